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

mod board;
mod faults;
mod metrics;
mod recovery;

pub use board::{
    Board, FinishedRun, History, RunningRun, Snapshot, Stats, TaskSnapshot, RECENT_RUNS,
};
pub use faults::{ClockStep, StoreFault};
pub use metrics::Metrics;

use faults::{WallWatch, STORE_RETRY};

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
    /// The task's overlap policy refuses a new run while this one is active.
    #[error("task {task} already has run {run} {what}; its overlap policy is skip")]
    Overlap {
        /// Task.
        task: String,
        /// The active run.
        run: RunId,
        /// "running" or "queued".
        what: &'static str,
    },
    /// No such run.
    #[error("no run with id {0}")]
    RunNotFound(RunId),
    /// Only a finished run can be retried.
    #[error("run {run} is {state}: only a finished run can be retried")]
    NotRetryable {
        /// Run.
        run: RunId,
        /// Its state.
        state: RunState,
    },
    /// The config file on disk is invalid; the running config was kept.
    #[error("config not reloaded, the running config is kept:\n{0}")]
    Config(crate::config::ConfigErrors),
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
    /// Pause or resume a task (persisted).
    Pause {
        /// Task.
        task: String,
        /// Pause (true) or resume (false).
        paused: bool,
        /// Answer.
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    /// Read the config file again; swap only if it is valid.
    Reload {
        /// Answer: the new config's hash.
        reply: oneshot::Sender<Result<String, EngineError>>,
    },
    /// Run a finished run's task again, resuming from its last checkpoint.
    Retry {
        /// The finished run.
        run: RunId,
        /// Answer: the new run.
        reply: oneshot::Sender<Result<RunId, EngineError>>,
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

    /// Pauses (`true`) or resumes (`false`) `task`.
    pub async fn pause(&self, task: &str, paused: bool) -> Result<(), EngineError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Pause {
            task: task.to_string(),
            paused,
            reply,
        })
        .await?;
        answer.await.map_err(|_| EngineError::Stopped)?
    }

    /// Reloads the config file; on errors the running config stays.
    pub async fn reload(&self) -> Result<String, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Reload { reply }).await?;
        answer.await.map_err(|_| EngineError::Stopped)?
    }

    /// Queues a new run of a finished run's task, resuming from its checkpoint.
    pub async fn retry(&self, run: RunId) -> Result<RunId, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Retry { run, reply }).await?;
        answer.await.map_err(|_| EngineError::Stopped)?
    }

    async fn send(&self, command: Command) -> Result<(), EngineError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| EngineError::Stopped)
    }

    /// Resolves once a shutdown has begun (long-lived readers, such as event streams, end
    /// on it so the HTTP server can stop).
    pub async fn stopping(&self) {
        self.cancel.cancelled().await;
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
    /// The board is stale and its rate limit has passed.
    Publish,
    Shutdown,
}

struct Running {
    task: TaskName,
    attempt: Attempt,
    max_attempts: u32,
    cascade: Option<RunId>,
    trigger: Trigger,
    scheduled_for: Instant,
    first_started_at: Instant,
    attempt_started_at: Instant,
    stop: watch::Sender<Option<StopReason>>,
    stopping: Option<(StopReason, String)>,
    /// Runs this attempt's result asked for (`request_runs`), queued if it succeeds.
    requests: Vec<RunRequest>,
    /// An event this attempt's result asked to publish (`event`), recorded if it succeeds.
    announce: Option<ResultEvent>,
    /// A built-in worker, which beats a heartbeat on its report pipe (external commands
    /// have none: their timeout is their bound).
    beats: bool,
    /// When the child last reported anything (or started).
    last_report: std::time::Instant,
}

/// An event a handler's result asks the engine to publish: `{"kind", "message"}`, e.g.
/// the drift task's verdict. Kinds are lower-case words joined by `_`; the `run_` kinds
/// are the engine's own.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ResultEvent {
    kind: String,
    message: String,
}

impl ResultEvent {
    fn is_allowed(&self) -> bool {
        !self.kind.starts_with("run_")
            && (1..=40).contains(&self.kind.len())
            && self
                .kind
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_')
    }
}

/// A run a handler's result asks the engine to queue: `{"task", "trigger", "reason"}`.
/// The handler never calls the engine; it says what it wants and the engine decides.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RunRequest {
    task: String,
    trigger: String,
    reason: String,
}

#[derive(Debug, Clone)]
struct Pending {
    run: RunId,
    task: TaskName,
    attempt: Attempt,
    max_attempts: u32,
    state: RunState,
    force: bool,
    cascade: Option<RunId>,
    trigger: Trigger,
    scheduled_for: Instant,
    first_started_at: Option<Instant>,
}

impl Pending {
    fn from_row(row: &RunRow) -> Pending {
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
        }
    }

    fn new_run(run: RunId, new_run: &NewRun) -> Pending {
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
        }
    }
}

