//! The durable truth: runs, attempts, per-task state, events and instances in SQLite.
//!
//! A run's life, as the engine drives it through [`Store::transition`]:
//! `queued → running → succeeded | failed | timed_out | aborted`, `queued → skipped`,
//! `running → retry_wait → running`, `running → orphaned → queued | failed`.
//!
//! Invariants:
//! - [`Store::transition`] is the only code that writes a run's `state`. Its UPDATE is
//!   guarded by the expected state *and* attempt; zero rows changed is an error
//!   ([`StoreError::Fenced`]), never ignored. The legal moves are
//!   [`RunState::can_become`].
//! - Every write is one transaction (`BEGIN IMMEDIATE`, WAL), and every state change
//!   appends its event in that same transaction, so the event log never disagrees with
//!   the runs.
//! - This module knows nothing of HTTP, JSON bodies or processes: results and checkpoints
//!   are opaque text.
//!
//! Progress: [`Batch::record_progress`] writes every report to the run row, but appends a
//! `run_progress` event only when it is news — the attempt's first report; later, another
//! phase or another 5 % step (100 % being one), at most once a second per run. A handler
//! reporting a thousand times no longer writes a thousand events, and SSE clients see
//! each step; the row is what `GET /scheduler/runs/<id>` and the dashboard show.
//!
//! Schema: `schema.sql` is the current shape, run (all `IF NOT EXISTS`) at every open;
//! `meta.schema_version` says which shape a file has, and `MIGRATIONS` takes an older
//! file forward in the same `BEGIN IMMEDIATE` transaction. A file from a newer
//! turbosched is refused ([`StoreError::NewerSchema`]).
//!
//! Durability: WAL with `synchronous = NORMAL`. A killed process (kill -9, panic, OOM)
//! loses no committed transaction; a power cut may lose the last few, never consistency.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};

mod batch;

pub use batch::Batch;

use crate::model::{from_micros, to_micros, Attempt, Instant, RunId, RunState, TaskName, Trigger};

const SCHEMA: &str = include_str!("schema.sql");
/// The schema version this build writes (`meta.schema_version`).
const SCHEMA_VERSION: usize = 2;

/// What `schema.sql`'s `IF NOT EXISTS` cannot do to an older database: entry `n` takes it
/// from version `n + 1` to `n + 2`. Run at open, in one `BEGIN IMMEDIATE` transaction
/// with `schema.sql` (which then adds any new table or index), so concurrent openers
/// migrate once. Never edit an entry: append one.
const MIGRATIONS: &[&str] = &[
    // 1 → 2 (issue "One room per job", item 7): `runs.version` was written and never
    // read (the fencing guard is state and attempt); progress events remember the last
    // one of the attempt. The events indexes come from schema.sql.
    "ALTER TABLE runs DROP COLUMN version;
     ALTER TABLE runs ADD COLUMN progress_event_at INTEGER;
     ALTER TABLE runs ADD COLUMN progress_event_pct REAL;
     ALTER TABLE runs ADD COLUMN progress_event_phase TEXT;",
];

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
    /// The database was written by a newer turbosched, whose schema this one cannot read.
    #[error("run database {path} has schema version {found}, newer than this turbosched ({SCHEMA_VERSION}); use a newer turbosched, or a backup made by this one")]
    NewerSchema {
        /// The file.
        path: PathBuf,
        /// The version found in `meta.schema_version`.
        found: usize,
    },
    /// The database said no.
    #[error("run database: {0}")]
    Sql(#[from] rusqlite::Error),
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
}

/// Filter for [`Store::runs`].
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

/// What [`Store::prune`] removed (or would remove).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneCounts {
    /// Finished runs.
    pub runs: u64,
    /// Their attempts.
    pub attempts: u64,
    /// Events.
    pub events: u64,
}

/// Rows per table, for reports and backup checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowCounts {
    /// `runs`.
    pub runs: u64,
    /// `attempts`.
    pub attempts: u64,
    /// `events`.
    pub events: u64,
    /// `task_state`.
    pub task_state: u64,
}

/// What [`Store::request_abort`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortOutcome {
    /// It had not started: it is aborted now.
    AbortedNow,
    /// It is running: its engine will stop it within a heartbeat interval.
    Requested,
    /// It had already finished in this state.
    AlreadyFinished(RunState),
}

/// The façade over one SQLite file. Cheap to clone; calls are serialized.
#[derive(Clone)]
pub struct Store {
    connection: Arc<Mutex<Connection>>,
}

const RUN_COLUMNS: &str =
    "id, task, trigger, scheduled_for, queued_at, started_at, finished_at, state, \
    attempt, max_attempts, next_attempt_at, exit_code, error, reason, progress, phase, checkpoint, \
    result, owner, pid, heartbeat_at, abort_requested, force, downstream, cascade";

