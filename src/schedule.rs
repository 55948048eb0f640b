//! Cron schedules in a time zone, and the misfire planner.
//!
//! A [`Schedule`] is a cron expression (5 fields, 6 with seconds, or an alias such as
//! `@daily`) evaluated by `croner` in an IANA time zone from `chrono-tz`. Every answer is a
//! UTC instant, and [`Schedule::next_after`] always moves forward in real time.
//!
//! DST follows the cronie / OCPS rule, which croner implements:
//! - a fixed-time job (`0 30 2 * * *`) whose wall time falls in the spring-forward gap runs
//!   once, at the first valid instant after the jump;
//! - in the fall-back hour a fixed-time job runs once, at the first pass;
//! - interval jobs (`*/15 * * * *`, a `*` in an hour/minute/second field) move in real
//!   time: no fire in the gap, both passes of the repeated hour.
//!
//! This module knows nothing of the store or the engine: it takes "now" as an argument,
//! which is how the tests inject the clock.
//!
//! ```
//! use chrono::{TimeZone, Utc};
//! let daily = turbosched::schedule::Schedule::parse("0 30 16 * * Mon-Fri", chrono_tz::America::New_York).unwrap();
//! let friday_noon = Utc.with_ymd_and_hms(2026, 11, 20, 17, 0, 0).unwrap();
//! // 16:30 New York on Friday is 21:30 UTC.
//! assert_eq!(daily.next_after(friday_noon).unwrap().to_rfc3339(), "2026-11-20T21:30:00+00:00");
//! ```

use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use hashlink::LruCache;

use crate::model::{Instant, Trigger};

mod describe;
pub use describe::describe;

/// A cron expression that failed to parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid cron expression {expr:?}: {reason}")]
pub struct ScheduleError {
    expr: String,
    reason: String,
}

/// A cron expression bound to a time zone; compiled on demand ([`compiled`]).
#[derive(Debug, Clone)]
pub struct Schedule {
    expr: String,
    tz: Tz,
}

/// How many compiled expressions the process keeps ([`compiled`]).
pub const COMPILED_CAP: usize = 64;

/// Compiled expressions, shared and bounded, the most recently used kept: a
/// `croner::Cron` holds a lookup table per field — its years' alone one byte for each of
/// the years 1–5000 — about 5 KB in all. A thousand tasks on one expression share one;
/// ten thousand tasks at staggered times (distinct expressions) would have held 50 MB for
/// good, one each. An expression not among the [`COMPILED_CAP`] kept is compiled again
/// when next asked (microseconds; an hourly task's, once an hour).
fn compiled(expr: &str) -> Result<Arc<Cron>, croner::errors::CronError> {
    let mut compiled = COMPILED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(cron) = compiled.get(expr) {
        return Ok(cron.clone());
    }
    let cron = Arc::new(
        CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(expr)?,
    );
    compiled.insert(expr.into(), cron.clone());
    Ok(cron)
}

static COMPILED: LazyLock<Mutex<LruCache<Box<str>, Arc<Cron>>>> =
    LazyLock::new(|| Mutex::new(LruCache::new(COMPILED_CAP)));

/// How many compiled expressions the process holds now (at most [`COMPILED_CAP`]).
pub fn compiled_count() -> usize {
    COMPILED.lock().unwrap_or_else(|p| p.into_inner()).len()
}

/// The aliases croner knows (any case).
const ALIASES: &[&str] = &[
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@hourly",
];

/// One field of a cron expression: its name in messages, its range and its names.
struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    /// `JAN`…`DEC` or `SUN`…`SAT`, numbered from `min` (months) or 0 (weekdays).
    words: &'static [&'static str],
    /// What the message says is expected.
    expected: &'static str,
    /// Letters croner reads in this field (`L`, `W`, `#`, `?`): a part with one of them is
    /// left to croner.
    special: &'static [char],
}

