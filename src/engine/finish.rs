//! Worker reports and the end of an attempt: progress, checkpoints and results recorded
//! (a burst of reports in one transaction), then the retry decision — succeeded,
//! `retry_wait` with backoff, failed, timed out, aborted, stalled (orphaned), or queued
//! again after a shutdown.

use std::time::Duration;

use tokio::sync::watch;

use super::{blocking, Engine, FinishedRun, Pending, Stats};
use crate::model::{Attempt, Instant, RunId, RunState, TaskName, Trigger};
use crate::runner::{Envelope, Outcome, RunnerEvent, StopReason};
use crate::store::{Change, Move, StoreError};
use crate::tasklog::Level;
use crate::worker::protocol::{Report, ResultEvent, RunRequest};
use tracing::warn;

pub(super) struct Running {
    pub(super) task: TaskName,
    pub(super) attempt: Attempt,
    pub(super) max_attempts: u32,
    pub(super) cascade: Option<RunId>,
    pub(super) trigger: Trigger,
    pub(super) scheduled_for: Instant,
    pub(super) first_started_at: Instant,
    pub(super) attempt_started_at: Instant,
    pub(super) stop: watch::Sender<Option<StopReason>>,
    pub(super) stopping: Option<(StopReason, String)>,
    /// Runs this attempt's result asked for (`request_runs`), queued if it succeeds.
    pub(super) requests: Vec<RunRequest>,
    /// An event this attempt's result asked to publish (`event`), recorded if it succeeds.
    pub(super) announce: Option<ResultEvent>,
    /// A built-in worker, which beats a heartbeat on its report pipe (external commands
    /// have none: their timeout is their bound).
    pub(super) beats: bool,
    /// When the child last reported anything (or started).
    pub(super) last_report: std::time::Instant,
    /// The timeout this attempt runs under (the config may change while it runs).
    pub(super) timeout: Duration,
    /// A checkpoint file was written for this run's child (deleted when the run ends).
    pub(super) handed_checkpoint: bool,
    /// The run's own params (its retries get them too).
    pub(super) params: Option<String>,
}

/// What one finished attempt turns into.
pub(super) struct Finish {
    pub(super) run: RunId,
    pub(super) attempt: Attempt,
    pub(super) running: Running,
    pub(super) to: RunState,
    pub(super) change: Change,
}

