//! Dispatch: queued runs start while worker slots are free (oldest first, one attempt per
//! task), after the dependency check, each as a runner task over one child process.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::{blocking, Engine, Launching, Pending, Running};
use crate::config::{Config, TaskSpec};
use crate::model::{Attempt, Instant, RunState, TaskName, Trigger};
use crate::runner::{self, AttemptSpec};
use crate::store::{Change, Move};
use crate::tasklog::Level;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, warn, Instrument};

use crate::model::RunId;
use crate::store::StoreError;

/// Starts spawned together at most: each holds four pipe ends open until its batch is
/// answered (a burst of 1,000 in one batch peaked at 4,047 descriptors). A built-in
/// worker's report pipe is made with its launch and held until its batch, two more.
const LAUNCH_BATCH: usize = 64;

impl Engine {
    /// Starts queued runs while worker slots are free, oldest first, one attempt per task,
    /// with all their `→ running` moves in one transaction.
    pub(super) fn dispatch(&mut self) {
        if self.cancel.is_cancelled() || self.queue.is_empty() || !self.may_claim() {
            return;
        }
        let now = self.clock.now();
        let config = self.config.clone();
        let mut chosen: Vec<Pending> = Vec::new();
        let mut chosen_tasks: std::collections::HashSet<TaskName> = Default::default();
        // Pools: a run whose pool is full waits in its place (the queue is FIFO), and runs
        // behind it of other pools go on.
        let mut slots = self.slots();
        let mut index = 0;
        while index < self.queue.len() && slots.free > 0 {
            let task = &self.queue[index].task;
            let pool = config.tasks.get(task).and_then(|s| s.pool.as_deref());
            if self.busy.contains_key(task)
                || chosen_tasks.contains(task)
                || self.busy_elsewhere.contains_key(task)
                || slots.pool_full(pool)
            {
                index += 1;
                continue;
            }
            let Some(pending) = self.queue.remove(index) else {
                break;
            };
            self.uncount_queued(&pending.task);
            let Some(spec) = config.tasks.get(&pending.task) else {
                self.fail_unconfigured(&pending, now);
                continue;
            };
            let first_attempt = pending.state == RunState::Queued && pending.attempt.0 == 0;
            if first_attempt && !pending.force && !spec.depends_on.is_empty() {
                if let Err(reason) = blocking(|| self.check_dependencies(spec, now)) {
                    self.skip(&pending, &reason, now);
                    continue;
                }
            }
            slots.take(pool);
            chosen_tasks.insert(pending.task.clone());
            chosen.push(pending);
        }
        if chosen.is_empty() {
            return;
        }
        let change = Change {
            owner: Some(self.instance.clone()),
            ..Change::default()
        };
        // Starts take their task's lock in the database (one attempt per task across
        // instances): in task order, so two instances' dispatches never wait on each other
        // in a circle.
        chosen.sort_by(|a, b| a.task.cmp(&b.task));
        let store = self.store.clone();
        let started = blocking(|| {
            let steps: Vec<Move> = chosen
                .iter()
                .map(|p| Move {
                    run: p.run,
                    attempt: p.attempt,
                    from: p.state,
                    to: RunState::Running,
                })
                .collect();
            store.batch(|batch| Ok(batch.transitions(&steps, &change, now)))
        });
        let started = match started {
            Ok(started) => started,
            Err(err) => {
                // Nothing was committed: the runs are still queued in the store; put them
                // back at the front, in order, for the next dispatch.
                warn!(runs = chosen.len(), "cannot start runs: {err}");
                for pending in chosen.into_iter().rev() {
                    *self
                        .queued_per_task
                        .entry(pending.task.clone())
                        .or_default() += 1;
                    self.queue.push_front(pending);
                }
                return;
            }
        };
        for (pending, result) in chosen.into_iter().zip(started) {
            self.started(pending, result, now);
        }
    }

