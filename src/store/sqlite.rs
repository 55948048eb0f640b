//! The SQLite backend: one file, WAL, one connection behind a mutex, rusqlite's
//! statement cache. Every [`Backend::write`] is one `BEGIN IMMEDIATE` transaction, and
//! [`SqliteTx`] is its [`Tx`]: the SQL of every write lives here, the rules they share
//! (legal moves, progress news, event wording) in the parent module.
//!
//! Schema: `schema.sql` is the current shape, run (all `IF NOT EXISTS`) at every open;
//! `meta.schema_version` says which shape a file has, and [`MIGRATIONS`] takes an older
//! file forward in the same `BEGIN IMMEDIATE` transaction. A file from a newer
//! turbosched is refused ([`StoreError::NewerSchema`]).
//!
//! Durability: WAL with `synchronous = FULL`: each commit syncs the WAL before it
//! returns, so neither a killed process (kill -9, panic, OOM) nor a power cut loses a
//! committed claim or terminal state (`NORMAL` could roll the last commits back after a
//! power cut, and a run that had finished would then run again). The engine batches its
//! writes (a tick's claims, a dispatch, a burst of reports: one commit each), so the syncs
//! stay few; `turbosched bench` prints them per second.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};

use super::progress_message;
use super::{
    attempt_outcome, delivery_columns, progress_is_news, transition_event, AttemptRow, Backend,
    Change, DeliveryOutcome, DeliveryRow, EventRow, HeldSchedule, InstanceRow, Landing,
    LastProgressEvent, Move, NewDelivery, NewRun, PruneCounts, RunFilter, RunRow, StoreError,
    TaskStateRow, Tx, SCHEMA_VERSION,
};
use crate::model::{from_micros, to_micros, Attempt, Instant, RunId, RunState, TaskName, Trigger};

const SCHEMA: &str = include_str!("schema.sql");

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
    // 2 → 3 (issue "Cluster mode"): each event names the instance that wrote it.
    "ALTER TABLE events ADD COLUMN instance TEXT;
     ALTER TABLE instances ADD COLUMN config_hash TEXT;",
    // 3 → 4 (issue 16): a run's own params; the claim index covers backfill too (so a
    // backfill never runs a tick again). The alert tables come from schema.sql.
    "ALTER TABLE runs ADD COLUMN params TEXT;
     DROP INDEX IF EXISTS runs_claim;",
    // 4 → 5 (issue 13): the partial indexes' conditions written as ORs, which SQLite
    // evaluates without building a temporary b-tree per write (schema.sql says why).
    // schema.sql creates them again; a large history makes this one open slower.
    "DROP INDEX IF EXISTS runs_claim;
     DROP INDEX IF EXISTS runs_state;",
];

/// The runs not finished: the condition of the partial index `runs_state`, written as
/// schema.sql writes it, so that a query holding it can use the index.
pub(super) const UNFINISHED: &str =
    "(state = 'queued' OR state = 'running' OR state = 'retry_wait' OR state = 'orphaned')";

/// The runs the claim covers: the condition of the partial unique index `runs_claim`,
/// written as schema.sql writes it.
pub(super) const CLAIMED: &str =
    "(trigger = 'schedule' OR trigger = 'catchup' OR trigger = 'backfill')";

/// The columns [`read_delivery`] reads, in its order.
const DELIVERY_COLUMNS: &str = "alert, event_seq, kind, task, run_id, created_at, payload, state, \
    attempts, next_attempt_at, claimed_by, last_status, last_error, finished_at";

/// One row of [`DELIVERY_COLUMNS`].
fn read_delivery(row: &Row<'_>) -> rusqlite::Result<DeliveryRow> {
    Ok(DeliveryRow {
        alert: row.get(0)?,
        event_seq: row.get(1)?,
        kind: row.get(2)?,
        task: row.get(3)?,
        run_id: row.get::<_, Option<i64>>(4)?.map(RunId),
        created_at: from_micros(row.get(5)?),
        payload: row.get(6)?,
        state: row.get(7)?,
        attempts: row.get(8)?,
        next_attempt_at: from_micros(row.get(9)?),
        claimed_by: row.get(10)?,
        last_status: row.get(11)?,
        last_error: row.get(12)?,
        finished_at: row.get::<_, Option<i64>>(13)?.map(from_micros),
    })
}