impl Engine {
    /// Handles a burst of runner events (up to 1024 already waiting) in one transaction.
    pub(super) fn on_worker(&mut self, first: Envelope) {
        let mut envelopes = vec![first];
        while envelopes.len() < 1024 {
            match self.worker_rx.try_recv() {
                Ok(envelope) => envelopes.push(envelope),
                Err(_) => break,
            }
        }
        let now = self.clock.now();
        let mut finishes = Vec::new();
        for envelope in &envelopes {
            if let RunnerEvent::Report(_) | RunnerEvent::Spawned(..) = &envelope.event {
                if let Some(running) = self.running.get_mut(&envelope.run) {
                    if running.attempt == envelope.attempt {
                        running.last_report = std::time::Instant::now();
                    }
                }
            }
            match &envelope.event {
                RunnerEvent::Report(Report::Result(result)) => {
                    for why in &result.ignored {
                        warn!(run = %envelope.run, "ignoring part of the result: {why}");
                    }
                    if let Some(running) = self.running.get_mut(&envelope.run) {
                        running.announce = result.event.clone();
                        running.requests = result.requests.clone();
                    }
                }
                RunnerEvent::Finished { outcome, elapsed } => {
                    if let Some(finish) = self.finish(
                        envelope.run,
                        envelope.attempt,
                        outcome.clone(),
                        *elapsed,
                        now,
                    ) {
                        finishes.push(finish);
                    }
                }
                RunnerEvent::Spawned(_, spawned_at) => {
                    if let Some(running) = self.running.get(&envelope.run) {
                        if running.trigger == Trigger::Schedule && running.attempt == Attempt(1) {
                            // From when the tick was due: its jitter is no lag.
                            let due = self.due_at(&running.task, running.scheduled_for);
                            let lag = (*spawned_at - due).to_std().unwrap_or_default();
                            self.metrics.fire_lag.observe(lag.as_secs_f64());
                        }
                    }
                }
                _ => {}
            }
        }
        let writes = |event: &RunnerEvent| {
            matches!(
                event,
                RunnerEvent::Spawned(..)
                    | RunnerEvent::Report(
                        Report::Progress { .. } | Report::Checkpoint(_) | Report::Result(_)
                    )
            )
        };
        if finishes.is_empty() && !envelopes.iter().any(|e| writes(&e.event)) {
            // Heartbeats only: nothing to record, no transaction.
            return;
        }
        let progressed = envelopes
            .iter()
            .any(|e| matches!(e.event, RunnerEvent::Report(Report::Progress { .. })));
        let store = self.store.clone();
        let applied = blocking(|| {
            store.batch(|batch| {
                // The children spawned since the last drain, recorded together.
                let spawned: Vec<_> = envelopes
                    .iter()
                    .filter_map(|e| match e.event {
                        RunnerEvent::Spawned(pid, at) => Some((e.run, e.attempt, pid, at)),
                        _ => None,
                    })
                    .collect();
                for ((run, ..), written) in spawned.iter().zip(batch.record_pids(&spawned)) {
                    if let Err(err) = written {
                        warn!(run = %run, "cannot record the child's pid: {err}");
                    }
                }
                for Envelope {
                    run,
                    attempt,
                    event,
                } in &envelopes
                {
                    let (run, attempt) = (*run, *attempt);
                    let written = match event {
                        RunnerEvent::Spawned(..) => Ok(true),
                        RunnerEvent::Report(Report::Progress { pct, phase }) => {
                            batch.record_progress(run, attempt, *pct, phase.as_deref(), now)
                        }
                        RunnerEvent::Report(Report::Checkpoint(json)) => {
                            batch.record_checkpoint(run, attempt, json)
                        }
                        RunnerEvent::Report(Report::Result(result)) => {
                            batch.record_result(run, attempt, &result.json)
                        }
                        RunnerEvent::Report(Report::Heartbeat | Report::Error { .. })
                        | RunnerEvent::Finished { .. } => Ok(true),
                    };
                    if let Err(err) = written {
                        warn!(run = %run, "cannot record runner report: {err}");
                    }
                }
                let moves: Vec<(Move, Change)> = finishes
                    .iter()
                    .map(|f| {
                        let step = Move {
                            run: f.run,
                            attempt: f.attempt,
                            from: RunState::Running,
                            to: f.to,
                        };
                        (step, f.change.clone())
                    })
                    .collect();
                finishes
                    .iter()
                    .zip(batch.finishes(&moves, now))
                    .map(|(f, outcome)| {
                        match outcome {
                            Ok(_) => Ok(true),
                            Err(err @ StoreError::Fenced { .. }) => {
                                // Another instance reaped this attempt (its owner lost
                                // the lease): the late outcome is refused, and says so.
                                let message = format!(
                                    "late {} of attempt {} refused: {err}",
                                    f.to, f.attempt
                                );
                                warn!(run = %f.run, "{message}");
                                batch.record_event(
                                    "result_refused",
                                    None,
                                    Some(f.run),
                                    &message,
                                    now,
                                )?;
                                Ok(false)
                            }
                            Err(err) => {
                                warn!(run = %f.run, "{err}");
                                Ok(false)
                            }
                        }
                    })
                    .collect::<Result<Vec<bool>, StoreError>>()
            })
        });
        let applied = match applied {
            Ok(applied) => applied,
            Err(err) => {
                // Nothing of this burst was committed. The finished runs are still
                // `running` in the store but no longer ours in memory: the first
                // heartbeat's orphan check once the store takes writes again settles them
                // by policy (queued again while attempts remain).
                self.store_failed(
                    &format!("recording {} finished attempt(s)", finishes.len()),
                    &err,
                    now,
                );
                return;
            }
        };
        self.store_ok(now);
        if progressed {
            // Progress may have appended events: event streams read them now.
            self.board.touch();
        }
        for (finish, ok) in finishes.into_iter().zip(applied) {
            if !ok {
                continue;
            }
            if finish.running.handed_checkpoint {
                // A copy for the child that has ended; the store keeps the checkpoint.
                let _ = std::fs::remove_file(self.checkpoint_path(finish.run));
            }
            match finish.to {
                RunState::RetryWait => {
                    let at = finish.change.next_attempt_at.unwrap_or(now);
                    self.retry_due.insert((at, finish.run));
                    self.retry_pending.insert(
                        finish.run,
                        Pending {
                            run: finish.run,
                            task: finish.running.task.clone(),
                            attempt: finish.attempt,
                            max_attempts: finish.running.max_attempts,
                            state: RunState::RetryWait,
                            force: true,
                            cascade: finish.running.cascade,
                            trigger: finish.running.trigger,
                            scheduled_for: finish.running.scheduled_for,
                            first_started_at: Some(finish.running.first_started_at),
                            params: finish.running.params.clone(),
                        },
                    );
                    self.metrics
                        .retries
                        .with_label_values(&[finish.running.task.as_str()])
                        .inc();
                }
                RunState::Queued => {}
                RunState::Orphaned => match self.store.run(finish.run) {
                    Ok(Some(row)) => {
                        let reason = finish.change.reason.clone().unwrap_or_default();
                        self.settle_orphan(&row, reason.trim_start_matches("orphaned: "), now);
                    }
                    Ok(None) => {}
                    // Left `orphaned`: the next heartbeat's orphan check settles it.
                    Err(err) => warn!(run = %finish.run, "cannot read the stalled run: {err}"),
                },
                terminal => {
                    let duration = (now - finish.running.first_started_at).to_std().ok();
                    self.note_finished(&finish.running.task, finish.run, terminal, duration, now);
                    if terminal == RunState::Succeeded {
                        if let Some(event) = &finish.running.announce {
                            self.log_event(
                                &event.kind,
                                Some(finish.running.task.as_str()),
                                Some(finish.run),
                                &event.message,
                                now,
                            );
                        }
                        self.queue_requested_runs(
                            finish.run,
                            finish.running.cascade,
                            &finish.running.requests,
                            now,
                        );
                    }
                    if let Some(root) = finish.running.cascade {
                        self.continue_cascade(root, now);
                    }
                }
            }
        }
    }

