//! The engine: one loop that turns ticks, requests and worker reports into run state
//! changes.
//!
//! Every cause of work is a [`Wake`] variant, and the loop is one `select!` over them:
//! `Tick` (the earliest persisted next fire or retry is due), `Worker` (a runner event),
//! `Command` (from a [`Handle`]), `Heartbeat` (liveness, abort requests, orphans), `Poll`
//! (runs queued by another process, such as the CLI) and `Shutdown`.
//!
//! The timer is our own: it sleeps until the earliest next fire, wakes early on any other
//! cause, and re-reads the wall clock after waking; a fire is claimed in the store before
//! it runs ([`Store::claim_fire`]). `tokio-cron-scheduler` was measured too coarse for
//! this (500 ms polling, whole seconds, fixed offsets, no claim): see ARCHITECTURE.md.
//!
//! A run's path here: claimed `queued` → admitted (overlap policy) → waits in the FIFO
//! queue for a worker slot (`max_workers`, one attempt per task at a time) → dependency
//! check (first attempt only, unless forced) → `running` with a runner task → terminal,
//! or `retry_wait` → `running` again after its backoff.
//!
//! Invariants: the engine holds no truth the store does not also hold (its queue and
//! timers are rebuilt from the store at start-up); every state change goes through
//! [`Store::transition`]; a store error or a failed run is logged and the loop goes on.

mod recovery;

use recovery::schedule_key;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Config, Overlap, TaskSpec};
use crate::model::{Attempt, Instant, RunId, RunState, TaskName, Trigger};
use crate::runner::{self, AttemptSpec, Envelope, Outcome, RunnerEvent, StopReason};
use crate::schedule::{plan_due, TickAction};
use crate::store::{AbortOutcome, Change, NewRun, RunRow, Store, StoreError};
use crate::tasklog::{Level, TaskLogs};
use crate::worker::protocol::Msg;

/// The wall clock, injectable.
pub trait Clock: Send + Sync {
    /// Now, UTC.
    fn now(&self) -> Instant;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        chrono::Utc::now()
    }
}

/// How the engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The service: fires schedules, adopts runs, finds orphans, runs until shut down.
    Serve,
    /// `turbosched run` with no service up: runs only the runs it is given (and their
    /// downstream cascade), then returns.
    Foreground,
}

/// What can go wrong when asking the engine for something.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No such task.
    #[error("unknown task \"{task}\" (known tasks: {known})")]
    UnknownTask {
        /// Asked for.
        task: String,
        /// Configured.
        known: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The engine has stopped.
    #[error("the engine is not running")]
    Stopped,
}

/// A request to the engine.
pub enum Command {
    /// Queue a manual run.
    Trigger {
        /// Task.
        task: String,
        /// Bypass the dependency check.
        force: bool,
        /// Then run the tasks that depend on it.
        downstream: bool,
        /// Answer.
        reply: oneshot::Sender<Result<RunId, EngineError>>,
    },
    /// Abort a run.
    Abort {
        /// Run.
        run: RunId,
        /// Answer.
        reply: oneshot::Sender<Result<AbortOutcome, EngineError>>,
    },
}

/// The front door for other in-process parts (the HTTP layer): a cheap, cloneable way to
/// send [`Command`]s and to stop the engine.
#[derive(Clone)]
pub struct Handle {
    commands: mpsc::Sender<Command>,
    cancel: CancellationToken,
}

impl Handle {
    /// Queues a manual run of `task`.
    pub async fn trigger(
        &self,
        task: &str,
        force: bool,
        downstream: bool,
    ) -> Result<RunId, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Trigger {
                task: task.to_string(),
                force,
                downstream,
                reply,
            })
            .await
            .map_err(|_| EngineError::Stopped)?;
        answer.await.map_err(|_| EngineError::Stopped)?
    }

    /// Aborts `run`.
    pub async fn abort(&self, run: RunId) -> Result<AbortOutcome, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Abort { run, reply })
            .await
            .map_err(|_| EngineError::Stopped)?;
        answer.await.map_err(|_| EngineError::Stopped)?
    }

    /// Starts a graceful shutdown.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }
}