const SECOND: Field = Field {
    name: "second",
    min: 0,
    max: 59,
    words: &[],
    expected: "0–59",
    special: &[],
};
const MINUTE: Field = Field {
    name: "minute",
    ..SECOND
};
const HOUR: Field = Field {
    name: "hour",
    max: 23,
    expected: "0–23",
    ..SECOND
};
const DAY_OF_MONTH: Field = Field {
    name: "day of month",
    min: 1,
    max: 31,
    words: &[],
    expected: "1–31",
    special: &['L', 'W', '?'],
};
const MONTH: Field = Field {
    name: "month",
    min: 1,
    max: 12,
    words: &[
        "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
    ],
    expected: "1–12 or JAN–DEC",
    special: &[],
};
const DAY_OF_WEEK: Field = Field {
    name: "day of week",
    min: 0,
    max: 7,
    words: &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"],
    expected: "0–7 (0 and 7 are Sunday) or SUN–SAT",
    special: &['L', '#', '?'],
};

/// Why croner refused `expr`, naming the field, its range and what was found:
/// `minute field "61": expected 0–59, found 61`. `None` when no field check finds the
/// fault (croner's own message is then used).
fn explain_refusal(expr: &str) -> Option<String> {
    if expr.starts_with('@') {
        return (!ALIASES.iter().any(|alias| alias.eq_ignore_ascii_case(expr)))
            .then(|| format!("unknown alias {expr:?} (known: {})", ALIASES.join(", ")));
    }
    let parts: Vec<&str> = expr.split_whitespace().collect();
    let fields: &[Field] = match parts.len() {
        5 => &[MINUTE, HOUR, DAY_OF_MONTH, MONTH, DAY_OF_WEEK],
        6 => &[SECOND, MINUTE, HOUR, DAY_OF_MONTH, MONTH, DAY_OF_WEEK],
        _ => return None,
    };
    parts.iter().zip(fields).find_map(|(text, field)| {
        check_field(field, text).map(|found| format!("{} field {text:?}: {found}", field.name))
    })
}

/// What is wrong with one field's text (`expected …, found …`), if a check can tell.
fn check_field(field: &Field, text: &str) -> Option<String> {
    for part in text.split(',') {
        if part.contains(field.special) {
            continue;
        }
        let (base, step) = match part.split_once('/') {
            Some((base, step)) => (base, Some(step)),
            None => (part, None),
        };
        if let Some(step) = step {
            match step.parse::<u32>() {
                Ok(0) => return Some("expected a step of at least 1, found 0".into()),
                Ok(_) => {}
                Err(_) => return Some(format!("expected a whole-number step, found {step:?}")),
            }
        }
        if base == "*" {
            continue;
        }
        let ends = match base.split_once('-') {
            Some((from, to)) if !from.is_empty() => vec![from, to],
            _ => vec![base],
        };
        for end in ends {
            if let Some(found) = check_value(field, end) {
                return Some(format!("expected {}, found {found}", field.expected));
            }
        }
    }
    None
}

/// `Some(what was found)` when `text` is no value of `field`.
fn check_value(field: &Field, text: &str) -> Option<String> {
    if field
        .words
        .iter()
        .any(|word| word.eq_ignore_ascii_case(text))
    {
        return None;
    }
    match text.parse::<u32>() {
        Ok(number) if (field.min..=field.max).contains(&number) => None,
        Ok(number) => Some(number.to_string()),
        Err(_) => Some(format!("{text:?}")),
    }
}

impl Schedule {
    /// Compiles `expr` (5 or 6 fields, or `@hourly`, `@daily`, `@weekly`, `@monthly`,
    /// `@yearly`/`@annually`) for the zone `tz`.
    ///
    /// A seventh field (croner's year) is refused: the reference documents 5 or 6 fields,
    /// and a year in the past would make a schedule that never fires.
    pub fn parse(expr: &str, tz: Tz) -> Result<Schedule, ScheduleError> {
        let fields = expr.split_whitespace().count();
        if !expr.trim_start().starts_with('@') && !(5..=6).contains(&fields) {
            return Err(ScheduleError {
                expr: expr.to_string(),
                reason: format!(
                    "expected 5 or 6 fields (min hour dom month dow, or sec min hour dom month dow), found {fields}"
                ),
            });
        }
        // croner compiles; when it refuses, the field checks below say which field, its
        // range and what was found (croner's own text only if they find nothing).
        compiled(expr.trim()).map_err(|err| ScheduleError {
            expr: expr.to_string(),
            reason: explain_refusal(expr.trim()).unwrap_or_else(|| err.to_string().to_lowercase()),
        })?;
        Ok(Schedule {
            expr: expr.to_string(),
            tz,
        })
    }