impl Store {
    /// Opens (creating if needed, with its folder) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let fail = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|err| fail(rusqlite::Error::ToSqlConversionFailure(Box::new(err))))?;
        }
        let mut connection = Connection::open(path).map_err(fail)?;
        connection
            .busy_timeout(Duration::from_secs(10))
            .map_err(fail)?;
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
            )
            .map_err(fail)?;
        migrate(&mut connection, path)?;
        // Room for every statement of the hot path (claims, transitions, events, reads).
        connection.set_prepared_statement_cache_capacity(64);
        Ok(Store {
            connection: Arc::new(Mutex::new(connection)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (the open
        // transaction rolls back when dropped), so a poisoned lock is safe to reuse.
        self.connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write<T>(
        &self,
        body: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut connection = self.lock();
        let tx = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let value = body(&tx)?;
        tx.commit()?;
        Ok(value)
    }

    /// Runs `body` in one `BEGIN IMMEDIATE` transaction: every write it makes through the
    /// [`Batch`] commits together, or (when `body` or the commit fails) none does. One
    /// operation's own refusal (`Fenced`, `AlreadyClaimed`) writes nothing for that
    /// operation and leaves the others of the batch intact.
    ///
    /// This is how the engine turns a tick of a thousand fires into one commit.
    pub fn batch<T>(
        &self,
        body: impl FnOnce(&Batch<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.write(|tx| body(&Batch { tx }))
    }

    /// [`Batch::claim_fire`] in a transaction of its own.
    pub fn claim_fire(
        &self,
        run: &NewRun,
        now: Instant,
        next_fire_at: Option<Instant>,
    ) -> Result<RunId, StoreError> {
        self.batch(|b| b.claim_fire(run, now, next_fire_at))
    }

    /// [`Batch::enqueue`] in a transaction of its own.
    pub fn enqueue(&self, run: &NewRun, now: Instant) -> Result<RunId, StoreError> {
        self.batch(|b| b.enqueue(run, now))
    }

    /// [`Batch::transition`] in a transaction of its own.
    pub fn transition(
        &self,
        run: RunId,
        attempt: Attempt,
        from: RunState,
        to: RunState,
        change: &Change,
        now: Instant,
    ) -> Result<Attempt, StoreError> {
        self.batch(|b| b.transition(run, attempt, from, to, change, now))
    }

    /// [`Batch::record_progress`] in a transaction of its own.
    pub fn record_progress(
        &self,
        run: RunId,
        attempt: Attempt,
        percent: f64,
        phase: Option<&str>,
        now: Instant,
    ) -> Result<bool, StoreError> {
        self.batch(|b| b.record_progress(run, attempt, percent, phase, now))
    }

    /// [`Batch::record_checkpoint`] in a transaction of its own.
    pub fn record_checkpoint(
        &self,
        run: RunId,
        attempt: Attempt,
        checkpoint: &str,
    ) -> Result<bool, StoreError> {
        self.batch(|b| b.record_checkpoint(run, attempt, checkpoint))
    }

    /// [`Batch::record_result`] in a transaction of its own.
    pub fn record_result(
        &self,
        run: RunId,
        attempt: Attempt,
        result: &str,
    ) -> Result<bool, StoreError> {
        self.batch(|b| b.record_result(run, attempt, result))
    }

    /// [`Batch::record_pid`] in a transaction of its own.
    pub fn record_pid(
        &self,
        run: RunId,
        attempt: Attempt,
        pid: u32,
        spawned_at: Instant,
    ) -> Result<bool, StoreError> {
        self.batch(|b| b.record_pid(run, attempt, pid, spawned_at))
    }

    /// Records that instance `owner` is alive, and so are the attempts it runs.
    ///
    /// Promise: a running run whose `heartbeat_at` is older than the configured
    /// `heartbeat_timeout` belongs to an owner that stopped beating; any instance may
    /// then orphan it.
    pub fn heartbeat(&self, owner: &str, now: Instant) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE instances SET heartbeat_at = ?2 WHERE id = ?1",
                params![owner, to_micros(now)],
            )?;
            tx.execute(
                "UPDATE runs SET heartbeat_at = ?2 WHERE owner = ?1 AND state = 'running'",
                params![owner, to_micros(now)],
            )?;
            Ok(())
        })
    }

    /// Asks for run `run` to stop. A queued or waiting run is aborted at once; a
    /// running one is flagged, and the engine that owns it stops it.
    pub fn request_abort(
        &self,
        run: RunId,
        reason: &str,
        now: Instant,
    ) -> Result<AbortOutcome, StoreError> {
        self.write(|tx| {
            let row = get_run(tx, run)?.ok_or(StoreError::NotFound(run))?;
            match row.state {
                RunState::Queued | RunState::RetryWait => {
                    let change = Change {
                        reason: Some(reason.to_string()),
                        ..Change::default()
                    };
                    transition_in(
                        tx,
                        run,
                        row.attempt,
                        row.state,
                        RunState::Aborted,
                        &change,
                        now,
                    )?;
                    Ok(AbortOutcome::AbortedNow)
                }
                RunState::Running | RunState::Orphaned => {
                    tx.execute(
                        "UPDATE runs SET abort_requested = 1, reason = ?2 WHERE id = ?1",
                        params![run.0, reason],
                    )?;
                    Ok(AbortOutcome::Requested)
                }
                finished => Ok(AbortOutcome::AlreadyFinished(finished)),
            }
        })
    }

    /// Running runs of `owner` with an abort request, and the reason given.
    pub fn abort_requests(&self, owner: &str) -> Result<Vec<(RunId, Option<String>)>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(
            "SELECT id, reason FROM runs WHERE state = 'running' AND owner = ?1 AND abort_requested = 1",
        )?;
        let ids = statement
            .query_map([owner], |row| Ok((RunId(row.get(0)?), row.get(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ids)
    }

    /// Ids of the runs in any of `states`.
    pub fn ids_in_states(&self, states: &[RunState]) -> Result<Vec<RunId>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(
            "SELECT id FROM runs WHERE state IN (SELECT value FROM json_each(?1)) ORDER BY id",
        )?;
        let names: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        let list = serde_free_json_list(&names);
        let ids = statement
            .query_map([list], |row| row.get(0).map(RunId))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ids)
    }

    /// One run.
    pub fn run(&self, run: RunId) -> Result<Option<RunRow>, StoreError> {
        let connection = self.lock();
        get_run(&connection, run)
    }

    /// Runs matching `filter`, newest first.
    pub fn runs(&self, filter: &RunFilter) -> Result<Vec<RunRow>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(&format!(
            "SELECT {RUN_COLUMNS} FROM runs
             WHERE (?1 IS NULL OR task = ?1) AND (?2 IS NULL OR state = ?2) AND (?3 IS NULL OR id < ?3)
               AND (?5 IS NULL OR queued_at >= ?5)
             ORDER BY id DESC LIMIT ?4"
        ))?;
        let limit = if filter.limit == 0 { 50 } else { filter.limit } as i64;
        let rows = statement.query_map(
            params![
                filter.task,
                filter.state.map(|s| s.as_str()),
                filter.before.map(|r| r.0),
                limit,
                filter.since.map(to_micros)
            ],
            |row| Ok(read_run(row)),
        )?;
        collect_runs(rows)
    }

    /// Runs in a state the engine must act on (queued, running, retry_wait, orphaned),
    /// oldest first.
    pub fn unfinished_runs(&self) -> Result<Vec<RunRow>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE state IN ('queued', 'running', 'retry_wait', 'orphaned') ORDER BY id"
        ))?;
        let rows = statement.query_map([], |row| Ok(read_run(row)))?;
        collect_runs(rows)
    }

    /// Runs in `state`, oldest first.
    pub fn runs_in_state(&self, state: RunState) -> Result<Vec<RunRow>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE state = ?1 ORDER BY id"
        ))?;
        let rows = statement.query_map([state.as_str()], |row| Ok(read_run(row)))?;
        collect_runs(rows)
    }

    /// The latest run of `task` that reached a terminal state other than `skipped`… or
    /// `skipped` too: a skipped upstream is an unsatisfied one.
    pub fn latest_finished(&self, task: &TaskName) -> Result<Option<RunRow>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE task = ?1
               AND state IN ('succeeded', 'failed', 'timed_out', 'aborted', 'skipped')
             ORDER BY finished_at DESC, id DESC LIMIT 1"
        ))?;
        let row = statement
            .query_row([task.as_str()], |row| Ok(read_run(row)))
            .optional()?;
        row.transpose()
    }

    /// Every run of the cascade rooted at `root`, oldest first.
    pub fn cascade_runs(&self, root: RunId) -> Result<Vec<RunRow>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE cascade = ?1 ORDER BY id"
        ))?;
        let rows = statement.query_map([root.0], |row| Ok(read_run(row)))?;
        collect_runs(rows)
    }

    /// The attempts history of a run.
    pub fn attempts(&self, run: RunId) -> Result<Vec<AttemptRow>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(
            "SELECT attempt, started_at, finished_at, outcome, exit_code, error, pid, spawned_at FROM attempts
             WHERE run_id = ?1 ORDER BY attempt",
        )?;
        let rows = statement
            .query_map([run.0], |row| {
                Ok(AttemptRow {
                    attempt: Attempt(row.get(0)?),
                    started_at: from_micros(row.get(1)?),
                    finished_at: row.get::<_, Option<i64>>(2)?.map(from_micros),
                    outcome: row.get(3)?,
                    exit_code: row.get(4)?,
                    error: row.get(5)?,
                    pid: row.get(6)?,
                    spawned_at: row.get::<_, Option<i64>>(7)?.map(from_micros),
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Persisted state of `task` (defaults if never seen).
    pub fn task_state(&self, task: &TaskName) -> Result<TaskStateRow, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(
            "SELECT paused, last_fire_at, next_fire_at, schedule FROM task_state WHERE task = ?1",
        )?;
        let row = statement
            .query_row([task.as_str()], |row| {
                Ok(TaskStateRow {
                    paused: row.get::<_, i64>(0)? != 0,
                    last_fire_at: row.get::<_, Option<i64>>(1)?.map(from_micros),
                    next_fire_at: row.get::<_, Option<i64>>(2)?.map(from_micros),
                    schedule: row.get(3)?,
                })
            })
            .optional()?;
        Ok(row.unwrap_or_default())
    }

    /// The ticks of `task` in `[from, to]` that a scheduled or catch-up run has claimed.
    pub fn claimed_ticks(
        &self,
        task: &TaskName,
        from: Instant,
        to: Instant,
    ) -> Result<std::collections::HashSet<Instant>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(
            "SELECT scheduled_for FROM runs WHERE task = ?1 AND trigger IN ('schedule', 'catchup') \
             AND scheduled_for BETWEEN ?2 AND ?3",
        )?;
        let ticks = statement
            .query_map(
                params![task.as_str(), to_micros(from), to_micros(to)],
                |row| row.get::<_, i64>(0),
            )?
            .map(|tick| tick.map(from_micros))
            .collect::<Result<_, _>>()?;
        Ok(ticks)
    }

    /// [`Batch::set_next_fire`] in a transaction of its own.
    pub fn set_next_fire(
        &self,
        task: &TaskName,
        next: Option<Instant>,
        schedule: Option<&str>,
    ) -> Result<(), StoreError> {
        self.batch(|b| b.set_next_fire(task, next, schedule))
    }

    /// Names of the paused tasks.
    pub fn paused_tasks(&self) -> Result<std::collections::HashSet<String>, StoreError> {
        let connection = self.lock();
        let mut statement =
            connection.prepare_cached("SELECT task FROM task_state WHERE paused = 1")?;
        let names = statement
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(names)
    }

    /// Pauses or resumes `task` (persisted across restarts), with its event.
    pub fn set_paused(
        &self,
        task: &TaskName,
        paused: bool,
        now: Instant,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO task_state(task, paused) VALUES (?1, ?2)
                 ON CONFLICT(task) DO UPDATE SET paused = excluded.paused",
                params![task.as_str(), paused as i64],
            )?;
            let kind = if paused {
                "task_paused"
            } else {
                "task_resumed"
            };
            append_event(tx, now, kind, Some(task.as_str()), None, None, "")?;
            Ok(())
        })
    }

    /// [`Batch::record_event`] in a transaction of its own.
    pub fn record_event(
        &self,
        kind: &str,
        task: Option<&str>,
        run: Option<RunId>,
        message: &str,
        now: Instant,
    ) -> Result<i64, StoreError> {
        self.batch(|b| b.record_event(kind, task, run, message, now))
    }

    /// Events after sequence number `after`, oldest first, at most `limit`.
    pub fn events_after(&self, after: i64, limit: usize) -> Result<Vec<EventRow>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(EVENTS_AFTER)?;
        let rows = statement
            .query_map(params![after, limit as i64], |row| {
                Ok(EventRow {
                    seq: row.get(0)?,
                    at: from_micros(row.get(1)?),
                    kind: row.get(2)?,
                    task: row.get(3)?,
                    run_id: row.get::<_, Option<i64>>(4)?.map(RunId),
                    attempt: row.get::<_, Option<u32>>(5)?.map(Attempt),
                    message: row.get(6)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Registers an instance: a service (`serving`) or a foreground `turbosched run`.
    pub fn register_instance(
        &self,
        id: &str,
        pid: u32,
        host: &str,
        serving: bool,
        now: Instant,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO instances(id, pid, host, started_at, heartbeat_at, serving) VALUES (?1, ?2, ?3, ?4, ?4, ?5)",
                params![id, pid, host, to_micros(now), serving as i64],
            )?;
            Ok(())
        })
    }

    /// Records the address of an instance's HTTP API.
    pub fn set_instance_api(&self, id: &str, address: &str) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE instances SET api = ?2 WHERE id = ?1",
                params![id, address],
            )?;
            Ok(())
        })
    }

    /// Marks an instance as cleanly stopped.
    pub fn stop_instance(&self, id: &str, now: Instant) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE instances SET stopped_at = ?2 WHERE id = ?1",
                params![id, to_micros(now)],
            )?;
            Ok(())
        })
    }

    /// Instances not stopped whose heartbeat is newer than `now - timeout`.
    pub fn live_instances(
        &self,
        timeout: Duration,
        now: Instant,
    ) -> Result<Vec<InstanceRow>, StoreError> {
        let since = now - chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX);
        let connection = self.lock();
        let mut statement = connection.prepare_cached(
            "SELECT id, pid, host, heartbeat_at, stopped_at, serving, api FROM instances
             WHERE stopped_at IS NULL AND heartbeat_at >= ?1 ORDER BY heartbeat_at DESC",
        )?;
        let rows = statement
            .query_map([to_micros(since)], read_instance)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// One instance.
    pub fn instance(&self, id: &str) -> Result<Option<InstanceRow>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(
            "SELECT id, pid, host, heartbeat_at, stopped_at, serving, api FROM instances WHERE id = ?1",
        )?;
        Ok(statement.query_row([id], read_instance).optional()?)
    }

    /// Removes history older than `cutoff`: runs in a terminal state that finished
    /// before it, with their attempts, and events before it.
    ///
    /// Promise: a run still referenced by an unfinished one (the root of a `--downstream`
    /// cascade that is still going) is kept, and so are its events. With `dry_run`,
    /// nothing is removed and the counts say what would be.
    pub fn prune(&self, cutoff: Instant, dry_run: bool) -> Result<PruneCounts, StoreError> {
        let cutoff = to_micros(cutoff);
        self.write(|tx| {
            let count = |sql: &str| -> Result<u64, StoreError> {
                Ok(tx.query_row(sql, [cutoff], |row| row.get::<_, i64>(0))? as u64)
            };
            let counts = PruneCounts {
                runs: count(&format!("SELECT COUNT(*) FROM ({OLD_RUNS})"))?,
                attempts: count(&format!(
                    "SELECT COUNT(*) FROM attempts WHERE run_id IN ({OLD_RUNS})"
                ))?,
                events: count(&format!("SELECT COUNT(*) {}", old_events()))?,
            };
            if !dry_run {
                tx.execute(&format!("DELETE {}", old_events()), [cutoff])?;
                tx.execute(
                    &format!("DELETE FROM attempts WHERE run_id IN ({OLD_RUNS})"),
                    [cutoff],
                )?;
                tx.execute(
                    &format!("DELETE FROM runs WHERE id IN ({OLD_RUNS})"),
                    [cutoff],
                )?;
            }
            Ok(counts)
        })
    }

    /// Copies the whole database to `destination` while it stays in use (SQLite's online
    /// backup API), then runs `PRAGMA optimize`. The copy is a complete, consistent
    /// database file.
    pub fn backup_to(&self, destination: &Path) -> Result<(), StoreError> {
        let connection = self.lock();
        let mut target = Connection::open(destination).map_err(|source| StoreError::Open {
            path: destination.to_path_buf(),
            source,
        })?;
        {
            let backup = rusqlite::backup::Backup::new(&connection, &mut target)?;
            backup.run_to_completion(256, Duration::from_millis(5), None)?;
        }
        target.execute_batch("PRAGMA journal_mode = DELETE;")?;
        drop(target);
        connection.execute_batch("PRAGMA optimize;")?;
        Ok(())
    }

    /// Proves the database takes a write within `patience` (for health checks): a
    /// transaction that changes a byte (`meta.health_probe` = `now`) and commits. A
    /// statement that changes nothing would let SQLite skip the write, and a full disk or
    /// a read-only journal would pass unseen.
    pub fn probe_write(&self, patience: Duration, now: Instant) -> Result<(), StoreError> {
        let connection = self.lock();
        connection.busy_timeout(patience)?;
        let result = connection.execute(
            "INSERT INTO meta(key, value) VALUES ('health_probe', ?1) \
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [to_micros(now).to_string()],
        );
        connection.busy_timeout(Duration::from_secs(10))?;
        result?;
        Ok(())
    }

    /// SQLite's `PRAGMA integrity_check`: "ok", or what is wrong.
    pub fn integrity_check(&self) -> Result<String, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare("PRAGMA integrity_check")?;
        let lines = statement
            .query_map([], |row| row.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(lines.join("; "))
    }

    /// How many events of the given kinds happened at or after `since`.
    pub fn count_events(&self, kinds: &[&str], since: Instant) -> Result<u64, StoreError> {
        let connection = self.lock();
        let list = serde_free_json_list(kinds);
        let count: i64 =
            connection.query_row(COUNT_EVENTS, params![to_micros(since), list], |row| {
                row.get(0)
            })?;
        Ok(count as u64)
    }

    /// The highest event sequence number (0 when there is none).
    pub fn last_event_seq(&self) -> Result<i64, StoreError> {
        let connection = self.lock();
        Ok(
            connection.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |row| {
                row.get(0)
            })?,
        )
    }

    /// Rows per table.
    pub fn row_counts(&self) -> Result<RowCounts, StoreError> {
        let connection = self.lock();
        row_counts(&connection)
    }

    /// Row counts, for the CLI status line and the benchmark.
    pub fn count_runs(&self, state: Option<RunState>) -> Result<i64, StoreError> {
        let connection = self.lock();
        Ok(connection.query_row(
            "SELECT COUNT(*) FROM runs WHERE ?1 IS NULL OR state = ?1",
            [state.map(|s| s.as_str())],
            |row| row.get(0),
        )?)
    }
}