const RUN_COLUMNS: &str =
    "id, task, trigger, scheduled_for, queued_at, started_at, finished_at, state, \
    attempt, max_attempts, next_attempt_at, exit_code, error, reason, progress, phase, checkpoint, \
    result, owner, pid, heartbeat_at, abort_requested, force, downstream, cascade, params";

/// One SQLite file. Calls are serialized on its one connection.
pub(super) struct SqliteBackend {
    connection: Mutex<Connection>,
    /// Transactions committed (each one sync of the WAL).
    commits: AtomicU64,
}

impl SqliteBackend {
    /// Opens (creating if needed, with its folder) the database at `path`, and brings it
    /// to [`SCHEMA_VERSION`].
    pub(super) fn open(path: &Path) -> Result<SqliteBackend, StoreError> {
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
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
            )
            .map_err(fail)?;
        migrate(&mut connection, path)?;
        // Room for every statement of the hot path (claims, transitions, events, reads).
        connection.set_prepared_statement_cache_capacity(64);
        Ok(SqliteBackend {
            connection: Mutex::new(connection),
            commits: AtomicU64::new(0),
        })
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (the open
        // transaction rolls back when dropped), so a poisoned lock is safe to reuse.
        self.connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Backend for SqliteBackend {
    /// `BEGIN IMMEDIATE`: the write lock is taken at the start, so two writers (two
    /// processes on one file) queue up instead of failing at their first write. `body`
    /// runs once.
    fn write(
        &self,
        author: Option<&str>,
        body: &mut dyn FnMut(&dyn Tx) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut connection = self.lock();
        let tx = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        body(&SqliteTx { tx: &tx, author })?;
        tx.commit()?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn abort_requests(&self, owner: &str) -> Result<Vec<(RunId, Option<String>)>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(
            "SELECT id, reason FROM runs WHERE state = 'running' AND owner = ?1 AND abort_requested = 1",
        )?;
        let ids = statement
            .query_map([owner], |row| Ok((RunId(row.get(0)?), row.get(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ids)
    }

    fn ids_in_states(&self, states: &[RunState]) -> Result<Vec<RunId>, StoreError> {
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

    fn run(&self, run: RunId) -> Result<Option<RunRow>, StoreError> {
        let connection = self.lock();
        get_run(&connection, run)
    }

    fn alert_cursor(&self, alert: &str) -> Result<Option<i64>, StoreError> {
        let connection = self.lock();
        let cursor = connection
            .prepare_cached("SELECT cursor FROM alerts WHERE name = ?1")?
            .query_row([alert], |row| row.get(0))
            .optional()?;
        Ok(cursor)
    }

    fn alert_deliveries(&self, limit: usize) -> Result<Vec<DeliveryRow>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM alert_deliveries ORDER BY event_seq DESC, alert LIMIT ?1"
        ))?;
        let rows = statement
            .query_map([limit as i64], read_delivery)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn runs(&self, filter: &RunFilter) -> Result<Vec<RunRow>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(&runs_sql(filter))?;
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

    fn unfinished_runs(&self) -> Result<Vec<RunRow>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE {UNFINISHED} ORDER BY id"
        ))?;
        let rows = statement.query_map([], |row| Ok(read_run(row)))?;
        collect_runs(rows)
    }

    fn latest_finished(&self, task: &TaskName) -> Result<Option<RunRow>, StoreError> {
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

    fn cascade_runs(&self, root: RunId) -> Result<Vec<RunRow>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE cascade = ?1 ORDER BY id"
        ))?;
        let rows = statement.query_map([root.0], |row| Ok(read_run(row)))?;
        collect_runs(rows)
    }

    fn attempts(&self, run: RunId) -> Result<Vec<AttemptRow>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(
            "SELECT attempt, started_at, finished_at, outcome, exit_code, error, pid, spawned_at, owner FROM attempts
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
                    owner: row.get(8)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn task_state(&self, task: &TaskName) -> Result<TaskStateRow, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(
            "SELECT paused, last_fire_at, next_fire_at, schedule FROM task_state WHERE task = ?1",
        )?;
        let row = statement
            .query_row([task.as_str()], |row| read_task_state(row, 0))
            .optional()?;
        Ok(row.unwrap_or_default())
    }

    fn task_states(&self) -> Result<HashMap<TaskName, TaskStateRow>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(
            "SELECT task, paused, last_fire_at, next_fire_at, schedule FROM task_state",
        )?;
        let rows = statement.query_map([], |row| {
            Ok((
                TaskName::from(row.get::<_, String>(0)?.as_str()),
                read_task_state(row, 1)?,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn claimed_ticks(
        &self,
        task: &TaskName,
        from: Instant,
        to: Instant,
    ) -> Result<HashSet<Instant>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(&format!(
            "SELECT scheduled_for FROM runs WHERE task = ?1 AND {CLAIMED} \
             AND scheduled_for BETWEEN ?2 AND ?3"
        ))?;
        let ticks = statement
            .query_map(
                params![task.as_str(), to_micros(from), to_micros(to)],
                |row| row.get::<_, i64>(0),
            )?
            .map(|tick| tick.map(from_micros))
            .collect::<Result<_, _>>()?;
        Ok(ticks)
    }

    fn paused_tasks(&self) -> Result<HashSet<String>, StoreError> {
        let connection = self.lock();
        let mut statement =
            connection.prepare_cached("SELECT task FROM task_state WHERE paused = 1")?;
        let names = statement
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(names)
    }

    fn events_after(&self, after: i64, limit: usize) -> Result<Vec<EventRow>, StoreError> {
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
                    instance: row.get(7)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn live_instances(
        &self,
        timeout: Duration,
        now: Instant,
    ) -> Result<Vec<InstanceRow>, StoreError> {
        let since = now - chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX);
        let connection = self.lock();
        let mut statement = connection.prepare_cached(
            "SELECT id, pid, host, heartbeat_at, stopped_at, serving, api, config_hash FROM instances
             WHERE stopped_at IS NULL AND heartbeat_at >= ?1 ORDER BY heartbeat_at DESC",
        )?;
        let rows = statement
            .query_map([to_micros(since)], read_instance)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// `PRAGMA data_version` of the one connection every call of this process shares: it
    /// changes with each commit of another connection, never with this one's.
    fn data_version(&self) -> Result<Option<i64>, StoreError> {
        let connection = self.lock();
        Ok(Some(connection.query_row(
            "PRAGMA data_version",
            [],
            |row| row.get(0),
        )?))
    }

    /// Zeros appended to the `-wal` file up to the size of a checkpoint's worth of frames
    /// (`wal_autocheckpoint` pages and their headers), under the write lock so that no
    /// other process appends meanwhile, then synced. No byte already in the file is
    /// touched: SQLite reads a log only as far as its frames' checksums and salts hold,
    /// and a log of zeros has no valid header (it is empty), as after its own rewinds.
    fn presize_log(&self) -> std::io::Result<u64> {
        use std::os::unix::fs::FileExt;
        let sql = |err: rusqlite::Error| std::io::Error::other(err);
        let mut connection = self.lock();
        let pragma = |name: &str| -> std::io::Result<u64> {
            let value: i64 = connection
                .query_row(&format!("PRAGMA {name}"), [], |row| row.get(0))
                .map_err(sql)?;
            Ok(value.max(0).unsigned_abs())
        };
        let (page, pages) = (pragma("page_size")?, pragma("wal_autocheckpoint")?);
        let Some(database) = connection.path().filter(|path| !path.is_empty()) else {
            return Ok(0);
        };
        let log = format!("{database}-wal");
        let tx = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        // Opened without creating: SQLite made it with the database's WAL mode.
        let file = match std::fs::OpenOptions::new().write(true).open(&log) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(err) => return Err(err),
        };
        const WAL_HEADER: u64 = 32;
        const FRAME_HEADER: u64 = 24;
        // Free room needed, as a multiple of the bytes to add.
        const ROOM_FACTOR: u64 = 16;
        let working = WAL_HEADER + pages * (FRAME_HEADER + page);
        let mut at = file.metadata()?.len();
        let from = at;
        // A nicety, never the last room on the disk: the database and the logs need it.
        let room = nix::sys::statvfs::fstatvfs(&file)
            .map(|fs| fs.blocks_available().saturating_mul(fs.fragment_size()))
            .map_err(std::io::Error::from)?;
        if room < working.saturating_sub(at).saturating_mul(ROOM_FACTOR) {
            return Ok(0);
        }
        let zeros = vec![0_u8; 256 * 1024];
        while at < working {
            let length = (working - at).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..length], at)?;
            at += length as u64;
        }
        if at > from {
            file.sync_data()?;
        }
        tx.commit().map_err(sql)?;
        Ok(at - from)
    }

    /// An embedded database has no clock of its own: its time is the local clock.
    fn database_now(&self) -> Result<Option<Instant>, StoreError> {
        Ok(None)
    }

    fn instance(&self, id: &str) -> Result<Option<InstanceRow>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(
            "SELECT id, pid, host, heartbeat_at, stopped_at, serving, api, config_hash FROM instances WHERE id = ?1",
        )?;
        Ok(statement.query_row([id], read_instance).optional()?)
    }

    /// SQLite's online backup API, then `PRAGMA optimize`; the copy is a plain
    /// (journal mode `DELETE`) database file.
    fn backup_to(&self, destination: &Path) -> Result<(), StoreError> {
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

    /// Sets `meta.health_probe` to `now` under a busy timeout of `patience`: a statement
    /// that changed nothing would let SQLite skip the write.
    fn probe_write(&self, patience: Duration, now: Instant) -> Result<(), StoreError> {
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

    /// `PRAGMA integrity_check`, its lines joined.
    fn integrity_check(&self) -> Result<String, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare("PRAGMA integrity_check")?;
        let lines = statement
            .query_map([], |row| row.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(lines.join("; "))
    }

    fn latest_event(
        &self,
        kinds: &[&str],
        task: Option<&str>,
        run: Option<RunId>,
    ) -> Result<Option<EventRow>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(LATEST_EVENT)?;
        let row = statement
            .query_row(
                params![serde_free_json_list(kinds), task, run.map(|r| r.0)],
                |row| {
                    Ok(EventRow {
                        seq: row.get(0)?,
                        at: from_micros(row.get(1)?),
                        kind: row.get(2)?,
                        task: row.get(3)?,
                        run_id: row.get::<_, Option<i64>>(4)?.map(RunId),
                        attempt: row.get::<_, Option<u32>>(5)?.map(Attempt),
                        message: row.get(6)?,
                        instance: row.get(7)?,
                    })
                },
            )
            .optional()?;
        Ok(row)
    }

    fn count_events(&self, kinds: &[&str], since: Instant) -> Result<u64, StoreError> {
        let connection = self.lock();
        let list = serde_free_json_list(kinds);
        let count: i64 =
            connection.query_row(COUNT_EVENTS, params![to_micros(since), list], |row| {
                row.get(0)
            })?;
        Ok(count as u64)
    }

    fn last_event_seq(&self) -> Result<i64, StoreError> {
        let connection = self.lock();
        Ok(
            connection.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |row| {
                row.get(0)
            })?,
        )
    }
}

