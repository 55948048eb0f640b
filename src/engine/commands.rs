//! Operator commands from a [`Handle`](super::Handle): trigger, abort, pause, reload,
//! retry; and manual runs queued by the CLI.

use std::sync::Arc;

use super::recovery::schedule_key;
use super::ReloadFailure;
use super::{blocking, Command, Engine, EngineError, Pending};
use crate::config::Overlap;
use crate::config::{Config, RunParams, TaskSpec};
use crate::model::TaskName;
use crate::model::{Instant, RunId, RunState, Trigger};
use crate::runner::StopReason;
use crate::store::AbortOutcome;
use crate::store::{NewRun, Store, StoreError};
use tracing::{info, warn};

/// The run a manual trigger of `spec` creates.
fn manual_run(
    spec: &TaskSpec,
    now: Instant,
    force: bool,
    downstream: bool,
    params: Option<String>,
) -> NewRun {
    NewRun {
        task: spec.name.clone(),
        trigger: Trigger::Manual,
        scheduled_for: now,
        max_attempts: spec.max_attempts(),
        force,
        downstream,
        cascade: None,
        params,
    }
}

/// A run's own params, checked against what `spec`'s handler reads, as stored (`None`
/// for none or an empty table).
fn run_params(spec: &TaskSpec, params: Option<RunParams>) -> Result<Option<String>, EngineError> {
    match params {
        Some(params) => params.checked_text(spec).map_err(EngineError::BadParams),
        None => Ok(None),
    }
}
/// Queues a manual run of `task`: the shared path of the CLI, the API and foreground runs.
pub fn enqueue_manual(
    config: &Config,
    store: &Store,
    now: Instant,
    task: &str,
    force: bool,
    downstream: bool,
    params: Option<RunParams>,
) -> Result<RunId, EngineError> {
    let spec = config.task(task).ok_or_else(|| EngineError::UnknownTask {
        task: task.to_string(),
        known: config.task_names().join(", "),
    })?;
    let params = run_params(spec, params)?;
    Ok(store.enqueue(&manual_run(spec, now, force, downstream, params), now)?)
}

/// The zone a backfill's dates are read in: the task's schedule's, else the scheduler's.
pub fn backfill_zone(config: &Config, task: &str) -> chrono_tz::Tz {
    config
        .task(task)
        .and_then(|spec| spec.schedule.as_ref().map(|s| s.timezone()))
        .unwrap_or(config.scheduler.timezone)
}

/// A backfill's `from`/`to`: RFC 3339, or a date in `zone` (its first instant, or with
/// `end` its last). `name` names the bound in the refusal.
pub fn backfill_bound(
    text: &str,
    zone: chrono_tz::Tz,
    end: bool,
    name: &str,
) -> Result<Instant, String> {
    if let Ok(at) = chrono::DateTime::parse_from_rfc3339(text.trim()) {
        return Ok(at.with_timezone(&chrono::Utc));
    }
    let date = chrono::NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d").map_err(|_| {
        format!("{name} {text:?}: expected RFC 3339 (2026-01-05T09:00:00Z) or a date (2026-01-05)")
    })?;
    let day = if end { date.succ_opt() } else { Some(date) }
        .ok_or_else(|| format!("{name} {text:?}: out of range"))?;
    // The day's first instant in the zone (a midnight skipped by DST: the first after it).
    let start = (0..24 * 60)
        .find_map(|minute| {
            let local = day.and_hms_opt(0, 0, 0)? + chrono::Duration::minutes(minute);
            local.and_local_timezone(zone).earliest()
        })
        .ok_or_else(|| format!("{name} {text:?}: no such day in {zone}"))?
        .with_timezone(&chrono::Utc);
    Ok(if end {
        start - chrono::Duration::microseconds(1)
    } else {
        start
    })
}

/// The most ticks one backfill queues.
pub const BACKFILL_MAX_TICKS: usize = 10_000;

