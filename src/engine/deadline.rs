//! Deadlines: `deadline = "45m"` — a scheduled run not succeeded within 45 minutes of its
//! nominal tick raises `deadline_missed` once (an event, a warning, a metric).
//!
//! Measured from the tick (`scheduled_for`), not from the start, so a late start counts.
//! Checked at every heartbeat over the runs of the recent ticks; a run is missed when its
//! tick plus the deadline has passed and it has not succeeded by then (running, waiting,
//! failed, timed out, aborted, or succeeded too late). Skipped runs (a calendar date, an
//! overlap, a misfire policy) and manual runs have no deadline. Once per run: the store
//! is asked for the run's `deadline_missed` before one is raised (so a restart raises
//! none again), and the engine remembers the runs it has raised or found in time.

use std::time::Duration;

use super::Engine;
use crate::model::{Instant, RunState, Trigger};
use crate::store::{RunFilter, RunRow};
use tracing::warn;

/// How far back, beyond the deadline, each heartbeat looks: runs whose deadline passed
/// longer ago than this were looked at by an earlier check.
const WINDOW: Duration = Duration::from_secs(3600);

/// How far back the first check after start-up looks: a deadline that passed while the
/// service was down is raised then.
const STARTUP_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Whether `run` has missed `deadline` at `now`, and how (for the event's text).
fn missed(run: &RunRow, deadline: chrono::TimeDelta, now: Instant) -> Option<String> {
    if !matches!(run.trigger, Trigger::Schedule | Trigger::Catchup) {
        return None;
    }
    let due = run.scheduled_for.checked_add_signed(deadline)?;
    if now < due {
        return None;
    }
    let how = match run.state {
        RunState::Skipped => return None,
        RunState::Succeeded => match run.finished_at {
            Some(finished) if finished <= due => return None,
            Some(finished) => format!("it succeeded only at {}", finished.to_rfc3339()),
            None => return None,
        },
        RunState::Queued if run.started_at.is_none() => "it has not started".to_string(),
        state => format!("it is {state}"),
    };
    Some(format!(
        "run {} of {} (tick {}) did not succeed within its deadline of {} (by {}): {how}",
        run.id,
        run.task,
        run.scheduled_for.to_rfc3339(),
        humantime::format_duration(deadline.to_std().unwrap_or_default()),
        due.to_rfc3339()
    ))
}

impl Engine {
    /// Raises `deadline_missed` for each scheduled run of a task with a `deadline` that
    /// has not succeeded within it of its tick, once per run.
    pub(super) fn check_deadlines(&mut self, now: Instant) {
        let config = self.config.clone();
        let window = if self.deadlines_checked {
            WINDOW
        } else {
            STARTUP_WINDOW
        };
        let mut still_in_window = std::collections::HashSet::new();
        for spec in config.tasks.values() {
            let Some(deadline) = spec.deadline else {
                continue;
            };
            let Ok(deadline) = chrono::TimeDelta::from_std(deadline) else {
                continue;
            };
            let back = chrono::TimeDelta::from_std(window).unwrap_or_default() + deadline;
            let filter = RunFilter {
                task: Some(spec.name.0.clone()),
                since: now.checked_sub_signed(back),
                limit: 100_000,
                ..RunFilter::default()
            };
            let runs = match self.store.runs(&filter) {
                Ok(runs) => runs,
                Err(err) => {
                    warn!(task = %spec.name, "cannot read runs for their deadline: {err}");
                    return;
                }
            };
            for run in runs {
                if self.deadlines_raised.contains(&run.id) {
                    still_in_window.insert(run.id);
                    continue;
                }
                let Some(message) = missed(&run, deadline, now) else {
                    continue;
                };
                // Raised once: by this process or another, before a restart or not.
                // Checked and written as one step: two instances (or this one after a
                // restart) never raise it twice for a run.
                let recorded = self.store.batch(|tx| {
                    let task = Some(spec.name.as_str());
                    if tx
                        .hold_events(&["deadline_missed"], task, Some(run.id))?
                        .is_some()
                    {
                        return Ok(None);
                    }
                    tx.record_event("deadline_missed", task, Some(run.id), &message, now)
                        .map(Some)
                });
                match recorded {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        self.deadlines_raised.insert(run.id);
                        still_in_window.insert(run.id);
                        continue;
                    }
                    Err(err) => {
                        warn!(run = %run.id, "cannot record deadline_missed: {err}");
                        continue;
                    }
                }
                warn!(task = %spec.name, run = %run.id, "deadline missed: {message}");
                self.metrics
                    .deadlines_missed
                    .with_label_values(&[spec.name.as_str()])
                    .inc();
                self.deadlines_raised.insert(run.id);
                still_in_window.insert(run.id);
            }
        }
        // Runs out of the window are not read again: forget them.
        self.deadlines_raised = still_in_window;
        self.deadlines_checked = true;
    }
}