/// Brings the database at `path` to [`SCHEMA_VERSION`]: creates a new one, migrates an
/// older one ([`MIGRATIONS`]), refuses a newer one; then `schema.sql` adds whatever is
/// missing. One `BEGIN IMMEDIATE` transaction: a second process opening the same file
/// waits, then finds nothing left to do.
fn migrate(connection: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let fail = |source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    };
    let tx = connection
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(fail)?;
    let has_meta: bool = tx
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta')",
            [],
            |row| row.get(0),
        )
        .map_err(fail)?;
    let stored: Option<String> = if has_meta {
        tx.query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |row| row.get(0),
        )
        .optional()
        .map_err(fail)?
    } else {
        None
    };
    // No version: a new file, unless it has runs: version 1 created its tables and wrote
    // its version in two steps, and may have been stopped between them.
    let has_runs: bool = tx
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'runs')",
            [],
            |row| row.get(0),
        )
        .map_err(fail)?;
    let found = match stored {
        None if has_runs => 1,
        None => SCHEMA_VERSION,
        Some(text) => text.trim().parse::<usize>().map_err(|_| {
            fail(rusqlite::Error::InvalidColumnType(
                0,
                format!("meta.schema_version = {text:?}"),
                rusqlite::types::Type::Text,
            ))
        })?,
    };
    if found > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            path: path.to_path_buf(),
            found,
        });
    }
    for migration in MIGRATIONS.iter().skip(found.saturating_sub(1)) {
        tx.execute_batch(migration).map_err(fail)?;
    }
    tx.execute_batch(SCHEMA).map_err(fail)?;
    tx.execute(
        "INSERT INTO meta(key, value) VALUES ('schema_version', ?1)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [SCHEMA_VERSION.to_string()],
    )
    .map_err(fail)?;
    tx.commit().map_err(fail)
}