    /// Decides what a finished attempt becomes, and takes it out of `running`.
    pub(super) fn finish(
        &mut self,
        run: RunId,
        attempt: Attempt,
        outcome: Outcome,
        elapsed: Duration,
        now: Instant,
    ) -> Option<Finish> {
        if self.running.get(&run).map(|r| r.attempt) != Some(attempt) {
            return None;
        }
        let running = self.running.remove(&run)?;
        self.dirty = true;
        if self.busy.get(&running.task) == Some(&run) {
            self.busy.remove(&running.task);
        }
        let config = self.config.clone();
        let spec = config.tasks.get(&running.task);
        let log = self.logs.task(running.task.as_str());
        let took = humantime::format_duration(Duration::from_millis(elapsed.as_millis() as u64));
        let (to, change) = match outcome {
            Outcome::Succeeded => {
                log.line(run, attempt, Level::Info, &format!("succeeded in {took}"));
                let change = Change {
                    exit_code: Some(0),
                    ..Change::default()
                };
                (RunState::Succeeded, change)
            }
            Outcome::Stopped(StopReason::Abort) => {
                log.line(run, attempt, Level::Warn, &format!("aborted after {took}"));
                let reason = running.stopping.as_ref().map(|(_, reason)| reason.clone());
                (
                    RunState::Aborted,
                    Change {
                        reason,
                        ..Change::default()
                    },
                )
            }
            Outcome::Stopped(StopReason::Stalled) => {
                let reason = running
                    .stopping
                    .as_ref()
                    .map(|(_, reason)| reason.clone())
                    .unwrap_or_else(|| "the worker stopped beating its heartbeat".into());
                log.line(
                    run,
                    attempt,
                    Level::Warn,
                    &format!("orphaned: {reason}; its process group was killed"),
                );
                self.metrics.orphans.inc();
                (
                    RunState::Orphaned,
                    Change {
                        reason: Some(format!("orphaned: {reason}")),
                        error: Some(format!(
                            "run {run} ({}, attempt {attempt}): orphaned: {reason}",
                            running.task
                        )),
                        ..Change::default()
                    },
                )
            }
            Outcome::Stopped(StopReason::Fenced) => {
                log.line(
                    run,
                    attempt,
                    Level::Warn,
                    &format!(
                        "interrupted after {took}: this instance lost its lease; queued again"
                    ),
                );
                let change = Change {
                    reason: Some(
                        "interrupted: its instance could not renew its lease; will run again"
                            .into(),
                    ),
                    refund_attempt: true,
                    ..Change::default()
                };
                (RunState::Queued, change)
            }
            Outcome::Stopped(StopReason::Shutdown) => {
                log.line(
                    run,
                    attempt,
                    Level::Warn,
                    &format!("interrupted by shutdown after {took}; queued again"),
                );
                let change = Change {
                    reason: Some("interrupted by shutdown; will run again".into()),
                    refund_attempt: true,
                    ..Change::default()
                };
                (RunState::Queued, change)
            }
            Outcome::TimedOut | Outcome::Failed { .. } => {
                let (terminal, exit_code, error, fatal) = match outcome {
                    Outcome::Failed {
                        exit_code,
                        error,
                        fatal,
                    } => (RunState::Failed, exit_code, error, fatal),
                    _ => {
                        let limit = running.timeout;
                        (
                            RunState::TimedOut,
                            None,
                            format!("timed out after {}", humantime::format_duration(limit)),
                            false,
                        )
                    }
                };
                let error = format!("run {run} ({}, attempt {attempt}): {error}", running.task);
                log.line(run, attempt, Level::Error, &error);
                match spec {
                    Some(spec) if !fatal && attempt.0 < running.max_attempts => {
                        let delay = spec.backoff.delay(attempt.0);
                        let change = Change {
                            exit_code,
                            error: Some(error),
                            next_attempt_at: Some(
                                now + chrono::Duration::from_std(delay).unwrap_or_default(),
                            ),
                            ..Change::default()
                        };
                        (RunState::RetryWait, change)
                    }
                    _ => (
                        terminal,
                        Change {
                            exit_code,
                            error: Some(error),
                            ..Change::default()
                        },
                    ),
                }
            }
        };
        Some(Finish {
            run,
            attempt,
            running,
            to,
            change,
        })
    }

    /// Records a run's end for the board and the metrics.
    pub(super) fn note_finished(
        &mut self,
        task: &TaskName,
        run: RunId,
        state: RunState,
        duration: Option<Duration>,
        now: Instant,
    ) {
        self.metrics
            .runs
            .with_label_values(&[task.as_str(), state.as_str()])
            .inc();
        if let Some(duration) = duration {
            self.metrics
                .run_duration
                .with_label_values(&[task.as_str()])
                .observe(duration.as_secs_f64());
        }
        let recent = self.recent.entry(task.clone()).or_default();
        recent.push(FinishedRun {
            run,
            state,
            finished_at: now,
            duration,
        });
        let stats = Stats::of(recent);
        self.stats.insert(task.clone(), stats);
        self.dirty = true;
        self.check_circuit(task, state, now);
    }
}
