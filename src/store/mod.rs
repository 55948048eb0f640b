//! The durable truth: runs, attempts, per-task state, events and instances.
//!
//! A run's life, as the engine drives it through [`Tx::transition`]:
//! `queued → running → succeeded | failed | timed_out | aborted`, `queued → skipped`,
//! `running → retry_wait → running`, `running → orphaned → queued | failed`.
//!
//! Shape: [`Store`] is the façade every caller holds (cheap to clone); inside it, an
//! `Arc<dyn Backend>`. A [`Backend`] answers the reads and runs [`Backend::write`]: one
//! transaction, whose every write goes through one type, [`Tx`]. [`Store::batch`] groups
//! many writes in one transaction; the single-operation methods of `Store` wrap one. The
//! backends are SQLite (`sqlite.rs`) and PostgreSQL (`postgres.rs`, single-instance
//! semantics so far), chosen by [`Store::open`]; what every backend must guarantee is written
//! once, as the conformance suite (`conformance.rs`), and run against each.
//!
//! Invariants:
//! - [`Tx::transition`] is the only code that writes a run's `state`. Its UPDATE is
//!   guarded by the expected state *and* attempt (a [`Move`]); zero rows changed is an
//!   error ([`StoreError::Fenced`]), never ignored. The legal moves are
//!   [`RunState::can_become`].
//! - Every write is one transaction, and every state change appends its event in that
//!   same transaction, so the event log never disagrees with the runs.
//! - This module knows nothing of HTTP, JSON bodies or processes: results and checkpoints
//!   are opaque text.
//!
//! Progress: [`Tx::record_progress`] writes every report to the run row, but appends a
//! `run_progress` event only when it is news — the attempt's first report; later, another
//! phase or another 5 % step (100 % being one), at most once a second per run. A handler
//! reporting a thousand times no longer writes a thousand events, and SSE clients see
//! each step; the row is what `GET /scheduler/runs/<id>` and the dashboard show. The rule
//! is `progress_is_news`, here, shared by every backend.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::model::{to_micros, Attempt, Instant, RunId, RunState, TaskName, Trigger};

pub mod migrate;
mod postgres;
mod sqlite;

#[cfg(test)]
mod conformance;
#[cfg(test)]
mod tests;

/// The schema version this build writes (SQLite's `meta.schema_version`).
const SCHEMA_VERSION: usize = 5;

/// What went wrong in the store, and what the caller should make of it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened or prepared.
    #[error("cannot open run database {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rusqlite::Error,
    },
    /// The PostgreSQL database could not be reached or prepared.
    #[error("cannot open run database {database}: {reason}")]
    PostgresOpen {
        /// The URL, without its password.
        database: String,
        /// Why.
        reason: String,
    },
    /// The database was written by a newer turbosched, whose schema this one cannot read.
    #[error("run database {database} has schema version {found}, newer than this turbosched ({supported}); use a newer turbosched, or a backup made by this one")]
    NewerSchema {
        /// The file, or the URL without its password.
        database: String,
        /// The version found in `meta.schema_version`.
        found: usize,
        /// The newest version this build reads (each backend numbers its own).
        supported: usize,
    },
    /// The database said no.
    #[error("run database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// PostgreSQL, or the pool of connections to it, said no.
    #[error("run database: {0}")]
    Postgres(PostgresError),
    /// This backend does not do that; the message says what to use instead.
    #[error("{operation}: not supported; {instead}")]
    NotSupported {
        /// What was asked.
        operation: String,
        /// What to do instead.
        instead: &'static str,
    },
    /// Somebody already claimed this task's tick: do not run it again.
    #[error("{task} at {scheduled_for} is already claimed")]
    AlreadyClaimed {
        /// The task.
        task: TaskName,
        /// The tick.
        scheduled_for: Instant,
    },
    /// The move is not in the table of legal moves.
    #[error("run {run}: illegal transition {from} -> {to}")]
    IllegalTransition {
        /// The run.
        run: RunId,
        /// Where it was said to be.
        from: RunState,
        /// Where it was asked to go.
        to: RunState,
    },
    /// The run is no longer where the caller believed: another attempt or actor moved it.
    #[error("run {run}: expected {expected_state} at attempt {expected_attempt}, found {found_state} at attempt {found_attempt}")]
    Fenced {
        /// The run.
        run: RunId,
        /// The state the caller expected.
        expected_state: RunState,
        /// The attempt the caller expected.
        expected_attempt: Attempt,
        /// The state found.
        found_state: RunState,
        /// The attempt found.
        found_attempt: Attempt,
    },
    /// Another run of the task is running (on this instance or another): one attempt
    /// per task at a time, across every instance on the database.
    #[error("run {run}: {task} already has run {running} running")]
    TaskBusy {
        /// The run that was to start.
        run: RunId,
        /// Its task.
        task: TaskName,
        /// The run of that task that is running.
        running: RunId,
    },
    /// No such run.
    #[error("no run with id {0}")]
    NotFound(RunId),
    /// A stored value this version cannot read.
    #[error("run {run}: unreadable stored value {value:?}")]
    Corrupt {
        /// The run.
        run: RunId,
        /// The value.
        value: String,
    },
}

impl StoreError {
    /// True when the database could not take the operation at all — a full disk, an I/O
    /// error, a read-only or locked file — as opposed to a refusal of this operation
    /// (`AlreadyClaimed`, `Fenced`, …). Such a store is *unavailable*: the engine keeps its
    /// ticks due and the API answers 503 until a write succeeds again.
    pub fn is_unavailable(&self) -> bool {
        use rusqlite::ErrorCode::*;
        let source = match self {
            StoreError::Open { source, .. } => source,
            StoreError::Sql(source) => source,
            StoreError::PostgresOpen { .. } => return true,
            StoreError::Postgres(err) => return err.unavailable,
            _ => return false,
        };
        match source.sqlite_error_code() {
            Some(code) => matches!(
                code,
                DiskFull
                    | SystemIoFailure
                    | ReadOnly
                    | CannotOpen
                    | DatabaseBusy
                    | DatabaseLocked
                    | PermissionDenied
                    | OutOfMemory
                    | FileLockingProtocolFailed
            ),
            None => matches!(source, rusqlite::Error::ToSqlConversionFailure(_)),
        }
    }
}

/// An error from PostgreSQL or its connection pool (`postgres.rs` builds it): the
/// message with its causes, the SQLSTATE, and whether it means the database cannot take
/// operations at all (no connection, the server shutting down, a full disk, a read-only
/// server) rather than refusing this one.
#[derive(Debug, Clone)]
pub struct PostgresError {
    message: String,
    code: Option<String>,
    unavailable: bool,
}

