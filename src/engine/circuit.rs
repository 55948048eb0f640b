//! The circuit breaker: `max_consecutive_failures = N` pauses a task's schedule once N of
//! its runs in a row have failed, and says why (`circuit_opened`); `resume` closes it
//! (`circuit_closed`) and starts the count again.
//!
//! What counts: a run that ended `failed` or `timed_out` (after its retries: one run is
//! one failure, whatever its attempts). A `succeeded` run ends the streak. `skipped` and
//! `aborted` runs (an operator's or a policy's doing, not the task's) neither count nor
//! end it. The count is read from the store's history (the newest runs, back to the
//! last `circuit_closed` event), so it survives restarts and is the same on every
//! instance of a cluster. Manual runs count too, and still run while the circuit is open.

use super::Engine;
use crate::model::{Instant, RunState, TaskName};
use crate::store::{EventRow, RunFilter, Store, StoreError};
use tracing::{info, warn};

/// The events that say whether a paused task's circuit is open: the newest one decides.
const CIRCUIT_EVENTS: &[&str] = &[
    "circuit_opened",
    "circuit_closed",
    "task_paused",
    "task_resumed",
];

/// The events that say whether a circuit opened since it was last closed: the newest one
/// decides (a pause or resume of the operator's aside, `circuit_opened` is open).
const OPENING_EVENTS: &[&str] = &["circuit_opened", "circuit_closed", "task_resumed"];

/// The `circuit_opened` event of `task` when its circuit is open now (the task is paused
/// and the newest pause-related event is that one), else `None`. What the CLI and the API
/// read to tell a manual trigger that the schedule is paused by the breaker.
pub fn open_circuit(store: &Store, task: &str) -> Result<Option<EventRow>, StoreError> {
    if !store.task_state(&TaskName(task.to_string()))?.paused {
        return Ok(None);
    }
    Ok(store
        .latest_event(CIRCUIT_EVENTS, Some(task), None)?
        .filter(|event| event.kind == "circuit_opened"))
}

/// How many of `task`'s newest runs failed in a row (stopping at `limit`), counting only
/// runs that ended after the task's last `circuit_closed`.
fn consecutive_failures(store: &Store, task: &TaskName, limit: u32) -> Result<u32, StoreError> {
    let closed = store
        .latest_event(&["circuit_closed"], Some(task.as_str()), None)?
        .map(|event| event.at);
    let runs = store.runs(&RunFilter {
        task: Some(task.0.clone()),
        // Skipped and aborted runs may sit between the failures.
        limit: (limit as usize).saturating_mul(4).max(100),
        ..RunFilter::default()
    })?;
    let mut failures = 0;
    for run in runs {
        match run.state {
            RunState::Succeeded => break,
            RunState::Failed | RunState::TimedOut => {
                let before_close = match (closed, run.finished_at) {
                    (Some(closed), Some(finished)) => finished <= closed,
                    _ => false,
                };
                if before_close {
                    break;
                }
                failures += 1;
                if failures >= limit {
                    break;
                }
            }
            _ => {}
        }
    }
    Ok(failures)
}

impl Engine {
    /// After a run of `task` ended in `state`: opens the task's circuit when this made
    /// `max_consecutive_failures` failures in a row.
    pub(super) fn check_circuit(&mut self, task: &TaskName, state: RunState, now: Instant) {
        if !matches!(state, RunState::Failed | RunState::TimedOut) {
            return;
        }
        let Some(limit) = self
            .config
            .tasks
            .get(task)
            .and_then(|spec| spec.max_consecutive_failures)
        else {
            return;
        };
        if self.paused.contains(task.as_str()) {
            return;
        }
        let failures = match consecutive_failures(&self.store, task, limit) {
            Ok(failures) => failures,
            Err(err) => {
                warn!(task = %task, "cannot count the task's failures in a row: {err}");
                return;
            }
        };
        if failures < limit {
            return;
        }
        let message = format!(
            "circuit opened: {failures} runs in a row failed (max_consecutive_failures = {limit}); \
             the schedule is paused until `turbosched resume {task}` (manual runs still work)"
        );
        // Opened once: another instance finishing a failed run of the task at the same
        // instant finds the circuit open already and writes nothing.
        let written = self.store.batch(|tx| {
            let newest = tx.hold_events(OPENING_EVENTS, Some(task.as_str()), None)?;
            if newest.as_deref() == Some("circuit_opened") {
                return Ok(false);
            }
            tx.set_paused(task, true, now)?;
            tx.record_event("circuit_opened", Some(task.as_str()), None, &message, now)?;
            Ok(true)
        });
        match written {
            Ok(false) => {
                self.paused.insert(task.as_str().to_string());
                self.circuits.insert(task.as_str().to_string());
                self.dirty = true;
            }
            Ok(true) => {
                warn!(task = %task, "{message}");
                self.paused.insert(task.as_str().to_string());
                self.circuits.insert(task.as_str().to_string());
                self.metrics
                    .circuits_opened
                    .with_label_values(&[task.as_str()])
                    .inc();
                self.dirty = true;
                self.board.touch();
            }
            Err(err) => warn!(task = %task, "cannot open the task's circuit: {err}"),
        }
    }

    /// Resuming `task`: when its circuit is open (here or as another instance opened
    /// it), the resume closes it — one transaction with the `circuit_closed` event, from
    /// which the count starts again. Returns whether it did.
    pub(super) fn close_circuit(
        &mut self,
        task: &TaskName,
        now: Instant,
    ) -> Result<bool, StoreError> {
        if open_circuit(&self.store, task.as_str())?.is_none() {
            self.circuits.remove(task.as_str());
            return Ok(false);
        }
        let message = format!(
            "circuit closed by resume: the count of {task}'s failures in a row starts again"
        );
        self.store.batch(|tx| {
            tx.set_paused(task, false, now)?;
            tx.record_event("circuit_closed", Some(task.as_str()), None, &message, now)?;
            Ok(())
        })?;
        info!(task = %task, "{message}");
        self.circuits.remove(task.as_str());
        Ok(true)
    }

    /// Start-up: which paused tasks are paused by their circuit.
    pub(super) fn seed_circuits(&mut self) {
        self.circuits.clear();
        for task in self.paused.clone() {
            match open_circuit(&self.store, &task) {
                Ok(Some(_)) => {
                    self.circuits.insert(task);
                }
                Ok(None) => {}
                Err(err) => warn!(task = %task, "cannot read the task's circuit: {err}"),
            }
        }
    }
}
