//! Every time turbosched prints, written in one place, by one convention:
//!
//! - **JSON** (the API, `--json`, server-sent events): RFC 3339 in UTC with the offset
//!   written out, `+00:00`, and microseconds — `2026-12-02T16:30:00.000000+00:00` —
//!   for every field, whatever zone a schedule is in ([`json`]). One form sorts as text
//!   and needs no zone table to read; the zone names are fields of their own
//!   (`scheduler.timezone`, a task's `timezone`).
//! - **People** (`status`, `runs`, `show`, `next`, `run`): in a named zone, its
//!   abbreviation beside every time — `2026-12-02 11:30:00 EST` ([`Shown`]): the
//!   scheduler's zone (`[scheduler] timezone`) by default, UTC with the global `--utc`.
//!
//! Log files keep their own stamp (`[2026-12-02T16:30:00.000000Z]`, UTC): a record
//! written before any config is read.

use chrono::{DateTime, SecondsFormat, TimeZone};
use chrono_tz::Tz;

use crate::model::Instant;

/// `at` for JSON: RFC 3339, UTC, `+00:00`, microseconds.
pub fn json(at: Instant) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, false)
}

/// [`json`] of an instant held in another zone (a schedule's tick): the same instant,
/// written in UTC.
pub fn json_of<Z: TimeZone>(at: &DateTime<Z>) -> String {
    json(at.with_timezone(&chrono::Utc))
}

/// The zone times are shown to people in, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shown {
    zone: Tz,
}

impl Shown {
    /// Times in `zone` (the scheduler's).
    pub fn in_zone(zone: Tz) -> Shown {
        Shown { zone }
    }

    /// Times in UTC (`--utc`).
    pub fn utc() -> Shown {
        Shown { zone: Tz::UTC }
    }

    /// The zone's name (`America/New_York`, `UTC`).
    pub fn zone_name(&self) -> &'static str {
        self.zone.name()
    }

    /// `2026-12-02 11:30:00 EST`.
    pub fn at(&self, at: Instant) -> String {
        at.with_timezone(&self.zone)
            .format("%Y-%m-%d %H:%M:%S %Z")
            .to_string()
    }

    /// `2026-12-02 11:30:00.123 EST`: a run's record, to the millisecond.
    pub fn precise(&self, at: Instant) -> String {
        at.with_timezone(&self.zone)
            .format("%Y-%m-%d %H:%M:%S%.3f %Z")
            .to_string()
    }

    /// `11:30:00 EST`: a line of progress.
    pub fn clock(&self, at: Instant) -> String {
        at.with_timezone(&self.zone)
            .format("%H:%M:%S %Z")
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn at(text: &str) -> Instant {
        DateTime::parse_from_rfc3339(text)
            .expect("test instant")
            .with_timezone(&Utc)
    }

    #[test]
    fn json_times_are_utc_with_the_offset_written_out() {
        assert_eq!(
            json(at("2026-07-01T12:00:00.5-04:00")),
            "2026-07-01T16:00:00.500000+00:00"
        );
        let tick = at("2026-12-02T21:30:00Z").with_timezone(&chrono_tz::America::New_York);
        assert_eq!(json_of(&tick), "2026-12-02T21:30:00.000000+00:00");
    }

    #[test]
    fn people_see_the_zone_abbreviation_beside_every_time() {
        let new_york = Shown::in_zone(chrono_tz::America::New_York);
        assert_eq!(
            new_york.at(at("2026-12-02T21:30:00Z")),
            "2026-12-02 16:30:00 EST"
        );
        assert_eq!(
            new_york.at(at("2026-07-01T20:30:00Z")),
            "2026-07-01 16:30:00 EDT"
        );
        assert_eq!(
            Shown::utc().precise(at("2026-07-01T20:30:00.25Z")),
            "2026-07-01 20:30:00.250 UTC"
        );
        assert_eq!(
            Shown::utc().clock(at("2026-07-01T20:30:00Z")),
            "20:30:00 UTC"
        );
        assert_eq!(new_york.zone_name(), "America/New_York");
    }
}