/// What one finished attempt turns into.
struct Finish {
    run: RunId,
    attempt: Attempt,
    running: Running,
    to: RunState,
    change: Change,
}

/// SQLite calls block: on the engine's hot paths they run under `block_in_place`, so the
/// runtime moves runner tasks (spawning children, reading their pipes) to other threads.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(work)
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
    /// Task → its running run (at most one attempt per task runs at a time).
    busy: HashMap<TaskName, RunId>,
    queue: VecDeque<Pending>,
    /// Task → how many of its runs wait in `queue`.
    queued_per_task: HashMap<TaskName, usize>,
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
    board: Arc<Board>,
    metrics: Arc<Metrics>,
    api_address: Option<String>,
    started_at: Instant,
    paused: std::collections::HashSet<String>,
    /// Task → its recent finished runs (`board::History`, compact).
    recent: HashMap<TaskName, History>,
    /// Task → `Stats::of` its recent runs, recomputed only when one of them finishes.
    stats: HashMap<TaskName, Stats>,
    /// Something the board shows changed since the last publication.
    dirty: bool,
    published_at: std::time::Instant,
    version: u64,
    /// The store refuses writes (cleared by the next write that succeeds).
    store_fault: Option<StoreFault>,
    /// Claims failed: do not try again before this (the ticks stay due meanwhile).
    claim_retry_at: Option<std::time::Instant>,
    /// The wall clock against the monotonic one.
    wall: WallWatch,
    /// The last step of the wall clock seen.
    clock_step: Option<ClockStep>,
}

impl Engine {
    /// An engine over `store` for `config`. Nothing runs until [`Engine::run`].
    pub fn new(config: Arc<Config>, store: Store, clock: Arc<dyn Clock>, mode: Mode) -> Engine {
        let (worker_tx, worker_rx) = mpsc::unbounded_channel();
        let (commands_tx, commands_rx) = mpsc::channel(256);
        let logs = TaskLogs::new(&config.scheduler.log_dir, &config.logging);
        let clock_now = clock.now();
        Engine {
            config,
            store,
            clock,
            mode,
            instance: uuid::Uuid::new_v4().to_string(),
            logs,
            running: HashMap::new(),
            busy: HashMap::new(),
            queue: VecDeque::new(),
            queued_per_task: HashMap::new(),
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
            board: Arc::new(Board::default()),
            metrics: Arc::new(Metrics::new()),
            api_address: None,
            started_at: clock_now,
            paused: Default::default(),
            recent: HashMap::new(),
            stats: HashMap::new(),
            dirty: true,
            published_at: std::time::Instant::now(),
            version: 0,
            store_fault: None,
            claim_retry_at: None,
            wall: WallWatch::new(clock_now),
            clock_step: None,
        }
    }

    /// The handle to send commands and to stop the engine.
    pub fn handle(&self) -> Handle {
        Handle {
            commands: self.commands_tx.clone(),
            cancel: self.cancel.clone(),
        }
    }

    /// Records where this engine's HTTP API listens (shown in the instances table).
    pub fn set_api_address(&mut self, address: String) {
        self.api_address = Some(address);
    }

    /// The status board this engine publishes (for the HTTP layer).
    pub fn board(&self) -> Arc<Board> {
        self.board.clone()
    }