/// Every cause of work in the loop.
enum Wake {
    Tick,
    Worker(Envelope),
    Command(Command),
    Heartbeat,
    Poll,
    Shutdown,
}

struct Running {
    task: TaskName,
    attempt: Attempt,
    stop: watch::Sender<Option<StopReason>>,
    stopping: Option<StopReason>,
}

#[derive(Debug, Clone)]
struct Pending {
    run: RunId,
    task: TaskName,
    attempt: Attempt,
    state: RunState,
    force: bool,
}

impl Pending {
    fn from_row(row: &RunRow) -> Pending {
        Pending {
            run: row.id,
            task: row.task.clone(),
            attempt: row.attempt,
            state: row.state,
            force: row.force,
        }
    }
}

/// The scheduler loop and its in-memory mirror of the store.
pub struct Engine {
    config: Arc<Config>,
    store: Store,
    clock: Arc<dyn Clock>,
    mode: Mode,
    instance: String,
    logs: TaskLogs,
    running: HashMap<RunId, Running>,
    queue: VecDeque<Pending>,
    next_fire: HashMap<TaskName, Instant>,
    retry_due: BTreeSet<(Instant, RunId)>,
    retry_pending: HashMap<RunId, Pending>,
    worker_tx: mpsc::UnboundedSender<Envelope>,
    worker_rx: mpsc::UnboundedReceiver<Envelope>,
    commands_rx: mpsc::Receiver<Command>,
    commands_tx: mpsc::Sender<Command>,
    cancel: CancellationToken,
    poll_interval: Duration,
    roots: Vec<RunId>,
}

impl Engine {
    /// An engine over `store` for `config`. Nothing runs until [`Engine::run`].
    pub fn new(config: Arc<Config>, store: Store, clock: Arc<dyn Clock>, mode: Mode) -> Engine {
        let (worker_tx, worker_rx) = mpsc::unbounded_channel();
        let (commands_tx, commands_rx) = mpsc::channel(256);
        let logs = TaskLogs::new(&config.scheduler.log_dir);
        Engine {
            config,
            store,
            clock,
            mode,
            instance: uuid::Uuid::new_v4().to_string(),
            logs,
            running: HashMap::new(),
            queue: VecDeque::new(),
            next_fire: HashMap::new(),
            retry_due: BTreeSet::new(),
            retry_pending: HashMap::new(),
            worker_tx,
            worker_rx,
            commands_rx,
            commands_tx,
            cancel: CancellationToken::new(),
            poll_interval: Duration::from_millis(200),
            roots: Vec::new(),
        }
    }

    /// The handle to send commands and to stop the engine.
    pub fn handle(&self) -> Handle {
        Handle {
            commands: self.commands_tx.clone(),
            cancel: self.cancel.clone(),
        }
    }

    /// This engine's instance id (the `owner` of the runs it runs).
    pub fn instance_id(&self) -> &str {
        &self.instance
    }

    /// Queues a run of `task` in the store (used by `turbosched run` before
    /// [`Engine::run`] in foreground mode).
    pub fn enqueue_manual(
        &mut self,
        task: &str,
        force: bool,
        downstream: bool,
    ) -> Result<RunId, EngineError> {
        let run = enqueue_manual(
            &self.config,
            &self.store,
            self.clock.now(),
            task,
            force,
            downstream,
        )?;
        self.roots.push(run);
        Ok(run)
    }