    /// The worker and pool slots free now, as a dispatch counts them.
    pub(super) fn slots(&self) -> Slots {
        let mut taken: HashMap<String, usize> = HashMap::new();
        for running in self.running.values() {
            if let Some(pool) = self
                .config
                .tasks
                .get(&running.task)
                .and_then(|spec| spec.pool.clone())
            {
                *taken.entry(pool).or_default() += 1;
            }
        }
        Slots {
            free: self
                .config
                .scheduler
                .max_workers
                .saturating_sub(self.running.len()),
            taken,
            config: self.config.clone(),
        }
    }

    /// Whether the first run of a tick of `spec`'s task, claimed now, would be started by
    /// the dispatch right after the claim: nothing waits in the queue ahead of it, the
    /// task runs nowhere (here or, as of the last poll, elsewhere) and has no run waiting,
    /// a worker slot and its pool's slot are free (taken from `slots` when the answer is
    /// yes), and its dependency check passes as dispatch checks it. `fire_due` then
    /// claims and starts it in one transaction: one commit before the child is spawned,
    /// not two.
    pub(super) fn starts_at_once(&self, spec: &TaskSpec, slots: &mut Slots, now: Instant) -> bool {
        let task = &spec.name;
        let pool = spec.pool.as_deref();
        if !self.queue.is_empty()
            || slots.free == 0
            || slots.pool_full(pool)
            || self.busy.contains_key(task)
            || self.busy_elsewhere.contains_key(task)
            || self.queued_per_task.contains_key(task)
        {
            return false;
        }
        if !spec.depends_on.is_empty() && self.check_dependencies(spec, now).is_err() {
            // The dispatch after the claim checks again, and records the skip.
            return false;
        }
        slots.take(pool);
        true
    }

    /// What follows a `queued → running` move the store answered (a dispatch's, or one
    /// made with its claim): the runner spawned, or the refusal met.
    pub(super) fn started(
        &mut self,
        pending: Pending,
        result: Result<Attempt, StoreError>,
        now: Instant,
    ) {
        match result {
            Ok(attempt) => self.start(pending, attempt),
            Err(StoreError::Fenced { found_state, .. }) => {
                // Another actor moved it (aborted from the CLI, taken by another
                // instance): it is no longer ours to start.
                debug!(run = %pending.run, "not starting: now {found_state}");
            }
            Err(StoreError::TaskBusy { running, .. }) => {
                // Its task runs on another instance: the run waits (or meets its
                // overlap policy) until the next poll says the task is free.
                self.busy_elsewhere.insert(pending.task.clone(), running);
                self.wait_for_task_elsewhere(pending, running, now);
            }
            // Still queued in the store: the next poll adopts it again.
            Err(err) => warn!(run = %pending.run, "cannot start run: {err}"),
        }
    }