impl std::fmt::Display for PostgresError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PostgresError {}

/// A run to insert.
#[derive(Debug, Clone)]
pub struct NewRun {
    /// Its task.
    pub task: TaskName,
    /// What caused it.
    pub trigger: Trigger,
    /// The nominal tick (the request time for manual runs).
    pub scheduled_for: Instant,
    /// Attempts in all.
    pub max_attempts: u32,
    /// Bypass the dependency check.
    pub force: bool,
    /// On success, trigger the tasks that depend on this one.
    pub downstream: bool,
    /// The root run of the cascade this run belongs to.
    pub cascade: Option<RunId>,
    /// The run's own params (a JSON object, merged over the task's at start), if given.
    pub params: Option<String>,
}

/// One delivery of one event to one alert's endpoint, to insert ([`Tx::add_deliveries`]).
#[derive(Debug, Clone)]
pub struct NewDelivery {
    /// The event's sequence number.
    pub event_seq: i64,
    /// The event's kind (`run_failed`).
    pub kind: String,
    /// The event's task, if about one.
    pub task: Option<String>,
    /// The event's run, if about one.
    pub run_id: Option<RunId>,
    /// The body to POST (opaque text: JSON built by the caller).
    pub payload: String,
}

/// One alert delivery as stored (the outbox of `[[alerts]]`).
#[derive(Debug, Clone)]
pub struct DeliveryRow {
    /// The alert's name.
    pub alert: String,
    /// The event's sequence number.
    pub event_seq: i64,
    /// The event's kind.
    pub kind: String,
    /// The event's task.
    pub task: Option<String>,
    /// The event's run.
    pub run_id: Option<RunId>,
    /// When it was derived from the event.
    pub created_at: Instant,
    /// The body.
    pub payload: String,
    /// `pending`, `delivered` or `failed` (gave up).
    pub state: String,
    /// POSTs tried so far.
    pub attempts: u32,
    /// When the next POST is due (while pending).
    pub next_attempt_at: Instant,
    /// The instance that holds it now.
    pub claimed_by: Option<String>,
    /// The last HTTP status, if one came back.
    pub last_status: Option<i32>,
    /// The last failure.
    pub last_error: Option<String>,
    /// When it was delivered or given up.
    pub finished_at: Option<Instant>,
}

/// How one POST of a delivery went ([`Tx::record_delivery`]).
#[derive(Debug, Clone)]
pub enum DeliveryOutcome {
    /// A 2xx came back.
    Delivered {
        /// The status.
        status: i32,
    },
    /// It failed; try again at `at`.
    Retry {
        /// The status, if one came back.
        status: Option<i32>,
        /// What went wrong.
        error: String,
        /// When to try again.
        at: Instant,
    },
    /// It failed and no attempt is left.
    GaveUp {
        /// The status, if one came back.
        status: Option<i32>,
        /// What went wrong.
        error: String,
    },
}

/// What [`Tx::record_delivery`] writes for `outcome`: the state, the status, the error
/// and when the next attempt is due — the same for every backend.
fn delivery_columns(
    outcome: &DeliveryOutcome,
    _now: Instant,
) -> (&'static str, Option<i32>, Option<String>, Option<Instant>) {
    match outcome {
        DeliveryOutcome::Delivered { status } => ("delivered", Some(*status), None, None),
        DeliveryOutcome::Retry { status, error, at } => {
            ("pending", *status, Some(error.clone()), Some(*at))
        }
        DeliveryOutcome::GaveUp { status, error } => ("failed", *status, Some(error.clone()), None),
    }
}

/// Fields a transition may set besides the state.
#[derive(Debug, Clone, Default)]
pub struct Change {
    /// Exit code of the attempt that ended.
    pub exit_code: Option<i32>,
    /// Error text (the last failure).
    pub error: Option<String>,
    /// Why skipped / aborted / orphaned / queued again.
    pub reason: Option<String>,
    /// Owner instance, for `→ running`.
    pub owner: Option<String>,
    /// When the next attempt is due, for `→ retry_wait`.
    pub next_attempt_at: Option<Instant>,
    /// Raise `max_attempts` by one (an attempt cut short by shutdown does not count).
    pub refund_attempt: bool,
}

/// A move of one run from one state to another, as its mover believes the run stands:
/// the guard of [`Tx::transition`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    /// The run.
    pub run: RunId,
    /// The attempt the mover believes current (the one ending, or the last one before a
    /// start).
    pub attempt: Attempt,
    /// The state the mover believes the run is in.
    pub from: RunState,
    /// Where it goes.
    pub to: RunState,
}

/// What a legal [`Move`] writes besides the state, the same for every backend.
pub(crate) struct Landing {
    /// The move enters `running`: a new attempt starts.
    pub(crate) starting: bool,
    /// The attempt the run is left at (one more when starting).
    pub(crate) attempt: Attempt,
    /// `now` in microseconds.
    pub(crate) now: i64,
    /// When the run finished, for a terminal state.
    pub(crate) finished_at: Option<i64>,
}

impl Move {
    /// Checks the move is legal and works out what it writes besides the state.
    pub(crate) fn landing(&self, now: Instant) -> Result<Landing, StoreError> {
        self.check_legal()?;
        let starting = self.to == RunState::Running;
        let now = to_micros(now);
        Ok(Landing {
            starting,
            attempt: if starting {
                Attempt(self.attempt.0 + 1)
            } else {
                self.attempt
            },
            now,
            finished_at: self.to.is_terminal().then_some(now),
        })
    }

    /// [`StoreError::IllegalTransition`] unless `from → to` is in the table of legal moves.
    fn check_legal(&self) -> Result<(), StoreError> {
        if self.from.can_become(self.to) {
            Ok(())
        } else {
            Err(StoreError::IllegalTransition {
                run: self.run,
                from: self.from,
                to: self.to,
            })
        }
    }
}