/// One tick of a backfill's range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackfillTick {
    /// The nominal tick.
    pub tick: Instant,
    /// The run queued for it (`None` on a dry run, or when it had run already).
    pub run: Option<RunId>,
    /// A scheduled, catch-up or backfill run had claimed it already: not run again.
    pub already: bool,
}

/// `turbosched backfill`: every tick of `task`'s schedule from `from` to `to` (both
/// included, and never after `now`), oldest first. Each tick not yet claimed is queued
/// (trigger `backfill`) under the claim of scheduled ticks, in one transaction, unless
/// `dry_run`; one already claimed is only listed. `downstream`: each run then queues the
/// tasks that depend on it, in dependency order, as `run --downstream` does.
#[allow(clippy::too_many_arguments)]
pub fn backfill(
    config: &Config,
    store: &Store,
    now: Instant,
    task: &str,
    from: Instant,
    to: Instant,
    downstream: bool,
    dry_run: bool,
) -> Result<Vec<BackfillTick>, EngineError> {
    let spec = config.task(task).ok_or_else(|| EngineError::UnknownTask {
        task: task.to_string(),
        known: config.task_names().join(", "),
    })?;
    let Some(schedule) = &spec.schedule else {
        return Err(EngineError::Backfill(format!(
            "task {task} has no schedule: it has no ticks to backfill (turbosched run {task} runs it once)"
        )));
    };
    let end = to.min(now);
    if from > end {
        return Err(EngineError::Backfill(format!(
            "the range {} to {} holds no past tick (--from must be before --to and the past)",
            from.to_rfc3339(),
            to.to_rfc3339()
        )));
    }
    let ticks: Vec<Instant> = schedule
        .ticks_after(from - chrono::Duration::microseconds(1))
        .take_while(|tick| *tick <= end)
        .take(BACKFILL_MAX_TICKS + 1)
        .collect();
    if ticks.len() > BACKFILL_MAX_TICKS {
        return Err(EngineError::Backfill(format!(
            "the range holds more than {BACKFILL_MAX_TICKS} ticks of {task}: backfill a shorter one at a time"
        )));
    }
    let claimed = store.claimed_ticks(&spec.name, from, end)?;
    let mut plan: Vec<BackfillTick> = ticks
        .iter()
        .map(|tick| BackfillTick {
            tick: *tick,
            run: None,
            already: claimed.contains(tick),
        })
        .collect();
    if dry_run {
        return Ok(plan);
    }
    store.batch(|tx| {
        for item in plan.iter_mut().filter(|item| !item.already) {
            let run = NewRun {
                task: spec.name.clone(),
                trigger: Trigger::Backfill,
                scheduled_for: item.tick,
                max_attempts: spec.max_attempts(),
                force: false,
                downstream,
                cascade: None,
                params: None,
            };
            match tx.claim_backfill(&run, now) {
                Ok(id) => item.run = Some(id),
                Err(StoreError::AlreadyClaimed { .. }) => item.already = true,
                Err(err) => return Err(err),
            }
        }
        Ok(())
    })?;
    Ok(plan)
}