    /// The compiled expression: [`Schedule::parse`] compiled it once, so it compiles
    /// again (`None` only if croner changed its mind, which it does not).
    fn cron(&self) -> Option<Arc<Cron>> {
        compiled(self.expr.trim()).ok()
    }

    /// The expression as written in the config.
    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// The zone the expression is read in.
    pub fn timezone(&self) -> Tz {
        self.tz
    }

    /// The first fire strictly after `after`, or `None` if the expression never fires
    /// again (e.g. a date that does not exist).
    pub fn next_after(&self, after: Instant) -> Option<Instant> {
        let local = after.with_timezone(&self.tz);
        self.cron()?
            .find_next_occurrence(&local, false)
            .ok()
            .map(|next| next.with_timezone(&Utc))
    }

    /// The ticks after `after`, in order (an iterator over [`Schedule::next_after`]).
    pub fn ticks_after(&self, after: Instant) -> impl Iterator<Item = Instant> + '_ {
        std::iter::successors(self.next_after(after), move |tick| self.next_after(*tick))
    }

    /// The latest fire at or before `at`, if any (used by the dependency check).
    pub fn latest_at_or_before(&self, at: Instant) -> Option<Instant> {
        let local = at.with_timezone(&self.tz);
        self.cron()?
            .find_previous_occurrence(&local, true)
            .ok()
            .map(|prev| prev.with_timezone(&Utc))
    }

    /// The next `count` fires after `after`, in the schedule's own zone.
    pub fn upcoming(&self, after: Instant, count: usize) -> Vec<DateTime<Tz>> {
        let mut out = Vec::with_capacity(count);
        let mut cursor = after;
        while out.len() < count {
            match self.next_after(cursor) {
                Some(next) => {
                    out.push(next.with_timezone(&self.tz));
                    cursor = next;
                }
                None => break,
            }
        }
        out
    }
}

/// What the task config says to do with ticks that were missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MisfirePolicy {
    /// One catch-up run for the latest missed tick within the grace.
    RunOnce,
    /// Each missed tick within the grace is recorded as a skipped run.
    Skip,
    /// Each missed tick within the grace runs (capped by [`CATCHUP_CAP`]).
    RunAll,
}

impl MisfirePolicy {
    /// Parses the config spelling.
    pub fn parse(text: &str) -> Option<MisfirePolicy> {
        match text {
            "run_once" => Some(MisfirePolicy::RunOnce),
            "skip" => Some(MisfirePolicy::Skip),
            "run_all" => Some(MisfirePolicy::RunAll),
            _ => None,
        }
    }

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            MisfirePolicy::RunOnce => "run_once",
            MisfirePolicy::Skip => "skip",
            MisfirePolicy::RunAll => "run_all",
        }
    }
}

/// At most this many missed ticks of one task are run (`run_all`) or recorded (`skip`)
/// in one catch-up; older ones are dropped and counted.
pub const CATCHUP_CAP: usize = 100;

/// What to do with one due tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TickAction {
    /// Claim and run it, with this trigger.
    Fire(Trigger),
    /// Claim it and record it as skipped (misfire policy `skip`).
    Skip,
}

/// The outcome of planning the due ticks of one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuePlan {
    /// Ticks to claim, oldest first.
    pub ticks: Vec<(Instant, TickAction)>,
    /// Missed ticks neither run nor recorded (older than the grace, over the cap, or
    /// covered by a `run_once` catch-up).
    pub dropped: usize,
    /// True when ticks older than the grace were passed over (not counted in `dropped`).
    pub older_than_grace: bool,
    /// The first tick after `now`: the next one to wait for.
    pub next: Option<Instant>,
}

impl DuePlan {
    /// The text of the `misfire` event for the ticks this plan neither runs nor records,
    /// or `None` when it drops none. It starts with the count, which
    /// [`dropped_in_misfire_event`] reads back (the tick accounting of `turbosched audit`).
    pub fn misfire_message(&self, policy: MisfirePolicy) -> Option<String> {
        (self.dropped > 0 || self.older_than_grace).then(|| {
            format!(
                "{} missed tick(s) not run under misfire policy {}{}",
                self.dropped,
                policy.as_str(),
                if self.older_than_grace {
                    ", and ticks older than misfire_grace"
                } else {
                    ""
                }
            )
        })
    }
}

