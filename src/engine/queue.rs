//! The waiting queue: a new run is admitted under its task's overlap policy (catch-ups
//! outside it), waits in FIFO order, and a waiting run that will not start is ended here.

use std::collections::VecDeque;

use super::{blocking, Engine};
use crate::config::Overlap;
use crate::model::{Attempt, Instant, RunId, RunState, TaskName, Trigger};
use crate::runner::StopReason;
use crate::store::{Change, Move, NewRun, RunRow};
use crate::tasklog::Level;
use tracing::{info, warn};

#[derive(Debug, Clone)]
pub(super) struct Pending {
    pub(super) run: RunId,
    pub(super) task: TaskName,
    pub(super) attempt: Attempt,
    pub(super) max_attempts: u32,
    pub(super) state: RunState,
    pub(super) force: bool,
    pub(super) cascade: Option<RunId>,
    pub(super) trigger: Trigger,
    pub(super) scheduled_for: Instant,
    pub(super) first_started_at: Option<Instant>,
    /// The run's own params (JSON object text), merged over the task's at start.
    pub(super) params: Option<String>,
}

impl Pending {
    pub(super) fn from_row(row: &RunRow) -> Pending {
        Pending {
            run: row.id,
            task: row.task.clone(),
            attempt: row.attempt,
            max_attempts: row.max_attempts,
            state: row.state,
            force: row.force,
            cascade: row.cascade,
            trigger: row.trigger,
            scheduled_for: row.scheduled_for,
            first_started_at: row.started_at,
            params: row.params.clone(),
        }
    }

    pub(super) fn new_run(run: RunId, new_run: &NewRun) -> Pending {
        Pending {
            run,
            task: new_run.task.clone(),
            attempt: Attempt(0),
            max_attempts: new_run.max_attempts.max(1),
            state: RunState::Queued,
            force: new_run.force,
            cascade: new_run.cascade.or(new_run.downstream.then_some(run)),
            trigger: new_run.trigger,
            scheduled_for: new_run.scheduled_for,
            first_started_at: None,
            params: new_run.params.clone(),
        }
    }
}

impl Engine {
    pub(super) fn queue_push(&mut self, pending: Pending) {
        self.dirty = true;
        *self
            .queued_per_task
            .entry(pending.task.clone())
            .or_default() += 1;
        self.queue.push_back(pending);
    }

    /// Keeps only the queued runs `keep` says yes to; returns the others.
    pub(super) fn queue_retain(&mut self, mut keep: impl FnMut(&Pending) -> bool) -> Vec<Pending> {
        let (kept, removed): (VecDeque<Pending>, VecDeque<Pending>) =
            self.queue.drain(..).partition(|p| keep(p));
        self.queue = kept;
        self.dirty |= !removed.is_empty();
        for pending in &removed {
            self.uncount_queued(&pending.task);
        }
        removed.into()
    }