/// The finished runs [`Store::prune`] removes: terminal before the cutoff `?1`, and not
/// the root of a cascade still going.
const OLD_RUNS: &str = "SELECT id FROM runs
    WHERE state IN ('succeeded', 'failed', 'timed_out', 'aborted', 'skipped')
      AND COALESCE(finished_at, queued_at) < ?1
      AND id NOT IN (SELECT cascade FROM runs WHERE cascade IS NOT NULL
                     AND state IN ('queued', 'running', 'retry_wait', 'orphaned'))";

/// `FROM events WHERE …`: the events [`Store::prune`] removes — before the cutoff `?1`,
/// and about no run, an old run or a run already gone.
fn old_events() -> String {
    format!(
        "FROM events WHERE at < ?1
           AND (run_id IS NULL OR run_id IN ({OLD_RUNS}) OR run_id NOT IN (SELECT id FROM runs))"
    )
}

/// [`Store::count_events`]: `?1` the start, `?2` a JSON list of kinds (`/health`).
const COUNT_EVENTS: &str =
    "SELECT COUNT(*) FROM events WHERE at >= ?1 AND kind IN (SELECT value FROM json_each(?2))";

/// [`Store::events_after`]: `?1` the last sequence number seen, `?2` the limit (SSE).
const EVENTS_AFTER: &str =
    "SELECT seq, at, kind, task, run_id, attempt, message FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2";