impl Engine {
    pub(super) fn on_command(&mut self, command: Command) {
        let now = self.clock.now();
        match command {
            Command::Trigger {
                task,
                force,
                downstream,
                params,
                reply,
            } => {
                let _ = reply.send(self.trigger(&task, force, downstream, params, now));
            }
            Command::Abort { run, reply } => {
                let result = self
                    .store
                    .request_abort(run, "abort requested", now)
                    .map_err(EngineError::from);
                if let Ok(AbortOutcome::Requested) = result {
                    self.stop_run(run, StopReason::Abort, "abort requested");
                }
                if let Ok(AbortOutcome::AbortedNow) = result {
                    // The store moved it already; the follow-ups are the same as for any
                    // waiting run that ends.
                    let mut ended = self.queue_retain(|p| p.run != run);
                    ended.extend(self.retry_pending.remove(&run));
                    self.retry_due.retain(|(_, r)| *r != run);
                    for pending in ended {
                        self.end_waiting_run(&pending, RunState::Aborted, None, now);
                    }
                }
                let _ = reply.send(result);
            }
            Command::Pause {
                task,
                paused,
                reply,
            } => {
                let _ = reply.send(self.pause(&task, paused, now));
            }
            Command::Backfill {
                task,
                from,
                to,
                downstream,
                dry_run,
                reply,
            } => {
                let _ = reply.send(self.backfill(&task, &from, &to, downstream, dry_run, now));
            }
            Command::Reload { reply } => {
                let _ = reply.send(self.reload(now));
            }
            Command::Retry { run, reply } => {
                let _ = reply.send(self.retry(run, now));
            }
        }
    }

    /// A manual run, refused (409 in the API) when the overlap policy is `skip` and a run
    /// of the task is active.
    pub(super) fn trigger(
        &mut self,
        task: &str,
        force: bool,
        downstream: bool,
        params: Option<RunParams>,
        now: Instant,
    ) -> Result<RunId, EngineError> {
        let config = self.config.clone();
        let spec = config.task(task).ok_or_else(|| EngineError::UnknownTask {
            task: task.to_string(),
            known: config.task_names().join(", "),
        })?;
        let params = run_params(spec, params)?;
        if spec.overlap == Overlap::Skip {
            let active = match self.busy.get(&spec.name) {
                Some(run) => Some((*run, "running")),
                None => self
                    .queue
                    .iter()
                    .find(|p| p.task == spec.name)
                    .map(|p| (p.run, "queued")),
            };
            if let Some((run, what)) = active {
                return Err(EngineError::Overlap {
                    task: task.to_string(),
                    run,
                    what,
                });
            }
        }
        let new_run = manual_run(spec, now, force, downstream, params);
        let run = blocking(|| self.store.enqueue(&new_run, now))?;
        self.admit(Pending::new_run(run, &new_run), now);
        Ok(run)
    }

    /// A backfill asked through the API: queued in the store, then admitted here.
    fn backfill(
        &mut self,
        task: &str,
        from: &str,
        to: &str,
        downstream: bool,
        dry_run: bool,
        now: Instant,
    ) -> Result<Vec<BackfillTick>, EngineError> {
        let config = self.config.clone();
        let zone = backfill_zone(&config, task);
        let from = backfill_bound(from, zone, false, "from").map_err(EngineError::Backfill)?;
        let to = backfill_bound(to, zone, true, "to").map_err(EngineError::Backfill)?;
        let plan = blocking(|| {
            backfill(
                &config,
                &self.store,
                now,
                task,
                from,
                to,
                downstream,
                dry_run,
            )
        })?;
        for run in plan.iter().filter_map(|t| t.run) {
            if let Ok(Some(row)) = blocking(|| self.store.run(run)) {
                self.admit(Pending::from_row(&row), now);
            }
        }
        Ok(plan)
    }

    pub(super) fn pause(
        &mut self,
        task: &str,
        paused: bool,
        now: Instant,
    ) -> Result<(), EngineError> {
        let spec = self
            .config
            .task(task)
            .ok_or_else(|| EngineError::UnknownTask {
                task: task.to_string(),
                known: self.config.task_names().join(", "),
            })?;
        let name = spec.name.clone();
        // A resume of a task whose circuit is open closes the circuit (and resumes it).
        let closed = !paused && blocking(|| self.close_circuit(&name, now))?;
        if !closed {
            blocking(|| self.store.set_paused(&name, paused, now))?;
        }
        if paused {
            self.paused.insert(task.to_string());
        } else {
            self.paused.remove(task);
        }
        self.dirty = true;
        Ok(())
    }