/// One run as stored.
#[derive(Debug, Clone)]
pub struct RunRow {
    /// Id.
    pub id: RunId,
    /// Task.
    pub task: TaskName,
    /// Cause.
    pub trigger: Trigger,
    /// Nominal tick.
    pub scheduled_for: Instant,
    /// Claimed at.
    pub queued_at: Instant,
    /// First attempt started at.
    pub started_at: Option<Instant>,
    /// Reached its terminal state at.
    pub finished_at: Option<Instant>,
    /// State.
    pub state: RunState,
    /// Attempts started so far.
    pub attempt: Attempt,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Next attempt due (retry_wait).
    pub next_attempt_at: Option<Instant>,
    /// Last exit code.
    pub exit_code: Option<i32>,
    /// Last error.
    pub error: Option<String>,
    /// Why skipped / aborted / orphaned.
    pub reason: Option<String>,
    /// 0..=100.
    pub progress: Option<f64>,
    /// Handler-defined phase name.
    pub phase: Option<String>,
    /// Last checkpoint (opaque text).
    pub checkpoint: Option<String>,
    /// Result (opaque text, JSON from the worker).
    pub result: Option<String>,
    /// Instance running it.
    pub owner: Option<String>,
    /// Child pid (= process group).
    pub pid: Option<i64>,
    /// Last heartbeat.
    pub heartbeat_at: Option<Instant>,
    /// Abort asked for.
    pub abort_requested: bool,
    /// Dependency check bypassed.
    pub force: bool,
    /// Triggers downstream tasks on success.
    pub downstream: bool,
    /// Root of its cascade.
    pub cascade: Option<RunId>,
    /// The run's own params (a JSON object, merged over the task's), if given.
    pub params: Option<String>,
}

/// One attempt as stored.
#[derive(Debug, Clone)]
pub struct AttemptRow {
    /// Its number.
    pub attempt: Attempt,
    /// Start.
    pub started_at: Instant,
    /// End.
    pub finished_at: Option<Instant>,
    /// A run state name, or `interrupted`.
    pub outcome: Option<String>,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Error text.
    pub error: Option<String>,
    /// Child pid.
    pub pid: Option<i64>,
    /// When the child process was started.
    pub spawned_at: Option<Instant>,
    /// The instance that ran it.
    pub owner: Option<String>,
}

/// One event of the persisted log.
#[derive(Debug, Clone)]
pub struct EventRow {
    /// Sequence number: strictly increasing, never reused.
    pub seq: i64,
    /// When.
    pub at: Instant,
    /// e.g. `run_started`.
    pub kind: String,
    /// Task, if about one.
    pub task: Option<String>,
    /// Run, if about one.
    pub run_id: Option<RunId>,
    /// Attempt, if about one.
    pub attempt: Option<Attempt>,
    /// Human text.
    pub message: String,
    /// The instance that wrote it (`None` for the CLI, or history from before version 3).
    pub instance: Option<String>,
}

/// Per-task persisted state.
#[derive(Debug, Clone, Default)]
pub struct TaskStateRow {
    /// Paused tasks do not fire on schedule.
    pub paused: bool,
    /// The latest tick claimed.
    pub last_fire_at: Option<Instant>,
    /// The earliest tick not yet claimed.
    pub next_fire_at: Option<Instant>,
    /// The expression `next_fire_at` was computed from.
    pub schedule: Option<String>,
}

/// A task's schedule row held by a transaction ([`Tx::hold_schedules`]).
#[derive(Debug, Clone, Default)]
pub struct HeldSchedule {
    /// What is stored.
    pub state: TaskStateRow,
    /// The stored next fire has come by the database's clock (always, for a database
    /// whose clock is the local one), or there is none.
    pub due: bool,
}

/// What other processes changed in the database since the last hint, as a [`Hints`]
/// feed tells it. A hint is a nudge to read the store now rather than at the next poll:
/// hints are lost while the listening connection is down, so a subscriber keeps polling
/// (less often while [`Hints::live`]). A feed never tells its own backend's writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hint {
    /// A run was queued, or moved back to `queued` or `retry_wait`.
    pub queued: bool,
    /// An abort was requested.
    pub abort: bool,
    /// A task was paused or resumed, or stored with another schedule.
    pub schedule: bool,
    /// Events were appended.
    pub event: bool,
}

impl Hint {
    /// Every kind: what a subscriber assumes after hints may have been lost.
    pub const ALL: Hint = Hint {
        queued: true,
        abort: true,
        schedule: true,
        event: true,
    };

    /// True when any kind is set.
    pub fn any(&self) -> bool {
        self.queued || self.abort || self.schedule || self.event
    }
}

/// A backend's side of a [`Hints`] subscription (the PostgreSQL listener's watch channel;
/// boxed so this module names no async runtime).
pub trait HintFeed: Send {
    /// Waits for the next hint; `None` once the feed has ended (the backend is gone).
    fn next(&mut self) -> Pin<Box<dyn Future<Output = Option<Hint>> + Send + '_>>;
    /// True while hints arrive (the listening connection is up).
    fn live(&self) -> bool;
}

/// One subscriber's wake-ups from the database ([`Store::hints`]): cheap to wait on,
/// and cancel-safe (a hint not yet taken stays for the next call).
pub struct Hints(Box<dyn HintFeed>);

impl Hints {
    /// Wraps a backend's feed.
    pub fn new(feed: Box<dyn HintFeed>) -> Hints {
        Hints(feed)
    }

    /// The next hint (what happened since the last one); `None` once the feed has ended.
    pub async fn next(&mut self) -> Option<Hint> {
        self.0.next().await
    }

    /// True while hints arrive: a subscriber may then poll less often.
    pub fn live(&self) -> bool {
        self.0.live()
    }
}

/// A serving instance as registered.
#[derive(Debug, Clone)]
pub struct InstanceRow {
    /// Random id.
    pub id: String,
    /// OS pid.
    pub pid: i64,
    /// Host name.
    pub host: String,
    /// Last heartbeat.
    pub heartbeat_at: Instant,
    /// Set on clean shutdown.
    pub stopped_at: Option<Instant>,
    /// A service (`serve`), which adopts runs queued by others; false for a foreground
    /// `turbosched run`, which runs only its own.
    pub serving: bool,
    /// The address its HTTP API listens on.
    pub api: Option<String>,
    /// The hash of the config it serves (instances that agree have the same).
    pub config_hash: Option<String>,
}

/// Filter for [`Backend::runs`].
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    /// Only this task.
    pub task: Option<String>,
    /// Only this state.
    pub state: Option<RunState>,
    /// Only runs with id below this (pagination cursor).
    pub before: Option<RunId>,
    /// Only runs queued at or after this.
    pub since: Option<Instant>,
    /// At most this many, newest first.
    pub limit: usize,
}

/// What [`Tx::prune`] removed (or would remove).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneCounts {
    /// Finished runs.
    pub runs: u64,
    /// Their attempts.
    pub attempts: u64,
    /// Events.
    pub events: u64,
}

/// What [`Tx::request_abort`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortOutcome {
    /// It had not started: it is aborted now.
    AbortedNow,
    /// It is running: its engine will stop it within a heartbeat interval.
    Requested,
    /// It had already finished in this state.
    AlreadyFinished(RunState),
}