    /// Spawns the runner of a run that just entered `running` at `attempt`.
    pub(super) fn start(&mut self, pending: Pending, attempt: Attempt) {
        let now = self.clock.now();
        let config = self.config.clone();
        let Some(spec) = config.tasks.get(&pending.task) else {
            return;
        };
        let (stop_tx, stop_rx) = watch::channel(None);
        let log = self.logs.task(pending.task.as_str());
        // A later attempt, or a retry of another run, resumes from the checkpoint in the
        // store (its one home): the child reads a copy at TURBOSCHED_CHECKPOINT.
        let handed_checkpoint = (attempt.0 > 1 || pending.trigger == Trigger::Retry)
            && self.hand_checkpoint(pending.run);
        log.line(
            pending.run,
            attempt,
            Level::Info,
            &format!(
                "attempt {attempt} of {} started ({})",
                pending.max_attempts,
                spec.handler.name()
            ),
        );
        let attempt_spec = AttemptSpec {
            run: pending.run,
            task: pending.task.0.clone(),
            attempt,
            trigger: pending.trigger,
            handler: spec.handler.clone(),
            params: crate::config::merged_params(&spec.params, pending.params.as_deref()),
            timeout: spec.timeout,
            kill_grace: config.scheduler.kill_grace,
            checkpoint_path: self.checkpoint_path(pending.run),
            config_path: config.source.clone(),
            log,
            die_with_parent: self.clustered(),
        };
        self.dirty = true;
        self.busy.insert(pending.task.clone(), pending.run);
        self.running.insert(
            pending.run,
            Running {
                task: pending.task,
                attempt,
                max_attempts: pending.max_attempts,
                cascade: pending.cascade,
                trigger: pending.trigger,
                scheduled_for: pending.scheduled_for,
                first_started_at: pending.first_started_at.unwrap_or(now),
                attempt_started_at: now,
                stop: stop_tx,
                stopping: None,
                requests: Vec::new(),
                announce: None,
                beats: matches!(spec.handler, crate::config::Handler::Builtin(_)),
                last_report: std::time::Instant::now(),
                handed_checkpoint,
                timeout: spec.timeout,
                params: pending.params,
            },
        );
        // Every service log line of the attempt's runner carries task, run and attempt.
        let span = tracing::info_span!(
            "run",
            task = %attempt_spec.task,
            run = %attempt_spec.run,
            attempt = %attempt_spec.attempt
        );
        // The only start of its wake spawns its child here and now (see `spawn_here`);
        // the starts of a wake of several are spawned together at its end.
        // Only those the spawner threads start: a launch on the `fork` road (cluster mode)
        // starts on its caller's thread, and the runner tasks start those in parallel.
        if !self.spawn_here {
            if let Some(launching) = &mut self.launching {
                if let Some(launch) = runner::Launched::of(&attempt_spec) {
                    launching.push(Launching {
                        spec: attempt_spec,
                        launch,
                        stop: stop_rx,
                        span,
                    });
                    return;
                }
            }
        }
        let spawned = self
            .spawn_here
            .then(|| span.in_scope(|| runner::spawn_child(&attempt_spec)));
        tokio::spawn(
            runner::run_attempt(attempt_spec, self.worker_tx.clone(), stop_rx, spawned)
                .instrument(span),
        );
    }

    /// The end of a wake: the children of its starts spawned together
    /// ([`runner::spawn_children`]: the spawner threads start them back to back while
    /// the engine waits once), each then handed to its runner task. A wake's one start is
    /// left to its runner task, as outside the loop: the engine does not wait for it.
    /// [`Engine::launch_waiting`] in the middle of a wake: what its starts so far have
    /// gathered is spawned now, and the rest of the wake gathers anew.
    pub(super) fn launch_gathered(&mut self) {
        if self.launching.as_ref().is_some_and(|l| !l.is_empty()) {
            self.launch_waiting();
            self.launching = Some(Vec::new());
        }
    }

    pub(super) fn launch_waiting(&mut self) {
        let Some(launching) = self.launching.take() else {
            return;
        };
        if launching.len() < 2 {
            for Launching {
                spec, stop, span, ..
            } in launching
            {
                tokio::spawn(
                    runner::run_attempt(spec, self.worker_tx.clone(), stop, None).instrument(span),
                );
            }
            return;
        }
        let mut launching = launching.into_iter().peekable();
        while launching.peek().is_some() {
            let (batch, launches): (Vec<_>, Vec<_>) = launching
                .by_ref()
                .take(LAUNCH_BATCH)
                .map(|l| ((l.spec, l.stop, l.span), l.launch))
                .unzip();
            let spawned = runner::spawn_children(launches);
            // Their runners start now: the next batch's spawns overlap their reading.
            for ((spec, stop, span), spawned) in batch.into_iter().zip(spawned) {
                tokio::spawn(
                    runner::run_attempt(spec, self.worker_tx.clone(), stop, Some(spawned))
                        .instrument(span),
                );
            }
        }
    }