    /// Runs the loop until shutdown (serve) or until its runs are done (foreground).
    pub async fn run(mut self) -> Result<(), EngineError> {
        let now = self.clock.now();
        let pid = std::process::id();
        let host = hostname();
        self.store
            .register_instance(&self.instance, pid, &host, now)?;
        match self.mode {
            Mode::Serve => {
                self.recover(now)?;
                self.plan_startup_fires(now);
                self.store.record_event(
                    "scheduler_started",
                    None,
                    None,
                    &format!(
                        "instance {} pid {pid} on {host}, config {}",
                        self.instance,
                        self.config.source.display()
                    ),
                    now,
                )?;
                info!(instance = %self.instance, tasks = self.config.tasks.len(), "scheduler started");
            }
            Mode::Foreground => {
                for root in self.roots.clone() {
                    if let Some(row) = self.store.run(root)? {
                        self.admit(Pending::from_row(&row), now);
                    }
                }
            }
        }
        self.dispatch();

        let mut heartbeat = tokio::time::interval(self.config.scheduler.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut poll = tokio::time::interval(self.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.mode == Mode::Foreground && self.is_idle() {
                break;
            }
            let sleep = self.sleep_until_next_deadline();
            let wake = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => Wake::Shutdown,
                Some(envelope) = self.worker_rx.recv() => Wake::Worker(envelope),
                Some(command) = self.commands_rx.recv() => Wake::Command(command),
                _ = sleep => Wake::Tick,
                _ = heartbeat.tick() => Wake::Heartbeat,
                _ = poll.tick(), if self.mode == Mode::Serve => Wake::Poll,
            };
            match wake {
                Wake::Shutdown => break,
                Wake::Worker(envelope) => self.on_worker(envelope),
                Wake::Command(command) => self.on_command(command),
                Wake::Tick => self.on_tick(),
                Wake::Heartbeat => self.on_heartbeat(),
                Wake::Poll => self.on_poll(),
            }
            self.dispatch();
        }
        self.shutdown().await;
        Ok(())
    }

    fn is_idle(&self) -> bool {
        self.running.is_empty() && self.queue.is_empty() && self.retry_due.is_empty()
    }

    /// A sleep until the earliest next fire or retry, read from the wall clock now.
    fn sleep_until_next_deadline(&self) -> tokio::time::Sleep {
        let earliest = self
            .next_fire
            .values()
            .copied()
            .chain(self.retry_due.first().map(|(at, _)| *at))
            .min();
        let delay = match earliest {
            Some(at) => (at - self.clock.now()).to_std().unwrap_or(Duration::ZERO),
            // Nothing scheduled: wake rarely; any other cause wakes the loop anyway.
            None => Duration::from_secs(3600),
        };
        tokio::time::sleep(delay)
    }