/// A place runs live: the reads, and one door for writes ([`Backend::write`]). Implement
/// it (and [`Tx`]) for a new database, then run the conformance suite on it.
pub trait Backend: Send + Sync {
    /// Runs `body` in one transaction: everything it does through the [`Tx`] commits
    /// together, or (when `body` or the commit fails) none of it does. A refusal of one
    /// operation (`Fenced`, `AlreadyClaimed`, an illegal move) writes nothing for that
    /// operation and leaves the transaction usable. A backend may run `body` again after
    /// a conflict it resolves by retrying, so `body` keeps its effects to the `Tx` and
    /// what it returns through its captures.
    /// `author` is the instance the transaction's events are written by
    /// (`events.instance`).
    fn write(
        &self,
        author: Option<&str>,
        body: &mut dyn FnMut(&dyn Tx) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;

    /// One run.
    fn run(&self, run: RunId) -> Result<Option<RunRow>, StoreError>;
    /// The last event seq alert `alert` has turned into deliveries (`None`: a new alert).
    fn alert_cursor(&self, alert: &str) -> Result<Option<i64>, StoreError>;
    /// Alert deliveries, newest event first, at most `limit`.
    fn alert_deliveries(&self, limit: usize) -> Result<Vec<DeliveryRow>, StoreError>;
    /// Runs matching `filter`, newest first (at most 50 when `filter.limit` is 0).
    fn runs(&self, filter: &RunFilter) -> Result<Vec<RunRow>, StoreError>;
    /// Runs in a state the engine must act on (queued, running, retry_wait, orphaned),
    /// oldest first.
    fn unfinished_runs(&self) -> Result<Vec<RunRow>, StoreError>;
    /// The latest run of `task` in a terminal state, `skipped` included (a skipped
    /// upstream is an unsatisfied one).
    fn latest_finished(&self, task: &TaskName) -> Result<Option<RunRow>, StoreError>;
    /// Every run of the cascade rooted at `root`, oldest first.
    fn cascade_runs(&self, root: RunId) -> Result<Vec<RunRow>, StoreError>;
    /// Ids of the runs in any of `states`, oldest first.
    fn ids_in_states(&self, states: &[RunState]) -> Result<Vec<RunId>, StoreError>;
    /// Running runs of `owner` with an abort request, and the reason given.
    fn abort_requests(&self, owner: &str) -> Result<Vec<(RunId, Option<String>)>, StoreError>;
    /// The attempts history of a run, oldest first.
    fn attempts(&self, run: RunId) -> Result<Vec<AttemptRow>, StoreError>;
    /// Persisted state of `task` (defaults if never seen).
    fn task_state(&self, task: &TaskName) -> Result<TaskStateRow, StoreError>;
    /// Persisted state of every task that has any (one read at start-up, not one a task).
    fn task_states(&self) -> Result<HashMap<TaskName, TaskStateRow>, StoreError>;
    /// The ticks of `task` in `[from, to]` that a scheduled or catch-up run has claimed.
    fn claimed_ticks(
        &self,
        task: &TaskName,
        from: Instant,
        to: Instant,
    ) -> Result<HashSet<Instant>, StoreError>;
    /// Names of the paused tasks.
    fn paused_tasks(&self) -> Result<HashSet<String>, StoreError>;
    /// Events after sequence number `after`, oldest first, at most `limit`.
    fn events_after(&self, after: i64, limit: usize) -> Result<Vec<EventRow>, StoreError>;
    /// The newest event of one of `kinds`, about `task` and/or `run` when given: what the
    /// engine reads before raising an event that must be raised once (`deadline_missed`),
    /// and to tell why a task is paused (`circuit_opened`).
    fn latest_event(
        &self,
        kinds: &[&str],
        task: Option<&str>,
        run: Option<RunId>,
    ) -> Result<Option<EventRow>, StoreError>;
    /// How many events of the given kinds happened at or after `since`.
    fn count_events(&self, kinds: &[&str], since: Instant) -> Result<u64, StoreError>;
    /// The highest event sequence number (0 when there is none).
    fn last_event_seq(&self) -> Result<i64, StoreError>;
    /// Instances not stopped whose heartbeat is at or after `now - timeout`, latest
    /// heartbeat first.
    fn live_instances(
        &self,
        timeout: Duration,
        now: Instant,
    ) -> Result<Vec<InstanceRow>, StoreError>;
    /// One instance.
    fn instance(&self, id: &str) -> Result<Option<InstanceRow>, StoreError>;
    /// The database's own clock, when it has one that several instances share
    /// (PostgreSQL's `clock_timestamp()`); `None` for an embedded database, whose time is
    /// the local clock. Instances measure their offset from it: due-ness and leases are
    /// judged on database time.
    fn database_now(&self) -> Result<Option<Instant>, StoreError>;
    /// A subscription to what other processes change in the database (runs queued,
    /// aborts requested, schedules changed, events appended), for a backend several
    /// processes share and that can tell (PostgreSQL: LISTEN/NOTIFY). `None` (the
    /// default; SQLite): poll.
    fn hints(&self) -> Option<Hints> {
        None
    }

    /// Gives the database's write-ahead log its working size before the first commits, so
    /// that a commit overwrites the log rather than growing its file; answers the bytes
    /// added. SQLite rewinds its log after each checkpoint (every 1,000 pages) but never
    /// shrinks it, so a service soon works in a log of that size; until then, on ext4,
    /// each commit's `fdatasync` also commits the file's new size to the file system's
    /// journal: 0.6 ms instead of 0.35 measured, 1.2 instead of 1.0 after a quiet spell.
    /// The service asks once at start-up; a server's database has nothing to do.
    fn presize_log(&self) -> std::io::Result<u64> {
        Ok(0)
    }

    /// Write transactions committed through this backend since it was opened (on SQLite
    /// with `synchronous = FULL`, each is one sync of the WAL to disk).
    fn commits(&self) -> u64 {
        0
    }

    /// A number that changes whenever another connection (another process: the CLI, a
    /// foreground run, another instance) has committed since it was last read, and only
    /// then: what this process wrote itself does not change it. `None` where the backend
    /// cannot tell (a server's database: every poll reads).
    fn data_version(&self) -> Result<Option<i64>, StoreError> {
        Ok(None)
    }

    /// Whether [`Backend::backup_to`] works here (an embedded database copies itself;
    /// a server's database is backed up by the server's own tools).
    fn can_back_up(&self) -> bool {
        true
    }

    /// Proves the database takes a write within `patience` (for `/health`): a write that
    /// really changes something and commits, so a full disk or a read-only database
    /// cannot pass unseen.
    fn probe_write(&self, patience: Duration, now: Instant) -> Result<(), StoreError>;
    /// The database's own consistency check: "ok", or what is wrong.
    fn integrity_check(&self) -> Result<String, StoreError>;
    /// Copies the whole database to the file `destination` while it stays in use: a
    /// complete, consistent copy.
    fn backup_to(&self, destination: &Path) -> Result<(), StoreError>;
}

/// Every write of the store, as operations on one open transaction (handed out by
/// [`Backend::write`], and to callers by [`Store::batch`]).
pub trait Tx {
    /// Claims one scheduled or catch-up tick of a task and queues its run.
    ///
    /// Promise: at most one run exists per task and tick for triggers `schedule` and
    /// `catchup`, however many engines (processes) try and however often the service
    /// restarts. The loser gets [`StoreError::AlreadyClaimed`], writes nothing, must not
    /// run the tick, and its transaction goes on. How (SQLite): the partial unique index
    /// `runs_claim` on `(task, scheduled_for)`, inside `BEGIN IMMEDIATE`. The same
    /// transaction moves the task's `next_fire_at` on to `next_fire_at`, so a restart
    /// resumes after the claimed tick.
    fn claim_fire(
        &self,
        run: &NewRun,
        now: Instant,
        next_fire_at: Option<Instant>,
    ) -> Result<RunId, StoreError>;