    /// Writes the run's stored checkpoint, if it has one, where its child will read it.
    fn hand_checkpoint(&self, run: RunId) -> bool {
        let checkpoint = match blocking(|| self.store.run(run)) {
            Ok(row) => row.and_then(|row| row.checkpoint),
            Err(err) => {
                warn!(run = %run, "cannot read the run's checkpoint: {err}");
                None
            }
        };
        let Some(checkpoint) = checkpoint else {
            return false;
        };
        let path = self.checkpoint_path(run);
        match write_atomically(&path, checkpoint.as_bytes()) {
            Ok(()) => true,
            Err(err) => {
                warn!(run = %run, "cannot write the checkpoint file {}: {err}", path.display());
                false
            }
        }
    }

    /// The dependency check: every upstream's latest finished run succeeded, and is fresh.
    pub(super) fn check_dependencies(&self, spec: &TaskSpec, now: Instant) -> Result<(), String> {
        for upstream in &spec.depends_on {
            let latest = self
                .store
                .latest_finished(upstream)
                .map_err(|err| format!("dependency {upstream}: cannot read its runs: {err}"))?;
            let Some(latest) = latest else {
                return Err(format!("dependency {upstream} has never run"));
            };
            if latest.state != RunState::Succeeded {
                return Err(format!(
                    "dependency {upstream}: latest run {} {}",
                    latest.id, latest.state
                ));
            }
            let finished = latest.finished_at.unwrap_or(latest.queued_at);
            if let Some(max_age) = spec.dependency_max_age {
                let age = (now - finished).to_std().unwrap_or(Duration::ZERO);
                if age > max_age {
                    return Err(format!(
                        "dependency {upstream}: latest success (run {}) finished {} ago, more than dependency_max_age {}",
                        latest.id,
                        humantime::format_duration(Duration::from_secs(age.as_secs())),
                        humantime::format_duration(max_age)
                    ));
                }
            } else if let Some(upstream_schedule) = self
                .config
                .tasks
                .get(upstream)
                .and_then(|u| u.schedule.as_ref())
            {
                if let Some(latest_tick) = upstream_schedule.latest_at_or_before(now) {
                    if latest.scheduled_for < latest_tick {
                        return Err(format!(
                            "dependency {upstream}: latest success (run {}) is older than its latest scheduled fire {}",
                            latest.id,
                            latest_tick.to_rfc3339()
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Where a run's child finds its checkpoint. `maintenance::remove_checkpoints` reads
    /// this naming (and the `.json.tmp` of [`write_atomically`]) to remove the files of
    /// runs that are over.
    pub(super) fn checkpoint_path(&self, run: RunId) -> PathBuf {
        self.config
            .scheduler
            .state_dir
            .join("checkpoints")
            .join(format!("run_{run}.json"))
    }
}

/// Worker slots and pool slots, as a dispatch counts them: free while the running attempts
/// and the starts chosen so far leave some.
pub(super) struct Slots {
    /// Worker slots left (`max_workers`).
    free: usize,
    /// Pool → its slots taken.
    taken: HashMap<String, usize>,
    /// Whose `[pools.<name>] slots` these are.
    config: Arc<Config>,
}

impl Slots {
    /// Whether `pool` (a task's, if it has one) has no slot left.
    fn pool_full(&self, pool: Option<&str>) -> bool {
        pool.is_some_and(|pool| {
            self.taken.get(pool).copied().unwrap_or(0)
                >= self.config.pools.get(pool).copied().unwrap_or(usize::MAX)
        })
    }

    /// Takes a worker slot, and one of `pool`'s.
    fn take(&mut self, pool: Option<&str>) {
        self.free = self.free.saturating_sub(1);
        if let Some(pool) = pool {
            *self.taken.entry(pool.to_string()).or_default() += 1;
        }
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename: a reader sees the old
/// file or the new one, never half of one.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let temporary = path.with_extension("json.tmp");
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, path)
}