    /// The metrics this engine keeps.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
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
        if self.mode == Mode::Serve {
            let (logs, config) = (self.logs.clone(), self.config.clone());
            blocking(|| logs.open_all(config.tasks.keys().map(|t| t.as_str())));
        }
        let now = self.clock.now();
        let pid = std::process::id();
        let host = hostname();
        self.store
            .register_instance(&self.instance, pid, &host, self.mode == Mode::Serve, now)?;
        if let Some(address) = &self.api_address {
            self.store.set_instance_api(&self.instance, address)?;
        }
        self.seed_board();
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
        self.publish(true);
        let mut poll = tokio::time::interval(self.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.mode == Mode::Foreground && self.is_idle() {
                break;
            }
            let sleep = self.sleep_until_next_deadline();
            let publish_due = tokio::time::sleep(
                Duration::from_millis(50).saturating_sub(self.published_at.elapsed()),
            );
            let wake = tokio::select! {
                // Ticks first: under load, a fire must not wait behind worker reports.
                biased;
                _ = self.cancel.cancelled() => Wake::Shutdown,
                _ = sleep => Wake::Tick,
                Some(envelope) = self.worker_rx.recv() => Wake::Worker(envelope),
                Some(command) = self.commands_rx.recv() => Wake::Command(command),
                _ = heartbeat.tick() => Wake::Heartbeat,
                _ = poll.tick(), if self.mode == Mode::Serve => Wake::Poll,
                _ = publish_due, if self.dirty => Wake::Publish,
            };
            if !matches!(wake, Wake::Shutdown) {
                self.watch_clock();
            }
            match wake {
                Wake::Shutdown => break,
                Wake::Worker(envelope) => self.on_worker(envelope),
                Wake::Command(command) => self.on_command(command),
                Wake::Tick => self.on_tick(),
                Wake::Heartbeat => self.on_heartbeat(),
                Wake::Poll => self.on_poll(),
                Wake::Publish => {}
            }
            self.dispatch();
            self.dirty = true;
            self.publish(false);
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
        // After a refused claim the due ticks stay due; try again at a measured pace.
        let delay = match self.claim_retry_at {
            Some(at) => delay.max(at.saturating_duration_since(std::time::Instant::now())),
            None => delay,
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
        if !due.is_empty() {
            self.fire_due(&due, now, false);
        }
        while let Some((at, run)) = self.retry_due.first().copied() {
            if at > now {
                break;
            }
            self.retry_due.pop_first();
            if let Some(pending) = self.retry_pending.remove(&run) {
                self.queue_push(pending);
            }
        }
    }

    /// Claims and handles every due tick of every task in `due` (task, first due tick) up
    /// to `now`, in one transaction.
    fn fire_due(&mut self, due: &[(TaskName, Instant)], now: Instant, at_startup: bool) {
        let config = self.config.clone();
        // The pause flags are the engine's own copy (seeded from the store at start-up and
        // changed only through `pause`), the same the board shows.
        let paused = &self.paused;
        struct TaskPlan<'a> {
            task: &'a TaskName,
            key: String,
            plan: crate::schedule::DuePlan,
            spec: &'a TaskSpec,
            fire: bool,
        }
        let mut plans = Vec::new();
        for (task, first_due) in due {
            let Some(spec) = config.tasks.get(task) else {
                self.next_fire.remove(task);
                continue;
            };
            let Some(schedule) = &spec.schedule else {
                self.next_fire.remove(task);
                continue;
            };
            let plan = plan_due(
                schedule,
                *first_due,
                now,
                spec.misfire,
                spec.misfire_grace,
                at_startup,
            );
            // Paused and disabled tasks let their ticks pass unclaimed.
            let fire = spec.enabled && !paused.contains(task.as_str());
            plans.push(TaskPlan {
                task,
                key: schedule_key(schedule),
                plan,
                spec,
                fire,
            });
        }

        let store = self.store.clone();
        let claims = blocking(|| {
            store.batch(|batch| {
                let mut claims = Vec::new();
                for plan in &plans {
                    if !plan.fire {
                        batch.set_next_fire(plan.task, plan.plan.next, Some(&plan.key))?;
                        continue;
                    }
                    if let Some(message) = plan.plan.misfire_message(plan.spec.misfire) {
                        warn!(task = %plan.task, "{message}");
                        batch.record_event("misfire", Some(plan.task.as_str()), None, &message, now)?;
                    }
                    for (tick, action) in &plan.plan.ticks {
                        let new_run = NewRun {
                            task: plan.task.clone(),
                            trigger: match action {
                                TickAction::Fire(trigger) => *trigger,
                                TickAction::Skip => Trigger::Catchup,
                            },
                            scheduled_for: *tick,
                            max_attempts: plan.spec.max_attempts(),
                            force: false,
                            downstream: false,
                            cascade: None,
                        };
                        match batch.claim_fire(&new_run, now, plan.plan.next) {
                            Ok(run) => claims.push((Pending::new_run(run, &new_run), *action)),
                            Err(StoreError::AlreadyClaimed { .. }) => {
                                debug!(task = %plan.task, tick = %tick, "tick already claimed elsewhere");
                            }
                            Err(err) => return Err(err),
                        }
                    }
                    if plan.plan.ticks.is_empty() {
                        batch.set_next_fire(plan.task, plan.plan.next, Some(&plan.key))?;
                    }
                }
                Ok(claims)
            })
        });
        let claims = match claims {
            Ok(claims) => claims,
            Err(err) => {
                // Nothing of the batch was committed: no tick was claimed, so none may be
                // passed over. Each task's next fire stays at its first unclaimed tick and
                // the claims are tried again after STORE_RETRY; once the store takes them,
                // the ticks missed meanwhile meet the task's misfire policy.
                for (task, first_due) in due {
                    let at = self
                        .next_fire
                        .get(task)
                        .map_or(*first_due, |at| (*at).min(*first_due));
                    self.next_fire.insert(task.clone(), at);
                }
                self.claim_retry_at = Some(std::time::Instant::now() + STORE_RETRY);
                self.store_failed(
                    &format!("claiming the due ticks of {} task(s)", plans.len()),
                    &err,
                    now,
                );
                return;
            }
        };
        self.claim_retry_at = None;
        self.store_ok(now);
        for plan in &plans {
            match plan.plan.next {
                Some(at) => self.next_fire.insert(plan.task.clone(), at),
                None => self.next_fire.remove(plan.task),
            };
        }
        for (pending, action) in claims {
            if action == TickAction::Skip {
                let reason = if at_startup {
                    "misfire policy skip: tick missed while the scheduler was down"
                } else {
                    "misfire policy skip: tick missed while the scheduler could not fire it"
                };
                self.skip(&pending, reason, now);
            } else {
                self.admit(pending, now);
            }
        }
    }