/// `["a","b"]` for `json_each`, from plain identifiers (state and event names).
fn serde_free_json_list(names: &[&str]) -> String {
    let quoted: Vec<String> = names
        .iter()
        .map(|n| format!("\"{}\"", n.replace(['"', '\\'], "")))
        .collect();
    format!("[{}]", quoted.join(","))
}

/// Rows per table of any turbosched database (a backup included).
pub fn row_counts(connection: &Connection) -> Result<RowCounts, StoreError> {
    let count = |table: &str| -> Result<u64, StoreError> {
        Ok(
            connection.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |row| {
                row.get::<_, i64>(0)
            })? as u64,
        )
    };
    Ok(RowCounts {
        runs: count("runs")?,
        attempts: count("attempts")?,
        events: count("events")?,
        task_state: count("task_state")?,
    })
}

fn read_instance(row: &Row<'_>) -> rusqlite::Result<InstanceRow> {
    Ok(InstanceRow {
        id: row.get(0)?,
        pid: row.get(1)?,
        host: row.get(2)?,
        heartbeat_at: from_micros(row.get(3)?),
        stopped_at: row.get::<_, Option<i64>>(4)?.map(from_micros),
        serving: row.get::<_, i64>(5)? != 0,
        api: row.get(6)?,
    })
}