/// The writes of one open `BEGIN IMMEDIATE` transaction.
struct SqliteTx<'a> {
    tx: &'a Transaction<'a>,
    /// The instance whose events these are (`events.instance`).
    author: Option<&'a str>,
}

impl Tx for SqliteTx<'_> {
    /// The partial unique index `runs_claim` on `(task, scheduled_for)` refuses the second
    /// claim; SQLite undoes only the refused statement, so the transaction goes on.
    fn claim_fire(
        &self,
        run: &NewRun,
        now: Instant,
        next_fire_at: Option<Instant>,
    ) -> Result<RunId, StoreError> {
        let id = insert_run(self, run, now).map_err(|err| match err {
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

    fn claim_backfill(&self, run: &NewRun, now: Instant) -> Result<RunId, StoreError> {
        insert_run(self, run, now).map_err(|err| match err {
            rusqlite::Error::SqliteFailure(code, _)
                if code.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                StoreError::AlreadyClaimed {
                    task: run.task.clone(),
                    scheduled_for: run.scheduled_for,
                }
            }
            other => StoreError::Sql(other),
        })
    }

    fn enqueue(&self, run: &NewRun, now: Instant) -> Result<RunId, StoreError> {
        Ok(insert_run(self, run, now)?)
    }

    fn transition(
        &self,
        step: &Move,
        change: &Change,
        now: Instant,
    ) -> Result<Attempt, StoreError> {
        transition_in(self, step, change, now)
    }

    fn record_progress(
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
            let message = progress_message(percent, phase.as_deref());
            append_event(
                self,
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

    fn record_checkpoint(
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

    fn hand_checkpoint(&self, run: RunId, checkpoint: &str) -> Result<bool, StoreError> {
        Ok(cached_execute(
            self.tx,
            "UPDATE runs SET checkpoint = ?2 WHERE id = ?1 AND state = 'queued'",
            params![run.0, checkpoint],
        )? > 0)
    }

    fn record_result(
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

    fn record_pid(
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

    fn set_next_fire(
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

    fn start_schedule(
        &self,
        task: &TaskName,
        next: Option<Instant>,
        schedule: Option<&str>,
    ) -> Result<Option<Instant>, StoreError> {
        cached_execute(self.tx,
            "INSERT INTO task_state(task, next_fire_at, schedule) VALUES (?1, ?2, ?3)
             ON CONFLICT(task) DO UPDATE SET next_fire_at = excluded.next_fire_at, schedule = excluded.schedule
             WHERE task_state.schedule IS NOT excluded.schedule OR task_state.next_fire_at IS NULL",
            params![task.as_str(), next.map(to_micros), schedule],
        )?;
        let stored: Option<i64> = self.tx.query_row(
            "SELECT next_fire_at FROM task_state WHERE task = ?1",
            [task.as_str()],
            |row| row.get(0),
        )?;
        Ok(stored.map(from_micros))
    }

    fn set_paused(&self, task: &TaskName, paused: bool, now: Instant) -> Result<(), StoreError> {
        self.tx.execute(
            "INSERT INTO task_state(task, paused) VALUES (?1, ?2)
             ON CONFLICT(task) DO UPDATE SET paused = excluded.paused",
            params![task.as_str(), paused as i64],
        )?;
        let kind = if paused {
            "task_paused"
        } else {
            "task_resumed"
        };
        append_event(self, now, kind, Some(task.as_str()), None, None, "")?;
        Ok(())
    }

    /// `BEGIN IMMEDIATE` already holds the whole database: every task is held, and due
    /// is the local clock's business.
    fn hold_schedules(
        &self,
        tasks: &[TaskName],
    ) -> Result<HashMap<TaskName, HeldSchedule>, StoreError> {
        let mut statement = self.tx.prepare_cached(
            "SELECT paused, last_fire_at, next_fire_at, schedule FROM task_state WHERE task = ?1",
        )?;
        let mut held = HashMap::with_capacity(tasks.len());
        for task in tasks {
            let row = statement
                .query_row([task.as_str()], |row| read_task_state(row, 0))
                .optional()?;
            let state = row.unwrap_or_default();
            held.insert(task.clone(), HeldSchedule { state, due: true });
        }
        Ok(held)
    }

    fn record_event(
        &self,
        kind: &str,
        task: Option<&str>,
        run: Option<RunId>,
        message: &str,
        now: Instant,
    ) -> Result<i64, StoreError> {
        append_event(self, now, kind, task, run, None, message)
    }

    /// `BEGIN IMMEDIATE` holds the whole database already.
    fn hold_events(
        &self,
        kinds: &[&str],
        task: Option<&str>,
        run: Option<RunId>,
    ) -> Result<Option<String>, StoreError> {
        Ok(self
            .tx
            .prepare_cached(LATEST_EVENT)?
            .query_row(
                params![serde_free_json_list(kinds), task, run.map(|r| r.0)],
                |row| row.get(2),
            )
            .optional()?)
    }

    fn heartbeat(&self, owner: &str, now: Instant) -> Result<(), StoreError> {
        self.tx.execute(
            "UPDATE instances SET heartbeat_at = ?2 WHERE id = ?1",
            params![owner, to_micros(now)],
        )?;
        self.tx.execute(
            "UPDATE runs SET heartbeat_at = ?2 WHERE owner = ?1 AND state = 'running'",
            params![owner, to_micros(now)],
        )?;
        Ok(())
    }

    fn run(&self, run: RunId) -> Result<Option<RunRow>, StoreError> {
        get_run(self.tx, run)
    }

    fn add_deliveries(
        &self,
        alert: &str,
        deliveries: &[NewDelivery],
        cursor: i64,
        now: Instant,
    ) -> Result<(), StoreError> {
        for delivery in deliveries {
            cached_execute(
                self.tx,
                "INSERT INTO alert_deliveries(alert, event_seq, kind, task, run_id, created_at,
                     payload, state, next_attempt_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'pending', ?6)
                 ON CONFLICT (alert, event_seq) DO NOTHING",
                params![
                    alert,
                    delivery.event_seq,
                    delivery.kind,
                    delivery.task,
                    delivery.run_id.map(|r| r.0),
                    to_micros(now),
                    delivery.payload,
                ],
            )?;
        }
        cached_execute(
            self.tx,
            "INSERT INTO alerts(name, cursor) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET cursor = MAX(cursor, excluded.cursor)",
            params![alert, cursor],
        )?;
        Ok(())
    }

    fn claim_deliveries(
        &self,
        owner: &str,
        now: Instant,
        until: Instant,
        limit: usize,
    ) -> Result<Vec<DeliveryRow>, StoreError> {
        let mut statement = self.tx.prepare_cached(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM alert_deliveries
             WHERE state = 'pending' AND next_attempt_at <= ?1
               AND (claimed_until IS NULL OR claimed_until < ?1)
             ORDER BY next_attempt_at, event_seq LIMIT ?2"
        ))?;
        let mut rows = statement
            .query_map(params![to_micros(now), limit as i64], read_delivery)?
            .collect::<Result<Vec<_>, _>>()?;
        for row in &mut rows {
            cached_execute(
                self.tx,
                "UPDATE alert_deliveries SET claimed_by = ?3, claimed_until = ?4
                 WHERE alert = ?1 AND event_seq = ?2",
                params![row.alert, row.event_seq, owner, to_micros(until)],
            )?;
            row.claimed_by = Some(owner.to_string());
        }
        Ok(rows)
    }

    fn record_delivery(
        &self,
        alert: &str,
        event_seq: i64,
        owner: &str,
        outcome: &DeliveryOutcome,
        now: Instant,
    ) -> Result<bool, StoreError> {
        let (state, status, error, next) = delivery_columns(outcome, now);
        let changed = cached_execute(
            self.tx,
            "UPDATE alert_deliveries
             SET state = ?4, attempts = attempts + 1, last_status = COALESCE(?5, last_status),
                 last_error = ?6, next_attempt_at = COALESCE(?7, next_attempt_at),
                 finished_at = CASE WHEN ?4 = 'pending' THEN NULL ELSE ?8 END,
                 claimed_by = NULL, claimed_until = NULL
             WHERE alert = ?1 AND event_seq = ?2 AND claimed_by = ?3 AND state = 'pending'",
            params![
                alert,
                event_seq,
                owner,
                state,
                status,
                error,
                next.map(to_micros),
                to_micros(now)
            ],
        )?;
        Ok(changed == 1)
    }

    fn flag_abort(&self, run: RunId, reason: &str) -> Result<(), StoreError> {
        self.tx.execute(
            "UPDATE runs SET abort_requested = 1, reason = ?2 WHERE id = ?1",
            params![run.0, reason],
        )?;
        Ok(())
    }

    fn register_instance(
        &self,
        id: &str,
        pid: u32,
        host: &str,
        serving: bool,
        now: Instant,
    ) -> Result<(), StoreError> {
        self.tx.execute(
            "INSERT INTO instances(id, pid, host, started_at, heartbeat_at, serving) VALUES (?1, ?2, ?3, ?4, ?4, ?5)",
            params![id, pid, host, to_micros(now), serving as i64],
        )?;
        Ok(())
    }

    fn set_instance_api(&self, id: &str, address: &str) -> Result<(), StoreError> {
        self.tx.execute(
            "UPDATE instances SET api = ?2 WHERE id = ?1",
            params![id, address],
        )?;
        Ok(())
    }

    fn set_instance_config(&self, id: &str, hash: &str) -> Result<(), StoreError> {
        self.tx.execute(
            "UPDATE instances SET config_hash = ?2 WHERE id = ?1",
            params![id, hash],
        )?;
        Ok(())
    }

    fn stop_instance(&self, id: &str, now: Instant) -> Result<(), StoreError> {
        self.tx.execute(
            "UPDATE instances SET stopped_at = ?2 WHERE id = ?1",
            params![id, to_micros(now)],
        )?;
        Ok(())
    }

    fn prune(&self, cutoff: Instant, dry_run: bool) -> Result<PruneCounts, StoreError> {
        let cutoff = to_micros(cutoff);
        let tx = self.tx;
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
            database: path.display().to_string(),
            found,
            supported: SCHEMA_VERSION,
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

/// The finished runs [`Tx::prune`] removes: terminal before the cutoff `?1`, and not
/// the root of a cascade still going.
const OLD_RUNS: &str = "SELECT id FROM runs
    WHERE state IN ('succeeded', 'failed', 'timed_out', 'aborted', 'skipped')
      AND COALESCE(finished_at, queued_at) < ?1
      AND id NOT IN (SELECT cascade FROM runs WHERE cascade IS NOT NULL
                     AND state IN ('queued', 'running', 'retry_wait', 'orphaned'))";

/// `FROM events WHERE …`: the events [`Tx::prune`] removes — before the cutoff `?1`,
/// and about no run, an old run or a run already gone.
pub(super) fn old_events() -> String {
    format!(
        "FROM events WHERE at < ?1
           AND (run_id IS NULL OR run_id IN ({OLD_RUNS}) OR run_id NOT IN (SELECT id FROM runs))"
    )
}

/// [`Backend::count_events`]: `?1` the start, `?2` a JSON list of kinds (`/health`).
pub(super) const COUNT_EVENTS: &str =
    "SELECT COUNT(*) FROM events WHERE at >= ?1 AND kind IN (SELECT value FROM json_each(?2))";

/// [`Backend::events_after`]: `?1` the last sequence number seen, `?2` the limit (SSE).
pub(super) const EVENTS_AFTER: &str =
    "SELECT seq, at, kind, task, run_id, attempt, message, instance FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2";

/// [`Backend::latest_event`]: `?1` the kinds (a JSON list), `?2` the task or NULL, `?3`
/// the run or NULL. The kinds asked for are rare ones; `events_kind_at` narrows to them.
pub(super) const LATEST_EVENT: &str =
    "SELECT seq, at, kind, task, run_id, attempt, message, instance FROM events
     WHERE kind IN (SELECT value FROM json_each(?1))
       AND (?2 IS NULL OR task = ?2) AND (?3 IS NULL OR run_id = ?3)
     ORDER BY seq DESC LIMIT 1";

/// `["a","b"]` for `json_each`, from plain identifiers (state and event names).
fn serde_free_json_list(names: &[&str]) -> String {
    let quoted: Vec<String> = names
        .iter()
        .map(|n| format!("\"{}\"", n.replace(['"', '\\'], "")))
        .collect();
    format!("[{}]", quoted.join(","))
}

/// `paused, last_fire_at, next_fire_at, schedule`, read from column `first` on.
fn read_task_state(row: &Row<'_>, first: usize) -> rusqlite::Result<TaskStateRow> {
    Ok(TaskStateRow {
        paused: row.get::<_, i64>(first)? != 0,
        last_fire_at: row.get::<_, Option<i64>>(first + 1)?.map(from_micros),
        next_fire_at: row.get::<_, Option<i64>>(first + 2)?.map(from_micros),
        schedule: row.get(first + 3)?,
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
        config_hash: row.get(7)?,
    })
}

/// [`insert_run`]'s INSERT: a new run, queued.
pub(super) const INSERT_RUN: &str = "INSERT INTO runs(task, trigger, scheduled_for, queued_at, state, max_attempts, force, downstream, cascade, params)
         VALUES (?1, ?2, ?3, ?4, 'queued', ?5, ?6, ?7, ?8, ?9)";

fn insert_run(tx: &SqliteTx<'_>, run: &NewRun, now: Instant) -> rusqlite::Result<RunId> {
    let (writer, tx) = (tx, tx.tx);
    cached_execute(
        tx,
        INSERT_RUN,
        params![
            run.task.as_str(),
            run.trigger.as_str(),
            to_micros(run.scheduled_for),
            to_micros(now),
            run.max_attempts.max(1),
            run.force as i64,
            run.downstream as i64,
            run.cascade.map(|c| c.0),
            run.params,
        ],
    )?;
    let id = RunId(tx.last_insert_rowid());
    if run.downstream && run.cascade.is_none() {
        cached_execute(tx, "UPDATE runs SET cascade = id WHERE id = ?1", [id.0])?;
    }
    let message = format!("{} for {}", run.trigger, run.scheduled_for.to_rfc3339());
    append_event(
        writer,
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

/// Another run of the same task in `running` (the one-attempt-per-task check).
pub(super) const TASK_BUSY: &str = "SELECT id, task FROM runs
     WHERE task = (SELECT task FROM runs WHERE id = ?1) AND state = 'running' AND id != ?1
     LIMIT 1";

/// [`Tx::transition`]'s UPDATE, guarded by the expected state and attempt.
pub(super) const TRANSITION: &str = "UPDATE runs SET
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
            phase = CASE WHEN ?6 OR ?4 = 'succeeded' THEN NULL ELSE phase END,
            progress_event_at = CASE WHEN ?6 THEN NULL ELSE progress_event_at END,
            progress_event_pct = CASE WHEN ?6 THEN NULL ELSE progress_event_pct END,
            progress_event_phase = CASE WHEN ?6 THEN NULL ELSE progress_event_phase END,
            max_attempts = max_attempts + ?14
         WHERE id = ?1 AND state = ?2 AND attempt = ?3";

/// [`Tx::transition`]: the one UPDATE that writes `runs.state`, guarded by the expected
/// state and attempt.
fn transition_in(
    tx: &SqliteTx<'_>,
    step: &Move,
    change: &Change,
    now: Instant,
) -> Result<Attempt, StoreError> {
    let (writer, tx) = (tx, tx.tx);
    let &Move {
        run,
        attempt,
        from,
        to,
    } = step;
    let Landing {
        starting,
        attempt: new_attempt,
        now: now_micros,
        finished_at,
    } = step.landing(now)?;
    if starting {
        // One attempt per task at a time: `BEGIN IMMEDIATE` holds the database, so
        // nothing can start another between this check and the update.
        let running: Option<(i64, String)> =
            cached_query_row(tx, TASK_BUSY, params![run.0], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .optional()?;
        if let Some((running, task)) = running {
            return Err(StoreError::TaskBusy {
                run,
                task: TaskName::from(task.as_str()),
                running: RunId(running),
            });
        }
    }
    let changed = cached_execute(
        tx,
        TRANSITION,
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
        let outcome = attempt_outcome(to);
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
    let (kind, message) = transition_event(to, change);
    append_event(
        writer,
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
    tx: &SqliteTx<'_>,
    now: Instant,
    kind: &str,
    task: Option<&str>,
    run: Option<RunId>,
    attempt: Option<Attempt>,
    message: &str,
) -> Result<i64, StoreError> {
    let (author, tx) = (tx.author, tx.tx);
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
        "INSERT INTO events(at, kind, task, run_id, attempt, message, instance) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![to_micros(now), kind, task, run.map(|r| r.0), attempt.map(|a| a.0), message, author],
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

/// The query of [`Backend::runs`] for `filter`: only the conditions given are written,
/// since `(?1 IS NULL OR task = ?1)` would keep SQLite from the (task, id) index and scan
/// the whole history for one task. The first term names every parameter, so each variant
/// binds the same five (task, state, before, limit, since).
pub(super) fn runs_sql(filter: &RunFilter) -> String {
    let mut conditions = vec!["coalesce(?1, ?2, ?3, ?5, 1) IS NOT NULL"];
    if filter.task.is_some() {
        conditions.push("task = ?1");
    }
    if filter.state.is_some() {
        conditions.push("state = ?2");
    }
    if filter.before.is_some() {
        conditions.push("id < ?3");
    }
    if filter.since.is_some() {
        conditions.push("queued_at >= ?5");
    }
    format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE {} ORDER BY id DESC LIMIT ?4",
        conditions.join(" AND ")
    )
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
        params: row.get(25)?,
    })
}

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