    pub(super) fn uncount_queued(&mut self, task: &TaskName) {
        if let Some(count) = self.queued_per_task.get_mut(task) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.queued_per_task.remove(task);
            }
        }
    }

    /// Applies the task's overlap policy to a new queued run.
    pub(super) fn admit(&mut self, pending: Pending, now: Instant) {
        let config = self.config.clone();
        let Some(spec) = config.tasks.get(&pending.task) else {
            self.fail_unconfigured(&pending, now);
            return;
        };
        if self.running.contains_key(&pending.run)
            || self.queue.iter().any(|p| p.run == pending.run)
        {
            return;
        }
        // A catch-up is never refused, replaced or made to refuse by the task's overlap
        // policy: the missed ticks of `misfire = "run_all"` all run, in tick order, one at
        // a time (dispatch starts one attempt per task). The policy decides only between
        // the task's other runs.
        if matches!(pending.trigger, Trigger::Catchup | Trigger::Backfill) {
            self.queue_push(pending);
            return;
        }
        if spec.overlap == Overlap::Skip {
            if let Some(reason) = self.overlap_skip_reason(&pending.task) {
                self.skip(&pending, &reason, now);
                return;
            }
        }
        let running = self.running_of(&pending.task);
        match spec.overlap {
            // An older run admitted late (adopted from another instance's queue) while a
            // newer one of its task runs or waits here: the older one is the replaced one.
            Overlap::Replace
                if running.is_some_and(|run| run > pending.run)
                    || self.queue.iter().any(|p| {
                        p.task == pending.task
                            && !matches!(p.trigger, Trigger::Catchup | Trigger::Backfill)
                            && p.run > pending.run
                    }) =>
            {
                let newer = running
                    .into_iter()
                    .chain(
                        self.queue
                            .iter()
                            .filter(|p| p.task == pending.task)
                            .map(|p| p.run),
                    )
                    .max()
                    .unwrap_or(pending.run);
                let change = Change {
                    reason: Some(format!("replaced by run {newer}")),
                    ..Change::default()
                };
                self.end_waiting_run(&pending, RunState::Aborted, Some(&change), now);
            }
            Overlap::Replace => {
                let reason = format!("replaced by run {}", pending.run);
                if let Some(run) = running {
                    self.stop_run(run, StopReason::Abort, &reason);
                }
                let task = pending.task.clone();
                for old in self.queue_retain(|p| {
                    p.task != task || matches!(p.trigger, Trigger::Catchup | Trigger::Backfill)
                }) {
                    let change = Change {
                        reason: Some(reason.clone()),
                        ..Change::default()
                    };
                    self.end_waiting_run(&old, RunState::Aborted, Some(&change), now);
                }
                self.queue_push(pending);
            }
            Overlap::Skip | Overlap::Queue => self.queue_push(pending),
        }
    }

    /// The run of `task` running here, unless it is a catch-up or a backfill (those never
    /// make a new run wait or refuse).
    fn running_of(&self, task: &TaskName) -> Option<RunId> {
        self.busy.get(task).copied().filter(|run| {
            !self
                .running
                .get(run)
                .is_some_and(|r| matches!(r.trigger, Trigger::Catchup | Trigger::Backfill))
        })
    }

    /// Why a new run of `task` is skipped under `overlap = "skip"` now: another of its
    /// runs (not a catch-up or a backfill) running or queued here. `None`: it may go on.
    pub(super) fn overlap_skip_reason(&self, task: &TaskName) -> Option<String> {
        let (other, what) = match self.running_of(task) {
            Some(run) => (run, "is still running"),
            None if self.queued_per_task.contains_key(task) => (
                self.queue
                    .iter()
                    .find(|p| {
                        &p.task == task
                            && !matches!(p.trigger, Trigger::Catchup | Trigger::Backfill)
                    })?
                    .run,
                "is queued",
            ),
            None => return None,
        };
        Some(format!("overlap policy skip: run {other} of {task} {what}"))
    }

    /// A run could not start because its task runs on another instance (`running`): it
    /// meets its overlap policy across the cluster — skipped (a first attempt under
    /// `skip`), the other run asked to stop (`replace`), or it waits at the front of the
    /// queue until the task is free.
    pub(super) fn wait_for_task_elsewhere(
        &mut self,
        pending: Pending,
        running: RunId,
        now: Instant,
    ) {
        let overlap = self
            .config
            .tasks
            .get(&pending.task)
            .map(|spec| spec.overlap);
        let first_attempt = pending.state == RunState::Queued && pending.attempt.0 == 0;
        let subject =
            !matches!(pending.trigger, Trigger::Catchup | Trigger::Backfill) && first_attempt;
        match overlap {
            Some(Overlap::Skip) if subject => {
                let reason = format!(
                    "overlap policy skip: run {running} of {} is still running on another instance",
                    pending.task
                );
                self.skip(&pending, &reason, now);
                return;
            }
            // The run running elsewhere is newer (claimed later, started first by
            // another instance): this one is the replaced one, not the other way round
            // (found by the cluster overlap test: "run 4 replaced by an older run 3").
            Some(Overlap::Replace) if subject && running > pending.run => {
                let change = Change {
                    reason: Some(format!("replaced by run {running}")),
                    ..Change::default()
                };
                self.end_waiting_run(&pending, RunState::Aborted, Some(&change), now);
                return;
            }
            Some(Overlap::Replace) if subject => {
                let reason = format!("replaced by run {}", pending.run);
                if let Err(err) = self.store.request_abort(running, &reason, now) {
                    tracing::warn!(run = %running, "cannot ask for the replaced run to stop: {err}");
                }
            }
            _ => {}
        }
        *self
            .queued_per_task
            .entry(pending.task.clone())
            .or_default() += 1;
        self.queue.push_front(pending);
        self.dirty = true;
    }

    pub(super) fn skip(&mut self, pending: &Pending, reason: &str, now: Instant) {
        self.say_skipped(pending, reason);
        let change = Change {
            reason: Some(reason.to_string()),
            ..Change::default()
        };
        if let Some(skips) = &mut self.skips {
            skips.push((pending.clone(), change));
            return;
        }
        self.end_waiting_run(pending, RunState::Skipped, Some(&change), now);
    }

    /// A tick the claim's own transaction recorded skipped: said in the logs, then the
    /// board and its cascade move on.
    pub(super) fn skipped_with_claim(&mut self, pending: &Pending, reason: &str, now: Instant) {
        self.say_skipped(pending, reason);
        self.end_waiting_run(pending, RunState::Skipped, None, now);
    }

    fn say_skipped(&self, pending: &Pending, reason: &str) {
        info!(task = %pending.task, run = %pending.run, "skipped: {reason}");
        self.logs.task(pending.task.as_str()).line(
            pending.run,
            pending.attempt,
            Level::Warn,
            &format!("skipped: {reason}"),
        );
    }

    /// Writes the skips gathered while a wake's claims were handed out in one
    /// transaction (PostgreSQL: a few statements for all), then moves the board and the
    /// cascades on for each skip the store took.
    pub(super) fn flush_skips(&mut self, now: Instant) {
        let Some(skips) = self.skips.take() else {
            return;
        };
        if skips.is_empty() {
            return;
        }
        let moves: Vec<(Move, Change)> = skips
            .iter()
            .map(|(pending, change)| {
                let step = Move {
                    run: pending.run,
                    attempt: pending.attempt,
                    from: pending.state,
                    to: RunState::Skipped,
                };
                (step, change.clone())
            })
            .collect();
        let store = self.store.clone();
        let outcomes = match blocking(|| store.batch(|batch| Ok(batch.finishes(&moves, now)))) {
            Ok(outcomes) => outcomes,
            Err(err) => {
                warn!(runs = moves.len(), "cannot record skipped runs: {err}");
                return;
            }
        };
        for ((pending, _), outcome) in skips.iter().zip(outcomes) {
            match outcome {
                Ok(_) => {
                    self.note_finished(&pending.task, pending.run, RunState::Skipped, None, now);
                    if let Some(root) = pending.cascade {
                        self.continue_cascade(root, now);
                    }
                }
                Err(err) => warn!(run = %pending.run, "{err}"),
            }
        }
    }

    pub(super) fn fail_unconfigured(&mut self, pending: &Pending, now: Instant) {
        let change = Change {
            error: Some(format!("task {} is no longer configured", pending.task)),
            ..Change::default()
        };
        self.end_waiting_run(pending, RunState::Failed, Some(&change), now);
    }

    /// The one way a waiting run (queued, or waiting for its next attempt) ends without
    /// starting — skipped, aborted, replaced, failed as unconfigured: the state change
    /// (`change`; `None` when another actor, such as the CLI's abort, already made it in
    /// the store), the board, and the cascade it belongs to moving on, so that
    /// `run --downstream --wait` sees every member end. Returns false if the store
    /// refused the change.
    pub(super) fn end_waiting_run(
        &mut self,
        pending: &Pending,
        to: RunState,
        change: Option<&Change>,
        now: Instant,
    ) -> bool {
        if let Some(change) = change {
            let step = Move {
                run: pending.run,
                attempt: pending.attempt,
                from: pending.state,
                to,
            };
            if !self.apply(&step, change, now) {
                return false;
            }
        }
        self.note_finished(&pending.task, pending.run, to, None, now);
        if let Some(root) = pending.cascade {
            self.continue_cascade(root, now);
        }
        true
    }
}