fn insert_run(tx: &Transaction<'_>, run: &NewRun, now: Instant) -> rusqlite::Result<RunId> {
    cached_execute(tx,
        "INSERT INTO runs(task, trigger, scheduled_for, queued_at, state, max_attempts, force, downstream, cascade)
         VALUES (?1, ?2, ?3, ?4, 'queued', ?5, ?6, ?7, ?8)",
        params![
            run.task.as_str(),
            run.trigger.as_str(),
            to_micros(run.scheduled_for),
            to_micros(now),
            run.max_attempts.max(1),
            run.force as i64,
            run.downstream as i64,
            run.cascade.map(|c| c.0),
        ],
    )?;
    let id = RunId(tx.last_insert_rowid());
    if run.downstream && run.cascade.is_none() {
        cached_execute(tx, "UPDATE runs SET cascade = id WHERE id = ?1", [id.0])?;
    }
    let message = format!("{} for {}", run.trigger, run.scheduled_for.to_rfc3339());
    append_event(
        tx,
        now,
        "run_queued",
        Some(run.task.as_str()),
        Some(id),
        Some(Attempt(0)),
        &message,
    )
    .map_err(|err| match err {
        StoreError::Sql(sql) => sql,
        other => rusqlite::Error::ToSqlConversionFailure(Box::new(other)),
    })?;
    Ok(id)
}