    fn on_tick(&mut self) {
        let now = self.clock.now();
        let due: Vec<(TaskName, Instant)> = self
            .next_fire
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(task, at)| (task.clone(), *at))
            .collect();
        for (task, first_due) in due {
            self.fire_due(&task, first_due, now, false);
        }
        while let Some((at, run)) = self.retry_due.first().copied() {
            if at > now {
                break;
            }
            self.retry_due.pop_first();
            if let Some(pending) = self.retry_pending.remove(&run) {
                self.queue.push_back(pending);
            }
        }
    }

    /// Claims and handles every due tick of `task` from `first_due` up to `now`.
    fn fire_due(&mut self, task: &TaskName, first_due: Instant, now: Instant, at_startup: bool) {
        let Some(spec) = self.config.tasks.get(task).cloned() else {
            self.next_fire.remove(task);
            return;
        };
        let Some(schedule) = spec.schedule.clone() else {
            self.next_fire.remove(task);
            return;
        };
        let plan = plan_due(
            &schedule,
            first_due,
            now,
            spec.misfire,
            spec.misfire_grace,
            at_startup,
        );
        let paused = self
            .store
            .task_state(task)
            .map(|s| s.paused)
            .unwrap_or(false);
        if paused || !spec.enabled {
            // Paused and disabled tasks let their ticks pass unclaimed.
            self.set_next_fire(task, plan.next, &schedule_key(&schedule));
            return;
        }
        if plan.dropped > 0 || plan.older_than_grace {
            let message = format!(
                "{} missed tick(s) not run under misfire policy {}{}",
                plan.dropped,
                spec.misfire.as_str(),
                if plan.older_than_grace {
                    ", and ticks older than misfire_grace"
                } else {
                    ""
                }
            );
            warn!(task = %task, "{message}");
            self.log_event("misfire", Some(task.as_str()), None, &message, now);
        }
        for (tick, action) in plan.ticks {
            let trigger = match action {
                TickAction::Fire(trigger) => trigger,
                TickAction::Skip => Trigger::Catchup,
            };
            let new_run = NewRun {
                task: task.clone(),
                trigger,
                scheduled_for: tick,
                max_attempts: spec.max_attempts(),
                force: false,
                downstream: false,
                cascade: None,
            };
            match self.store.claim_fire(&new_run, now, plan.next) {
                Ok(run) => {
                    debug!(task = %task, run = %run, tick = %tick, "claimed fire");
                    let pending = Pending {
                        run,
                        task: task.clone(),
                        attempt: Attempt(0),
                        state: RunState::Queued,
                        force: false,
                    };
                    if action == TickAction::Skip {
                        self.skip(
                            &pending,
                            "misfire policy skip: tick missed while the scheduler was down",
                            now,
                        );
                    } else {
                        self.admit(pending, now);
                    }
                }
                Err(StoreError::AlreadyClaimed { .. }) => {
                    debug!(task = %task, tick = %tick, "tick already claimed elsewhere");
                }
                Err(err) => warn!(task = %task, tick = %tick, "cannot claim fire: {err}"),
            }
        }
        self.set_next_fire(task, plan.next, &schedule_key(&schedule));
    }

    fn set_next_fire(&mut self, task: &TaskName, next: Option<Instant>, expr: &str) {
        match next {
            Some(at) => {
                self.next_fire.insert(task.clone(), at);
            }
            None => {
                self.next_fire.remove(task);
            }
        }
        if let Err(err) = self.store.set_next_fire(task, next, Some(expr)) {
            warn!(task = %task, "cannot store next fire: {err}");
        }
    }

    /// Applies the task's overlap policy to a new queued run.
    fn admit(&mut self, pending: Pending, now: Instant) {
        let Some(spec) = self.config.tasks.get(&pending.task).cloned() else {
            self.fail_unconfigured(&pending, now);
            return;
        };
        if self.queue.iter().any(|p| p.run == pending.run)
            || self.running.contains_key(&pending.run)
        {
            return;
        }
        let running: Vec<RunId> = self
            .running
            .iter()
            .filter(|(_, r)| r.task == pending.task)
            .map(|(id, _)| *id)
            .collect();
        let queued: Vec<RunId> = self
            .queue
            .iter()
            .filter(|p| p.task == pending.task)
            .map(|p| p.run)
            .collect();
        match spec.overlap {
            Overlap::Skip if !running.is_empty() || !queued.is_empty() => {
                let other = running
                    .first()
                    .or(queued.first())
                    .copied()
                    .unwrap_or(RunId(0));
                let what = if running.is_empty() {
                    "is queued"
                } else {
                    "is still running"
                };
                self.skip(
                    &pending,
                    &format!(
                        "overlap policy skip: run {other} of {} {what}",
                        pending.task
                    ),
                    now,
                );
            }
            Overlap::Replace => {
                for run in running {
                    self.stop_run(run, StopReason::Abort);
                    let _ = self.store.request_abort(
                        run,
                        &format!("replaced by run {}", pending.run),
                        now,
                    );
                }
                let (replaced, kept): (Vec<Pending>, Vec<Pending>) =
                    self.queue.drain(..).partition(|p| p.task == pending.task);
                self.queue = kept.into();
                for old in replaced {
                    let change = Change {
                        reason: Some(format!("replaced by run {}", pending.run)),
                        ..Change::default()
                    };
                    self.apply(
                        old.run,
                        old.attempt,
                        old.state,
                        RunState::Aborted,
                        &change,
                        now,
                    );
                }
                self.queue.push_back(pending);
            }
            Overlap::Skip | Overlap::Queue => self.queue.push_back(pending),
        }
    }

    /// Starts queued runs while worker slots are free, oldest first, one attempt per task.
    fn dispatch(&mut self) {
        if self.cancel.is_cancelled() {
            return;
        }
        let now = self.clock.now();
        let mut index = 0;
        while index < self.queue.len() && self.running.len() < self.config.scheduler.max_workers {
            let task_busy = self
                .running
                .values()
                .any(|r| r.task == self.queue[index].task);
            if task_busy {
                index += 1;
                continue;
            }
            let Some(pending) = self.queue.remove(index) else {
                break;
            };
            self.start(pending, now);
        }
    }

    fn start(&mut self, pending: Pending, now: Instant) {
        let Some(spec) = self.config.tasks.get(&pending.task).cloned() else {
            self.fail_unconfigured(&pending, now);
            return;
        };
        if pending.state == RunState::Queued && pending.attempt.0 == 0 && !pending.force {
            if let Err(reason) = self.check_dependencies(&spec, now) {
                self.skip(&pending, &reason, now);
                return;
            }
        }
        let change = Change {
            owner: Some(self.instance.clone()),
            ..Change::default()
        };
        let attempt = match self.store.transition(
            pending.run,
            pending.attempt,
            pending.state,
            RunState::Running,
            &change,
            now,
        ) {
            Ok(attempt) => attempt,
            Err(StoreError::Fenced { found_state, .. }) => {
                // Another actor moved it (aborted from the CLI, or taken by another
                // instance): it is no longer ours to start.
                debug!(run = %pending.run, "not starting: now {found_state}");
                return;
            }
            Err(err) => {
                warn!(run = %pending.run, "cannot start run: {err}");
                return;
            }
        };
        let (stop_tx, stop_rx) = watch::channel(None);
        let log = self.logs.task(pending.task.as_str());
        log.line(
            pending.run,
            attempt,
            Level::Info,
            &format!(
                "attempt {attempt} of {} started ({})",
                spec.max_attempts(),
                spec.handler.name()
            ),
        );
        let attempt_spec = AttemptSpec {
            run: pending.run,
            task: pending.task.0.clone(),
            attempt,
            handler: spec.handler.clone(),
            params: spec.params.clone(),
            timeout: spec.timeout,
            kill_grace: self.config.scheduler.kill_grace,
            checkpoint_path: self.checkpoint_path(pending.run),
            log,
        };
        self.running.insert(
            pending.run,
            Running {
                task: pending.task.clone(),
                attempt,
                stop: stop_tx,
                stopping: None,
            },
        );
        tokio::spawn(runner::run_attempt(
            attempt_spec,
            self.worker_tx.clone(),
            stop_rx,
        ));
    }

    /// The dependency check: every upstream's latest finished run succeeded, and is fresh.
    fn check_dependencies(&self, spec: &TaskSpec, now: Instant) -> Result<(), String> {
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

    fn on_worker(&mut self, envelope: Envelope) {
        let now = self.clock.now();
        let Envelope {
            run,
            attempt,
            event,
        } = envelope;
        match event {
            RunnerEvent::Spawned(pid, spawned_at) => {
                if let Err(err) = self.store.record_pid(run, attempt, pid, spawned_at) {
                    warn!(run = %run, "cannot record pid: {err}");
                }
            }
            RunnerEvent::Report(Msg::Heartbeat) | RunnerEvent::Report(Msg::Error { .. }) => {}
            RunnerEvent::Report(Msg::Progress { pct, phase }) => {
                if let Err(err) =
                    self.store
                        .record_progress(run, attempt, pct, phase.as_deref(), now)
                {
                    warn!(run = %run, "cannot record progress: {err}");
                }
            }
            RunnerEvent::Report(Msg::Checkpoint { data }) => {
                let text = data.to_string();
                if let Err(err) = write_atomically(&self.checkpoint_path(run), text.as_bytes()) {
                    warn!(run = %run, "cannot write checkpoint file: {err}");
                }
                if let Err(err) = self.store.record_checkpoint(run, attempt, &text) {
                    warn!(run = %run, "cannot record checkpoint: {err}");
                }
            }
            RunnerEvent::Report(Msg::Result { data }) => {
                if let Err(err) = self.store.record_result(run, attempt, &data.to_string()) {
                    warn!(run = %run, "cannot record result: {err}");
                }
            }
            RunnerEvent::Finished { outcome, elapsed } => {
                self.on_finished(run, attempt, outcome, elapsed, now)
            }
        }
    }

    fn on_finished(
        &mut self,
        run: RunId,
        attempt: Attempt,
        outcome: Outcome,
        elapsed: Duration,
        now: Instant,
    ) {
        if self.running.get(&run).map(|r| r.attempt) != Some(attempt) {
            return;
        }
        let Some(running) = self.running.remove(&run) else {
            return;
        };
        let spec = self.config.tasks.get(&running.task).cloned();
        let max_attempts = self
            .store
            .run(run)
            .ok()
            .flatten()
            .map(|row| row.max_attempts)
            .unwrap_or(1);
        let log = self.logs.task(running.task.as_str());
        let took = humantime::format_duration(Duration::from_millis(elapsed.as_millis() as u64));
        let (to, change) = match outcome {
            Outcome::Succeeded => {
                log.line(run, attempt, Level::Info, &format!("succeeded in {took}"));
                (RunState::Succeeded, Change::default())
            }
            Outcome::Stopped(StopReason::Abort) => {
                log.line(run, attempt, Level::Warn, &format!("aborted after {took}"));
                let reason = self
                    .store
                    .run(run)
                    .ok()
                    .flatten()
                    .and_then(|r| r.reason)
                    .unwrap_or_else(|| "abort requested".into());
                (
                    RunState::Aborted,
                    Change {
                        reason: Some(reason),
                        ..Change::default()
                    },
                )
            }
            Outcome::Stopped(StopReason::Shutdown) => {
                log.line(
                    run,
                    attempt,
                    Level::Warn,
                    &format!("interrupted by shutdown after {took}; queued again"),
                );
                (
                    RunState::Queued,
                    Change {
                        reason: Some("interrupted by shutdown; will run again".into()),
                        refund_attempt: true,
                        ..Change::default()
                    },
                )
            }
            Outcome::TimedOut | Outcome::Failed { .. } => {
                let (terminal, exit_code, error, fatal) = match outcome {
                    Outcome::Failed {
                        exit_code,
                        error,
                        fatal,
                    } => (RunState::Failed, exit_code, error, fatal),
                    _ => (
                        RunState::TimedOut,
                        None,
                        format!(
                            "timed out after {}",
                            humantime::format_duration(
                                spec.as_ref().map(|s| s.timeout).unwrap_or_default()
                            )
                        ),
                        false,
                    ),
                };
                let error = format!("run {run} ({}, attempt {attempt}): {error}", running.task);
                log.line(run, attempt, Level::Error, &error);
                if !fatal && attempt.0 < max_attempts && spec.is_some() {
                    let delay = spec
                        .as_ref()
                        .map(|s| s.backoff.delay(attempt.0))
                        .unwrap_or_default();
                    let next = now + chrono::Duration::from_std(delay).unwrap_or_default();
                    (
                        RunState::RetryWait,
                        Change {
                            exit_code,
                            error: Some(error),
                            next_attempt_at: Some(next),
                            ..Change::default()
                        },
                    )
                } else {
                    (
                        terminal,
                        Change {
                            exit_code,
                            error: Some(error),
                            ..Change::default()
                        },
                    )
                }
            }
        };
        if !self.apply(run, attempt, RunState::Running, to, &change, now) {
            return;
        }
        match to {
            RunState::RetryWait => {
                let at = change.next_attempt_at.unwrap_or(now);
                self.retry_due.insert((at, run));
                self.retry_pending.insert(
                    run,
                    Pending {
                        run,
                        task: running.task.clone(),
                        attempt,
                        state: RunState::RetryWait,
                        force: true,
                    },
                );
            }
            RunState::Queued => {}
            _ => self.continue_cascade(run, now),
        }
    }

    /// After a run of a `--downstream` cascade ends, queues every task of the cascade whose
    /// upstreams within it have all finished. The dependency check then decides.
    fn continue_cascade(&mut self, run: RunId, now: Instant) {
        let Ok(Some(row)) = self.store.run(run) else {
            return;
        };
        let Some(root) = row.cascade else { return };
        let Ok(Some(root_row)) = self.store.run(root) else {
            return;
        };
        let members = self.config.downstream_of(&root_row.task);
        let Ok(runs) = self.store.cascade_runs(root) else {
            return;
        };
        let mut in_cascade: Vec<TaskName> = vec![root_row.task.clone()];
        in_cascade.extend(members.iter().cloned());
        for member in &members {
            if runs.iter().any(|r| &r.task == member) {
                continue;
            }
            let Some(spec) = self.config.tasks.get(member) else {
                continue;
            };
            let ready = spec
                .depends_on
                .iter()
                .filter(|up| in_cascade.contains(up))
                .all(|up| runs.iter().any(|r| &r.task == up && r.state.is_terminal()));
            if !ready {
                continue;
            }
            let new_run = NewRun {
                task: member.clone(),
                trigger: Trigger::Downstream,
                scheduled_for: now,
                max_attempts: spec.max_attempts(),
                force: false,
                downstream: true,
                cascade: Some(root),
            };
            match self.store.enqueue(&new_run, now) {
                Ok(id) => self.admit(
                    Pending {
                        run: id,
                        task: member.clone(),
                        attempt: Attempt(0),
                        state: RunState::Queued,
                        force: false,
                    },
                    now,
                ),
                Err(err) => warn!(task = %member, "cannot queue downstream run: {err}"),
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        let now = self.clock.now();
        match command {
            Command::Trigger {
                task,
                force,
                downstream,
                reply,
            } => {
                let result =
                    enqueue_manual(&self.config, &self.store, now, &task, force, downstream);
                if let Ok(run) = &result {
                    self.admit(
                        Pending {
                            run: *run,
                            task: TaskName(task),
                            attempt: Attempt(0),
                            state: RunState::Queued,
                            force,
                        },
                        now,
                    );
                }
                let _ = reply.send(result);
            }
            Command::Abort { run, reply } => {
                let result = self
                    .store
                    .request_abort(run, "abort requested", now)
                    .map_err(EngineError::from);
                if let Ok(AbortOutcome::Requested) = result {
                    self.stop_run(run, StopReason::Abort);
                }
                if let Ok(AbortOutcome::AbortedNow) = result {
                    self.queue.retain(|p| p.run != run);
                    self.retry_pending.remove(&run);
                    self.retry_due.retain(|(_, r)| *r != run);
                }
                let _ = reply.send(result);
            }
        }
    }

    fn on_heartbeat(&mut self) {
        let now = self.clock.now();
        if let Err(err) = self.store.heartbeat(&self.instance, now) {
            warn!("cannot record heartbeat: {err}");
        }
        match self.store.abort_requests(&self.instance) {
            Ok(runs) => {
                for run in runs {
                    self.stop_run(run, StopReason::Abort);
                }
            }
            Err(err) => warn!("cannot read abort requests: {err}"),
        }
        if self.mode == Mode::Serve {
            if let Err(err) = self.find_orphans(now) {
                warn!("cannot look for orphaned runs: {err}");
            }
        }
    }

    fn on_poll(&mut self) {
        let now = self.clock.now();
        match self.store.runs_in_state(RunState::Queued) {
            Ok(rows) => {
                for row in rows {
                    let known = self.queue.iter().any(|p| p.run == row.id)
                        || self.running.contains_key(&row.id);
                    if !known {
                        self.admit(Pending::from_row(&row), now);
                    }
                }
            }
            Err(err) => warn!("cannot poll for queued runs: {err}"),
        }
        // Runs aborted from outside while queued leave the queue.
        if !self.queue.is_empty() {
            let ids: Vec<RunId> = self.queue.iter().map(|p| p.run).collect();
            for id in ids {
                if let Ok(Some(row)) = self.store.run(id) {
                    if row.state != RunState::Queued && row.state != RunState::RetryWait {
                        self.queue.retain(|p| p.run != id);
                    }
                }
            }
        }
    }

    fn stop_run(&mut self, run: RunId, reason: StopReason) {
        if let Some(running) = self.running.get_mut(&run) {
            if running.stopping.is_none() {
                running.stopping = Some(reason);
                let _ = running.stop.send(Some(reason));
            }
        }
    }

    fn skip(&mut self, pending: &Pending, reason: &str, now: Instant) {
        info!(task = %pending.task, run = %pending.run, "skipped: {reason}");
        self.logs.task(pending.task.as_str()).line(
            pending.run,
            pending.attempt,
            Level::Warn,
            &format!("skipped: {reason}"),
        );
        let change = Change {
            reason: Some(reason.to_string()),
            ..Change::default()
        };
        if self.apply(
            pending.run,
            pending.attempt,
            pending.state,
            RunState::Skipped,
            &change,
            now,
        ) {
            self.continue_cascade(pending.run, now);
        }
    }

    fn fail_unconfigured(&mut self, pending: &Pending, now: Instant) {
        let change = Change {
            error: Some(format!("task {} is no longer configured", pending.task)),
            ..Change::default()
        };
        self.apply(
            pending.run,
            pending.attempt,
            pending.state,
            RunState::Failed,
            &change,
            now,
        );
    }

    /// One state change through the store; logs and returns false when refused.
    fn apply(
        &self,
        run: RunId,
        attempt: Attempt,
        from: RunState,
        to: RunState,
        change: &Change,
        now: Instant,
    ) -> bool {
        match self.store.transition(run, attempt, from, to, change, now) {
            Ok(_) => true,
            Err(err) => {
                warn!(run = %run, "{err}");
                false
            }
        }
    }

    fn log_event(
        &self,
        kind: &str,
        task: Option<&str>,
        run: Option<RunId>,
        message: &str,
        now: Instant,
    ) {
        if let Err(err) = self.store.record_event(kind, task, run, message, now) {
            warn!("cannot record event {kind}: {err}");
        }
    }

    fn checkpoint_path(&self, run: RunId) -> PathBuf {
        self.config
            .scheduler
            .state_dir
            .join("checkpoints")
            .join(format!("run_{run}.json"))
    }

    /// Graceful shutdown: stop firing, let attempts finish within `shutdown_grace`, then
    /// stop them and put their runs back in the queue. Nothing stays `running`.
    async fn shutdown(&mut self) {
        let now = self.clock.now();
        self.cancel.cancel();
        if self.mode == Mode::Serve {
            self.log_event(
                "scheduler_stopping",
                None,
                None,
                &format!("{} attempt(s) running", self.running.len()),
                now,
            );
            info!(running = self.running.len(), "scheduler stopping");
        }
        let grace = tokio::time::sleep(self.config.scheduler.shutdown_grace);
        tokio::pin!(grace);
        let mut grace_over = false;
        while !self.running.is_empty() {
            tokio::select! {
                Some(envelope) = self.worker_rx.recv() => self.on_worker(envelope),
                _ = &mut grace, if !grace_over => {
                    grace_over = true;
                    let runs: Vec<RunId> = self.running.keys().copied().collect();
                    for run in runs {
                        self.stop_run(run, StopReason::Shutdown);
                    }
                }
            }
        }
        if let Err(err) = self.store.stop_instance(&self.instance, self.clock.now()) {
            warn!("cannot mark instance stopped: {err}");
        }
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
) -> Result<RunId, EngineError> {
    let spec = config.task(task).ok_or_else(|| EngineError::UnknownTask {
        task: task.to_string(),
        known: config.task_names().join(", "),
    })?;
    let run = NewRun {
        task: spec.name.clone(),
        trigger: Trigger::Manual,
        scheduled_for: now,
        max_attempts: spec.max_attempts(),
        force,
        downstream,
        cascade: None,
    };
    Ok(store.enqueue(&run, now)?)
}

fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let temporary = path.with_extension("json.tmp");
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, path)
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}