    /// Claims a past tick for a backfill (trigger `backfill`) and queues its run, leaving
    /// the task's next fire alone.
    ///
    /// Promise: the same claim as [`Tx::claim_fire`]: a tick already claimed by a
    /// scheduled, catch-up or backfill run is [`StoreError::AlreadyClaimed`] and writes
    /// nothing; the transaction goes on.
    fn claim_backfill(&self, run: &NewRun, now: Instant) -> Result<RunId, StoreError>;

    /// Claims several ticks in one go, each as [`Tx::claim_fire`] would (the same promise),
    /// in order: the answer holds, per claim, its run or `None` where the tick was claimed
    /// already (that claim wrote nothing). A task with several ticks in the batch ends with
    /// the `last_fire_at` of its last tick claimed. PostgreSQL does the whole batch in a
    /// few statements instead of a round trip per row; the default claims one by one.
    fn claim_fires(
        &self,
        claims: &[(NewRun, Option<Instant>)],
        now: Instant,
    ) -> Result<Vec<Option<RunId>>, StoreError> {
        let mut ids = Vec::with_capacity(claims.len());
        for (run, next_fire_at) in claims {
            match self.claim_fire(run, now, *next_fire_at) {
                Ok(id) => ids.push(Some(id)),
                Err(StoreError::AlreadyClaimed { .. }) => ids.push(None),
                Err(err) => return Err(err),
            }
        }
        Ok(ids)
    }

    /// Queues a run that is not a scheduled tick (manual, downstream, retry).
    fn enqueue(&self, run: &NewRun, now: Instant) -> Result<RunId, StoreError>;

    /// Moves a run as `step` says: the only writer of a run's state.
    ///
    /// Promise: the move happens only if it is legal ([`RunState::can_become`], else
    /// [`StoreError::IllegalTransition`]) and the run is still exactly in `step.from` at
    /// `step.attempt`; otherwise nothing is written and the error says what was found
    /// ([`StoreError::Fenced`]), so an orphaned worker cannot overwrite the attempt that
    /// replaced it. Entering `running` starts attempt `attempt + 1` (returned) and opens
    /// its attempts row; leaving `running` closes it. The matching event is appended in
    /// the same transaction.
    fn transition(&self, step: &Move, change: &Change, now: Instant)
        -> Result<Attempt, StoreError>;

    /// Makes several moves with one `change`, each as [`Tx::transition`] would (the same
    /// promise), in order; the answer holds each move's outcome. PostgreSQL starts a batch
    /// of runs of distinct tasks (the dispatch of one wake) in a few statements instead
    /// of five round trips per run; the default moves one by one.
    fn transitions(
        &self,
        steps: &[Move],
        change: &Change,
        now: Instant,
    ) -> Vec<Result<Attempt, StoreError>> {
        steps
            .iter()
            .map(|step| self.transition(step, change, now))
            .collect()
    }

    /// Ends several running attempts, each move with its own change, each as
    /// [`Tx::transition`] would (the same promise), in order. PostgreSQL ends a burst of
    /// attempts of distinct runs in three statements instead of three round trips per run;
    /// the default moves one by one.
    fn finishes(&self, moves: &[(Move, Change)], now: Instant) -> Vec<Result<Attempt, StoreError>> {
        moves
            .iter()
            .map(|(step, change)| self.transition(step, change, now))
            .collect()
    }

    /// Records progress of a running attempt (false, and nothing written, if the attempt
    /// is no longer current), and appends a `run_progress` event only when the report is
    /// news.
    ///
    /// Promise: the run row (`progress`, `phase`, `heartbeat_at`) takes every report, so
    /// `GET /scheduler/runs/<id>` is always current. The event log takes at most one
    /// `run_progress` event per run and second, and only for a report that differs from
    /// the attempt's last such event (the rule is `progress_is_news`). A handler reporting
    /// a thousand times writes a thousand row updates and a few dozen events at most.
    fn record_progress(
        &self,
        run: RunId,
        attempt: Attempt,
        percent: f64,
        phase: Option<&str>,
        now: Instant,
    ) -> Result<bool, StoreError>;

    /// Stores the latest checkpoint of a running attempt (false if no longer current).
    fn record_checkpoint(
        &self,
        run: RunId,
        attempt: Attempt,
        checkpoint: &str,
    ) -> Result<bool, StoreError>;

    /// Gives a queued run a checkpoint to start from (a retry resumes where the run it
    /// retries stopped). The store is a checkpoint's one home; the file a child reads is
    /// a copy the engine writes when the attempt starts.
    fn hand_checkpoint(&self, run: RunId, checkpoint: &str) -> Result<bool, StoreError>;

    /// Stores the result a running attempt reported (false if no longer current).
    fn record_result(&self, run: RunId, attempt: Attempt, result: &str)
        -> Result<bool, StoreError>;

    /// Stores the pid (= process group) of a running attempt's child and when it started.
    fn record_pid(
        &self,
        run: RunId,
        attempt: Attempt,
        pid: u32,
        spawned_at: Instant,
    ) -> Result<bool, StoreError>;

    /// [`Tx::record_pid`] for several attempts (the children one dispatch spawned), each
    /// as `record_pid` would, in order. PostgreSQL writes them in two statements instead
    /// of two round trips per child; the default records one by one.
    fn record_pids(
        &self,
        pids: &[(RunId, Attempt, u32, Instant)],
    ) -> Vec<Result<bool, StoreError>> {
        pids.iter()
            .map(|(run, attempt, pid, at)| self.record_pid(*run, *attempt, *pid, *at))
            .collect()
    }

