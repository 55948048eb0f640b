//! The engine: one loop that turns ticks, requests and worker reports into run state
//! changes.
//!
//! Every cause of work is a [`Wake`] variant, and the loop is one `select!` over them:
//! `Tick` (the earliest persisted next fire or retry is due), `Worker` (a runner event),
//! `Command` (from a [`Handle`]), `Heartbeat` (liveness, abort requests, orphans), `Poll`
//! (runs queued by another process, such as the CLI), `Hint` (the database says another
//! process changed something: the poll's or the abort check's work at once), `KeepAlive`
//! (the loop tells its [`ServiceManager`], systemd's watchdog, that it still turns) and
//! `Shutdown`.
//!
//! The timer is our own: it sleeps until just before the earliest next fire (the rest on
//! its thread, to the microsecond), wakes early on any other cause, and re-reads the wall
//! clock after waking; a fire is claimed in the store before
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
mod cascade;
mod circuit;
mod cluster;
mod commands;
mod deadline;
mod dispatch;
mod faults;
mod finish;
mod fire;
mod handle;
mod hints;
mod metrics;
mod publish;
mod queue;
mod recovery;
mod supervise;
#[cfg(test)]
mod tests;

pub use board::{
    Board, FinishedRun, History, PoolSnapshot, RunningRun, Snapshot, Stats, TaskSnapshot,
    RECENT_RUNS,
};
pub use circuit::open_circuit;
pub use cluster::{ClusterView, ConfigConflict, DatabaseClock, OFFSET_WARNING};
pub use commands::{
    backfill, backfill_bound, backfill_zone, enqueue_manual, BackfillTick, BACKFILL_MAX_TICKS,
};
pub use faults::{ClockStep, StoreFault};
pub use handle::{Clock, Command, EngineError, Handle, Mode, SystemClock};
pub use metrics::Metrics;

use crate::worker::protocol::RunRequest;
use faults::WallWatch;
use finish::Running;
use queue::Pending;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::model::{Instant, RunId, TaskName};
use crate::runner::{Envelope, StopReason};
use crate::store::{Change, Move, Store};
use crate::tasklog::TaskLogs;

/// How long before the earliest fire or retry the loop's timer wakes; the engine then
/// claims what comes due then and waits out the rest precisely (`Engine::on_tick_wake`).
const WAKE_EARLY: Duration = Duration::from_millis(3);

/// The last stretch of that wait is spun rather than slept, after a quiet spell: a
/// thread sleep overshoots by its timer slack and by the wake of a CPU gone idle, which
/// measured 120 µs at the median and 500 µs at p99 on a two-vCPU VM; a spin, 1–2 µs.
const SPIN: Duration = Duration::from_micros(200);

/// Fires closer together than this keep the CPU awake anyway: their waits are slept
/// whole, so dense fires never spin away more than `SPIN` per `QUIET` (1 %).
const QUIET: Duration = Duration::from_millis(20);

/// A fire or retry the loop's timer woke ahead of: when it comes, by the engine's clock
/// and by the monotonic one.
#[derive(Clone, Copy)]
struct Deadline {
    wall: Instant,
    mono: std::time::Instant,
    /// No tick for `QUIET` before it: the last `SPIN` of the wait is spun.
    quiet: bool,
}

/// A start of the wake at hand, its child not spawned yet (`Engine::launching`).
struct Launching {
    spec: crate::runner::AttemptSpec,
    launch: crate::runner::Launched,
    stop: tokio::sync::watch::Receiver<Option<StopReason>>,
    span: tracing::Span,
}

/// Every cause of work in the loop.
enum Wake {
    Tick,
    Worker(Envelope),
    Command(Command),
    Heartbeat,
    Poll,
    /// Another process changed something (the store's hints); `None`: the feed ended.
    Hint(Option<crate::store::Hint>),
    /// The loop says it is alive to the service manager (systemd's watchdog).
    KeepAlive,
    /// The board is stale and its rate limit has passed.
    Publish,
    Shutdown,
}

