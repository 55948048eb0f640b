//! Every write of the store, as operations on one open transaction.

use rusqlite::{params, OptionalExtension, Transaction};

use super::{
    append_event, cached_execute, cached_query_row, insert_run, transition_in, Change, NewRun,
    StoreError,
};
use crate::model::{from_micros, to_micros, Attempt, Instant, RunId, RunState, TaskName};

/// Progress events mark steps of this many percent: 0–4.99 is one step, 5–9.99 the
/// next, …, and 100 a step of its own.
pub(super) const PROGRESS_STEP: f64 = 5.0;

/// At most one `run_progress` event per run in this long.
pub(super) const PROGRESS_EVENT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The last `run_progress` event of the current attempt, as the run row remembers it.
#[derive(Debug, Clone, Copy)]
pub(super) struct LastProgressEvent<'a> {
    pub(super) at: Instant,
    pub(super) percent: Option<f64>,
    pub(super) phase: Option<&'a str>,
}

/// Whether a progress report (`percent`, `phase` — the phase in force after it) deserves
/// a `run_progress` event, given the attempt's last one.
///
/// The rule: the attempt's first report always does. Any later one does when it
/// says something the last event did not — another phase, or another [`PROGRESS_STEP`]
/// (reaching 100 % included) — and at least [`PROGRESS_EVENT_INTERVAL`] has passed since
/// that event. A change held back by the interval is not lost: the next report a second
/// on still differs from the last event and carries it. So a run emits at most one
/// progress event a second, and a steadily advancing run at most 21 plus one per phase.
pub(super) fn progress_is_news(
    last: Option<LastProgressEvent<'_>>,
    percent: f64,
    phase: Option<&str>,
    now: Instant,
) -> bool {
    let Some(last) = last else {
        return true;
    };
    let step = |percent: f64| (percent / PROGRESS_STEP).floor() as i64;
    let differs = last.phase != phase || last.percent.map(step) != Some(step(percent));
    let waited = (now - last.at)
        .to_std()
        .is_ok_and(|elapsed| elapsed >= PROGRESS_EVENT_INTERVAL);
    differs && waited
}

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

    /// Records progress of a running attempt (ignored if the attempt is no longer
    /// current), and appends a `run_progress` event only when the report is news.
    ///
    /// Promise: the run row (`progress`, `phase`, `heartbeat_at`) takes every report, so
    /// `GET /scheduler/runs/<id>` is always current. The event log takes at most one
    /// `run_progress` event per run and second, and only for a report that differs from
    /// the attempt's last such event (the rule is `progress_is_news`). A handler reporting a
    /// thousand times writes a thousand row updates and a few dozen events at most.
    pub fn record_progress(
        &self,
        run: RunId,
        attempt: Attempt,
        percent: f64,
        phase: Option<&str>,
        now: Instant,
    ) -> Result<bool, StoreError> {
        let current = cached_query_row(
            self.tx,
            "SELECT phase, progress_event_at, progress_event_pct, progress_event_phase FROM runs
             WHERE id = ?1 AND attempt = ?2 AND state = 'running'",
            params![run.0, attempt.0],
            |row| {
                Ok((
                    row.get::<_, Option<String>>(0)?,
                    row.get::<_, Option<i64>>(1)?,
                    row.get::<_, Option<f64>>(2)?,
                    row.get::<_, Option<String>>(3)?,
                ))
            },
        )
        .optional()?;
        let Some((stored_phase, event_at, event_percent, event_phase)) = current else {
            return Ok(false);
        };
        // A report without a phase keeps the one before.
        let phase = phase.map(str::to_string).or(stored_phase);
        let last_event = event_at.map(|at| LastProgressEvent {
            at: from_micros(at),
            percent: event_percent,
            phase: event_phase.as_deref(),
        });
        let news = progress_is_news(last_event, percent, phase.as_deref(), now);
        cached_execute(
            self.tx,
            "UPDATE runs SET progress = ?2, phase = ?3, heartbeat_at = ?4,
                progress_event_at = CASE WHEN ?5 THEN ?4 ELSE progress_event_at END,
                progress_event_pct = CASE WHEN ?5 THEN ?2 ELSE progress_event_pct END,
                progress_event_phase = CASE WHEN ?5 THEN ?3 ELSE progress_event_phase END
             WHERE id = ?1",
            params![run.0, percent, phase, to_micros(now), news],
        )?;
        if news {
            let message = match &phase {
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
        Ok(true)
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