    /// Sets the earliest unclaimed tick of `task`, computed from `schedule`.
    fn set_next_fire(
        &self,
        task: &TaskName,
        next: Option<Instant>,
        schedule: Option<&str>,
    ) -> Result<(), StoreError>;

    /// Starts `task`'s schedule at an instance's start-up: stores `next` under `schedule`
    /// unless the row holds `schedule` already with a next fire — then another instance
    /// started it, or fired from it, after this one read it, and its next fire stands.
    /// Answers the next fire the row holds afterwards.
    fn start_schedule(
        &self,
        task: &TaskName,
        next: Option<Instant>,
        schedule: Option<&str>,
    ) -> Result<Option<Instant>, StoreError>;

    /// Pauses or resumes `task` (persisted across restarts), with its event.
    fn set_paused(&self, task: &TaskName, paused: bool, now: Instant) -> Result<(), StoreError>;
    /// Takes the schedule rows of `tasks` for this transaction: the compare half of the
    /// compare-and-set that advances a next fire. A task is in the answer (its stored
    /// row, or an empty row if it has none) when this transaction holds it; a task left
    /// out is being fired by another instance right now (PostgreSQL: `FOR UPDATE SKIP
    /// LOCKED`). `due` says whether its stored next fire has come by the database's
    /// clock. The caller fires a held task only if it is due and its stored next fire and
    /// schedule key are the ones it planned from, and writes the new next fire in the
    /// same transaction (`claim_fire`, `set_next_fire`).
    fn hold_schedules(
        &self,
        tasks: &[TaskName],
    ) -> Result<HashMap<TaskName, HeldSchedule>, StoreError>;

    /// Inserts the deliveries alert `alert` derived from the events up to `cursor` (one
    /// already there is left as it is) and moves its cursor on to `cursor` (never back).
    ///
    /// Promise: one delivery per alert and event, however many instances derive them.
    fn add_deliveries(
        &self,
        alert: &str,
        deliveries: &[NewDelivery],
        cursor: i64,
        now: Instant,
    ) -> Result<(), StoreError>;

    /// Takes up to `limit` pending deliveries that are due at `now` and that no instance
    /// holds (or whose holder's claim lapsed), for `owner` until `until`, oldest first.
    ///
    /// Promise: a delivery is held by one instance at a time (PostgreSQL: `FOR UPDATE
    /// SKIP LOCKED`), so each is POSTed by one instance.
    fn claim_deliveries(
        &self,
        owner: &str,
        now: Instant,
        until: Instant,
        limit: usize,
    ) -> Result<Vec<DeliveryRow>, StoreError>;

    /// Records how a POST of a delivery `owner` holds went, and releases it (false, and
    /// nothing written, when `owner` no longer holds it).
    fn record_delivery(
        &self,
        alert: &str,
        event_seq: i64,
        owner: &str,
        outcome: &DeliveryOutcome,
        now: Instant,
    ) -> Result<bool, StoreError>;

    /// Appends an event that is not a run state change; returns its sequence number.
    fn record_event(
        &self,
        kind: &str,
        task: Option<&str>,
        run: Option<RunId>,
        message: &str,
        now: Instant,
    ) -> Result<i64, StoreError>;

    /// Holds the events about `task` and/or `run` for the rest of this transaction and
    /// answers the kind of the newest of `kinds` about them: what to check before writing
    /// an event that must be written once (a `deadline_missed` per run, a
    /// `circuit_opened` per opening), whatever the number of instances doing the same.
    /// Another transaction holding the same subject waits for this one to end, then sees
    /// what it wrote (PostgreSQL: a transaction-scoped advisory lock on the subject;
    /// SQLite: the write lock every transaction takes).
    fn hold_events(
        &self,
        kinds: &[&str],
        task: Option<&str>,
        run: Option<RunId>,
    ) -> Result<Option<String>, StoreError>;

    /// Records that instance `owner` is alive, and so are the attempts it runs.
    ///
    /// Promise: the instance's `heartbeat_at` and that of every running run it owns
    /// become `now`. A running run whose `heartbeat_at` is older than the configured
    /// `heartbeat_timeout` belongs to an owner that stopped beating; any instance may
    /// then orphan it.
    fn heartbeat(&self, owner: &str, now: Instant) -> Result<(), StoreError>;

    /// One run, as this transaction sees it (the read a write decides on).
    fn run(&self, run: RunId) -> Result<Option<RunRow>, StoreError>;

    /// Sets a run's abort flag and reason; its state is untouched. Use
    /// [`Tx::request_abort`], which decides between this and an immediate abort.
    fn flag_abort(&self, run: RunId, reason: &str) -> Result<(), StoreError>;

    /// Asks for run `run` to stop. A queued or waiting run is aborted at once (through
    /// [`Tx::transition`]); a running or orphaned one is flagged, and the engine that
    /// owns it stops it; a finished one is left alone. Written once, over the other
    /// operations: a backend does not override it.
    fn request_abort(
        &self,
        run: RunId,
        reason: &str,
        now: Instant,
    ) -> Result<AbortOutcome, StoreError> {
        let row = self.run(run)?.ok_or(StoreError::NotFound(run))?;
        match row.state {
            RunState::Queued | RunState::RetryWait => {
                let change = Change {
                    reason: Some(reason.to_string()),
                    ..Change::default()
                };
                let step = Move {
                    run,
                    attempt: row.attempt,
                    from: row.state,
                    to: RunState::Aborted,
                };
                self.transition(&step, &change, now)?;
                Ok(AbortOutcome::AbortedNow)
            }
            RunState::Running | RunState::Orphaned => {
                self.flag_abort(run, reason)?;
                Ok(AbortOutcome::Requested)
            }
            finished => Ok(AbortOutcome::AlreadyFinished(finished)),
        }
    }

    /// Registers an instance: a service (`serving`) or a foreground `turbosched run`.
    fn register_instance(
        &self,
        id: &str,
        pid: u32,
        host: &str,
        serving: bool,
        now: Instant,
    ) -> Result<(), StoreError>;

    /// Records the address of an instance's HTTP API.
    fn set_instance_api(&self, id: &str, address: &str) -> Result<(), StoreError>;

    /// Records the hash of the config an instance serves.
    fn set_instance_config(&self, id: &str, hash: &str) -> Result<(), StoreError>;

    /// Marks an instance as cleanly stopped.
    fn stop_instance(&self, id: &str, now: Instant) -> Result<(), StoreError>;