/// Whoever supervises the process (systemd's `sd_notify` in the CLI): the engine says when
/// it is ready, that its loop still turns, and when it stops, and knows nothing of how
/// that is told.
pub trait ServiceManager: Send + Sync {
    /// Start-up is done (registered, recovered, start-up fires claimed, every next fire
    /// stored): the loop is about to run.
    fn ready(&self, tasks: usize);
    /// How often the loop calls [`ServiceManager::alive`]; `None`: never.
    fn keepalive_every(&self) -> Option<Duration>;
    /// The loop turned. Called from the loop itself, so a loop that hangs stops calling.
    fn alive(&self);
    /// Shutdown has begun.
    fn stopping(&self);
}

/// Gives the heap pages start-up freed (reading the config, planning every task) back to
/// the system: glibc keeps them otherwise, about 1 MiB of resident memory with 1,000 tasks.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only returns free pages of glibc's heap; it takes no pointer
    // and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
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
    /// Task → its run running on another instance (cluster mode; as of the last poll).
    busy_elsewhere: HashMap<TaskName, RunId>,
    /// Instance → the runs it is running (as of the last poll).
    running_by_owner: HashMap<String, Vec<RunId>>,
    /// The store's [`Store::data_version`] at the last poll that read the unfinished runs.
    polled_version: Option<i64>,
    queue: VecDeque<Pending>,
    /// Task → how many of its runs wait in `queue`.
    queued_per_task: HashMap<TaskName, usize>,
    next_fire: HashMap<TaskName, Instant>,
    /// Tasks whose circuit is open (paused by `max_consecutive_failures`; `circuit.rs`).
    circuits: HashSet<String>,
    /// Runs whose `deadline_missed` is raised (`deadline.rs`), within the checked window.
    deadlines_raised: HashSet<RunId>,
    /// The first deadline check (which looks further back) is done.
    deadlines_checked: bool,
    retry_due: BTreeSet<(Instant, RunId)>,
    retry_pending: HashMap<RunId, Pending>,
    worker_tx: mpsc::Sender<Envelope>,
    worker_rx: mpsc::Receiver<Envelope>,
    commands_rx: mpsc::Receiver<Command>,
    commands_tx: mpsc::Sender<Command>,
    cancel: CancellationToken,
    /// When runs queued by other processes were last looked for (`hints.rs`).
    polled_at: std::time::Instant,
    /// When the loop last handled a tick (`wait_for` spins only after `QUIET`).
    ticked_at: Option<std::time::Instant>,
    /// Wake-ups from the database (cluster mode, unless `poll_only`).
    hints: Option<crate::store::Hints>,
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
    /// While a wake's claims are handed out: the runs skipped meanwhile, written in one
    /// transaction at its end (`flush_skips`) rather than one each.
    skips: Option<Vec<(Pending, Change)>>,
    /// A tick whose run can start at once is claimed and started in one transaction
    /// (`fire_due`, `dispatch::starts_at_once`). Set when the loop starts: the engine's
    /// steps called on their own (the tests') leave every start to `dispatch`.
    start_with_claim: bool,
    /// While the one start of a wake's claims is handed out: its child is spawned on the
    /// engine's thread at once rather than by its runner task, which another thread must
    /// wake for first (a lone fire's latency). Several starts leave their spawns to the
    /// runners, which run them in parallel.
    spawn_here: bool,
    /// While a wake claims ahead of its deadline (`on_tick_wake`): the deadline, which
    /// `fire_due` waits for after its commit and before its starts.
    hold: Option<Deadline>,
    /// While the loop handles a wake: its starts, whose children are spawned together
    /// at its end (`dispatch::launch_waiting`). `None` outside the loop (start-up, the
    /// tests' steps): each runner task spawns its own.
    launching: Option<Vec<Launching>>,
    /// How long ahead of a deadline the timer wakes: `WAKE_EARLY` (a test widens it to
    /// watch what is done before the deadline).
    wake_early: Duration,
    /// The wall clock against the monotonic one.
    wall: WallWatch,
    /// The last step of the wall clock seen.
    clock_step: Option<ClockStep>,
    /// Cluster mode (a database several instances share): lease and database clock.
    cluster: Option<cluster::Cluster>,
    /// What the board shows of the cluster.
    cluster_view: ClusterView,
    /// The last reload failed (cleared by one that succeeds).
    reload_failure: Option<ReloadFailure>,
    /// Told of readiness, liveness and shutdown (`turbosched serve` under systemd).
    service_manager: Option<Arc<dyn ServiceManager>>,
}

