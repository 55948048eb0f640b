//! Every write of the store, as operations on one open transaction.

use rusqlite::{params, Transaction};

use super::{append_event, cached_execute, insert_run, transition_in, Change, NewRun, StoreError};
use crate::model::{to_micros, Attempt, Instant, RunId, RunState, TaskName};

/// The writes of one `BEGIN IMMEDIATE` transaction, handed out by [`super::Store::batch`].
pub struct Batch<'a> {
    pub(super) tx: &'a Transaction<'a>,
}

impl Batch<'_> {
    /// Claims one scheduled or catch-up tick of a task and queues its run.
    ///
    /// Promise: at most one run exists per task and tick for triggers `schedule` and
    /// `catchup`, however many engines try and however often the service restarts. How:
    /// the partial unique index `runs_claim` on `(task, scheduled_for)`, inside a
    /// `BEGIN IMMEDIATE` transaction; the loser gets [`StoreError::AlreadyClaimed`] and
    /// must not run the tick. The same transaction moves the task's `next_fire_at` on to
    /// `next_fire_at`, so a restart resumes after the claimed tick.
    pub fn claim_fire(
        &self,
        run: &NewRun,
        now: Instant,
        next_fire_at: Option<Instant>,
    ) -> Result<RunId, StoreError> {
        let id = insert_run(self.tx, run, now).map_err(|err| match err {
            rusqlite::Error::SqliteFailure(code, _)
                if code.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                StoreError::AlreadyClaimed {
                    task: run.task.clone(),
                    scheduled_for: run.scheduled_for,
                }
            }
            other => StoreError::Sql(other),
        })?;
        cached_execute(self.tx,
            "INSERT INTO task_state(task, last_fire_at, next_fire_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(task) DO UPDATE SET last_fire_at = excluded.last_fire_at, next_fire_at = excluded.next_fire_at",
            params![run.task.as_str(), to_micros(run.scheduled_for), next_fire_at.map(to_micros)],
        )?;
        Ok(id)
    }

    /// Queues a run that is not a scheduled tick (manual, downstream, retry).
    pub fn enqueue(&self, run: &NewRun, now: Instant) -> Result<RunId, StoreError> {
        Ok(insert_run(self.tx, run, now)?)
    }

    /// Moves run `run` from `from` at attempt `attempt` to `to`: the only writer of a
    /// run's state.
    ///
    /// Promise: the move happens only if it is legal ([`RunState::can_become`]) and the
    /// run is still exactly in `from` at `attempt`; otherwise nothing is written and the
    /// error says what was found ([`StoreError::Fenced`]), so an orphaned worker cannot
    /// overwrite the attempt that replaced it. Entering `running` starts attempt
    /// `attempt + 1` (returned) and records it in the attempts history; leaving `running`
    /// closes it. The matching event is appended in the same transaction.
    pub fn transition(
        &self,
        run: RunId,
        attempt: Attempt,
        from: RunState,
        to: RunState,
        change: &Change,
        now: Instant,
    ) -> Result<Attempt, StoreError> {
        transition_in(self.tx, run, attempt, from, to, change, now)
    }

    /// Records progress of a running attempt (ignored if the attempt is no longer current).
    pub fn record_progress(
        &self,
        run: RunId,
        attempt: Attempt,
        percent: f64,
        phase: Option<&str>,
        now: Instant,
    ) -> Result<bool, StoreError> {
        let changed = cached_execute(
            self.tx,
            "UPDATE runs SET progress = ?3, phase = COALESCE(?4, phase), heartbeat_at = ?5
             WHERE id = ?1 AND attempt = ?2 AND state = 'running'",
            params![run.0, attempt.0, percent, phase, to_micros(now)],
        )?;
        if changed > 0 {
            let message = match phase {
                Some(phase) => format!("{percent:.0}% {phase}"),
                None => format!("{percent:.0}%"),
            };
            append_event(
                self.tx,
                now,
                "run_progress",
                None,
                Some(run),
                Some(attempt),
                &message,
            )?;
        }
        Ok(changed > 0)
    }

    /// Stores the latest checkpoint of a running attempt.
    pub fn record_checkpoint(
        &self,
        run: RunId,
        attempt: Attempt,
        checkpoint: &str,
    ) -> Result<bool, StoreError> {
        Ok(cached_execute(
            self.tx,
            "UPDATE runs SET checkpoint = ?3 WHERE id = ?1 AND attempt = ?2 AND state = 'running'",
            params![run.0, attempt.0, checkpoint],
        )? > 0)
    }

    /// Gives a queued run a checkpoint to start from (a retry resumes where the run it
    /// retries stopped). The store is a checkpoint's one home; the file a child reads is
    /// a copy the engine writes when the attempt starts.
    pub fn hand_checkpoint(&self, run: RunId, checkpoint: &str) -> Result<bool, StoreError> {
        Ok(cached_execute(
            self.tx,
            "UPDATE runs SET checkpoint = ?2 WHERE id = ?1 AND state = 'queued'",
            params![run.0, checkpoint],
        )? > 0)
    }

    /// Stores the result a running attempt reported.
    pub fn record_result(
        &self,
        run: RunId,
        attempt: Attempt,
        result: &str,
    ) -> Result<bool, StoreError> {
        Ok(cached_execute(
            self.tx,
            "UPDATE runs SET result = ?3 WHERE id = ?1 AND attempt = ?2 AND state = 'running'",
            params![run.0, attempt.0, result],
        )? > 0)
    }

    /// Stores the pid (= process group) of a running attempt's child and when it started.
    pub fn record_pid(
        &self,
        run: RunId,
        attempt: Attempt,
        pid: u32,
        spawned_at: Instant,
    ) -> Result<bool, StoreError> {
        cached_execute(
            self.tx,
            "UPDATE attempts SET pid = ?3, spawned_at = ?4 WHERE run_id = ?1 AND attempt = ?2",
            params![run.0, attempt.0, pid, to_micros(spawned_at)],
        )?;
        Ok(cached_execute(
            self.tx,
            "UPDATE runs SET pid = ?3 WHERE id = ?1 AND attempt = ?2 AND state = 'running'",
            params![run.0, attempt.0, pid],
        )? > 0)
    }

    /// Sets the earliest unclaimed tick of `task`, computed from `schedule`.
    pub fn set_next_fire(
        &self,
        task: &TaskName,
        next: Option<Instant>,
        schedule: Option<&str>,
    ) -> Result<(), StoreError> {
        cached_execute(self.tx,
            "INSERT INTO task_state(task, next_fire_at, schedule) VALUES (?1, ?2, ?3)
             ON CONFLICT(task) DO UPDATE SET next_fire_at = excluded.next_fire_at, schedule = excluded.schedule",
            params![task.as_str(), next.map(to_micros), schedule],
        )?;
        Ok(())
    }

    /// Appends an event that is not a run state change.
    pub fn record_event(
        &self,
        kind: &str,
        task: Option<&str>,
        run: Option<RunId>,
        message: &str,
        now: Instant,
    ) -> Result<i64, StoreError> {
        append_event(self.tx, now, kind, task, run, None, message)
    }
}