    /// Removes history older than `cutoff`: runs in a terminal state that finished
    /// before it, with their attempts, and events before it.
    ///
    /// Promise: a run still referenced by an unfinished one (the root of a `--downstream`
    /// cascade that is still going) is kept, and so are its events. With `dry_run`,
    /// nothing is removed and the counts say what would be.
    fn prune(&self, cutoff: Instant, dry_run: bool) -> Result<PruneCounts, StoreError>;
}

/// The façade every caller holds: the reads, [`Store::batch`] for a transaction of many
/// writes, and a method per write that callers make alone. Cheap to clone; a clone is
/// the same database.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    /// The instance this handle writes for: its events name it.
    author: Option<Arc<str>>,
}

impl Store {
    /// Opens the run database the `database` setting names: a `postgres://` or
    /// `postgresql://` URL opens that PostgreSQL database (its tables created or
    /// migrated); anything else is the path of a SQLite file, created if needed with its
    /// folder. The setting stays a path in the config (`scheduler.database`), so every
    /// caller opens either through this one function.
    pub fn open(database: &Path) -> Result<Store, StoreError> {
        let backend: Arc<dyn Backend> = match database
            .to_str()
            .filter(|setting| postgres::is_postgres_url(setting))
        {
            Some(url) => Arc::new(postgres::PostgresBackend::open(url)?),
            None => Arc::new(sqlite::SqliteBackend::open(database)?),
        };
        Ok(Store::from_backend(backend))
    }

    /// A store over any backend.
    pub fn from_backend(backend: Arc<dyn Backend>) -> Store {
        Store {
            backend,
            author: None,
        }
    }

    /// This store, writing for `instance`: every event it appends names it (one event
    /// stream for a cluster, each event saying which instance wrote it).
    pub fn written_by(&self, instance: &str) -> Store {
        Store {
            backend: self.backend.clone(),
            author: Some(Arc::from(instance)),
        }
    }

    /// Runs `body` in one transaction ([`Backend::write`]): every write it makes through
    /// the [`Tx`] commits together, or (when `body` or the commit fails) none does. One
    /// operation's own refusal (`Fenced`, `AlreadyClaimed`) writes nothing for that
    /// operation and leaves the others of the batch intact.
    ///
    /// This is how the engine turns a tick of a thousand fires into one commit.
    pub fn batch<T>(
        &self,
        mut body: impl FnMut(&dyn Tx) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut value = None;
        self.backend.write(self.author.as_deref(), &mut |tx| {
            value = Some(body(tx)?);
            Ok(())
        })?;
        Ok(value.expect("a committed transaction ran its body"))
    }

    /// [`Tx::claim_fire`] in a transaction of its own.
    pub fn claim_fire(
        &self,
        run: &NewRun,
        now: Instant,
        next_fire_at: Option<Instant>,
    ) -> Result<RunId, StoreError> {
        self.batch(|tx| tx.claim_fire(run, now, next_fire_at))
    }

    /// [`Tx::enqueue`] in a transaction of its own.
    pub fn enqueue(&self, run: &NewRun, now: Instant) -> Result<RunId, StoreError> {
        self.batch(|tx| tx.enqueue(run, now))
    }

    /// [`Tx::transition`] in a transaction of its own.
    pub fn transition(
        &self,
        step: &Move,
        change: &Change,
        now: Instant,
    ) -> Result<Attempt, StoreError> {
        self.batch(|tx| tx.transition(step, change, now))
    }

    /// [`Tx::heartbeat`] in a transaction of its own.
    pub fn heartbeat(&self, owner: &str, now: Instant) -> Result<(), StoreError> {
        self.batch(|tx| tx.heartbeat(owner, now))
    }

    /// [`Tx::request_abort`] in a transaction of its own.
    pub fn request_abort(
        &self,
        run: RunId,
        reason: &str,
        now: Instant,
    ) -> Result<AbortOutcome, StoreError> {
        self.batch(|tx| tx.request_abort(run, reason, now))
    }

    /// [`Tx::set_next_fire`] in a transaction of its own.
    pub fn set_next_fire(
        &self,
        task: &TaskName,
        next: Option<Instant>,
        schedule: Option<&str>,
    ) -> Result<(), StoreError> {
        self.batch(|tx| tx.set_next_fire(task, next, schedule))
    }

    /// [`Tx::set_paused`] in a transaction of its own.
    pub fn set_paused(
        &self,
        task: &TaskName,
        paused: bool,
        now: Instant,
    ) -> Result<(), StoreError> {
        self.batch(|tx| tx.set_paused(task, paused, now))
    }

    /// [`Tx::record_event`] in a transaction of its own.
    pub fn record_event(
        &self,
        kind: &str,
        task: Option<&str>,
        run: Option<RunId>,
        message: &str,
        now: Instant,
    ) -> Result<i64, StoreError> {
        self.batch(|tx| tx.record_event(kind, task, run, message, now))
    }

    /// [`Tx::register_instance`] in a transaction of its own.
    pub fn register_instance(
        &self,
        id: &str,
        pid: u32,
        host: &str,
        serving: bool,
        now: Instant,
    ) -> Result<(), StoreError> {
        self.batch(|tx| tx.register_instance(id, pid, host, serving, now))
    }

    /// [`Tx::set_instance_api`] in a transaction of its own.
    pub fn set_instance_api(&self, id: &str, address: &str) -> Result<(), StoreError> {
        self.batch(|tx| tx.set_instance_api(id, address))
    }

    /// [`Tx::set_instance_config`] in a transaction of its own.
    pub fn set_instance_config(&self, id: &str, hash: &str) -> Result<(), StoreError> {
        self.batch(|tx| tx.set_instance_config(id, hash))
    }

    /// [`Tx::stop_instance`] in a transaction of its own.
    pub fn stop_instance(&self, id: &str, now: Instant) -> Result<(), StoreError> {
        self.batch(|tx| tx.stop_instance(id, now))
    }

    /// [`Tx::prune`] in a transaction of its own.
    pub fn prune(&self, cutoff: Instant, dry_run: bool) -> Result<PruneCounts, StoreError> {
        self.batch(|tx| tx.prune(cutoff, dry_run))
    }

    /// [`Backend::alert_cursor`].
    pub fn alert_cursor(&self, alert: &str) -> Result<Option<i64>, StoreError> {
        self.backend.alert_cursor(alert)
    }

    /// [`Backend::alert_deliveries`].
    pub fn alert_deliveries(&self, limit: usize) -> Result<Vec<DeliveryRow>, StoreError> {
        self.backend.alert_deliveries(limit)
    }

    /// [`Backend::run`].
    pub fn run(&self, run: RunId) -> Result<Option<RunRow>, StoreError> {
        self.backend.run(run)
    }

    /// [`Backend::runs`].
    pub fn runs(&self, filter: &RunFilter) -> Result<Vec<RunRow>, StoreError> {
        self.backend.runs(filter)
    }

