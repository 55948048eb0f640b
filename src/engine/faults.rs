//! Faults around the engine that it absorbs and reports: a store that cannot be written
//! and a wall clock that jumps.
//!
//! Promises:
//! - A tick that could not be claimed stays due: the engine does not advance a task's next
//!   fire past a tick the store has not recorded. While writes fail the engine retries
//!   every [`STORE_RETRY`], the board carries a [`StoreFault`] (so `/health` says
//!   `unhealthy`, with the error), and the first write that succeeds clears it; the missed
//!   ticks then meet the task's misfire policy like any other late tick.
//! - A wall clock that moves against the monotonic clock by more than [`STEP_TOLERANCE`]
//!   is a step. Stepped back: ticks already claimed are not run again (the claim key is
//!   the tick), and every schedule resumes at its first unclaimed tick after the new wall
//!   time (cronie's rule). Stepped forward: the skipped-over ticks are late ticks and
//!   meet each task's misfire policy. Either way the step is logged, recorded as a
//!   `clock_step` event and shown on the board; a backward step keeps `/health`
//!   `degraded` until the wall clock is back where it was before the step.

use std::time::Duration;

use tracing::{info, warn};

use crate::model::Instant;
use crate::store::StoreError;

/// How long the engine waits before it tries again to claim ticks the store refused.
pub(super) const STORE_RETRY: Duration = Duration::from_millis(500);

/// A difference between wall-clock and monotonic progress larger than this is a step.
/// NTP slews at most 500 ppm: a second is far beyond any slew between two wakes.
pub(super) const STEP_TOLERANCE: chrono::TimeDelta = chrono::TimeDelta::seconds(1);

/// The store refused a write the engine needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreFault {
    /// The first refusal of this outage.
    pub since: Instant,
    /// What the engine was doing (`claiming 3 due tick(s)`).
    pub doing: String,
    /// The store's error.
    pub error: String,
}

/// The wall clock jumped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClockStep {
    /// The wall time after the step.
    pub at: Instant,
    /// Wall time minus where the monotonic clock says it should be: negative when the
    /// clock was stepped back.
    pub by: chrono::TimeDelta,
    /// The wall time the clock had reached before the step; a backward step's repeated
    /// interval ends here.
    pub until: Instant,
}

impl ClockStep {
    /// A human reading: "stepped back 10m" / "stepped forward 1h".
    pub fn describe(&self) -> String {
        let size =
            humantime::format_duration(Duration::from_secs(self.by.num_seconds().unsigned_abs()));
        let way = if self.by < chrono::TimeDelta::zero() {
            "back"
        } else {
            "forward"
        };
        format!(
            "wall clock stepped {way} {size} at {}",
            self.at.to_rfc3339()
        )
    }

    /// True for a backward step whose repeated interval is not over at `now`.
    pub fn repeating(&self, now: Instant) -> bool {
        self.by < chrono::TimeDelta::zero() && now < self.until
    }
}

/// Watches the wall clock against the monotonic clock.
#[derive(Debug)]
pub(super) struct WallWatch {
    wall: Instant,
    mono: std::time::Instant,
}

impl WallWatch {
    /// Starts watching from `wall`, read now.
    pub(super) fn new(wall: Instant) -> WallWatch {
        WallWatch {
            wall,
            mono: std::time::Instant::now(),
        }
    }

    /// Reads `wall` (the clock's answer now) and returns the step since the last reading,
    /// if the two clocks disagree by more than [`STEP_TOLERANCE`].
    pub(super) fn observe(&mut self, wall: Instant) -> Option<ClockStep> {
        let mono = std::time::Instant::now();
        let elapsed = chrono::TimeDelta::from_std(mono - self.mono).unwrap_or_default();
        let expected = self.wall + elapsed;
        let by = wall - expected;
        self.wall = wall;
        self.mono = mono;
        (by.abs() > STEP_TOLERANCE).then_some(ClockStep {
            at: wall,
            by,
            until: expected,
        })
    }
}

impl super::Engine {
    /// The store refused a write: remembered (and shown on the board) until one succeeds.
    pub(super) fn store_failed(&mut self, doing: &str, err: &StoreError, now: Instant) {
        match &mut self.store_fault {
            Some(fault) => {
                warn!("store still refuses writes ({doing}): {err}");
                fault.doing = doing.to_string();
                fault.error = err.to_string();
            }
            None => {
                tracing::error!(
                    "store refuses writes ({doing}): {err}; due ticks stay due until it takes them"
                );
                self.store_fault = Some(StoreFault {
                    since: now,
                    doing: doing.to_string(),
                    error: err.to_string(),
                });
            }
        }
        self.dirty = true;
    }

    /// A write succeeded: an outage, if there was one, is over and is put on record.
    pub(super) fn store_ok(&mut self, now: Instant) {
        let Some(fault) = self.store_fault.take() else {
            return;
        };
        let lasted = humantime::format_duration(Duration::from_secs(
            (now - fault.since).num_seconds().max(0) as u64,
        ));
        let message = format!(
            "the store refused writes for {lasted} (since {}; last: {}: {}); ticks due meanwhile met their misfire policy",
            fault.since.to_rfc3339(),
            fault.doing,
            fault.error
        );
        info!("{message}");
        self.log_event("store_recovered", None, None, &message, now);
        self.dirty = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wall_clock_that_keeps_pace_is_no_step_and_one_that_jumps_is() {
        let start = chrono::Utc::now();
        let mut watch = WallWatch::new(start);
        assert_eq!(
            watch.observe(start + chrono::TimeDelta::milliseconds(5)),
            None
        );
        let back = watch
            .observe(start - chrono::TimeDelta::minutes(10))
            .expect("a step back");
        assert!(back.by < -chrono::TimeDelta::minutes(9));
        assert!(back.repeating(start - chrono::TimeDelta::minutes(5)));
        assert!(!back.repeating(back.until + chrono::TimeDelta::seconds(1)));
        assert!(back.describe().starts_with("wall clock stepped back 10m"));
        let forward = watch
            .observe(start + chrono::TimeDelta::hours(1))
            .expect("a step forward");
        assert!(forward.by > chrono::TimeDelta::minutes(69));
        assert!(!forward.repeating(forward.at));
    }
}