/// A reload refused the file on disk: the running config is the one before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadFailure {
    /// When.
    pub at: Instant,
    /// The config errors, one per line.
    pub error: String,
}

impl Engine {
    /// An engine over `store` for `config`. Nothing runs until [`Engine::run`].
    pub fn new(config: Arc<Config>, store: Store, clock: Arc<dyn Clock>, mode: Mode) -> Engine {
        let (worker_tx, worker_rx) = mpsc::channel(crate::runner::EVENT_QUEUE);
        let (commands_tx, commands_rx) = mpsc::channel(256);
        let logs = TaskLogs::new(&config.scheduler.log_dir, &config.logging);
        let clock_now = clock.now();
        // A new instance id per process; every event this engine appends names it.
        let instance = uuid::Uuid::new_v4().to_string();
        Engine {
            config,
            store: store.written_by(&instance),
            clock,
            mode,
            instance,
            logs,
            running: HashMap::new(),
            busy: HashMap::new(),
            busy_elsewhere: HashMap::new(),
            running_by_owner: HashMap::new(),
            polled_version: None,
            queue: VecDeque::new(),
            queued_per_task: HashMap::new(),
            next_fire: HashMap::new(),
            circuits: HashSet::new(),
            deadlines_raised: HashSet::new(),
            deadlines_checked: false,
            retry_due: BTreeSet::new(),
            retry_pending: HashMap::new(),
            worker_tx,
            worker_rx,
            commands_rx,
            commands_tx,
            cancel: CancellationToken::new(),
            polled_at: std::time::Instant::now(),
            ticked_at: None,
            hints: None,
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
            skips: None,
            start_with_claim: false,
            spawn_here: false,
            hold: None,
            launching: None,
            wake_early: WAKE_EARLY,
            wall: WallWatch::new(clock_now),
            clock_step: None,
            cluster: None,
            cluster_view: ClusterView::default(),
            reload_failure: None,
            service_manager: None,
        }
    }

    /// Tells `manager` of readiness, liveness and shutdown.
    pub fn set_service_manager(&mut self, manager: Arc<dyn ServiceManager>) {
        self.service_manager = Some(manager);
    }

    /// The handle to send commands and to stop the engine.
    pub fn handle(&self) -> Handle {
        Handle {
            commands: self.commands_tx.clone(),
            cancel: self.cancel.clone(),
        }
    }

    /// This engine's instance id (new for each process).
    pub fn instance(&self) -> &str {
        &self.instance
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
        params: Option<crate::config::RunParams>,
    ) -> Result<RunId, EngineError> {
        let run = enqueue_manual(
            &self.config,
            &self.store,
            self.clock.now(),
            task,
            force,
            downstream,
            params,
        )?;
        self.roots.push(run);
        Ok(run)
    }

    /// Runs already queued in the store (a backfill's) that this foreground engine runs
    /// and waits for.
    pub fn adopt_roots(&mut self, runs: &[RunId]) {
        self.roots.extend_from_slice(runs);
    }