    /// [`Backend::unfinished_runs`].
    pub fn unfinished_runs(&self) -> Result<Vec<RunRow>, StoreError> {
        self.backend.unfinished_runs()
    }

    /// [`Backend::latest_finished`].
    pub fn latest_finished(&self, task: &TaskName) -> Result<Option<RunRow>, StoreError> {
        self.backend.latest_finished(task)
    }

    /// [`Backend::cascade_runs`].
    pub fn cascade_runs(&self, root: RunId) -> Result<Vec<RunRow>, StoreError> {
        self.backend.cascade_runs(root)
    }

    /// [`Backend::ids_in_states`].
    pub fn ids_in_states(&self, states: &[RunState]) -> Result<Vec<RunId>, StoreError> {
        self.backend.ids_in_states(states)
    }

    /// [`Backend::abort_requests`].
    pub fn abort_requests(&self, owner: &str) -> Result<Vec<(RunId, Option<String>)>, StoreError> {
        self.backend.abort_requests(owner)
    }

    /// [`Backend::attempts`].
    pub fn attempts(&self, run: RunId) -> Result<Vec<AttemptRow>, StoreError> {
        self.backend.attempts(run)
    }

    /// [`Backend::task_state`].
    pub fn task_state(&self, task: &TaskName) -> Result<TaskStateRow, StoreError> {
        self.backend.task_state(task)
    }

    /// [`Backend::task_states`].
    pub fn task_states(&self) -> Result<HashMap<TaskName, TaskStateRow>, StoreError> {
        self.backend.task_states()
    }

    /// [`Backend::claimed_ticks`].
    pub fn claimed_ticks(
        &self,
        task: &TaskName,
        from: Instant,
        to: Instant,
    ) -> Result<HashSet<Instant>, StoreError> {
        self.backend.claimed_ticks(task, from, to)
    }

    /// [`Backend::paused_tasks`].
    pub fn paused_tasks(&self) -> Result<HashSet<String>, StoreError> {
        self.backend.paused_tasks()
    }

    /// [`Backend::latest_event`].
    pub fn latest_event(
        &self,
        kinds: &[&str],
        task: Option<&str>,
        run: Option<RunId>,
    ) -> Result<Option<EventRow>, StoreError> {
        self.backend.latest_event(kinds, task, run)
    }

    /// [`Backend::events_after`].
    pub fn events_after(&self, after: i64, limit: usize) -> Result<Vec<EventRow>, StoreError> {
        self.backend.events_after(after, limit)
    }

    /// [`Backend::count_events`].
    pub fn count_events(&self, kinds: &[&str], since: Instant) -> Result<u64, StoreError> {
        self.backend.count_events(kinds, since)
    }

    /// [`Backend::last_event_seq`].
    pub fn last_event_seq(&self) -> Result<i64, StoreError> {
        self.backend.last_event_seq()
    }

    /// [`Backend::live_instances`].
    pub fn live_instances(
        &self,
        timeout: Duration,
        now: Instant,
    ) -> Result<Vec<InstanceRow>, StoreError> {
        self.backend.live_instances(timeout, now)
    }

    /// See [`Backend::presize_log`].
    pub fn presize_log(&self) -> std::io::Result<u64> {
        self.backend.presize_log()
    }

    /// See [`Backend::commits`].
    pub fn commits(&self) -> u64 {
        self.backend.commits()
    }

    /// See [`Backend::data_version`].
    pub fn data_version(&self) -> Result<Option<i64>, StoreError> {
        self.backend.data_version()
    }

    /// See [`Backend::can_back_up`].
    pub fn can_back_up(&self) -> bool {
        self.backend.can_back_up()
    }

    /// See [`Backend::database_now`].
    pub fn database_now(&self) -> Result<Option<Instant>, StoreError> {
        self.backend.database_now()
    }

    /// See [`Backend::hints`].
    pub fn hints(&self) -> Option<Hints> {
        self.backend.hints()
    }

    /// See [`Backend::instance`].
    pub fn instance(&self, id: &str) -> Result<Option<InstanceRow>, StoreError> {
        self.backend.instance(id)
    }

    /// [`Backend::probe_write`].
    pub fn probe_write(&self, patience: Duration, now: Instant) -> Result<(), StoreError> {
        self.backend.probe_write(patience, now)
    }

    /// [`Backend::integrity_check`].
    pub fn integrity_check(&self) -> Result<String, StoreError> {
        self.backend.integrity_check()
    }

    /// [`Backend::backup_to`].
    pub fn backup_to(&self, destination: &Path) -> Result<(), StoreError> {
        self.backend.backup_to(destination)
    }
}

/// The outcome an attempt's row records when `running` ends in `to`: the state's name,
/// or `interrupted` when the run went back to the queue (shutdown).
fn attempt_outcome(to: RunState) -> &'static str {
    if to == RunState::Queued {
        "interrupted"
    } else {
        to.as_str()
    }
}

/// The event a move to `to` appends: its kind, and its message (the reason, the error,
/// and when the next attempt is due).
fn transition_event(to: RunState, change: &Change) -> (&'static str, String) {
    let kind = match to {
        RunState::Queued => "run_requeued",
        RunState::Running => "run_started",
        RunState::RetryWait => "run_retrying",
        RunState::Orphaned => "run_orphaned",
        RunState::Succeeded => "run_succeeded",
        RunState::Failed => "run_failed",
        RunState::TimedOut => "run_timed_out",
        RunState::Aborted => "run_aborted",
        RunState::Skipped => "run_skipped",
    };
    let mut message = String::new();
    for part in [change.reason.as_deref(), change.error.as_deref()]
        .into_iter()
        .flatten()
    {
        if !message.is_empty() {
            message.push_str("; ");
        }
        message.push_str(part);
    }
    if let Some(at) = change.next_attempt_at {
        message = format!("{message} (next attempt at {})", at.to_rfc3339())
            .trim()
            .to_string();
    }
    (kind, message)
}

/// Progress events mark steps of this many percent: 0–4.99 is one step, 5–9.99 the
/// next, …, and 100 a step of its own.
const PROGRESS_STEP: f64 = 5.0;

/// At most one `run_progress` event per run in this long.
const PROGRESS_EVENT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The last `run_progress` event of the current attempt, as the run row remembers it.
#[derive(Debug, Clone, Copy)]
struct LastProgressEvent<'a> {
    at: Instant,
    percent: Option<f64>,
    phase: Option<&'a str>,
}

/// The text of a `run_progress` event: `45% features`, or `45%` without a phase.
pub(crate) fn progress_message(percent: f64, phase: Option<&str>) -> String {
    match phase {
        Some(phase) => format!("{percent:.0}% {phase}"),
        None => format!("{percent:.0}%"),
    }
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
fn progress_is_news(
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