    /// Validates the config file, then swaps it in: schedules that changed get a new next
    /// fire, removed tasks stop firing. On errors the running config stays.
    pub(super) fn reload(&mut self, now: Instant) -> Result<String, EngineError> {
        let source = self.config.source.clone();
        match crate::config::load(&source) {
            Ok(new) => {
                let new = Arc::new(new);
                for (name, spec) in &new.tasks {
                    let key = spec.schedule.as_ref().map(schedule_key);
                    let old_key = self
                        .config
                        .tasks
                        .get(name)
                        .and_then(|old| old.schedule.as_ref().map(schedule_key));
                    if key != old_key {
                        match (&spec.schedule, key) {
                            (Some(schedule), Some(key)) => {
                                self.set_next_fire(name, schedule.next_after(now), &key)
                            }
                            _ => {
                                self.next_fire.remove(name);
                            }
                        }
                    }
                }
                let removed: Vec<TaskName> = self
                    .config
                    .tasks
                    .keys()
                    .filter(|t| !new.tasks.contains_key(*t))
                    .cloned()
                    .collect();
                for name in removed {
                    self.next_fire.remove(&name);
                }
                if new.scheduler.log_dir != self.config.scheduler.log_dir
                    || new.logging != self.config.logging
                {
                    self.logs = self.logs.reconfigured(&new.scheduler.log_dir, &new.logging);
                }
                let hash = new.hash.clone();
                self.reload_failure = None;
                if let Err(err) = self.store.set_instance_config(&self.instance, &hash) {
                    warn!("cannot record the reloaded config's hash: {err}");
                }
                self.config = new;
                self.metrics
                    .know_tasks(self.config.tasks.keys().map(|t| t.as_str()));
                self.dirty = true;
                info!(hash = %hash, tasks = self.config.tasks.len(), "config reloaded");
                self.log_event(
                    "config_reloaded",
                    None,
                    None,
                    &format!(
                        "{} ({} tasks, sha256 {hash})",
                        source.display(),
                        self.config.tasks.len()
                    ),
                    now,
                );
                Ok(hash)
            }
            Err(errors) => {
                warn!("config not reloaded:\n{errors}");
                self.log_event("config_reload_failed", None, None, &errors.to_string(), now);
                // Until a reload succeeds, the file on disk is not what runs: /health says so.
                self.reload_failure = Some(ReloadFailure {
                    at: now,
                    error: errors.to_string(),
                });
                self.dirty = true;
                Err(EngineError::Config(errors))
            }
        }
    }

    /// A new run of a finished run's task (trigger `retry`), handed the old run's last
    /// checkpoint so it resumes where that one stopped.
    pub(super) fn retry(&mut self, old: RunId, now: Instant) -> Result<RunId, EngineError> {
        let row = blocking(|| self.store.run(old))?.ok_or(EngineError::RunNotFound(old))?;
        if !row.state.is_terminal() {
            return Err(EngineError::NotRetryable {
                run: old,
                state: row.state,
            });
        }
        let config = self.config.clone();
        let spec = config
            .tasks
            .get(&row.task)
            .ok_or_else(|| EngineError::UnknownTask {
                task: row.task.0.clone(),
                known: config.task_names().join(", "),
            })?;
        let new_run = NewRun {
            task: row.task.clone(),
            trigger: Trigger::Retry,
            scheduled_for: now,
            max_attempts: spec.max_attempts(),
            force: true,
            downstream: false,
            cascade: None,
            params: None,
        };
        // The new run resumes from the old one's last checkpoint, handed over in the store.
        let run = blocking(|| {
            self.store.batch(|batch| {
                let run = batch.enqueue(&new_run, now)?;
                if let Some(checkpoint) = &row.checkpoint {
                    batch.hand_checkpoint(run, checkpoint)?;
                }
                Ok(run)
            })
        })?;
        self.admit(Pending::new_run(run, &new_run), now);
        Ok(run)
    }
}