    /// Runs the loop until shutdown (serve) or until its runs are done (foreground).
    pub async fn run(mut self) -> Result<(), EngineError> {
        if self.mode == Mode::Serve {
            blocking(|| self.join_cluster());
            self.subscribe_hints();
            if let Err(err) = blocking(|| self.store.presize_log()) {
                // Only speed is lost: the log grows as the commits come.
                warn!("cannot give the database's write-ahead log its working size: {err}");
            }
        }
        let now = self.clock.now();
        let pid = std::process::id();
        let host = hostname();
        self.store
            .register_instance(&self.instance, pid, &host, self.mode == Mode::Serve, now)?;
        if let Some(address) = &self.api_address {
            self.store.set_instance_api(&self.instance, address)?;
        }
        self.store
            .set_instance_config(&self.instance, &self.config.hash)?;
        // Start-up is long with ten thousand tasks: a SIGTERM meanwhile is honoured between
        // its steps (and every few hundred tasks within them).
        blocking(|| self.seed_board());
        self.metrics
            .know_tasks(self.config.tasks.keys().map(|t| t.as_str()));
        if self.mode == Mode::Serve && !self.cancel.is_cancelled() {
            blocking(|| self.recover(now))?;
        }
        if self.mode == Mode::Serve && !self.cancel.is_cancelled() {
            blocking(|| self.plan_startup_fires(now));
        }
        if self.cancel.is_cancelled() {
            info!("stopped during start-up");
            self.shutdown().await;
            return Ok(());
        }
        match self.mode {
            Mode::Serve => {
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
        release_freed_memory();

        let mut heartbeat = tokio::time::interval(self.config.scheduler.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.publish(true);
        self.polled_at = std::time::Instant::now();
        let keepalive_every = self
            .service_manager
            .as_ref()
            .and_then(|manager| manager.keepalive_every());
        let mut keepalive =
            tokio::time::interval(keepalive_every.unwrap_or(Duration::from_secs(3600)));
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if let Some(manager) = &self.service_manager {
            manager.ready(self.config.tasks.len());
        }
        self.start_with_claim = true;
        loop {
            if self.mode == Mode::Foreground && self.is_idle() {
                break;
            }
            let delay = self.next_deadline_delay();
            // Woken early on purpose; the handler claims, then waits out the rest (`on_tick_wake`).
            let sleep = tokio::time::sleep(delay.saturating_sub(self.wake_early));
            let publish_left =
                Duration::from_millis(50).saturating_sub(self.published_at.elapsed());
            let publish_due = tokio::time::sleep(publish_left);
            let poll_left = self
                .poll_interval()
                .saturating_sub(self.polled_at.elapsed());
            let poll_due = tokio::time::sleep(poll_left);
            let wake = tokio::select! {
                // Ticks first: under load, a fire must not wait behind worker reports.
                biased;
                _ = self.cancel.cancelled() => Wake::Shutdown,
                // Before the ticks: a loop busy firing is alive, not hung.
                _ = keepalive.tick(), if keepalive_every.is_some() => Wake::KeepAlive,
                // A deadline already passed is a tick now, without the timer: a fresh
                // zero-length `sleep` is not ready at its first poll (tokio fires it at the
                // timer driver's next turn), and, made anew every turn, it lost every turn
                // to a worker report that was ready — a busy instance never fired again
                // (found by the cluster kill -9 storm: a backlog of thousands of runs).
                // Only one already due: one merely within WAKE_EARLY taken here at every
                // turn would starve the heartbeat and the reports below whenever fires
                // come closer together than that (thousands of jittered tasks); the
                // `sleep` arm wakes early for those, and the handler waits the rest.
                _ = std::future::ready(()), if delay.is_zero() => Wake::Tick,
                _ = sleep => Wake::Tick,
                // The heartbeat before worker reports: under a steady stream of reports
                // (hundreds of runs a second) the reports arm is ready at every turn, and a
                // heartbeat behind it never ran — in a cluster the lease then lapsed, the
                // instance fenced itself and killed all its children every few seconds
                // (found by the cluster kill -9 storm). It is due once an interval.
                _ = heartbeat.tick() => Wake::Heartbeat,
                // A poll or publication already due, likewise, before worker reports: both
                // are rate-limited, so they cannot starve the reports, and a fresh sleep
                // would lose every turn to them (runs adopted late, a stale board).
                _ = std::future::ready(()), if poll_left.is_zero() && self.mode == Mode::Serve => Wake::Poll,
                _ = std::future::ready(()), if publish_left.is_zero() && self.dirty => Wake::Publish,
                Some(envelope) = self.worker_rx.recv() => Wake::Worker(envelope),
                Some(command) = self.commands_rx.recv() => Wake::Command(command),
                hint = hints::next_hint(&mut self.hints), if self.hints.is_some() => Wake::Hint(hint),
                _ = poll_due, if self.mode == Mode::Serve => Wake::Poll,
                _ = publish_due, if self.dirty => Wake::Publish,
            };
            if !matches!(wake, Wake::Shutdown) {
                // A lease that may have been reaped is noticed before anything else is
                // done: a process resumed after a SIGSTOP fences itself first.
                self.check_lease();
                self.watch_clock();
            }
            if let Wake::Shutdown = wake {
                break;
            }
            // Every handler reads or writes the store (and files): the whole of it runs
            // under `block_in_place`, so runner tasks keep the other threads.
            blocking(|| {
                self.launching = Some(Vec::new());
                match wake {
                    Wake::Worker(envelope) => self.on_worker(envelope),
                    Wake::Command(command) => self.on_command(command),
                    Wake::Tick => self.on_tick_wake(),
                    Wake::Heartbeat => self.on_heartbeat(),
                    Wake::Poll => {
                        self.polled_at = std::time::Instant::now();
                        self.on_poll()
                    }
                    Wake::Hint(hint) => self.on_hint(hint),
                    Wake::KeepAlive => {
                        if let Some(manager) = &self.service_manager {
                            manager.alive();
                        }
                    }
                    Wake::Publish | Wake::Shutdown => {}
                }
                self.dispatch();
                self.launch_waiting();
            });
            self.publish(false);
        }
        self.shutdown().await;
        Ok(())
    }

    fn is_idle(&self) -> bool {
        self.running.is_empty() && self.queue.is_empty() && self.retry_due.is_empty()
    }

    /// The earliest fire or retry the timer woke `wake_early` ahead of, on both clocks;
    /// `None` when it has come already (or is further off: a wake for another cause).
    fn deadline_ahead(&self) -> Option<Deadline> {
        let delay = self.next_deadline_delay();
        if delay.is_zero() || delay > self.wake_early {
            return None;
        }
        let wall = self.clock.now() + chrono::TimeDelta::from_std(delay).ok()?;
        Some(Deadline {
            wall,
            // Against the monotonic clock: the engine's may be a test's, standing still.
            mono: std::time::Instant::now() + delay,
            quiet: self.ticked_at.is_none_or(|at| at.elapsed() >= QUIET),
        })
    }

    /// Waits for `deadline` here, to the microsecond, rather than tokio's whole
    /// milliseconds (a timer rounded up to the next millisecond, then the poll's timeout
    /// rounded up again: a fire started up to ~2 ms late). A thread sleep, and after a
    /// quiet spell its last `SPIN` spun. Nothing to wait for once it has come.
    fn wait_for(&mut self, deadline: Option<&Deadline>) {
        if let Some(deadline) = deadline {
            let left = deadline
                .mono
                .saturating_duration_since(std::time::Instant::now());
            if deadline.quiet {
                std::thread::sleep(left.saturating_sub(SPIN));
                while std::time::Instant::now() < deadline.mono {
                    std::hint::spin_loop();
                }
            } else if !left.is_zero() {
                std::thread::sleep(left);
            }
        }
        self.ticked_at = Some(std::time::Instant::now());
    }

    /// How long until the earliest next fire or retry, read from the wall clock now (zero:
    /// one is due).
    fn next_deadline_delay(&self) -> Duration {
        let earliest = self
            .next_fire
            .iter()
            .map(|(task, at)| self.due_at(task, *at))
            .chain(self.retry_due.first().map(|(at, _)| *at))
            .min();
        let delay = match earliest {
            Some(at) => (at - self.clock.now()).to_std().unwrap_or(Duration::ZERO),
            // Nothing scheduled: wake rarely; any other cause wakes the loop anyway.
            None => Duration::from_secs(3600),
        };
        // After a refused claim the due ticks stay due; try again at a measured pace.
        match self.claim_retry_at {
            Some(at) => delay.max(at.saturating_duration_since(std::time::Instant::now())),
            None => delay,
        }
    }

    /// One state change through the store; logs and returns false when refused.
    fn apply(&self, step: &Move, change: &Change, now: Instant) -> bool {
        match self.store.transition(step, change, now) {
            Ok(_) => true,
            Err(err) => {
                warn!(run = %step.run, "{err}");
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

    /// Graceful shutdown: stop firing, let attempts finish within `shutdown_grace`, then
    /// stop them and put their runs back in the queue. Nothing stays `running`.
    async fn shutdown(&mut self) {
        let now = self.clock.now();
        self.cancel.cancel();
        if let Some(manager) = &self.service_manager {
            manager.stopping();
        }
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

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}