/// What a `misfire` event's message says was dropped: the counted ticks, and whether
/// uncounted ticks older than the grace were passed over too.
pub fn dropped_in_misfire_event(message: &str) -> Option<(usize, bool)> {
    let (count, rest) = message.split_once(" missed tick(s) not run")?;
    Some((
        count.parse().ok()?,
        rest.contains("older than misfire_grace"),
    ))
}

/// Plans every tick of `schedule` from `first_due` (inclusive) up to `now`.
///
/// `at_startup` says whether the service is coming back from downtime: then every due
/// tick was missed. In the running loop only the latest due tick is on time (trigger
/// `schedule`); earlier ones were missed because the loop fell behind. Missed ticks follow
/// `policy` within `grace` of `now`; older ones are dropped.
pub fn plan_due(
    schedule: &Schedule,
    first_due: Instant,
    now: Instant,
    policy: MisfirePolicy,
    grace: Duration,
    at_startup: bool,
) -> DuePlan {
    let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
    let horizon = now
        .checked_sub_signed(grace)
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    let mut dropped = 0usize;
    // Ticks older than the grace are never enumerated: a long downtime of a per-second
    // task must not walk a day of ticks. They are reported by a flag instead of a count.
    let mut older_than_grace = false;
    let mut due: Vec<Instant> = Vec::new();
    let mut cursor = Some(first_due).filter(|first| *first <= now);
    if let Some(first) = cursor {
        if first < horizon {
            older_than_grace = true;
            cursor = schedule.next_after(horizon - chrono::Duration::microseconds(1));
        }
    }
    while let Some(tick) = cursor {
        if tick > now {
            break;
        }
        due.push(tick);
        if due.len() > CATCHUP_CAP + 1 {
            due.remove(0);
            dropped += 1;
        }
        cursor = schedule.next_after(tick);
    }
    let next = schedule.next_after(now);

    let (on_time, missed): (Option<Instant>, Vec<Instant>) = if at_startup {
        (None, due)
    } else {
        let mut missed = due;
        let last = missed.pop();
        (last, missed)
    };
    let mut ticks = Vec::new();
    match policy {
        MisfirePolicy::RunAll => {
            let keep = missed.len().min(CATCHUP_CAP);
            dropped += missed.len() - keep;
            for tick in &missed[missed.len() - keep..] {
                ticks.push((*tick, TickAction::Fire(Trigger::Catchup)));
            }
        }
        MisfirePolicy::Skip => {
            let keep = missed.len().min(CATCHUP_CAP);
            dropped += missed.len() - keep;
            for tick in &missed[missed.len() - keep..] {
                ticks.push((*tick, TickAction::Skip));
            }
        }
        MisfirePolicy::RunOnce => {
            if on_time.is_some() {
                // The on-time fire covers every earlier missed tick.
                dropped += missed.len();
            } else if let Some(last) = missed.last() {
                dropped += missed.len() - 1;
                ticks.push((*last, TickAction::Fire(Trigger::Catchup)));
            }
        }
    }
    if let Some(tick) = on_time {
        ticks.push((tick, TickAction::Fire(Trigger::Schedule)));
    }
    DuePlan {
        ticks,
        dropped,
        older_than_grace,
        next,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, NaiveDateTime, TimeZone, Timelike};

    fn zone(name: &str) -> Tz {
        name.parse().expect("known zone")
    }

    /// `expr` is refused with exactly `expected` after `invalid cron expression "<expr>": `.
    fn check_refused(expr: &str, expected: &str) {
        let err = Schedule::parse(expr, chrono_tz::UTC).expect_err("should be refused");
        assert_eq!(
            err.to_string(),
            format!("invalid cron expression {expr:?}: {expected}")
        );
    }

    #[test]
    fn a_value_out_of_range_names_its_field_and_the_range() {
        // Issue 15, item 9: croner said only "number out of bounds.".
        check_refused("61 * * * *", "minute field \"61\": expected 0–59, found 61");
        check_refused("0 24 * * *", "hour field \"24\": expected 0–23, found 24");
        check_refused(
            "0 0 0 * *",
            "day of month field \"0\": expected 1–31, found 0",
        );
        check_refused(
            "0 0 1 1-13 *",
            "month field \"1-13\": expected 1–12 or JAN–DEC, found 13",
        );
        check_refused(
            "0 0 * * 1,8",
            "day of week field \"1,8\": expected 0–7 (0 and 7 are Sunday) or SUN–SAT, found 8",
        );
        check_refused(
            "60 0 * * * *",
            "second field \"60\": expected 0–59, found 60",
        );
        check_refused(
            "0 60 * * * *",
            "minute field \"60\": expected 0–59, found 60",
        );
    }

    #[test]
    fn an_unknown_word_names_its_field_and_what_it_accepts() {
        // Issue 15, item 9: croner said "cronpattern contains illegal character 'm' in part 'mnd'".
        check_refused(
            "0 0 * * mnd",
            "day of week field \"mnd\": expected 0–7 (0 and 7 are Sunday) or SUN–SAT, found \"mnd\"",
        );
        check_refused(
            "0 0 1 jna *",
            "month field \"jna\": expected 1–12 or JAN–DEC, found \"jna\"",
        );
        check_refused(
            "x * * * *",
            "minute field \"x\": expected 0–59, found \"x\"",
        );
        check_refused(
            "*/0 * * * *",
            "minute field \"*/0\": expected a step of at least 1, found 0",
        );
        check_refused(
            "@dayly",
            "unknown alias \"@dayly\" (known: @yearly, @annually, @monthly, @weekly, @daily, @hourly)",
        );
    }

    #[test]
    fn what_croner_accepts_stays_accepted() {
        for expr in [
            "0 30 16 * * Mon-Fri",
            "*/15 * * * *",
            "0 0 L * *",
            "0 0 15W * *",
            "0 0 * * 5L",
            "0 0 * * 5#2",
            "0 0 ? * MON",
            "0 0 1 JAN,jul *",
            "0 0 * * 7",
            "@daily",
            "@Weekly",
            "0-30/10 * * * *",
        ] {
            Schedule::parse(expr, chrono_tz::UTC).unwrap_or_else(|err| panic!("{expr}: {err}"));
        }
    }

    /// Local wall time `2026-03-08T00:00` in `tz`, as UTC.
    /// More tasks on distinct expressions than the compiled cache holds: the cache stays
    /// bounded, and every schedule, its compiled form evicted long ago, still answers its
    /// own next and previous fire.
    #[test]
    fn schedules_on_more_distinct_expressions_than_the_cache_holds_all_answer_right() {
        let tz = zone("Europe/Paris");
        let count = COMPILED_CAP * 3;
        let schedules: Vec<(u32, u32, Schedule)> = (0..count as u32)
            .map(|i| {
                let (minute, hour) = (i % 60, (i / 60) % 24);
                let second = i / (60 * 24);
                let expr = format!("{second} {minute} {hour} * * *");
                (minute, hour, Schedule::parse(&expr, tz).expect("valid"))
            })
            .collect();
        assert!(compiled_count() <= COMPILED_CAP, "{}", compiled_count());
        let start = local(tz, "2026-03-09T23:59:59");
        for (minute, hour, schedule) in &schedules {
            let next = schedule
                .next_after(start)
                .expect("fires")
                .with_timezone(&tz);
            assert_eq!(
                (next.hour(), next.minute(), next.day()),
                (*hour, *minute, 10),
                "{}",
                schedule.expr()
            );
            let previous = schedule
                .latest_at_or_before(start)
                .expect("fired")
                .with_timezone(&tz);
            assert_eq!(
                (previous.hour(), previous.minute(), previous.day()),
                (*hour, *minute, 9)
            );
        }
        assert!(compiled_count() <= COMPILED_CAP, "{}", compiled_count());
    }

    fn local(tz: Tz, text: &str) -> Instant {
        let naive = NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M")
            .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S"))
            .expect("test time");
        tz.from_local_datetime(&naive)
            .earliest()
            .expect("unambiguous test start")
            .with_timezone(&Utc)
    }

    /// The spec helper: `expr` in `tz`, starting at local `start`, yields exactly `expected`
    /// (RFC 3339 with the zone's offset).
    fn check_fires(expr: &str, tz: &str, start: &str, expected: &[&str]) {
        let tz = zone(tz);
        let schedule = Schedule::parse(expr, tz).expect("valid cron");
        let got: Vec<String> = schedule
            .upcoming(local(tz, start), expected.len())
            .into_iter()
            .map(|t| t.format("%Y-%m-%dT%H:%M:%S%:z").to_string())
            .collect();
        let expected: Vec<String> = expected
            .iter()
            .map(|e| {
                if e.len() == 22 {
                    format!("{}:00{}", &e[..16], &e[16..])
                } else {
                    e.to_string()
                }
            })
            .collect();
        assert_eq!(got, expected, "{expr} in {tz} from {start}");
    }

    #[test]
    fn skipped_wall_time_fires_once_right_after_the_jump_new_york() {
        check_fires(
            "0 30 2 * * *",
            "America/New_York",
            "2026-03-08T00:00",
            &["2026-03-08T03:00-04:00", "2026-03-09T02:30-04:00"],
        );
    }

    #[test]
    fn repeated_wall_time_fires_once_in_the_fall_back_hour_new_york() {
        check_fires(
            "0 30 1 * * *",
            "America/New_York",
            "2026-11-01T00:00",
            &["2026-11-01T01:30-04:00", "2026-11-02T01:30-05:00"],
        );
    }

    #[test]
    fn skipped_wall_time_fires_once_right_after_the_jump_berlin() {
        check_fires(
            "0 30 2 * * *",
            "Europe/Berlin",
            "2026-03-29T00:00",
            &["2026-03-29T03:00+02:00", "2026-03-30T02:30+02:00"],
        );
    }

    #[test]
    fn repeated_wall_time_fires_once_in_the_fall_back_hour_berlin() {
        check_fires(
            "0 30 2 * * *",
            "Europe/Berlin",
            "2026-10-25T00:00",
            &["2026-10-25T02:30+02:00", "2026-10-26T02:30+01:00"],
        );
    }

    #[test]
    fn interval_job_has_no_fire_in_the_gap_and_moves_in_real_time() {
        // Every 30 minutes: 01:30 EST, then the clock jumps 02:00 → 03:00.
        check_fires(
            "*/30 * * * *",
            "America/New_York",
            "2026-03-08T01:00",
            &[
                "2026-03-08T01:30-05:00",
                "2026-03-08T03:00-04:00",
                "2026-03-08T03:30-04:00",
            ],
        );
    }

    #[test]
    fn interval_job_fires_in_both_passes_of_the_repeated_hour() {
        check_fires(
            "0 */30 1 * * *",
            "Europe/Berlin",
            "2026-10-25T00:00",
            &[
                "2026-10-25T01:00+02:00",
                "2026-10-25T01:30+02:00",
                "2026-10-26T01:00+01:00",
            ],
        );
        check_fires(
            "0 */30 * * * *",
            "Europe/Berlin",
            "2026-10-25T02:00",
            &[
                "2026-10-25T02:30+02:00",
                "2026-10-25T02:00+01:00",
                "2026-10-25T02:30+01:00",
                "2026-10-25T03:00+01:00",
            ],
        );
    }

    #[test]
    fn five_fields_six_fields_and_aliases_are_accepted() {
        check_fires(
            "@hourly",
            "UTC",
            "2026-01-01T00:10",
            &["2026-01-01T01:00+00:00"],
        );
        check_fires(
            "@daily",
            "UTC",
            "2026-01-01T00:10",
            &["2026-01-02T00:00+00:00"],
        );
        check_fires(
            "15 10 * * *",
            "UTC",
            "2026-01-01T00:00",
            &["2026-01-01T10:15+00:00"],
        );
        check_fires(
            "5 15 10 * * *",
            "UTC",
            "2026-01-01T00:00",
            &["2026-01-01T10:15:05+00:00"],
        );
        check_fires(
            "0 30 16 * * Mon-Fri",
            "America/New_York",
            "2026-11-20T17:00",
            &["2026-11-23T16:30-05:00"],
        );
    }

    #[test]
    fn bad_expressions_are_refused() {
        // A seventh field is a year to croner; the reference has none.
        for bad in [
            "61 * * * *",
            "* * *",
            "@fortnightly",
            "0 0 32 * *",
            "0 0 0 1 1 * 2099",
        ] {
            assert!(
                Schedule::parse(bad, chrono_tz::UTC).is_err(),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn next_after_a_sub_second_instant_is_the_next_whole_second() {
        let every_second = Schedule::parse("* * * * * *", chrono_tz::UTC).unwrap();
        let at = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
            + chrono::Duration::milliseconds(500);
        assert_eq!(
            every_second.next_after(at),
            Some(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 1).unwrap())
        );
        let on_tick = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 1).unwrap();
        assert_eq!(
            every_second.next_after(on_tick),
            Some(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 2).unwrap())
        );
    }

    fn minutely() -> Schedule {
        Schedule::parse("0 * * * * *", chrono_tz::UTC).unwrap()
    }

    fn t(h: u32, m: u32) -> Instant {
        Utc.with_ymd_and_hms(2026, 5, 1, h, m, 0).unwrap()
    }

    #[test]
    fn downtime_with_run_once_runs_the_latest_missed_tick_once() {
        let plan = plan_due(
            &minutely(),
            t(10, 0),
            t(10, 5) + chrono::Duration::seconds(20),
            MisfirePolicy::RunOnce,
            Duration::from_secs(3600),
            true,
        );
        assert_eq!(
            plan.ticks,
            vec![(t(10, 5), TickAction::Fire(Trigger::Catchup))]
        );
        assert_eq!(plan.dropped, 5);
        assert_eq!(plan.next, Some(t(10, 6)));
    }

    #[test]
    fn downtime_with_run_all_runs_each_missed_tick_within_the_grace() {
        let plan = plan_due(
            &minutely(),
            t(10, 0),
            t(10, 5) + chrono::Duration::seconds(20),
            MisfirePolicy::RunAll,
            Duration::from_secs(150),
            true,
        );
        // Grace 2.5 min before 10:05:20 is 10:02:50: ticks 10:03, 10:04, 10:05.
        assert_eq!(
            plan.ticks,
            vec![
                (t(10, 3), TickAction::Fire(Trigger::Catchup)),
                (t(10, 4), TickAction::Fire(Trigger::Catchup)),
                (t(10, 5), TickAction::Fire(Trigger::Catchup)),
            ]
        );
        assert!(
            plan.older_than_grace,
            "ticks older than the grace are reported"
        );
        assert_eq!(plan.dropped, 0);
    }

    #[test]
    fn downtime_with_skip_records_each_missed_tick_as_skipped() {
        let plan = plan_due(
            &minutely(),
            t(10, 0),
            t(10, 2) + chrono::Duration::seconds(1),
            MisfirePolicy::Skip,
            Duration::from_secs(3600),
            true,
        );
        assert_eq!(
            plan.ticks,
            vec![
                (t(10, 0), TickAction::Skip),
                (t(10, 1), TickAction::Skip),
                (t(10, 2), TickAction::Skip)
            ]
        );
        assert_eq!(plan.dropped, 0);
    }

    #[test]
    fn run_all_is_capped() {
        let every_second = Schedule::parse("* * * * * *", chrono_tz::UTC).unwrap();
        let plan = plan_due(
            &every_second,
            t(10, 0),
            t(11, 0),
            MisfirePolicy::RunAll,
            Duration::from_secs(7200),
            true,
        );
        assert_eq!(plan.ticks.len(), CATCHUP_CAP);
        assert_eq!(plan.ticks.last().map(|x| x.0), Some(t(11, 0)));
        assert_eq!(plan.dropped, 3601 - CATCHUP_CAP);
    }

    #[test]
    fn in_the_loop_the_latest_due_tick_is_on_time() {
        let plan = plan_due(
            &minutely(),
            t(10, 0),
            t(10, 0) + chrono::Duration::milliseconds(3),
            MisfirePolicy::Skip,
            Duration::from_secs(3600),
            false,
        );
        assert_eq!(
            plan.ticks,
            vec![(t(10, 0), TickAction::Fire(Trigger::Schedule))]
        );
        assert_eq!(plan.next, Some(t(10, 1)));
    }

    #[test]
    fn nothing_due_yet_plans_nothing() {
        let plan = plan_due(
            &minutely(),
            t(10, 1),
            t(10, 0),
            MisfirePolicy::RunAll,
            Duration::from_secs(60),
            true,
        );
        assert!(plan.ticks.is_empty());
        assert_eq!(plan.dropped, 0);
        assert_eq!(plan.next, Some(t(10, 1)));
    }
}