fn transition_in(
    tx: &Transaction<'_>,
    run: RunId,
    attempt: Attempt,
    from: RunState,
    to: RunState,
    change: &Change,
    now: Instant,
) -> Result<Attempt, StoreError> {
    if !from.can_become(to) {
        return Err(StoreError::IllegalTransition { run, from, to });
    }
    let now_micros = to_micros(now);
    let starting = to == RunState::Running;
    let new_attempt = if starting {
        Attempt(attempt.0 + 1)
    } else {
        attempt
    };
    let finished_at = to.is_terminal().then_some(now_micros);
    let changed = cached_execute(
        tx,
        "UPDATE runs SET
            state = ?4,
            attempt = ?5,
            started_at = CASE WHEN ?6 AND started_at IS NULL THEN ?7 ELSE started_at END,
            finished_at = COALESCE(?8, finished_at),
            exit_code = CASE WHEN ?6 THEN NULL ELSE COALESCE(?9, exit_code) END,
            error = COALESCE(?10, error),
            reason = COALESCE(?11, reason),
            owner = CASE WHEN ?6 THEN ?12 WHEN ?4 = 'queued' THEN NULL ELSE owner END,
            pid = CASE WHEN ?6 THEN NULL ELSE pid END,
            heartbeat_at = CASE WHEN ?6 THEN ?7 ELSE heartbeat_at END,
            next_attempt_at = ?13,
            progress = CASE WHEN ?6 THEN NULL WHEN ?4 = 'succeeded' THEN 100.0 ELSE progress END,
            progress_event_at = CASE WHEN ?6 THEN NULL ELSE progress_event_at END,
            progress_event_pct = CASE WHEN ?6 THEN NULL ELSE progress_event_pct END,
            progress_event_phase = CASE WHEN ?6 THEN NULL ELSE progress_event_phase END,
            max_attempts = max_attempts + ?14
         WHERE id = ?1 AND state = ?2 AND attempt = ?3",
        params![
            run.0,
            from.as_str(),
            attempt.0,
            to.as_str(),
            new_attempt.0,
            starting,
            now_micros,
            finished_at,
            change.exit_code,
            change.error,
            change.reason,
            change.owner,
            change.next_attempt_at.map(to_micros),
            change.refund_attempt as i64,
        ],
    )?;
    if changed == 0 {
        let found = get_run(tx, run)?.ok_or(StoreError::NotFound(run))?;
        return Err(StoreError::Fenced {
            run,
            expected_state: from,
            expected_attempt: attempt,
            found_state: found.state,
            found_attempt: found.attempt,
        });
    }
    if starting {
        cached_execute(
            tx,
            "INSERT INTO attempts(run_id, attempt, started_at, owner) VALUES (?1, ?2, ?3, ?4)",
            params![run.0, new_attempt.0, now_micros, change.owner],
        )?;
    } else if from == RunState::Running {
        let outcome = if to == RunState::Queued {
            "interrupted"
        } else {
            to.as_str()
        };
        cached_execute(
            tx,
            "UPDATE attempts SET finished_at = ?3, outcome = ?4, exit_code = ?5, error = ?6
             WHERE run_id = ?1 AND attempt = ?2",
            params![
                run.0,
                attempt.0,
                now_micros,
                outcome,
                change.exit_code,
                change.error
            ],
        )?;
    }
    let task: String =
        cached_query_row(tx, "SELECT task FROM runs WHERE id = ?1", [run.0], |row| {
            row.get(0)
        })?;
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
    append_event(
        tx,
        now,
        kind,
        Some(&task),
        Some(run),
        Some(new_attempt),
        &message,
    )?;
    Ok(new_attempt)
}