    fn set_next_fire(&mut self, task: &TaskName, next: Option<Instant>, key: &str) {
        match next {
            Some(at) => {
                self.next_fire.insert(task.clone(), at);
            }
            None => {
                self.next_fire.remove(task);
            }
        }
        if let Err(err) = self.store.set_next_fire(task, next, Some(key)) {
            warn!(task = %task, "cannot store next fire: {err}");
        }
    }

    fn queue_push(&mut self, pending: Pending) {
        *self
            .queued_per_task
            .entry(pending.task.clone())
            .or_default() += 1;
        self.queue.push_back(pending);
    }

    /// Keeps only the queued runs `keep` says yes to; returns the others.
    fn queue_retain(&mut self, mut keep: impl FnMut(&Pending) -> bool) -> Vec<Pending> {
        let (kept, removed): (VecDeque<Pending>, VecDeque<Pending>) =
            self.queue.drain(..).partition(|p| keep(p));
        self.queue = kept;
        for pending in &removed {
            self.uncount_queued(&pending.task);
        }
        removed.into()
    }

    fn uncount_queued(&mut self, task: &TaskName) {
        if let Some(count) = self.queued_per_task.get_mut(task) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.queued_per_task.remove(task);
            }
        }
    }

    /// Applies the task's overlap policy to a new queued run.
    fn admit(&mut self, pending: Pending, now: Instant) {
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
        if pending.trigger == Trigger::Catchup {
            self.queue_push(pending);
            return;
        }
        let running = self
            .busy
            .get(&pending.task)
            .copied()
            .filter(|run| self.running.get(run).map(|r| r.trigger) != Some(Trigger::Catchup));
        let queued = match self.queued_per_task.get(&pending.task) {
            Some(_) => self
                .queue
                .iter()
                .filter(|p| p.task == pending.task && p.trigger != Trigger::Catchup)
                .count(),
            None => 0,
        };
        match spec.overlap {
            Overlap::Skip if running.is_some() || queued > 0 => {
                let (other, what) = match running {
                    Some(run) => (run, "is still running"),
                    None => (
                        self.queue
                            .iter()
                            .find(|p| p.task == pending.task && p.trigger != Trigger::Catchup)
                            .map(|p| p.run)
                            .unwrap_or(RunId(0)),
                        "is queued",
                    ),
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
                let reason = format!("replaced by run {}", pending.run);
                if let Some(run) = running {
                    self.stop_run(run, StopReason::Abort, &reason);
                }
                let task = pending.task.clone();
                for old in self.queue_retain(|p| p.task != task || p.trigger == Trigger::Catchup) {
                    let change = Change {
                        reason: Some(reason.clone()),
                        ..Change::default()
                    };
                    if self.apply(
                        old.run,
                        old.attempt,
                        old.state,
                        RunState::Aborted,
                        &change,
                        now,
                    ) {
                        self.note_finished(&old.task, old.run, RunState::Aborted, None, now);
                    }
                }
                self.queue_push(pending);
            }
            Overlap::Skip | Overlap::Queue => self.queue_push(pending),
        }
    }

    /// Starts queued runs while worker slots are free, oldest first, one attempt per task,
    /// with all their `→ running` moves in one transaction.
    fn dispatch(&mut self) {
        if self.cancel.is_cancelled() || self.queue.is_empty() {
            return;
        }
        let now = self.clock.now();
        let config = self.config.clone();
        let free = config
            .scheduler
            .max_workers
            .saturating_sub(self.running.len());
        let mut chosen: Vec<Pending> = Vec::new();
        let mut chosen_tasks: std::collections::HashSet<TaskName> = Default::default();
        let mut index = 0;
        while index < self.queue.len() && chosen.len() < free {
            let task = &self.queue[index].task;
            if self.busy.contains_key(task) || chosen_tasks.contains(task) {
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
        let store = self.store.clone();
        let started = blocking(|| {
            store.batch(|batch| {
                Ok(chosen
                    .iter()
                    .map(|p| {
                        batch.transition(p.run, p.attempt, p.state, RunState::Running, &change, now)
                    })
                    .collect::<Vec<_>>())
            })
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
            match result {
                Ok(attempt) => self.start(pending, attempt),
                Err(StoreError::Fenced { found_state, .. }) => {
                    // Another actor moved it (aborted from the CLI, taken by another
                    // instance): it is no longer ours to start.
                    debug!(run = %pending.run, "not starting: now {found_state}");
                }
                Err(err) => warn!(run = %pending.run, "cannot start run: {err}"),
            }
        }
    }

    /// Spawns the runner of a run that just entered `running` at `attempt`.
    fn start(&mut self, pending: Pending, attempt: Attempt) {
        let now = self.clock.now();
        let config = self.config.clone();
        let Some(spec) = config.tasks.get(&pending.task) else {
            return;
        };
        let (stop_tx, stop_rx) = watch::channel(None);
        let log = self.logs.task(pending.task.as_str());
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
            handler: spec.handler.clone(),
            params: spec.params.clone(),
            timeout: spec.timeout,
            kill_grace: config.scheduler.kill_grace,
            checkpoint_path: self.checkpoint_path(pending.run),
            config_path: config.source.clone(),
            log,
        };
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

    /// Handles a burst of runner events (up to 1024 already waiting) in one transaction.
    fn on_worker(&mut self, first: Envelope) {
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
                RunnerEvent::Report(Msg::Checkpoint { data }) => {
                    let path = self.checkpoint_path(envelope.run);
                    if let Err(err) = write_atomically(&path, data.to_string().as_bytes()) {
                        warn!(run = %envelope.run, "cannot write checkpoint file {}: {err}", path.display());
                    }
                }
                RunnerEvent::Report(Msg::Result { data }) => {
                    if let Some(event) = data.get("event") {
                        match serde_json::from_value::<ResultEvent>(event.clone()) {
                            Ok(event) if event.is_allowed() => {
                                if let Some(running) = self.running.get_mut(&envelope.run) {
                                    running.announce = Some(event);
                                }
                            }
                            Ok(event) => {
                                warn!(run = %envelope.run, kind = %event.kind, "ignoring a result event: kinds are lower-case words joined by _, not run_*")
                            }
                            Err(err) => {
                                warn!(run = %envelope.run, "ignoring a malformed event in the result: {err}")
                            }
                        }
                    }
                    if let Some(requests) = data.get("request_runs") {
                        match serde_json::from_value::<Vec<RunRequest>>(requests.clone()) {
                            Ok(requests) => {
                                if let Some(running) = self.running.get_mut(&envelope.run) {
                                    running.requests = requests;
                                }
                            }
                            Err(err) => {
                                warn!(run = %envelope.run, "ignoring malformed request_runs in the result: {err}")
                            }
                        }
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
                            let lag = (*spawned_at - running.scheduled_for)
                                .to_std()
                                .unwrap_or_default();
                            self.metrics.fire_lag.observe(lag.as_secs_f64());
                        }
                    }
                }
                _ => {}
            }
        }
        let store = self.store.clone();
        let applied = blocking(|| {
            store.batch(|batch| {
                for Envelope {
                    run,
                    attempt,
                    event,
                } in &envelopes
                {
                    let (run, attempt) = (*run, *attempt);
                    let written = match event {
                        RunnerEvent::Spawned(pid, at) => batch.record_pid(run, attempt, *pid, *at),
                        RunnerEvent::Report(Msg::Progress { pct, phase }) => {
                            batch.record_progress(run, attempt, *pct, phase.as_deref(), now)
                        }
                        RunnerEvent::Report(Msg::Checkpoint { data }) => {
                            batch.record_checkpoint(run, attempt, &data.to_string())
                        }
                        RunnerEvent::Report(Msg::Result { data }) => {
                            batch.record_result(run, attempt, &data.to_string())
                        }
                        RunnerEvent::Report(Msg::Heartbeat | Msg::Error { .. })
                        | RunnerEvent::Finished { .. } => Ok(true),
                    };
                    if let Err(err) = written {
                        warn!(run = %run, "cannot record runner report: {err}");
                    }
                }
                Ok(finishes
                    .iter()
                    .map(|f| {
                        match batch.transition(
                            f.run,
                            f.attempt,
                            RunState::Running,
                            f.to,
                            &f.change,
                            now,
                        ) {
                            Ok(_) => true,
                            Err(err) => {
                                warn!(run = %f.run, "{err}");
                                false
                            }
                        }
                    })
                    .collect::<Vec<bool>>())
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
        for (finish, ok) in finishes.into_iter().zip(applied) {
            if !ok {
                continue;
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
    fn finish(
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
                (RunState::Succeeded, Change::default())
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
                        let limit = spec.map(|s| s.timeout).unwrap_or_default();
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

    /// Queues the runs a succeeded run's result asked for, in the requesting run's cascade
    /// (so `run … --downstream` waits for them too). Only known tasks and the `drift`
    /// trigger are accepted; anything else is logged and refused.
    fn queue_requested_runs(
        &mut self,
        by: RunId,
        cascade: Option<RunId>,
        requests: &[RunRequest],
        now: Instant,
    ) {
        for request in requests {
            let log = |message: &str| warn!(run = %by, task = %request.task, "{message}");
            if Trigger::parse(&request.trigger) != Some(Trigger::Drift) {
                log("refused a requested run: only the \"drift\" trigger may be requested");
                continue;
            }
            let Some(spec) = self
                .config
                .tasks
                .get(&TaskName::from(request.task.as_str()))
            else {
                log("refused a requested run: no such task");
                continue;
            };
            let new_run = NewRun {
                task: spec.name.clone(),
                trigger: Trigger::Drift,
                scheduled_for: now,
                max_attempts: spec.max_attempts(),
                force: false,
                downstream: false,
                cascade,
            };
            match self.store.enqueue(&new_run, now) {
                Ok(id) => {
                    info!(run = %id, task = %spec.name, requested_by = %by, "queued a requested run: {}", request.reason);
                    self.logs.task(spec.name.as_str()).line(
                        id,
                        Attempt(1),
                        Level::Info,
                        &format!("queued at the request of run {by}: {}", request.reason),
                    );
                    self.admit(Pending::new_run(id, &new_run), now);
                }
                Err(err) => warn!(task = %spec.name, "cannot queue a requested run: {err}"),
            }
        }
    }

    /// After a run of a `--downstream` cascade ends, queues every task of the cascade whose
    /// upstreams within it have all finished. The dependency check then decides.
    fn continue_cascade(&mut self, root: RunId, now: Instant) {
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
                Ok(id) => self.admit(Pending::new_run(id, &new_run), now),
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
                let _ = reply.send(self.trigger(&task, force, downstream, now));
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
                    if let Some(pending) = self.queue.iter().find(|p| p.run == run).cloned() {
                        self.note_finished(&pending.task, run, RunState::Aborted, None, now);
                    }
                    self.queue_retain(|p| p.run != run);
                    self.retry_pending.remove(&run);
                    self.retry_due.retain(|(_, r)| *r != run);
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
    fn trigger(
        &mut self,
        task: &str,
        force: bool,
        downstream: bool,
        now: Instant,
    ) -> Result<RunId, EngineError> {
        let config = self.config.clone();
        let spec = config.task(task).ok_or_else(|| EngineError::UnknownTask {
            task: task.to_string(),
            known: config.task_names().join(", "),
        })?;
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
        let new_run = manual_run(spec, now, force, downstream);
        let run = blocking(|| self.store.enqueue(&new_run, now))?;
        self.admit(Pending::new_run(run, &new_run), now);
        Ok(run)
    }

    fn pause(&mut self, task: &str, paused: bool, now: Instant) -> Result<(), EngineError> {
        let spec = self
            .config
            .task(task)
            .ok_or_else(|| EngineError::UnknownTask {
                task: task.to_string(),
                known: self.config.task_names().join(", "),
            })?;
        blocking(|| self.store.set_paused(&spec.name, paused, now))?;
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
    fn reload(&mut self, now: Instant) -> Result<String, EngineError> {
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
                    self.logs = TaskLogs::new(&new.scheduler.log_dir, &new.logging);
                }
                let hash = new.hash.clone();
                self.config = new;
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
                Err(EngineError::Config(errors))
            }
        }
    }

    /// A new run of a finished run's task (trigger `retry`), handed the old run's last
    /// checkpoint so it resumes where that one stopped.
    fn retry(&mut self, old: RunId, now: Instant) -> Result<RunId, EngineError> {
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
        };
        let run = blocking(|| self.store.enqueue(&new_run, now))?;
        let checkpoint = std::fs::read(self.checkpoint_path(old))
            .ok()
            .or_else(|| row.checkpoint.clone().map(String::into_bytes));
        if let Some(bytes) = checkpoint {
            if let Err(err) = write_atomically(&self.checkpoint_path(run), &bytes) {
                warn!(run = %run, "cannot hand over the checkpoint of run {old}: {err}");
            }
        }
        self.admit(Pending::new_run(run, &new_run), now);
        Ok(run)
    }

    /// Records a run's end for the board and the metrics.
    fn note_finished(
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
    }

    /// Publishes a new snapshot when something changed (at most every 50 ms) or when
    /// `force`d (every heartbeat, so readers can tell the loop is alive).
    fn publish(&mut self, force: bool) {
        if !force && (!self.dirty || self.published_at.elapsed() < Duration::from_millis(50)) {
            return;
        }
        let now = self.clock.now();
        let config = self.config.clone();
        let tasks = config
            .tasks
            .values()
            .map(|spec| {
                let paused = self.paused.contains(spec.name.as_str());
                let recent = self.recent.get(&spec.name);
                TaskSnapshot {
                    name: spec.name.0.clone(),
                    paused,
                    next_fire: if paused || !spec.enabled {
                        None
                    } else {
                        self.next_fire.get(&spec.name).copied()
                    },
                    running: self
                        .busy
                        .get(&spec.name)
                        .and_then(|run| self.running.get(run).map(|r| (run, r)))
                        .map(|(run, r)| RunningRun {
                            run: *run,
                            attempt: r.attempt,
                            started_at: r.attempt_started_at,
                        })
                        .into_iter()
                        .collect(),
                    last: recent.and_then(History::last),
                    stats: self.stats.get(&spec.name).copied().unwrap_or_default(),
                }
            })
            .collect();
        self.version += 1;
        self.metrics.running.set(self.running.len() as i64);
        self.metrics.queued.set(self.queue.len() as i64);
        self.board.publish(Snapshot {
            version: self.version,
            at: now,
            instance: self.instance.clone(),
            started_at: self.started_at,
            config,
            busy: self.running.len(),
            queued: self.queue.len(),
            retry_waiting: self.retry_due.len(),
            tasks,
            store_fault: self.store_fault.clone(),
            clock_step: self.clock_step.clone(),
        });
        self.dirty = false;
        self.published_at = std::time::Instant::now();
    }

    /// Seeds the board's per-task history and pause flags from the store.
    fn seed_board(&mut self) {
        match self.store.paused_tasks() {
            Ok(paused) => self.paused = paused,
            Err(err) => warn!("cannot read paused tasks: {err}"),
        }
        let config = self.config.clone();
        for name in config.tasks.keys() {
            let filter = crate::store::RunFilter {
                task: Some(name.0.clone()),
                limit: board::RECENT_RUNS,
                ..Default::default()
            };
            let Ok(rows) = self.store.runs(&filter) else {
                continue;
            };
            let mut recent = History::default();
            for finished in rows
                .iter()
                .rev()
                .filter(|row| row.state.is_terminal())
                .map(|row| FinishedRun {
                    run: row.id,
                    state: row.state,
                    finished_at: row.finished_at.unwrap_or(row.queued_at),
                    duration: row
                        .started_at
                        .zip(row.finished_at)
                        .and_then(|(start, end)| (end - start).to_std().ok()),
                })
            {
                recent.push(finished);
            }
            self.stats.insert(name.clone(), Stats::of(&recent));
            self.recent.insert(name.clone(), recent);
        }
    }

    fn on_heartbeat(&mut self) {
        let now = self.clock.now();
        self.publish(true);
        match self.store.heartbeat(&self.instance, now) {
            Ok(()) => self.store_ok(now),
            Err(err) => self.store_failed("recording the heartbeat", &err, now),
        }
        self.find_stalled();
        match self.store.abort_requests(&self.instance) {
            Ok(runs) => {
                for (run, reason) in runs {
                    self.stop_run(
                        run,
                        StopReason::Abort,
                        reason.as_deref().unwrap_or("abort requested"),
                    );
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

    /// Adopts runs another process queued (the CLI), and drops from the queue runs that
    /// another process moved on (aborted while queued).
    fn on_poll(&mut self) {
        let now = self.clock.now();
        let waiting = blocking(|| {
            self.store
                .ids_in_states(&[RunState::Queued, RunState::RetryWait])
        });
        // Oldest first: runs queued by other processes are admitted in FIFO order.
        let waiting_in_order: Vec<RunId> = match waiting {
            Ok(ids) => ids,
            Err(err) => {
                warn!("cannot poll for queued runs: {err}");
                return;
            }
        };
        let waiting: std::collections::HashSet<RunId> = waiting_in_order.iter().copied().collect();
        self.queue_retain(|p| waiting.contains(&p.run));
        let known: std::collections::HashSet<RunId> = self
            .queue
            .iter()
            .map(|p| p.run)
            .chain(self.running.keys().copied())
            .chain(self.retry_pending.keys().copied())
            .collect();
        for run in waiting_in_order.iter().filter(|run| !known.contains(run)) {
            match self.store.run(*run) {
                Ok(Some(row)) if row.state == RunState::Queued => {
                    self.admit(Pending::from_row(&row), now)
                }
                Ok(_) => {}
                Err(err) => warn!(run = %run, "cannot read queued run: {err}"),
            }
        }
    }

    fn stop_run(&mut self, run: RunId, reason: StopReason, why: &str) {
        if let Some(running) = self.running.get_mut(&run) {
            if running.stopping.is_none() {
                running.stopping = Some((reason, why.to_string()));
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
            self.note_finished(&pending.task, pending.run, RunState::Skipped, None, now);
            if let Some(root) = pending.cascade {
                self.continue_cascade(root, now);
            }
        }
    }

    fn fail_unconfigured(&mut self, pending: &Pending, now: Instant) {
        let change = Change {
            error: Some(format!("task {} is no longer configured", pending.task)),
            ..Change::default()
        };
        if self.apply(
            pending.run,
            pending.attempt,
            pending.state,
            RunState::Failed,
            &change,
            now,
        ) {
            self.note_finished(&pending.task, pending.run, RunState::Failed, None, now);
        }
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

    /// Stops every built-in worker that has not reported for longer than
    /// `heartbeat_timeout` (at least three of its one-second heartbeats): a stopped
    /// (SIGSTOP) or hung worker would otherwise hold its slot until its timeout. Its group
    /// is killed and the attempt orphaned, then retried or failed by policy.
    fn find_stalled(&mut self) {
        let limit = self
            .config
            .scheduler
            .heartbeat_timeout
            .max(Duration::from_secs(3));
        let stalled: Vec<(RunId, Duration)> = self
            .running
            .iter()
            .filter(|(_, r)| r.beats && r.stopping.is_none())
            .map(|(run, r)| (*run, r.last_report.elapsed()))
            .filter(|(_, silent)| *silent > limit)
            .collect();
        for (run, silent) in stalled {
            let why = format!(
                "no heartbeat from its worker for {} (heartbeat_timeout {})",
                humantime::format_duration(Duration::from_secs(silent.as_secs())),
                humantime::format_duration(limit)
            );
            warn!(run = %run, "stalled: {why}");
            self.stop_run(run, StopReason::Stalled, &why);
        }
    }

    /// The store refused a write: remembered (and shown on the board) until one succeeds.
    fn store_failed(&mut self, doing: &str, err: &StoreError, now: Instant) {
        match &mut self.store_fault {
            Some(fault) => {
                warn!("store still refuses writes ({doing}): {err}");
                fault.doing = doing.to_string();
                fault.error = err.to_string();
            }
            None => {
                tracing::error!(
                    "store refuses writes ({doing}): {err}; due ticks stay due until it takes them"
                );
                self.store_fault = Some(StoreFault {
                    since: now,
                    doing: doing.to_string(),
                    error: err.to_string(),
                });
            }
        }
        self.dirty = true;
    }

    /// A write succeeded: an outage, if there was one, is over and is put on record.
    fn store_ok(&mut self, now: Instant) {
        let Some(fault) = self.store_fault.take() else {
            return;
        };
        let lasted = humantime::format_duration(Duration::from_secs(
            (now - fault.since).num_seconds().max(0) as u64,
        ));
        let message = format!(
            "the store refused writes for {lasted} (since {}; last: {}: {}); ticks due meanwhile met their misfire policy",
            fault.since.to_rfc3339(),
            fault.doing,
            fault.error
        );
        info!("{message}");
        self.log_event("store_recovered", None, None, &message, now);
        self.dirty = true;
    }

    /// Notices a step of the wall clock between two wakes. Stepped back: schedules resume
    /// at their first unclaimed tick after the new wall time. Stepped forward: the ticks
    /// passed over are simply due, and meet each task's misfire policy.
    fn watch_clock(&mut self) {
        let now = self.clock.now();
        let Some(step) = self.wall.observe(now) else {
            return;
        };
        let message = if step.by < chrono::TimeDelta::zero() {
            let moved = self.resume_schedules(now, step.until);
            format!(
                "{}: ticks already claimed (up to {}) are not run again; {moved} schedule(s) resume from the new wall time",
                step.describe(),
                step.until.to_rfc3339()
            )
        } else {
            format!(
                "{}: the ticks passed over meet each task's misfire policy",
                step.describe()
            )
        };
        warn!("{message}");
        self.log_event("clock_step", None, None, &message, now);
        self.clock_step = Some(step);
        self.dirty = true;
    }

    /// After the wall clock went back to `now` (from `until`): each scheduled task's next
    /// fire becomes its first tick after `now` that no run has claimed (a claimed tick is
    /// never run twice). Returns how many next fires moved.
    fn resume_schedules(&mut self, now: Instant, until: Instant) -> usize {
        let config = self.config.clone();
        let mut moved = 0;
        for spec in config.tasks.values() {
            let Some(schedule) = &spec.schedule else {
                continue;
            };
            let Some(old) = self.next_fire.get(&spec.name).copied() else {
                continue;
            };
            let claimed = match self.store.claimed_ticks(&spec.name, now, old.max(until)) {
                Ok(claimed) => claimed,
                Err(err) => {
                    warn!(task = %spec.name, "cannot read claimed ticks after a clock step: {err}");
                    continue;
                }
            };
            let next = schedule
                .ticks_after(now)
                .take_while(|tick| *tick < old)
                .take(100_000)
                .find(|tick| !claimed.contains(tick));
            if let Some(next) = next {
                let key = schedule_key(schedule);
                self.set_next_fire(&spec.name, Some(next), &key);
                moved += 1;
            }
        }
        moved
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
                        self.stop_run(run, StopReason::Shutdown, "service shutting down");
                    }
                }
            }
        }
        if let Err(err) = self.store.stop_instance(&self.instance, self.clock.now()) {
            warn!("cannot mark instance stopped: {err}");
        }
    }
}

/// The run a manual trigger of `spec` creates.
fn manual_run(spec: &TaskSpec, now: Instant, force: bool, downstream: bool) -> NewRun {
    NewRun {
        task: spec.name.clone(),
        trigger: Trigger::Manual,
        scheduled_for: now,
        max_attempts: spec.max_attempts(),
        force,
        downstream,
        cascade: None,
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
    Ok(store.enqueue(&manual_run(spec, now, force, downstream), now)?)
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
