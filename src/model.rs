//! The vocabulary shared by every module: run ids, task names, attempts, nominal
//! times, run states and triggers.
//!
//! These are newtypes so that a signature says what it takes (`fn get_run(RunId)`), and
//! the legal moves between run states live here, next to the states themselves, in
//! [`RunState::can_become`]. None of these types derive `Serialize`: the edges (CLI JSON,
//! the worker pipe) convert them by hand.

use std::fmt;

use chrono::{DateTime, TimeZone, Utc};

/// The database id of one run (one fire of one task, with all its attempts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunId(pub i64);

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A task's name as written under `[tasks.<name>]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskName(pub String);

impl TaskName {
    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TaskName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl From<&str> for TaskName {
    fn from(name: &str) -> Self {
        TaskName(name.to_string())
    }
}

/// The number of an attempt within a run, starting at 1. Zero means "not started yet".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Attempt(pub u32);

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A UTC instant with microsecond precision, as stored in the database.
pub type Instant = DateTime<Utc>;

/// Microseconds since the Unix epoch: the storage form of every instant.
pub fn to_micros(at: Instant) -> i64 {
    at.timestamp_micros()
}

/// The inverse of [`to_micros`]; out-of-range values clamp to the epoch.
pub fn from_micros(micros: i64) -> Instant {
    Utc.timestamp_micros(micros).single().unwrap_or_default()
}

/// Where a run stands. See DESIGN.md "Run states" and [`RunState::can_become`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunState {
    /// Claimed and waiting for a worker slot (or for its dependency check).
    Queued,
    /// An attempt is running in a child process.
    Running,
    /// An attempt failed or timed out and the next one waits for its backoff.
    RetryWait,
    /// The owner of a running attempt vanished; about to be retried or failed.
    Orphaned,
    /// Terminal: the last attempt succeeded.
    Succeeded,
    /// Terminal: the last attempt failed and no attempts remain (or it failed fatally).
    Failed,
    /// Terminal: the last attempt ran past its timeout and no attempts remain.
    TimedOut,
    /// Terminal: stopped on request; never retried.
    Aborted,
    /// Terminal: never started (dependency not satisfied, overlap or misfire policy).
    Skipped,
}

impl RunState {
    /// Every state, for listings and round-trip tests.
    pub const ALL: [RunState; 9] = [
        RunState::Queued,
        RunState::Running,
        RunState::RetryWait,
        RunState::Orphaned,
        RunState::Succeeded,
        RunState::Failed,
        RunState::TimedOut,
        RunState::Aborted,
        RunState::Skipped,
    ];

    /// The table of legal moves. `store::transition` refuses every other one.
    ///
    /// `running → queued` is the one move DESIGN.md does not draw: an attempt cut short by
    /// a graceful shutdown goes back to the queue without using up a retry.
    pub fn can_become(self, next: RunState) -> bool {
        use RunState::*;
        matches!(
            (self, next),
            (Queued, Running | Skipped | Aborted | Failed)
                | (
                    Running,
                    Succeeded | Failed | TimedOut | Aborted | Orphaned | RetryWait | Queued
                )
                | (RetryWait, Running | Aborted)
                | (Orphaned, Queued | Failed)
        )
    }

    /// True for the five states a run never leaves.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunState::Succeeded
                | RunState::Failed
                | RunState::TimedOut
                | RunState::Aborted
                | RunState::Skipped
        )
    }

    /// The stored and printed name, e.g. `timed_out`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Queued => "queued",
            RunState::Running => "running",
            RunState::RetryWait => "retry_wait",
            RunState::Orphaned => "orphaned",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::TimedOut => "timed_out",
            RunState::Aborted => "aborted",
            RunState::Skipped => "skipped",
        }
    }

    /// Parses a stored or user-given name.
    pub fn parse(text: &str) -> Option<RunState> {
        RunState::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
    }

    /// Every name, comma-separated, for "expected one of …" messages.
    pub fn names() -> String {
        RunState::ALL.map(RunState::as_str).join(", ")
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// What caused a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Trigger {
    /// A cron tick, fired on time.
    Schedule,
    /// A person or script: CLI `run`, or the API.
    Manual,
    /// A tick missed while the service was down, run under the task's misfire policy.
    Catchup,
    /// An upstream run that succeeded with `--downstream`.
    Downstream,
    /// An explicit retry of a finished run.
    Retry,
    /// Asked for by a finished run's result (`request_runs`), e.g. the drift task asking
    /// for a retraining, or that retraining asking for predictions from the model it
    /// promoted.
    Drift,
    /// A past tick queued by `turbosched backfill`, under the same claim as a scheduled
    /// tick: a tick that already ran is not run again.
    Backfill,
}

impl Trigger {
    /// Every trigger.
    pub const ALL: [Trigger; 7] = [
        Trigger::Schedule,
        Trigger::Manual,
        Trigger::Catchup,
        Trigger::Downstream,
        Trigger::Retry,
        Trigger::Drift,
        Trigger::Backfill,
    ];

    /// The stored and printed name.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::Manual => "manual",
            Trigger::Catchup => "catchup",
            Trigger::Downstream => "downstream",
            Trigger::Retry => "retry",
            Trigger::Drift => "drift",
            Trigger::Backfill => "backfill",
        }
    }

    /// A tick of the schedule, claimed once per (task, tick): run outside the task's
    /// overlap policy (the ticks run one at a time, in order).
    pub fn is_tick(self) -> bool {
        matches!(
            self,
            Trigger::Schedule | Trigger::Catchup | Trigger::Backfill
        )
    }

    /// Parses a stored name.
    pub fn parse(text: &str) -> Option<Trigger> {
        Trigger::ALL.into_iter().find(|t| t.as_str() == text)
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_have_no_way_out() {
        for from in RunState::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in RunState::ALL {
                assert!(!from.can_become(to), "{from} -> {to} must be illegal");
            }
        }
    }

    #[test]
    fn state_and_trigger_names_round_trip() {
        for state in RunState::ALL {
            assert_eq!(RunState::parse(state.as_str()), Some(state));
        }
        for trigger in Trigger::ALL {
            assert_eq!(Trigger::parse(trigger.as_str()), Some(trigger));
        }
    }

    #[test]
    fn micros_round_trip() {
        let at = Utc.with_ymd_and_hms(2026, 3, 8, 7, 0, 0).unwrap()
            + chrono::Duration::microseconds(123_456);
        assert_eq!(from_micros(to_micros(at)), at);
    }
}