fn append_event(
    tx: &Transaction<'_>,
    now: Instant,
    kind: &str,
    task: Option<&str>,
    run: Option<RunId>,
    attempt: Option<Attempt>,
    message: &str,
) -> Result<i64, StoreError> {
    let task = match (task, run) {
        (Some(task), _) => Some(task.to_string()),
        (None, Some(run)) => {
            cached_query_row(tx, "SELECT task FROM runs WHERE id = ?1", [run.0], |row| {
                row.get(0)
            })
            .optional()?
        }
        (None, None) => None,
    };
    cached_execute(tx,
        "INSERT INTO events(at, kind, task, run_id, attempt, message) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![to_micros(now), kind, task, run.map(|r| r.0), attempt.map(|a| a.0), message],
    )?;
    Ok(tx.last_insert_rowid())
}

fn get_run(connection: &Connection, run: RunId) -> Result<Option<RunRow>, StoreError> {
    let mut statement =
        connection.prepare_cached(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"))?;
    let row = statement
        .query_row([run.0], |row| Ok(read_run(row)))
        .optional()?;
    row.transpose()
}

fn collect_runs(
    rows: impl Iterator<Item = rusqlite::Result<Result<RunRow, StoreError>>>,
) -> Result<Vec<RunRow>, StoreError> {
    let mut out = Vec::new();
    for row in rows {
        out.push(row??);
    }
    Ok(out)
}

fn read_run(row: &Row<'_>) -> Result<RunRow, StoreError> {
    let id = RunId(row.get(0)?);
    let trigger_text: String = row.get(2)?;
    let state_text: String = row.get(7)?;
    let trigger = Trigger::parse(&trigger_text).ok_or(StoreError::Corrupt {
        run: id,
        value: trigger_text.clone(),
    })?;
    let state = RunState::parse(&state_text).ok_or(StoreError::Corrupt {
        run: id,
        value: state_text.clone(),
    })?;
    let instant = |index: usize| -> rusqlite::Result<Option<Instant>> {
        Ok(row.get::<_, Option<i64>>(index)?.map(from_micros))
    };
    Ok(RunRow {
        id,
        task: TaskName(row.get(1)?),
        trigger,
        scheduled_for: from_micros(row.get(3)?),
        queued_at: from_micros(row.get(4)?),
        started_at: instant(5)?,
        finished_at: instant(6)?,
        state,
        attempt: Attempt(row.get(8)?),
        max_attempts: row.get(9)?,
        next_attempt_at: instant(10)?,
        exit_code: row.get(11)?,
        error: row.get(12)?,
        reason: row.get(13)?,
        progress: row.get(14)?,
        phase: row.get(15)?,
        checkpoint: row.get(16)?,
        result: row.get(17)?,
        owner: row.get(18)?,
        pid: row.get(19)?,
        heartbeat_at: instant(20)?,
        abort_requested: row.get::<_, i64>(21)? != 0,
        force: row.get::<_, i64>(22)? != 0,
        downstream: row.get::<_, i64>(23)? != 0,
        cascade: row.get::<_, Option<i64>>(24)?.map(RunId),
    })
}

#[cfg(test)]
mod tests;

/// `execute` through the connection's statement cache: at a thousand runs a second,
/// parsing the same SQL again is a tenth of the engine's CPU.
pub(crate) fn cached_execute(
    connection: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<usize> {
    connection.prepare_cached(sql)?.execute(params)
}

/// `query_row` through the connection's statement cache.
pub(crate) fn cached_query_row<T>(
    connection: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    connection.prepare_cached(sql)?.query_row(params, f)
}
