//! The PostgreSQL backend: `tokio-postgres` connections in a `deadpool-postgres` pool.
//! Every [`Backend::write`] is one `READ COMMITTED` transaction, and [`PostgresTx`] is its
//! [`Tx`]: the SQL of every write lives here, the rules they share (legal moves, progress
//! news, event wording) in the parent module. Today it gives the single-instance
//! semantics of SQLite (the conformance suite); cluster mode (leases, `SKIP LOCKED`
//! firing, config agreement) is not here yet.
//!
//! Why a runtime of its own: the store's interface is synchronous — the engine calls it
//! inside `block_in_place`, the API from actix's blocking pool, the CLI and the
//! maintenance task from plain threads — while the client is async. The backend owns a
//! small tokio runtime (one worker thread, which drives the connections) and `block_on`s
//! each operation on it (`block_on` here), so any thread can call it: a plain one, or a
//! worker of a multi-thread runtime (the engine calls some reads outside its
//! `block_in_place` sections), where the call runs under `block_in_place`. Only an async
//! task of a current-thread runtime cannot (actix handlers go through `web::block`).
//! Dropping the backend shuts that runtime down in the background, so even the last
//! `Store` dropped on an async thread does not block it.
//!
//! How the guarantees are kept:
//! - Claims: `INSERT … ON CONFLICT DO NOTHING` against the partial unique index
//!   `runs_claim`; no row back means `AlreadyClaimed`. (A unique violation would abort
//!   the whole PostgreSQL transaction, and a refusal must leave the rest of the batch.)
//! - Fenced moves: the `UPDATE … WHERE id AND state AND attempt`; zero rows is `Fenced`,
//!   with the state and attempt found. Under `READ COMMITTED` a concurrent UPDATE of the
//!   same row waits for the first to commit and re-checks the guard on the new row.
//! - Events: `seq` is `meta.event_seq` bumped in the appending transaction, not a
//!   sequence: a `bigserial` leaves gaps on rollback and can commit out of order. The
//!   counter row stays locked until commit, so appends are serialized and committed in
//!   `seq` order, without gaps.
//! - A deadlock or serialization failure (two transactions taking the counter and a row
//!   in opposite orders) rolls back and runs the body again, at most
//!   [`CONFLICT_RETRIES`] times, as [`Backend::write`] allows.
//! - Instants are BIGINT microseconds since the epoch, as in SQLite: exact.
//! - Hints ([`Backend::hints`]): a transaction that queues a run, flags an abort, changes
//!   a pause flag or a schedule key, or appends events sends one NOTIFY just before its
//!   COMMIT (delivered at commit, never for a rollback); [`listen`] hears them on a
//!   connection of its own, reconnecting when it drops. Hints only bring work forward.
//!
//! Schema: `postgres.sql` is the current shape, run in one transaction under an advisory
//! lock (concurrent openers migrate once) when a database is new or older;
//! `meta.schema_version` says which shape a database has (read first under the lock
//! shared: a current database is opened without touching its tables), [`MIGRATIONS`]
//! takes an older one forward, and a newer one is refused ([`StoreError::NewerSchema`]).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::OnceLock;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Transaction};
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, IsolationLevel, NoTls, Row};
use tracing::{info, warn};

use super::progress_message;
use super::{
    attempt_outcome, delivery_columns, progress_is_news, transition_event, AttemptRow, Backend,
    Change, DeliveryOutcome, DeliveryRow, EventRow, HeldSchedule, Hint, HintFeed, Hints,
    InstanceRow, Landing, LastProgressEvent, Move, NewDelivery, NewRun, PostgresError, PruneCounts,
    RunFilter, RunRow, StoreError, TaskStateRow, Tx,
};
use crate::model::{from_micros, to_micros, Attempt, Instant, RunId, RunState, TaskName, Trigger};

const SCHEMA: &str = include_str!("postgres.sql");

/// The schema version this build writes into a PostgreSQL database's
/// `meta.schema_version` (numbered apart from SQLite's).
const POSTGRES_SCHEMA_VERSION: usize = 3;

/// What `postgres.sql`'s `IF NOT EXISTS` cannot do to an older database: entry `n` takes
/// it from version `n + 1` to `n + 2`. Never edit an entry: append one.
const MIGRATIONS: &[&str] = &[
    // 1 → 2 (issue "Cluster mode"): each event names the instance that wrote it.
    "ALTER TABLE events ADD COLUMN IF NOT EXISTS instance TEXT;
     ALTER TABLE instances ADD COLUMN IF NOT EXISTS config_hash TEXT;",
    // 2 → 3 (issue 16): a run's own params; the claim index covers backfill too. The
    // alert tables come from postgres.sql.
    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS params TEXT;
     DROP INDEX IF EXISTS runs_claim;",
];

/// The advisory lock the migration holds, so concurrent openers migrate once.
const MIGRATION_LOCK: i64 = 0x7475_7262_6f73_6368; // "turbosch"

/// Connections per backend: the engine, the API's blocking threads and the heartbeat
/// share them; a write holds one for its transaction.
const POOL_SIZE: usize = 8;

/// Times a write runs its body again after a deadlock or serialization failure.
const CONFLICT_RETRIES: usize = 5;

/// The columns [`read_delivery`] reads, in its order.
const DELIVERY_COLUMNS: &str = "alert, event_seq, kind, task, run_id, created_at, payload, state, \
    attempts, next_attempt_at, claimed_by, last_status, last_error, finished_at";

/// One row of [`DELIVERY_COLUMNS`].
fn read_delivery(row: &Row) -> Result<DeliveryRow, StoreError> {
    Ok(DeliveryRow {
        alert: row.try_get(0)?,
        event_seq: row.try_get(1)?,
        kind: row.try_get(2)?,
        task: row.try_get(3)?,
        run_id: row.try_get::<_, Option<i64>>(4)?.map(RunId),
        created_at: from_micros(row.try_get(5)?),
        payload: row.try_get(6)?,
        state: row.try_get(7)?,
        attempts: row.try_get::<_, i64>(8)?.max(0) as u32,
        next_attempt_at: from_micros(row.try_get(9)?),
        claimed_by: row.try_get(10)?,
        last_status: row.try_get(11)?,
        last_error: row.try_get(12)?,
        finished_at: row.try_get::<_, Option<i64>>(13)?.map(from_micros),
    })
}

const RUN_COLUMNS: &str =
    "id, task, trigger, scheduled_for, queued_at, started_at, finished_at, state, \
    attempt, max_attempts, next_attempt_at, exit_code, error, reason, progress, phase, checkpoint, \
    result, owner, pid, heartbeat_at, abort_requested, force, downstream, cascade, params";

/// Whether the `database` setting names a PostgreSQL database rather than a SQLite file.
/// The server's clock now, in µs since the epoch: what due-ness and leases are judged on
/// when several instances share the database.
const DATABASE_NOW: &str = "(extract(epoch FROM clock_timestamp()) * 1000000)::BIGINT";

pub(super) fn is_postgres_url(setting: &str) -> bool {
    setting.starts_with("postgres://") || setting.starts_with("postgresql://")
}

impl From<tokio_postgres::Error> for PostgresError {
    fn from(err: tokio_postgres::Error) -> PostgresError {
        let code = err.code().map(|code| code.code().to_string());
        let io = std::error::Error::source(&err).is_some_and(|s| s.is::<std::io::Error>());
        // Classes 08 (connection), 53 (resources: disk full, out of memory), 57
        // (operator intervention: shutdown), 58 (system: I/O); 25006 a read-only server.
        let unavailable = err.is_closed()
            || io
            || err.to_string() == "timeout waiting for server"
            || code.as_deref().is_some_and(|code| {
                ["08", "53", "57", "58"].iter().any(|c| code.starts_with(c)) || code == "25006"
            });
        PostgresError {
            message: with_causes(&err),
            code,
            unavailable,
        }
    }
}

impl From<PoolError> for PostgresError {
    fn from(err: PoolError) -> PostgresError {
        match err {
            PoolError::Backend(err) => err.into(),
            PoolError::Timeout(_) | PoolError::Closed => PostgresError {
                message: format!("no connection: {err}"),
                code: None,
                unavailable: true,
            },
            other => PostgresError {
                message: other.to_string(),
                code: None,
                unavailable: false,
            },
        }
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(err: tokio_postgres::Error) -> StoreError {
        StoreError::Postgres(err.into())
    }
}

impl From<PoolError> for StoreError {
    fn from(err: PoolError) -> StoreError {
        StoreError::Postgres(err.into())
    }
}

/// Runs `future` to completion on the backend's `runtime`, from any thread that is not
/// driving a current-thread runtime: a plain thread, actix's blocking pool, or a worker
/// of a multi-thread runtime — there (the engine's own calls outside its
/// `block_in_place` sections) under `block_in_place`, since a bare `block_on` would
/// panic, and the runtime moves its other tasks to other threads meanwhile (nested in a
/// `block_in_place` already, that is a no-op).
fn block_on<F: std::future::Future>(runtime: &Runtime, future: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| runtime.block_on(future))
        }
        _ => runtime.block_on(future),
    }
}

/// A deadlock or serialization failure: the transaction may be run again.
fn is_conflict(err: &PostgresError) -> bool {
    matches!(err.code.as_deref(), Some("40001" | "40P01"))
}

/// `error: cause: cause`, since tokio-postgres says only "db error" at the top.
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    message
}

/// The URL without its password, for messages.
pub(super) fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((user, host)) => {
            let user = user.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}@{host}")
        }
        None => url.to_string(),
    }
}

/// One PostgreSQL database, through a pool, driven by a runtime of its own.
pub(super) struct PostgresBackend {
    pool: Pool,
    /// `Some` until dropped (see the `Drop` impl).
    runtime: Option<Runtime>,
    /// How to connect (the listener opens a connection of its own).
    config: tokio_postgres::Config,
    /// This backend's name in its hints' payloads, so its listener skips its own writes.
    origin: String,
    /// The listener's counts, once [`Backend::hints`] has started it.
    listener: OnceLock<watch::Sender<HintCounts>>,
}

impl Drop for PostgresBackend {
    /// The runtime is shut down in the background: dropping it plainly would block, which
    /// panics when the last `Store` is dropped on an async thread.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl PostgresBackend {
    /// Connects to the database at `url` (`postgres://user@host:port/name`) and brings its
    /// schema to [`POSTGRES_SCHEMA_VERSION`].
    pub(super) fn open(url: &str) -> Result<PostgresBackend, StoreError> {
        let database = redacted(url);
        let fail = |reason: String| StoreError::PostgresOpen {
            database: database.clone(),
            reason,
        };
        let config: tokio_postgres::Config = url.parse().map_err(|err| fail(with_causes(&err)))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("turbosched-postgres")
            .enable_all()
            .build()
            .map_err(|err| fail(err.to_string()))?;
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(10)))
            .recycle_timeout(Some(Duration::from_secs(10)))
            .build()
            .map_err(|err| fail(err.to_string()))?;
        let backend = PostgresBackend {
            pool,
            runtime: Some(runtime),
            config,
            origin: uuid::Uuid::new_v4().simple().to_string(),
            listener: OnceLock::new(),
        };
        backend.migrate(&database).map_err(|err| match err {
            StoreError::Postgres(err) => fail(err.to_string()),
            other => other,
        })?;
        Ok(backend)
    }

    fn runtime(&self) -> &Runtime {
        self.runtime.as_ref().expect("the runtime lives until drop")
    }

    /// Runs `work` on one pooled connection, on the backend's runtime: for what is no
    /// [`Tx`] of run state (`migrate.rs`'s copy: a transaction of its own, `COPY`, DDL).
    pub(super) fn with_connection<T, E, F, Fut>(&self, work: F) -> Result<T, E>
    where
        E: From<StoreError>,
        F: FnOnce(deadpool_postgres::Object) -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        block_on(self.runtime(), async {
            let client = self.pool.get().await.map_err(StoreError::from)?;
            work(client).await
        })
    }

    /// Creates a new database's tables, migrates an older one, refuses a newer one; one
    /// transaction under [`MIGRATION_LOCK`].
    ///
    /// A database already at this schema is left alone, its version read under the
    /// migration lock shared (no lock on any table; a migration under way is waited for,
    /// so an older turbosched is refused by the schema it brings): the DDL re-run
    /// (`CREATE INDEX IF NOT EXISTS` takes a SHARE lock on its table even when the index
    /// exists) would queue this open behind every peer's write and every peer's write
    /// behind this open. An opener that waited for a peer's migration finds it done and
    /// runs nothing either.
    fn migrate(&self, database: &str) -> Result<(), StoreError> {
        let current = Some(POSTGRES_SCHEMA_VERSION as i64);
        block_on(self.runtime(), async {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            tx.execute(
                "SELECT pg_advisory_xact_lock_shared($1)",
                &[&MIGRATION_LOCK],
            )
            .await?;
            let stored = stored_schema_version(&tx).await?;
            tx.commit().await?;
            if stored == current {
                return Ok(());
            }
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await?;
            if stored_schema_version(&tx).await? == current {
                tx.commit().await?;
                return Ok(());
            }
            // `IF NOT EXISTS` on an existing table is a NOTICE, which tokio-postgres logs
            // at INFO: a dozen lines in the service log at every open.
            tx.batch_execute("SET LOCAL client_min_messages = warning")
                .await?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL)",
            )
            .await?;
            let stored = tx
                .query_opt("SELECT value FROM meta WHERE key = 'schema_version'", &[])
                .await?
                .map(|row| row.try_get::<_, i64>(0))
                .transpose()?;
            let found = stored.map_or(POSTGRES_SCHEMA_VERSION, |v| v.max(0) as usize);
            if found > POSTGRES_SCHEMA_VERSION {
                return Err(StoreError::NewerSchema {
                    database: database.to_string(),
                    found,
                    supported: POSTGRES_SCHEMA_VERSION,
                });
            }
            for migration in MIGRATIONS.iter().skip(found.saturating_sub(1)) {
                tx.batch_execute(migration).await?;
            }
            tx.batch_execute(SCHEMA).await?;
            tx.execute(
                "INSERT INTO meta(key, value) VALUES ('schema_version', $1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[&(POSTGRES_SCHEMA_VERSION as i64)],
            )
            .await?;
            tx.execute(
                "INSERT INTO meta(key, value) VALUES ('event_seq', 0) ON CONFLICT (key) DO NOTHING",
                &[],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Rows of one read, on a pooled connection (prepared statements cached per
    /// connection).
    fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, StoreError> {
        block_on(self.runtime(), async {
            let client = self.pool.get().await?;
            let statement = client.prepare_cached(sql).await?;
            Ok(client.query(&statement, params).await?)
        })
    }

    fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    fn runs_where(
        &self,
        condition: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<RunRow>, StoreError> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE {condition}");
        self.query(&sql, params)?.iter().map(read_run).collect()
    }
}

impl Backend for PostgresBackend {
    /// One `READ COMMITTED` transaction on one pooled connection. `body` runs again (at
    /// most [`CONFLICT_RETRIES`] times) after a deadlock or serialization failure. A
    /// statement that failed inside `body` aborts the PostgreSQL transaction: the write
    /// then fails with that error even if `body` went on, since PostgreSQL would turn
    /// the COMMIT into a silent rollback.
    fn write(
        &self,
        author: Option<&str>,
        body: &mut dyn FnMut(&dyn Tx) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let runtime = self.runtime();
        let mut retries = 0;
        loop {
            let mut client = block_on(runtime, self.pool.get())?;
            let tx = block_on(
                runtime,
                client
                    .build_transaction()
                    .isolation_level(IsolationLevel::ReadCommitted)
                    .start(),
            )?;
            let postgres_tx = PostgresTx {
                runtime,
                tx: &tx,
                failed: RefCell::new(None),
                author,
                hints: Cell::new(0),
            };
            let result = body(&postgres_tx);
            let hinted = postgres_tx.hints.get();
            let failed = postgres_tx.failed.into_inner();
            let outcome = match (result, failed) {
                (Ok(()), None) => block_on(runtime, async {
                    if hinted != 0 {
                        let notify = tx.prepare_cached("SELECT pg_notify($1, $2)").await?;
                        let payload = hint_payload(&self.origin, hinted);
                        tx.execute(&notify, &[&HINT_CHANNEL, &payload]).await?;
                    }
                    tx.commit().await
                })
                .map_err(StoreError::from),
                (result, failed) => {
                    // Rolled back explicitly, so the connection goes back to the pool clean.
                    let _ = block_on(runtime, tx.rollback());
                    match (result, failed) {
                        (Err(StoreError::Postgres(err)), _) | (Ok(()), Some(err)) => {
                            Err(StoreError::Postgres(err))
                        }
                        (Err(err), _) => Err(err),
                        (Ok(()), None) => unreachable!("committed above"),
                    }
                }
            };
            match outcome {
                Err(StoreError::Postgres(err))
                    if is_conflict(&err) && retries < CONFLICT_RETRIES =>
                {
                    retries += 1;
                }
                other => return other,
            }
        }
    }

    fn run(&self, run: RunId) -> Result<Option<RunRow>, StoreError> {
        Ok(self.runs_where("id = $1", &[&run.0])?.into_iter().next())
    }

    fn alert_cursor(&self, alert: &str) -> Result<Option<i64>, StoreError> {
        self.query_opt("SELECT cursor FROM alerts WHERE name = $1", &[&alert])?
            .map(|row| row.try_get(0).map_err(StoreError::from))
            .transpose()
    }

    fn alert_deliveries(&self, limit: usize) -> Result<Vec<DeliveryRow>, StoreError> {
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM alert_deliveries ORDER BY event_seq DESC, alert LIMIT $1"
        );
        self.query(&sql, &[&(limit as i64)])?
            .iter()
            .map(read_delivery)
            .collect()
    }

    fn runs(&self, filter: &RunFilter) -> Result<Vec<RunRow>, StoreError> {
        // Only the conditions given are written, so the planner can use (task, id).
        let state = filter.state.map(|s| s.as_str());
        let before = filter.before.map(|r| r.0);
        let since = filter.since.map(to_micros);
        let limit = if filter.limit == 0 { 50 } else { filter.limit } as i64;
        let mut conditions: Vec<String> = Vec::new();
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        if let Some(task) = &filter.task {
            params.push(task);
            conditions.push(format!("task = ${}", params.len()));
        }
        if let Some(state) = &state {
            params.push(state);
            conditions.push(format!("state = ${}", params.len()));
        }
        if let Some(before) = &before {
            params.push(before);
            conditions.push(format!("id < ${}", params.len()));
        }
        if let Some(since) = &since {
            params.push(since);
            conditions.push(format!("queued_at >= ${}", params.len()));
        }
        params.push(&limit);
        let condition = if conditions.is_empty() {
            "TRUE".to_string()
        } else {
            conditions.join(" AND ")
        };
        self.runs_where(
            &format!("{condition} ORDER BY id DESC LIMIT ${}", params.len()),
            &params,
        )
    }

    fn unfinished_runs(&self) -> Result<Vec<RunRow>, StoreError> {
        self.runs_where(
            "state IN ('queued', 'running', 'retry_wait', 'orphaned') ORDER BY id",
            &[],
        )
    }

    fn latest_finished(&self, task: &TaskName) -> Result<Option<RunRow>, StoreError> {
        Ok(self
            .runs_where(
                "task = $1 AND state IN ('succeeded', 'failed', 'timed_out', 'aborted', 'skipped')
                 ORDER BY finished_at DESC NULLS LAST, id DESC LIMIT 1",
                &[&task.as_str()],
            )?
            .into_iter()
            .next())
    }

    fn cascade_runs(&self, root: RunId) -> Result<Vec<RunRow>, StoreError> {
        self.runs_where("cascade = $1 ORDER BY id", &[&root.0])
    }

    fn ids_in_states(&self, states: &[RunState]) -> Result<Vec<RunId>, StoreError> {
        let names: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        self.query(
            "SELECT id FROM runs WHERE state = ANY($1) ORDER BY id",
            &[&names],
        )?
        .iter()
        .map(|row| Ok(RunId(row.try_get(0)?)))
        .collect()
    }

    fn abort_requests(&self, owner: &str) -> Result<Vec<(RunId, Option<String>)>, StoreError> {
        self.query(
            "SELECT id, reason FROM runs WHERE state = 'running' AND owner = $1 AND abort_requested ORDER BY id",
            &[&owner],
        )?
        .iter()
        .map(|row| Ok((RunId(row.try_get(0)?), row.try_get(1)?)))
        .collect()
    }

    fn attempts(&self, run: RunId) -> Result<Vec<AttemptRow>, StoreError> {
        self.query(
            "SELECT attempt, started_at, finished_at, outcome, exit_code, error, pid, spawned_at, owner
             FROM attempts WHERE run_id = $1 ORDER BY attempt",
            &[&run.0],
        )?
        .iter()
        .map(|row| {
            Ok(AttemptRow {
                attempt: attempt_at(row, 0)?,
                started_at: from_micros(row.try_get(1)?),
                finished_at: instant_at(row, 2)?,
                outcome: row.try_get(3)?,
                exit_code: row.try_get(4)?,
                error: row.try_get(5)?,
                pid: row.try_get(6)?,
                spawned_at: instant_at(row, 7)?,
                owner: row.try_get(8)?,
            })
        })
        .collect()
    }

    fn task_state(&self, task: &TaskName) -> Result<TaskStateRow, StoreError> {
        let row = self.query_opt(
            "SELECT task, paused, last_fire_at, next_fire_at, schedule FROM task_state WHERE task = $1",
            &[&task.as_str()],
        )?;
        Ok(row
            .map(|row| read_task_state(&row))
            .transpose()?
            .map(|(_, state)| state)
            .unwrap_or_default())
    }

    fn task_states(&self) -> Result<HashMap<TaskName, TaskStateRow>, StoreError> {
        self.query(
            "SELECT task, paused, last_fire_at, next_fire_at, schedule FROM task_state",
            &[],
        )?
        .iter()
        .map(read_task_state)
        .collect()
    }

    fn claimed_ticks(
        &self,
        task: &TaskName,
        from: Instant,
        to: Instant,
    ) -> Result<HashSet<Instant>, StoreError> {
        self.query(
            "SELECT scheduled_for FROM runs WHERE task = $1 AND trigger IN ('schedule', 'catchup', 'backfill')
             AND scheduled_for BETWEEN $2 AND $3",
            &[&task.as_str(), &to_micros(from), &to_micros(to)],
        )?
        .iter()
        .map(|row| Ok(from_micros(row.try_get(0)?)))
        .collect()
    }

    fn paused_tasks(&self) -> Result<HashSet<String>, StoreError> {
        self.query("SELECT task FROM task_state WHERE paused", &[])?
            .iter()
            .map(|row| Ok(row.try_get(0)?))
            .collect()
    }

    fn events_after(&self, after: i64, limit: usize) -> Result<Vec<EventRow>, StoreError> {
        self.query(
            "SELECT seq, at, kind, task, run_id, attempt, message, instance FROM events
             WHERE seq > $1 ORDER BY seq LIMIT $2",
            &[&after, &(limit as i64)],
        )?
        .iter()
        .map(|row| {
            Ok(EventRow {
                seq: row.try_get(0)?,
                at: from_micros(row.try_get(1)?),
                kind: row.try_get(2)?,
                task: row.try_get(3)?,
                run_id: row.try_get::<_, Option<i64>>(4)?.map(RunId),
                attempt: row.try_get::<_, Option<i64>>(5)?.map(|a| Attempt(a as u32)),
                message: row.try_get(6)?,
                instance: row.try_get(7)?,
            })
        })
        .collect()
    }

    fn latest_event(
        &self,
        kinds: &[&str],
        task: Option<&str>,
        run: Option<RunId>,
    ) -> Result<Option<EventRow>, StoreError> {
        let run = run.map(|r| r.0);
        self.query_opt(LATEST_EVENT, &[&kinds, &task, &run])?
            .map(|row| {
                Ok(EventRow {
                    seq: row.try_get(0)?,
                    at: from_micros(row.try_get(1)?),
                    kind: row.try_get(2)?,
                    task: row.try_get(3)?,
                    run_id: row.try_get::<_, Option<i64>>(4)?.map(RunId),
                    attempt: row.try_get::<_, Option<i64>>(5)?.map(|a| Attempt(a as u32)),
                    message: row.try_get(6)?,
                    instance: row.try_get(7)?,
                })
            })
            .transpose()
    }

    fn count_events(&self, kinds: &[&str], since: Instant) -> Result<u64, StoreError> {
        let row = self.query_opt(
            "SELECT COUNT(*) FROM events WHERE at >= $1 AND kind = ANY($2)",
            &[&to_micros(since), &kinds],
        )?;
        Ok(row
            .map(|row| row.try_get::<_, i64>(0))
            .transpose()?
            .unwrap_or(0) as u64)
    }

    /// The counter, not `MAX(seq)`: a number handed out stays used after a prune.
    fn last_event_seq(&self) -> Result<i64, StoreError> {
        let row = self.query_opt("SELECT value FROM meta WHERE key = 'event_seq'", &[])?;
        Ok(row.map(|row| row.try_get(0)).transpose()?.unwrap_or(0))
    }

    fn live_instances(
        &self,
        timeout: Duration,
        now: Instant,
    ) -> Result<Vec<InstanceRow>, StoreError> {
        let since = now - chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX);
        self.query(
            "SELECT id, pid, host, heartbeat_at, stopped_at, serving, api, config_hash FROM instances
             WHERE stopped_at IS NULL AND heartbeat_at >= $1 ORDER BY heartbeat_at DESC",
            &[&to_micros(since)],
        )?
        .iter()
        .map(read_instance)
        .collect()
    }

    /// `clock_timestamp()`: the server's time now (not the transaction's start).
    fn database_now(&self) -> Result<Option<Instant>, StoreError> {
        let rows = self.query(&format!("SELECT {DATABASE_NOW}"), &[])?;
        let row = rows.first().ok_or_else(|| {
            StoreError::Postgres(PostgresError {
                message: "SELECT clock_timestamp() returned no row".into(),
                code: None,
                unavailable: false,
            })
        })?;
        Ok(Some(from_micros(row.try_get(0)?)))
    }

    fn instance(&self, id: &str) -> Result<Option<InstanceRow>, StoreError> {
        self.query_opt(
            "SELECT id, pid, host, heartbeat_at, stopped_at, serving, api, config_hash FROM instances WHERE id = $1",
            &[&id],
        )?
        .as_ref()
        .map(read_instance)
        .transpose()
    }

    /// Sets `meta.health_probe` to `now` and commits, all within `patience` (the pool's
    /// wait included); a transaction cut short by the deadline rolls back.
    fn probe_write(&self, patience: Duration, now: Instant) -> Result<(), StoreError> {
        let probe = async {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            tx.execute(
                "INSERT INTO meta(key, value) VALUES ('health_probe', $1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[&to_micros(now)],
            )
            .await?;
            tx.commit().await?;
            Ok::<(), StoreError>(())
        };
        block_on(self.runtime(), async {
            tokio::time::timeout(patience, probe)
                .await
                .unwrap_or_else(|_| {
                    Err(StoreError::Postgres(PostgresError {
                        message: format!("no write committed within {patience:?}"),
                        code: None,
                        unavailable: true,
                    }))
                })
        })
    }

    /// PostgreSQL checks its own pages; what is checked here is the store's one
    /// invariant of its own that the schema does not enforce: the event counter is at
    /// or past every stored event. "ok", or what is wrong.
    fn integrity_check(&self) -> Result<String, StoreError> {
        let row = self.query_opt(
            "SELECT (SELECT value FROM meta WHERE key = 'event_seq'),
                    (SELECT COALESCE(MAX(seq), 0) FROM events)",
            &[],
        )?;
        let (counter, highest): (Option<i64>, i64) = match row {
            Some(row) => (row.try_get(0)?, row.try_get(1)?),
            None => (None, 0),
        };
        Ok(match counter {
            None => "meta.event_seq is missing".to_string(),
            Some(counter) if counter < highest => {
                format!("meta.event_seq is {counter}, behind the highest event seq {highest}")
            }
            Some(_) => "ok".to_string(),
        })
    }

    fn can_back_up(&self) -> bool {
        false
    }

    /// Not done here: a PostgreSQL database is backed up by `pg_dump` (or the server's
    /// own base backups), run by whoever runs the server.
    fn backup_to(&self, destination: &Path) -> Result<(), StoreError> {
        Err(StoreError::NotSupported {
            operation: format!("backing up the run database to {}", destination.display()),
            instead: "on PostgreSQL, use pg_dump (or the server's own backups)",
        })
    }

    /// LISTEN/NOTIFY: the first call starts the listener (a connection of its own, on
    /// the backend's runtime, see [`listen`]); every call subscribes to it. Hints of this
    /// backend's own writes are left out: its caller made them.
    fn hints(&self) -> Option<Hints> {
        let sender = self.listener.get_or_init(|| {
            let (sender, _) = watch::channel(HintCounts::default());
            let listening = listen(self.config.clone(), self.origin.clone(), sender.clone());
            self.runtime().spawn(listening);
            sender
        });
        let receiver = sender.subscribe();
        let seen = *receiver.borrow();
        Some(Hints::new(Box::new(PostgresHints { receiver, seen })))
    }
}

/// The channel writers NOTIFY and the listener LISTENs on.
const HINT_CHANNEL: &str = "turbosched";

const HINT_QUEUED: u8 = 1;
const HINT_ABORT: u8 = 2;
const HINT_SCHEDULE: u8 = 4;
const HINT_EVENT: u8 = 8;

/// Each kind of hint, and its word in a payload.
const HINT_KINDS: [(u8, &str); 4] = [
    (HINT_QUEUED, "queued"),
    (HINT_ABORT, "abort"),
    (HINT_SCHEDULE, "schedule"),
    (HINT_EVENT, "event"),
];

/// The listener's first wait before connecting again; it doubles up to
/// [`LISTEN_RETRY_MAX`].
const LISTEN_RETRY_MIN: Duration = Duration::from_millis(200);
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(5);

/// `<origin> <kind>,<kind>`: one NOTIFY per transaction whatever it wrote (PostgreSQL
/// delivers it at commit, and nothing of a rolled-back one).
fn hint_payload(origin: &str, mask: u8) -> String {
    let kinds: Vec<&str> = HINT_KINDS
        .iter()
        .filter(|(bit, _)| mask & bit != 0)
        .map(|(_, word)| *word)
        .collect();
    format!("{origin} {}", kinds.join(","))
}

/// The kinds a payload names, unless it comes from `origin` (or names none we know: a
/// newer turbosched's kinds are ignored).
fn parse_hint(payload: &str, origin: &str) -> u8 {
    let Some((from, kinds)) = payload.split_once(' ') else {
        return 0;
    };
    if from == origin {
        return 0;
    }
    kinds
        .split(',')
        .filter_map(|word| HINT_KINDS.iter().find(|(_, w)| *w == word))
        .fold(0, |mask, (bit, _)| mask | bit)
}

/// How many hints of each kind the listener has received, and whether it is listening:
/// a subscriber compares counts with the ones it saw last, so hints coalesce but none
/// is missed between two looks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct HintCounts {
    counts: [u64; 4],
    live: bool,
}

impl HintCounts {
    fn add(&mut self, mask: u8) {
        for (count, (bit, _)) in self.counts.iter_mut().zip(HINT_KINDS) {
            if mask & bit != 0 {
                *count += 1;
            }
        }
    }

    /// What changed since `seen`.
    fn since(&self, seen: &HintCounts) -> Hint {
        let changed = |kind: usize| self.counts[kind] != seen.counts[kind];
        Hint {
            queued: changed(0),
            abort: changed(1),
            schedule: changed(2),
            event: changed(3),
        }
    }
}

/// A subscriber's view of the listener's watch channel.
struct PostgresHints {
    receiver: watch::Receiver<HintCounts>,
    seen: HintCounts,
}

impl HintFeed for PostgresHints {
    fn next(&mut self) -> Pin<Box<dyn Future<Output = Option<Hint>> + Send + '_>> {
        Box::pin(async move {
            loop {
                self.receiver.changed().await.ok()?;
                let now = *self.receiver.borrow_and_update();
                let hint = now.since(&self.seen);
                self.seen = now;
                if hint.any() {
                    return Some(hint);
                }
            }
        })
    }

    fn live(&self) -> bool {
        self.receiver.borrow().live
    }
}

/// The listener: a connection of its own (not pooled: a pooled one goes back to the pool
/// and LISTEN with it) that `LISTEN`s on [`HINT_CHANNEL`] and counts what it hears into
/// `hints`. When the connection drops it connects again, waiting from
/// [`LISTEN_RETRY_MIN`] doubling up to [`LISTEN_RETRY_MAX`]; one warning per outage, one
/// line when it is back, and then every kind is counted once (hints sent meanwhile were
/// lost), so subscribers read everything again. Runs until the backend's runtime stops.
async fn listen(
    mut config: tokio_postgres::Config,
    origin: String,
    hints: watch::Sender<HintCounts>,
) {
    config
        .application_name("turbosched listener")
        .connect_timeout(Duration::from_secs(5))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3);
    let mut delay = LISTEN_RETRY_MIN;
    let mut down_since: Option<std::time::Instant> = None;
    let mut connected_before = false;
    loop {
        let lost = match config.connect(NoTls).await {
            Ok((client, mut connection)) => {
                let (origin, sender) = (origin.clone(), hints.clone());
                let driver = tokio::spawn(async move {
                    loop {
                        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                            Some(Ok(AsyncMessage::Notification(note))) => {
                                let mask = parse_hint(note.payload(), &origin);
                                if note.channel() == HINT_CHANNEL && mask != 0 {
                                    sender.send_modify(|counts| counts.add(mask));
                                }
                            }
                            Some(Ok(_)) => {}
                            Some(Err(err)) => return with_causes(&err),
                            None => return "the server closed it".to_string(),
                        }
                    }
                });
                match client
                    .batch_execute(&format!("LISTEN {HINT_CHANNEL}"))
                    .await
                {
                    Ok(()) => {
                        hints.send_modify(|counts| {
                            counts.live = true;
                            if connected_before {
                                counts.add(u8::MAX);
                            }
                        });
                        connected_before = true;
                        delay = LISTEN_RETRY_MIN;
                        if let Some(since) = down_since.take() {
                            info!(
                                "listening for wake-ups again (LISTEN {HINT_CHANNEL}) after {}",
                                humantime::format_duration(Duration::from_millis(
                                    since.elapsed().as_millis() as u64
                                ))
                            );
                        }
                        let why = driver
                            .await
                            .unwrap_or_else(|err| format!("its task ended: {err}"));
                        drop(client);
                        hints.send_modify(|counts| counts.live = false);
                        why
                    }
                    Err(err) => {
                        driver.abort();
                        with_causes(&err)
                    }
                }
            }
            Err(err) => with_causes(&err),
        };
        if down_since.is_none() {
            down_since = Some(std::time::Instant::now());
            warn!("the connection listening for wake-ups (LISTEN {HINT_CHANNEL}) is down: {lost}; polling until it is back, connecting again every {} at most", humantime::format_duration(LISTEN_RETRY_MAX));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(LISTEN_RETRY_MAX);
    }
}

/// The writes of one open transaction. A statement's error is remembered in `failed`:
/// PostgreSQL has aborted the transaction, whatever the body does with the error.
struct PostgresTx<'t, 'c> {
    runtime: &'t Runtime,
    tx: &'t Transaction<'c>,
    failed: RefCell<Option<PostgresError>>,
    /// The instance whose events these are (`events.instance`).
    author: Option<&'t str>,
    /// The kinds of hint this transaction sends at commit (`HINT_*` bits).
    hints: Cell<u8>,
}

impl PostgresTx<'_, '_> {
    fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, StoreError> {
        let result = block_on(self.runtime, async {
            let statement = self.tx.prepare_cached(sql).await?;
            self.tx.query(&statement, params).await
        });
        result.map_err(|err| self.remember(err))
    }

    fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        let result = block_on(self.runtime, async {
            let statement = self.tx.prepare_cached(sql).await?;
            self.tx.execute(&statement, params).await
        });
        result.map_err(|err| self.remember(err))
    }

    /// Sends a hint of these kinds when the transaction commits.
    fn hint(&self, kinds: u8) {
        self.hints.set(self.hints.get() | kinds);
    }

    fn remember(&self, err: tokio_postgres::Error) -> StoreError {
        let err = PostgresError::from(err);
        self.failed.borrow_mut().get_or_insert_with(|| err.clone());
        StoreError::Postgres(err)
    }

    /// Inserts a run (`ON CONFLICT DO NOTHING`: `None` when the claim key is taken) and
    /// its `run_queued` event.
    fn insert_run(&self, run: &NewRun, now: Instant) -> Result<Option<RunId>, StoreError> {
        let row = self.query_opt(
            "INSERT INTO runs(task, trigger, scheduled_for, queued_at, state, max_attempts, force, downstream, cascade, params)
             VALUES ($1, $2, $3, $4, 'queued', $5, $6, $7, $8, $9)
             ON CONFLICT DO NOTHING
             RETURNING id",
            &[
                &run.task.as_str(),
                &run.trigger.as_str(),
                &to_micros(run.scheduled_for),
                &to_micros(now),
                &i64::from(run.max_attempts.max(1)),
                &run.force,
                &run.downstream,
                &run.cascade.map(|c| c.0),
                &run.params,
            ],
        )?;
        let Some(row) = row else {
            return Ok(None);
        };
        let id = RunId(row.try_get(0)?);
        self.hint(HINT_QUEUED);
        if run.downstream && run.cascade.is_none() {
            self.execute("UPDATE runs SET cascade = id WHERE id = $1", &[&id.0])?;
        }
        let message = format!("{} for {}", run.trigger, run.scheduled_for.to_rfc3339());
        self.append_event(
            now,
            "run_queued",
            Some(run.task.as_str()),
            Some(id),
            Some(Attempt(0)),
            &message,
        )?;
        Ok(Some(id))
    }

    /// The batch of [`Tx::transitions`] for starts of runs of distinct tasks; `None` (and
    /// nothing written but locks) when the runs are not of distinct tasks or one is
    /// missing, to be moved one by one.
    fn start_batch(
        &self,
        steps: &[Move],
        change: &Change,
        now: Instant,
    ) -> Result<Option<Vec<Result<Attempt, StoreError>>>, StoreError> {
        let ids: Vec<i64> = steps.iter().map(|step| step.run.0).collect();
        // Locks in task order, as one start after another would take them (the subquery
        // is sorted before the outer select calls the lock function row by row).
        self.query(
            "SELECT pg_advisory_xact_lock(hashtextextended('turbosched task ' || task, 0))
             FROM (SELECT DISTINCT task FROM runs WHERE id = ANY($1) ORDER BY task) AS held",
            &[&ids],
        )?;
        // A statement of its own: under READ COMMITTED its snapshot, taken after the
        // locks, sees any start committed before them.
        let rows = self.query(
            "SELECT this.id, this.task, (SELECT other.id FROM runs AS other
                     WHERE other.task = this.task AND other.state = 'running' AND other.id <> this.id
                     LIMIT 1)
             FROM runs AS this WHERE this.id = ANY($1)",
            &[&ids],
        )?;
        let mut found: HashMap<i64, (String, Option<i64>)> = HashMap::with_capacity(rows.len());
        for row in &rows {
            found.insert(row.try_get(0)?, (row.try_get(1)?, row.try_get(2)?));
        }
        let tasks: HashSet<&str> = found.values().map(|(task, _)| task.as_str()).collect();
        if found.len() != steps.len() || tasks.len() != steps.len() {
            return Ok(None);
        }
        let mut outcomes: Vec<Option<Result<Attempt, StoreError>>> =
            steps.iter().map(|_| None).collect();
        let mut moving: Vec<usize> = Vec::new();
        for (index, step) in steps.iter().enumerate() {
            let (task, running) = &found[&step.run.0];
            match running {
                Some(running) => {
                    outcomes[index] = Some(Err(StoreError::TaskBusy {
                        run: step.run,
                        task: TaskName::from(task.as_str()),
                        running: RunId(*running),
                    }))
                }
                None => moving.push(index),
            }
        }
        let now_micros = to_micros(now);
        let move_ids: Vec<i64> = moving.iter().map(|i| steps[*i].run.0).collect();
        let froms: Vec<&str> = moving.iter().map(|i| steps[*i].from.as_str()).collect();
        let attempts: Vec<i64> = moving
            .iter()
            .map(|i| i64::from(steps[*i].attempt.0))
            .collect();
        let updated = if moving.is_empty() {
            Vec::new()
        } else {
            self.query(
                "UPDATE runs SET
                    state = 'running',
                    attempt = runs.attempt + 1,
                    started_at = COALESCE(runs.started_at, $4::BIGINT),
                    exit_code = NULL,
                    error = COALESCE($5::TEXT, runs.error),
                    reason = COALESCE($6::TEXT, runs.reason),
                    owner = $7::TEXT,
                    pid = NULL,
                    heartbeat_at = $4,
                    next_attempt_at = $8::BIGINT,
                    progress = NULL,
                    phase = NULL,
                    progress_event_at = NULL,
                    progress_event_pct = NULL,
                    progress_event_phase = NULL,
                    max_attempts = runs.max_attempts + $9::BIGINT
                 FROM unnest($1::BIGINT[], $2::TEXT[], $3::BIGINT[]) AS m(id, from_state, attempt)
                 WHERE runs.id = m.id AND runs.state = m.from_state AND runs.attempt = m.attempt
                 RETURNING runs.id",
                &[
                    &move_ids,
                    &froms,
                    &attempts,
                    &now_micros,
                    &change.error,
                    &change.reason,
                    &change.owner,
                    &change.next_attempt_at.map(to_micros),
                    &i64::from(change.refund_attempt),
                ],
            )?
        };
        let mut started: HashSet<i64> = HashSet::with_capacity(updated.len());
        for row in &updated {
            started.insert(row.try_get(0)?);
        }
        let mut opened: Vec<usize> = Vec::new();
        for index in moving {
            let step = &steps[index];
            if started.contains(&step.run.0) {
                opened.push(index);
                outcomes[index] = Some(Ok(Attempt(step.attempt.0 + 1)));
            } else {
                let found = self.run(step.run)?.ok_or(StoreError::NotFound(step.run))?;
                outcomes[index] = Some(Err(StoreError::Fenced {
                    run: step.run,
                    expected_state: step.from,
                    expected_attempt: step.attempt,
                    found_state: found.state,
                    found_attempt: found.attempt,
                }));
            }
        }
        if !opened.is_empty() {
            let run_ids: Vec<i64> = opened.iter().map(|i| steps[*i].run.0).collect();
            let new_attempts: Vec<i64> = opened
                .iter()
                .map(|i| i64::from(steps[*i].attempt.0) + 1)
                .collect();
            self.execute(
                "INSERT INTO attempts(run_id, attempt, started_at, owner)
                 SELECT run_id, attempt, $3, $4 FROM unnest($1::BIGINT[], $2::BIGINT[]) AS a(run_id, attempt)",
                &[&run_ids, &new_attempts, &now_micros, &change.owner],
            )?;
            let (kind, message) = transition_event(RunState::Running, change);
            let event_tasks: Vec<&str> = opened
                .iter()
                .map(|i| found[&steps[*i].run.0].0.as_str())
                .collect();
            let messages = vec![message; opened.len()];
            let kinds = vec![kind; opened.len()];
            self.append_events(
                now,
                &kinds,
                &event_tasks,
                &run_ids,
                &new_attempts,
                &messages,
            )?;
        }
        Ok(Some(outcomes.into_iter().flatten().collect()))
    }

    /// A batch that failed part-way: the transaction must not commit (part of the batch
    /// may be written), and each move of it says why.
    fn fail_all<T>(&self, err: StoreError, moves: usize) -> Vec<Result<T, StoreError>> {
        let failure = match err {
            StoreError::Postgres(err) => err,
            other => PostgresError {
                message: other.to_string(),
                code: None,
                unavailable: false,
            },
        };
        self.failed
            .borrow_mut()
            .get_or_insert_with(|| failure.clone());
        (0..moves)
            .map(|_| Err(StoreError::Postgres(failure.clone())))
            .collect()
    }

    /// The batch of [`Tx::finishes`]: moves of distinct runs that start nothing, in three
    /// statements (one fenced `UPDATE … FROM unnest` of the runs, one of the attempts rows
    /// of those leaving `running`, their events); a stale move is `Fenced` and writes
    /// nothing.
    fn finish_batch(
        &self,
        moves: &[(Move, Change)],
        now: Instant,
    ) -> Result<Vec<Result<Attempt, StoreError>>, StoreError> {
        let now_micros = to_micros(now);
        let ids: Vec<i64> = moves.iter().map(|(step, _)| step.run.0).collect();
        let attempts: Vec<i64> = moves
            .iter()
            .map(|(step, _)| i64::from(step.attempt.0))
            .collect();
        let froms: Vec<&str> = moves.iter().map(|(step, _)| step.from.as_str()).collect();
        let tos: Vec<&str> = moves.iter().map(|(step, _)| step.to.as_str()).collect();
        let finished: Vec<Option<i64>> = moves
            .iter()
            .map(|(step, _)| step.to.is_terminal().then_some(now_micros))
            .collect();
        let exit_codes: Vec<Option<i32>> = moves.iter().map(|(_, c)| c.exit_code).collect();
        let errors: Vec<Option<&str>> = moves.iter().map(|(_, c)| c.error.as_deref()).collect();
        let reasons: Vec<Option<&str>> = moves.iter().map(|(_, c)| c.reason.as_deref()).collect();
        let next_attempts: Vec<Option<i64>> = moves
            .iter()
            .map(|(_, c)| c.next_attempt_at.map(to_micros))
            .collect();
        let refunds: Vec<i64> = moves
            .iter()
            .map(|(_, c)| i64::from(c.refund_attempt))
            .collect();
        let rows = self.query(
            "UPDATE runs SET
                state = m.to_state,
                finished_at = COALESCE(m.finished_at, runs.finished_at),
                exit_code = COALESCE(m.exit_code, runs.exit_code),
                error = COALESCE(m.error, runs.error),
                reason = COALESCE(m.reason, runs.reason),
                owner = CASE WHEN m.to_state = 'queued' THEN NULL ELSE runs.owner END,
                next_attempt_at = m.next_attempt_at,
                progress = CASE WHEN m.to_state = 'succeeded' THEN 100.0 ELSE runs.progress END,
                phase = CASE WHEN m.to_state = 'succeeded' THEN NULL ELSE runs.phase END,
                max_attempts = runs.max_attempts + m.refund
             FROM unnest($1::BIGINT[], $2::BIGINT[], $3::TEXT[], $4::TEXT[], $5::BIGINT[], $6::INTEGER[], $7::TEXT[], $8::TEXT[], $9::BIGINT[], $10::BIGINT[])
                 AS m(id, attempt, from_state, to_state, finished_at, exit_code, error, reason, next_attempt_at, refund)
             WHERE runs.id = m.id AND runs.state = m.from_state AND runs.attempt = m.attempt
             RETURNING runs.id, runs.task",
            &[
                &ids,
                &attempts,
                &froms,
                &tos,
                &finished,
                &exit_codes,
                &errors,
                &reasons,
                &next_attempts,
                &refunds,
            ],
        )?;
        let mut moved: HashMap<i64, String> = HashMap::with_capacity(rows.len());
        for row in &rows {
            moved.insert(row.try_get(0)?, row.try_get(1)?);
        }
        let mut outcomes = Vec::with_capacity(moves.len());
        let mut closed: Vec<usize> = Vec::new();
        for (index, (step, _)) in moves.iter().enumerate() {
            if moved.contains_key(&step.run.0) {
                closed.push(index);
                outcomes.push(Ok(step.attempt));
            } else {
                let found = self.run(step.run)?.ok_or(StoreError::NotFound(step.run))?;
                outcomes.push(Err(StoreError::Fenced {
                    run: step.run,
                    expected_state: step.from,
                    expected_attempt: step.attempt,
                    found_state: found.state,
                    found_attempt: found.attempt,
                }));
            }
        }
        if closed.is_empty() {
            return Ok(outcomes);
        }
        if closed
            .iter()
            .any(|i| matches!(moves[*i].0.to, RunState::Queued | RunState::RetryWait))
        {
            self.hint(HINT_QUEUED);
        }
        // The attempts rows of the runs that left `running` close.
        let ended: Vec<usize> = closed
            .iter()
            .copied()
            .filter(|i| moves[*i].0.from == RunState::Running)
            .collect();
        if !ended.is_empty() {
            let ended_ids: Vec<i64> = ended.iter().map(|i| ids[*i]).collect();
            let ended_attempts: Vec<i64> = ended.iter().map(|i| attempts[*i]).collect();
            let outcomes_text: Vec<&str> = ended
                .iter()
                .map(|i| attempt_outcome(moves[*i].0.to))
                .collect();
            let ended_codes: Vec<Option<i32>> = ended.iter().map(|i| exit_codes[*i]).collect();
            let ended_errors: Vec<Option<&str>> = ended.iter().map(|i| errors[*i]).collect();
            self.execute(
                "UPDATE attempts SET finished_at = $3, outcome = a.outcome, exit_code = a.exit_code, error = a.error
                 FROM unnest($1::BIGINT[], $2::BIGINT[], $4::TEXT[], $5::INTEGER[], $6::TEXT[])
                     AS a(run_id, attempt, outcome, exit_code, error)
                 WHERE attempts.run_id = a.run_id AND attempts.attempt = a.attempt",
                &[
                    &ended_ids,
                    &ended_attempts,
                    &now_micros,
                    &outcomes_text,
                    &ended_codes,
                    &ended_errors,
                ],
            )?;
        }
        let mut kinds = Vec::with_capacity(closed.len());
        let mut messages = Vec::with_capacity(closed.len());
        for index in &closed {
            let (step, change) = &moves[*index];
            let (kind, message) = transition_event(step.to, change);
            kinds.push(kind);
            messages.push(message);
        }
        let tasks: Vec<&str> = closed.iter().map(|i| moved[&ids[*i]].as_str()).collect();
        let run_ids: Vec<i64> = closed.iter().map(|i| ids[*i]).collect();
        let run_attempts: Vec<i64> = closed.iter().map(|i| attempts[*i]).collect();
        self.append_events(now, &kinds, &tasks, &run_ids, &run_attempts, &messages)?;
        Ok(outcomes)
    }

    /// Appends events at one instant in one statement, numbered
    /// in order by one bump of `meta.event_seq` (no gap, as one by one would).
    fn append_events(
        &self,
        now: Instant,
        kinds: &[&str],
        tasks: &[&str],
        runs: &[i64],
        attempts: &[i64],
        messages: &[String],
    ) -> Result<(), StoreError> {
        if tasks.is_empty() {
            return Ok(());
        }
        let count = tasks.len() as i64;
        let appended = self.execute(
            "WITH next AS (UPDATE meta SET value = value + $1 WHERE key = 'event_seq' RETURNING value)
             INSERT INTO events(seq, at, kind, task, run_id, attempt, message, instance)
             SELECT next.value - $1 + e.ordinal, $2, e.kind, e.task, e.run_id, e.attempt, e.message, $8
             FROM next, unnest($3::TEXT[], $4::TEXT[], $5::BIGINT[], $6::BIGINT[], $7::TEXT[])
                 WITH ORDINALITY AS e(kind, task, run_id, attempt, message, ordinal)",
            &[
                &count,
                &to_micros(now),
                &kinds,
                &tasks,
                &runs,
                &attempts,
                &messages,
                &self.author,
            ],
        )?;
        if appended == 0 {
            return Err(StoreError::Postgres(PostgresError {
                message: "meta.event_seq is missing: the schema was not set up".into(),
                code: None,
                unavailable: false,
            }));
        }
        self.hint(HINT_EVENT);
        Ok(())
    }

    /// Appends an event numbered by `meta.event_seq`, bumped in this transaction.
    fn append_event(
        &self,
        now: Instant,
        kind: &str,
        task: Option<&str>,
        run: Option<RunId>,
        attempt: Option<Attempt>,
        message: &str,
    ) -> Result<i64, StoreError> {
        let row = self.query_opt(
            "WITH next AS (UPDATE meta SET value = value + 1 WHERE key = 'event_seq' RETURNING value)
             INSERT INTO events(seq, at, kind, task, run_id, attempt, message, instance)
             SELECT next.value, $1, $2,
                    COALESCE($3::TEXT, (SELECT task FROM runs WHERE id = $4::BIGINT)),
                    $4::BIGINT, $5, $6, $7
             FROM next
             RETURNING seq",
            &[
                &to_micros(now),
                &kind,
                &task,
                &run.map(|r| r.0),
                &attempt.map(|a| i64::from(a.0)),
                &message,
                &self.author,
            ],
        )?;
        let row = row.ok_or_else(|| {
            StoreError::Postgres(PostgresError {
                message: "meta.event_seq is missing: the schema was not set up".into(),
                code: None,
                unavailable: false,
            })
        })?;
        self.hint(HINT_EVENT);
        Ok(row.try_get(0)?)
    }
}

impl Tx for PostgresTx<'_, '_> {
    /// `INSERT … ON CONFLICT DO NOTHING` against the partial unique index `runs_claim`:
    /// no row back is the refusal, and the transaction goes on (a unique violation would
    /// have aborted it).
    fn claim_fire(
        &self,
        run: &NewRun,
        now: Instant,
        next_fire_at: Option<Instant>,
    ) -> Result<RunId, StoreError> {
        let id = self
            .insert_run(run, now)?
            .ok_or_else(|| StoreError::AlreadyClaimed {
                task: run.task.clone(),
                scheduled_for: run.scheduled_for,
            })?;
        self.execute(
            "INSERT INTO task_state(task, last_fire_at, next_fire_at) VALUES ($1, $2, $3)
             ON CONFLICT (task) DO UPDATE SET last_fire_at = excluded.last_fire_at, next_fire_at = excluded.next_fire_at",
            &[
                &run.task.as_str(),
                &to_micros(run.scheduled_for),
                &next_fire_at.map(to_micros),
            ],
        )?;
        Ok(id)
    }

    fn claim_backfill(&self, run: &NewRun, now: Instant) -> Result<RunId, StoreError> {
        self.insert_run(run, now)?
            .ok_or_else(|| StoreError::AlreadyClaimed {
                task: run.task.clone(),
                scheduled_for: run.scheduled_for,
            })
    }

    /// The batch in four statements whatever its size: the runs in one multi-row
    /// `INSERT … ON CONFLICT DO NOTHING RETURNING` (a tick claimed already returns no
    /// row), a cascade root for any downstream run, the `run_queued` events in one insert
    /// numbered by one bump of `meta.event_seq`, and each task's `last_fire_at` and
    /// `next_fire_at` in one multi-row upsert. The rows of the tasks are held by this
    /// transaction (`hold_schedules`), so the upsert writes over exactly what the caller
    /// compared.
    fn claim_fires(
        &self,
        claims: &[(NewRun, Option<Instant>)],
        now: Instant,
    ) -> Result<Vec<Option<RunId>>, StoreError> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let tasks: Vec<&str> = claims.iter().map(|(run, _)| run.task.as_str()).collect();
        let triggers: Vec<&str> = claims.iter().map(|(run, _)| run.trigger.as_str()).collect();
        let ticks: Vec<i64> = claims
            .iter()
            .map(|(run, _)| to_micros(run.scheduled_for))
            .collect();
        let max_attempts: Vec<i64> = claims
            .iter()
            .map(|(run, _)| i64::from(run.max_attempts.max(1)))
            .collect();
        let forces: Vec<bool> = claims.iter().map(|(run, _)| run.force).collect();
        let downstreams: Vec<bool> = claims.iter().map(|(run, _)| run.downstream).collect();
        let cascades: Vec<Option<i64>> = claims
            .iter()
            .map(|(run, _)| run.cascade.map(|c| c.0))
            .collect();
        let ordinals: Vec<i64> = (0..claims.len() as i64).collect();
        // The ordinal comes back with each row: the ids follow the order of the claims.
        let rows = self.query(
            "WITH claim AS (
                 SELECT * FROM unnest($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::BIGINT[], $5::BOOLEAN[], $6::BOOLEAN[], $7::BIGINT[], $8::BIGINT[])
                     AS c(task, trigger, scheduled_for, max_attempts, force, downstream, cascade, ordinal)
             ), inserted AS (
                 INSERT INTO runs(task, trigger, scheduled_for, queued_at, state, max_attempts, force, downstream, cascade)
                 SELECT task, trigger, scheduled_for, $9, 'queued', max_attempts, force, downstream, cascade
                 FROM claim ORDER BY ordinal
                 ON CONFLICT DO NOTHING
                 RETURNING id, task, scheduled_for
             )
             SELECT inserted.id, min(claim.ordinal)
             FROM inserted JOIN claim USING (task, scheduled_for)
             GROUP BY inserted.id
             ORDER BY 2",
            &[
                &tasks,
                &triggers,
                &ticks,
                &max_attempts,
                &forces,
                &downstreams,
                &cascades,
                &ordinals,
                &to_micros(now),
            ],
        )?;
        let mut ids: Vec<Option<RunId>> = vec![None; claims.len()];
        for row in &rows {
            let id: i64 = row.try_get(0)?;
            let ordinal: i64 = row.try_get(1)?;
            if let Some(slot) = usize::try_from(ordinal).ok().and_then(|i| ids.get_mut(i)) {
                *slot = Some(RunId(id));
            }
        }
        let claimed: Vec<(usize, RunId)> = ids
            .iter()
            .enumerate()
            .filter_map(|(i, id)| id.map(|id| (i, id)))
            .collect();
        if claimed.is_empty() {
            return Ok(ids);
        }
        self.hint(HINT_QUEUED);
        let roots: Vec<i64> = claimed
            .iter()
            .filter(|(i, _)| claims[*i].0.downstream && claims[*i].0.cascade.is_none())
            .map(|(_, id)| id.0)
            .collect();
        if !roots.is_empty() {
            self.execute("UPDATE runs SET cascade = id WHERE id = ANY($1)", &[&roots])?;
        }
        let event_tasks: Vec<&str> = claimed.iter().map(|(i, _)| tasks[*i]).collect();
        let event_runs: Vec<i64> = claimed.iter().map(|(_, id)| id.0).collect();
        let messages: Vec<String> = claimed
            .iter()
            .map(|(i, _)| {
                let run = &claims[*i].0;
                format!("{} for {}", run.trigger, run.scheduled_for.to_rfc3339())
            })
            .collect();
        let zeros = vec![0_i64; claimed.len()];
        self.append_events(
            now,
            &vec!["run_queued"; claimed.len()],
            &event_tasks,
            &event_runs,
            &zeros,
            &messages,
        )?;
        // Each task's last tick claimed and its next fire, once per task.
        let mut last: Vec<(&str, i64, Option<i64>)> = Vec::new();
        let mut slot: HashMap<&str, usize> = HashMap::new();
        for (i, _) in &claimed {
            let (run, next) = &claims[*i];
            let entry = (
                run.task.as_str(),
                to_micros(run.scheduled_for),
                next.map(to_micros),
            );
            match slot.get(run.task.as_str()) {
                Some(&at) => last[at] = entry,
                None => {
                    slot.insert(run.task.as_str(), last.len());
                    last.push(entry);
                }
            }
        }
        let state_tasks: Vec<&str> = last.iter().map(|(task, _, _)| *task).collect();
        let last_fires: Vec<i64> = last.iter().map(|(_, at, _)| *at).collect();
        let next_fires: Vec<Option<i64>> = last.iter().map(|(_, _, next)| *next).collect();
        self.execute(
            "INSERT INTO task_state(task, last_fire_at, next_fire_at)
             SELECT * FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[])
             ON CONFLICT (task) DO UPDATE SET last_fire_at = excluded.last_fire_at, next_fire_at = excluded.next_fire_at",
            &[&state_tasks, &last_fires, &next_fires],
        )?;
        Ok(ids)
    }

    fn enqueue(&self, run: &NewRun, now: Instant) -> Result<RunId, StoreError> {
        self.insert_run(run, now)?
            .ok_or_else(|| StoreError::AlreadyClaimed {
                task: run.task.clone(),
                scheduled_for: run.scheduled_for,
            })
    }

    /// The one UPDATE that writes `runs.state`, guarded by the expected state and
    /// attempt; zero rows is [`StoreError::Fenced`] with what was found.
    fn transition(
        &self,
        step: &Move,
        change: &Change,
        now: Instant,
    ) -> Result<Attempt, StoreError> {
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
            // One attempt per task at a time, across instances: the task's advisory lock
            // (held to commit) orders concurrent starts, and the check is a statement of
            // its own, so under READ COMMITTED its snapshot, taken after the lock, sees any
            // start committed before it.
            self.query(
                "SELECT pg_advisory_xact_lock(hashtextextended('turbosched task ' || task, 0))
                 FROM runs WHERE id = $1",
                &[&run.0],
            )?;
            let running = self.query_opt(
                "SELECT other.id, other.task FROM runs AS this
                 JOIN runs AS other ON other.task = this.task AND other.state = 'running' AND other.id <> this.id
                 WHERE this.id = $1
                 LIMIT 1",
                &[&run.0],
            )?;
            if let Some(row) = running {
                let task: String = row.try_get(1)?;
                return Err(StoreError::TaskBusy {
                    run,
                    task: TaskName::from(task.as_str()),
                    running: RunId(row.try_get(0)?),
                });
            }
        }
        let updated = self.query_opt(
            "UPDATE runs SET
                state = $4::TEXT,
                attempt = $5::BIGINT,
                started_at = CASE WHEN $6::BOOLEAN AND started_at IS NULL THEN $7::BIGINT ELSE started_at END,
                finished_at = COALESCE($8::BIGINT, finished_at),
                exit_code = CASE WHEN $6 THEN NULL ELSE COALESCE($9::INTEGER, exit_code) END,
                error = COALESCE($10::TEXT, error),
                reason = COALESCE($11::TEXT, reason),
                owner = CASE WHEN $6 THEN $12::TEXT WHEN $4 = 'queued' THEN NULL ELSE owner END,
                pid = CASE WHEN $6 THEN NULL ELSE pid END,
                heartbeat_at = CASE WHEN $6 THEN $7 ELSE heartbeat_at END,
                next_attempt_at = $13::BIGINT,
                progress = CASE WHEN $6 THEN NULL WHEN $4 = 'succeeded' THEN 100.0 ELSE progress END,
                phase = CASE WHEN $6 OR $4 = 'succeeded' THEN NULL ELSE phase END,
                progress_event_at = CASE WHEN $6 THEN NULL ELSE progress_event_at END,
                progress_event_pct = CASE WHEN $6 THEN NULL ELSE progress_event_pct END,
                progress_event_phase = CASE WHEN $6 THEN NULL ELSE progress_event_phase END,
                max_attempts = max_attempts + $14::BIGINT
             WHERE id = $1::BIGINT AND state = $2::TEXT AND attempt = $3::BIGINT
             RETURNING task",
            &[
                &run.0,
                &from.as_str(),
                &i64::from(attempt.0),
                &to.as_str(),
                &i64::from(new_attempt.0),
                &starting,
                &now_micros,
                &finished_at,
                &change.exit_code,
                &change.error,
                &change.reason,
                &change.owner,
                &change.next_attempt_at.map(to_micros),
                &i64::from(change.refund_attempt),
            ],
        )?;
        let Some(updated) = updated else {
            let found = self.run(run)?.ok_or(StoreError::NotFound(run))?;
            return Err(StoreError::Fenced {
                run,
                expected_state: from,
                expected_attempt: attempt,
                found_state: found.state,
                found_attempt: found.attempt,
            });
        };
        let task: String = updated.try_get(0)?;
        if matches!(to, RunState::Queued | RunState::RetryWait) {
            self.hint(HINT_QUEUED);
        }
        if starting {
            self.execute(
                "INSERT INTO attempts(run_id, attempt, started_at, owner) VALUES ($1, $2, $3, $4)",
                &[
                    &run.0,
                    &i64::from(new_attempt.0),
                    &now_micros,
                    &change.owner,
                ],
            )?;
        } else if from == RunState::Running {
            self.execute(
                "UPDATE attempts SET finished_at = $3, outcome = $4, exit_code = $5, error = $6
                 WHERE run_id = $1 AND attempt = $2",
                &[
                    &run.0,
                    &i64::from(attempt.0),
                    &now_micros,
                    &attempt_outcome(to),
                    &change.exit_code,
                    &change.error,
                ],
            )?;
        }
        let (kind, message) = transition_event(to, change);
        self.append_event(
            now,
            kind,
            Some(&task),
            Some(run),
            Some(new_attempt),
            &message,
        )?;
        Ok(new_attempt)
    }

    /// Starts of runs of distinct tasks (a dispatch) in five statements whatever their
    /// number: the tasks' advisory locks taken in task order in one, then (a statement of
    /// its own, so it sees every start committed before the locks) which task runs
    /// elsewhere, one fenced `UPDATE … FROM unnest(…)` of the runs, their attempts rows
    /// and their `run_started` events. Anything else moves one by one.
    fn transitions(
        &self,
        steps: &[Move],
        change: &Change,
        now: Instant,
    ) -> Vec<Result<Attempt, StoreError>> {
        let one_by_one = |tx: &Self| -> Vec<Result<Attempt, StoreError>> {
            steps
                .iter()
                .map(|step| tx.transition(step, change, now))
                .collect()
        };
        let distinct_runs: HashSet<RunId> = steps.iter().map(|step| step.run).collect();
        if steps.len() < 2
            || distinct_runs.len() != steps.len()
            || steps
                .iter()
                .any(|step| step.to != RunState::Running || !step.from.can_become(step.to))
        {
            return one_by_one(self);
        }
        match self.start_batch(steps, change, now) {
            Ok(Some(outcomes)) => outcomes,
            Ok(None) => one_by_one(self),
            Err(err) => self.fail_all(err, steps.len()),
        }
    }

    /// Moves of distinct runs that start nothing (attempts ending, waiting runs skipped)
    /// in three statements (see `finish_batch`); anything else moves one by one.
    fn finishes(&self, moves: &[(Move, Change)], now: Instant) -> Vec<Result<Attempt, StoreError>> {
        let distinct: HashSet<RunId> = moves.iter().map(|(step, _)| step.run).collect();
        if moves.len() < 2
            || distinct.len() != moves.len()
            || moves
                .iter()
                .any(|(step, _)| step.to == RunState::Running || !step.from.can_become(step.to))
        {
            return moves
                .iter()
                .map(|(step, change)| self.transition(step, change, now))
                .collect();
        }
        match self.finish_batch(moves, now) {
            Ok(outcomes) => outcomes,
            Err(err) => self.fail_all(err, moves.len()),
        }
    }

    /// The row is read `FOR UPDATE`, so a concurrent move of the run waits for this
    /// report (or this report sees the move and is refused).
    fn record_progress(
        &self,
        run: RunId,
        attempt: Attempt,
        percent: f64,
        phase: Option<&str>,
        now: Instant,
    ) -> Result<bool, StoreError> {
        let current = self.query_opt(
            "SELECT phase, progress_event_at, progress_event_pct, progress_event_phase FROM runs
             WHERE id = $1 AND attempt = $2 AND state = 'running' FOR UPDATE",
            &[&run.0, &i64::from(attempt.0)],
        )?;
        let Some(current) = current else {
            return Ok(false);
        };
        let stored_phase: Option<String> = current.try_get(0)?;
        let event_at: Option<i64> = current.try_get(1)?;
        let event_percent: Option<f64> = current.try_get(2)?;
        let event_phase: Option<String> = current.try_get(3)?;
        // A report without a phase keeps the one before.
        let phase = phase.map(str::to_string).or(stored_phase);
        let last_event = event_at.map(|at| LastProgressEvent {
            at: from_micros(at),
            percent: event_percent,
            phase: event_phase.as_deref(),
        });
        let news = progress_is_news(last_event, percent, phase.as_deref(), now);
        self.execute(
            "UPDATE runs SET progress = $2, phase = $3, heartbeat_at = $4,
                progress_event_at = CASE WHEN $5 THEN $4 ELSE progress_event_at END,
                progress_event_pct = CASE WHEN $5 THEN $2 ELSE progress_event_pct END,
                progress_event_phase = CASE WHEN $5 THEN $3 ELSE progress_event_phase END
             WHERE id = $1",
            &[&run.0, &percent, &phase, &to_micros(now), &news],
        )?;
        if news {
            let message = progress_message(percent, phase.as_deref());
            self.append_event(
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
        Ok(self.execute(
            "UPDATE runs SET checkpoint = $3 WHERE id = $1 AND attempt = $2 AND state = 'running'",
            &[&run.0, &i64::from(attempt.0), &checkpoint],
        )? > 0)
    }

    fn hand_checkpoint(&self, run: RunId, checkpoint: &str) -> Result<bool, StoreError> {
        Ok(self.execute(
            "UPDATE runs SET checkpoint = $2 WHERE id = $1 AND state = 'queued'",
            &[&run.0, &checkpoint],
        )? > 0)
    }

    fn record_result(
        &self,
        run: RunId,
        attempt: Attempt,
        result: &str,
    ) -> Result<bool, StoreError> {
        Ok(self.execute(
            "UPDATE runs SET result = $3 WHERE id = $1 AND attempt = $2 AND state = 'running'",
            &[&run.0, &i64::from(attempt.0), &result],
        )? > 0)
    }

    fn record_pid(
        &self,
        run: RunId,
        attempt: Attempt,
        pid: u32,
        spawned_at: Instant,
    ) -> Result<bool, StoreError> {
        let pid = i64::from(pid);
        self.execute(
            "UPDATE attempts SET pid = $3, spawned_at = $4 WHERE run_id = $1 AND attempt = $2",
            &[&run.0, &i64::from(attempt.0), &pid, &to_micros(spawned_at)],
        )?;
        Ok(self.execute(
            "UPDATE runs SET pid = $3 WHERE id = $1 AND attempt = $2 AND state = 'running'",
            &[&run.0, &i64::from(attempt.0), &pid],
        )? > 0)
    }

    /// Two multi-row updates; a run no longer running at that attempt is `false`.
    fn record_pids(
        &self,
        pids: &[(RunId, Attempt, u32, Instant)],
    ) -> Vec<Result<bool, StoreError>> {
        if pids.len() < 2 {
            return pids
                .iter()
                .map(|(run, attempt, pid, at)| self.record_pid(*run, *attempt, *pid, *at))
                .collect();
        }
        let runs: Vec<i64> = pids.iter().map(|p| p.0 .0).collect();
        let attempts: Vec<i64> = pids.iter().map(|p| i64::from(p.1 .0)).collect();
        let children: Vec<i64> = pids.iter().map(|p| i64::from(p.2)).collect();
        let spawned: Vec<i64> = pids.iter().map(|p| to_micros(p.3)).collect();
        let written = self
            .execute(
                "UPDATE attempts SET pid = c.pid, spawned_at = c.spawned_at
                 FROM unnest($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[])
                     AS c(run_id, attempt, pid, spawned_at)
                 WHERE attempts.run_id = c.run_id AND attempts.attempt = c.attempt",
                &[&runs, &attempts, &children, &spawned],
            )
            .and_then(|_| {
                self.query(
                    "UPDATE runs SET pid = c.pid
                     FROM unnest($1::BIGINT[], $2::BIGINT[], $3::BIGINT[]) AS c(id, attempt, pid)
                     WHERE runs.id = c.id AND runs.attempt = c.attempt AND runs.state = 'running'
                     RETURNING runs.id, runs.attempt",
                    &[&runs, &attempts, &children],
                )
            });
        match written {
            Ok(rows) => {
                let current: HashSet<(i64, i64)> = rows
                    .iter()
                    .filter_map(|row| Some((row.try_get(0).ok()?, row.try_get(1).ok()?)))
                    .collect();
                runs.iter()
                    .zip(&attempts)
                    .map(|(run, attempt)| Ok(current.contains(&(*run, *attempt))))
                    .collect()
            }
            Err(err) => self.fail_all(err, pids.len()),
        }
    }

    fn set_next_fire(
        &self,
        task: &TaskName,
        next: Option<Instant>,
        schedule: Option<&str>,
    ) -> Result<(), StoreError> {
        // Whether the schedule key changed (the CTE reads the row as it was).
        let changed = self.query_opt(
            "WITH old AS (SELECT schedule FROM task_state WHERE task = $1)
             INSERT INTO task_state(task, next_fire_at, schedule) VALUES ($1, $2, $3)
             ON CONFLICT (task) DO UPDATE SET next_fire_at = excluded.next_fire_at, schedule = excluded.schedule
             RETURNING (SELECT schedule FROM old) IS DISTINCT FROM $3::TEXT",
            &[&task.as_str(), &next.map(to_micros), &schedule],
        )?;
        if changed.map(|row| row.try_get::<_, bool>(0)).transpose()? == Some(true) {
            self.hint(HINT_SCHEDULE);
        }
        Ok(())
    }

    /// The update is conditional on the key (`WHERE … IS DISTINCT FROM`); the row's next
    /// fire is read back either way. A peer holding the row makes this wait for its commit,
    /// then see what it wrote (READ COMMITTED re-checks the updated row).
    fn start_schedule(
        &self,
        task: &TaskName,
        next: Option<Instant>,
        schedule: Option<&str>,
    ) -> Result<Option<Instant>, StoreError> {
        let written = self.query_opt(
            "INSERT INTO task_state(task, next_fire_at, schedule) VALUES ($1, $2, $3)
             ON CONFLICT (task) DO UPDATE SET next_fire_at = excluded.next_fire_at, schedule = excluded.schedule
             WHERE task_state.schedule IS DISTINCT FROM excluded.schedule
                OR task_state.next_fire_at IS NULL
             RETURNING next_fire_at",
            &[&task.as_str(), &next.map(to_micros), &schedule],
        )?;
        let stored: Option<i64> = match written {
            Some(row) => {
                self.hint(HINT_SCHEDULE);
                row.try_get(0)?
            }
            None => match self.query_opt(
                "SELECT next_fire_at FROM task_state WHERE task = $1",
                &[&task.as_str()],
            )? {
                Some(row) => row.try_get(0)?,
                None => None,
            },
        };
        Ok(stored.map(from_micros))
    }

    fn set_paused(&self, task: &TaskName, paused: bool, now: Instant) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO task_state(task, paused) VALUES ($1, $2)
             ON CONFLICT (task) DO UPDATE SET paused = excluded.paused",
            &[&task.as_str(), &paused],
        )?;
        self.hint(HINT_SCHEDULE);
        let kind = if paused {
            "task_paused"
        } else {
            "task_resumed"
        };
        self.append_event(now, kind, Some(task.as_str()), None, None, "")?;
        Ok(())
    }

    /// The compare half of the compare-and-set on next fires: the rows of `tasks`,
    /// locked `FOR UPDATE SKIP LOCKED` (a row another instance is firing is left out, and
    /// nobody waits), each with whether it is due by the server's clock (whatever the
    /// local clock says). A task with no row yet is held as an empty row: its first fire
    /// is decided by the claim key alone.
    fn hold_schedules(
        &self,
        tasks: &[TaskName],
    ) -> Result<HashMap<TaskName, HeldSchedule>, StoreError> {
        let names: Vec<&str> = tasks.iter().map(|t| t.as_str()).collect();
        let sql = format!(
            "SELECT task, paused, last_fire_at, next_fire_at, schedule,
                    next_fire_at IS NULL OR next_fire_at <= {DATABASE_NOW}
             FROM task_state WHERE task = ANY($1)
             FOR UPDATE SKIP LOCKED"
        );
        let mut held = HashMap::with_capacity(tasks.len());
        for row in self.query(&sql, &[&names])? {
            let (task, state) = read_task_state(&row)?;
            let due: bool = row.try_get(5)?;
            held.insert(task, HeldSchedule { state, due });
        }
        if held.len() < tasks.len() {
            let missing: Vec<&str> = names
                .iter()
                .copied()
                .filter(|name| !held.contains_key(&TaskName::from(*name)))
                .collect();
            let existing: HashSet<String> = self
                .query(
                    "SELECT task FROM task_state WHERE task = ANY($1)",
                    &[&missing],
                )?
                .iter()
                .map(|row| row.try_get(0))
                .collect::<Result<_, _>>()?;
            for name in missing {
                if !existing.contains(name) {
                    let empty = HeldSchedule {
                        state: TaskStateRow::default(),
                        due: true,
                    };
                    held.insert(TaskName::from(name), empty);
                }
            }
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
        self.append_event(now, kind, task, run, None, message)
    }

    fn hold_events(
        &self,
        kinds: &[&str],
        task: Option<&str>,
        run: Option<RunId>,
    ) -> Result<Option<String>, StoreError> {
        let subject = format!(
            "turbosched events {} {}",
            task.unwrap_or(""),
            run.map_or(0, |r| r.0)
        );
        self.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            &[&subject],
        )?;
        let run_id = run.map(|r| r.0);
        let latest = self.query_opt(LATEST_EVENT, &[&kinds, &task, &run_id])?;
        Ok(latest.map(|row| row.try_get(2)).transpose()?)
    }

    fn heartbeat(&self, owner: &str, now: Instant) -> Result<(), StoreError> {
        let now = to_micros(now);
        self.execute(
            "UPDATE instances SET heartbeat_at = $2 WHERE id = $1",
            &[&owner, &now],
        )?;
        self.execute(
            "UPDATE runs SET heartbeat_at = $2 WHERE owner = $1 AND state = 'running'",
            &[&owner, &now],
        )?;
        Ok(())
    }

    fn run(&self, run: RunId) -> Result<Option<RunRow>, StoreError> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1");
        self.query_opt(&sql, &[&run.0])?
            .as_ref()
            .map(read_run)
            .transpose()
    }

    fn add_deliveries(
        &self,
        alert: &str,
        deliveries: &[NewDelivery],
        cursor: i64,
        now: Instant,
    ) -> Result<(), StoreError> {
        for delivery in deliveries {
            self.execute(
                "INSERT INTO alert_deliveries(alert, event_seq, kind, task, run_id, created_at,
                     payload, state, next_attempt_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', $6)
                 ON CONFLICT (alert, event_seq) DO NOTHING",
                &[
                    &alert,
                    &delivery.event_seq,
                    &delivery.kind,
                    &delivery.task,
                    &delivery.run_id.map(|r| r.0),
                    &to_micros(now),
                    &delivery.payload,
                ],
            )?;
        }
        self.execute(
            "INSERT INTO alerts(name, cursor) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET cursor = GREATEST(alerts.cursor, excluded.cursor)",
            &[&alert, &cursor],
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
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM alert_deliveries
             WHERE state = 'pending' AND next_attempt_at <= $1
               AND (claimed_until IS NULL OR claimed_until < $1)
             ORDER BY next_attempt_at, event_seq LIMIT $2
             FOR UPDATE SKIP LOCKED"
        );
        let mut rows = self
            .query(&sql, &[&to_micros(now), &(limit as i64)])?
            .iter()
            .map(read_delivery)
            .collect::<Result<Vec<_>, _>>()?;
        for row in &mut rows {
            self.execute(
                "UPDATE alert_deliveries SET claimed_by = $3, claimed_until = $4
                 WHERE alert = $1 AND event_seq = $2",
                &[&row.alert, &row.event_seq, &owner, &to_micros(until)],
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
        let changed = self.execute(
            "UPDATE alert_deliveries
             SET state = $4, attempts = attempts + 1, last_status = COALESCE($5, last_status),
                 last_error = $6, next_attempt_at = COALESCE($7, next_attempt_at),
                 finished_at = CASE WHEN $4 = 'pending' THEN NULL ELSE $8::BIGINT END,
                 claimed_by = NULL, claimed_until = NULL
             WHERE alert = $1 AND event_seq = $2 AND claimed_by = $3 AND state = 'pending'",
            &[
                &alert,
                &event_seq,
                &owner,
                &state,
                &status,
                &error,
                &next.map(to_micros),
                &to_micros(now),
            ],
        )?;
        Ok(changed == 1)
    }

    fn flag_abort(&self, run: RunId, reason: &str) -> Result<(), StoreError> {
        self.execute(
            "UPDATE runs SET abort_requested = TRUE, reason = $2 WHERE id = $1",
            &[&run.0, &reason],
        )?;
        self.hint(HINT_ABORT);
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
        self.execute(
            "INSERT INTO instances(id, pid, host, started_at, heartbeat_at, serving) VALUES ($1, $2, $3, $4, $4, $5)",
            &[&id, &i64::from(pid), &host, &to_micros(now), &serving],
        )?;
        Ok(())
    }

    fn set_instance_api(&self, id: &str, address: &str) -> Result<(), StoreError> {
        self.execute(
            "UPDATE instances SET api = $2 WHERE id = $1",
            &[&id, &address],
        )?;
        Ok(())
    }

    fn set_instance_config(&self, id: &str, hash: &str) -> Result<(), StoreError> {
        self.execute(
            "UPDATE instances SET config_hash = $2 WHERE id = $1",
            &[&id, &hash],
        )?;
        Ok(())
    }

    fn stop_instance(&self, id: &str, now: Instant) -> Result<(), StoreError> {
        self.execute(
            "UPDATE instances SET stopped_at = $2 WHERE id = $1",
            &[&id, &to_micros(now)],
        )?;
        Ok(())
    }

    fn prune(&self, cutoff: Instant, dry_run: bool) -> Result<PruneCounts, StoreError> {
        let cutoff = to_micros(cutoff);
        let count = |sql: &str| -> Result<u64, StoreError> {
            let row = self.query_opt(sql, &[&cutoff])?;
            Ok(row
                .map(|row| row.try_get::<_, i64>(0))
                .transpose()?
                .unwrap_or(0) as u64)
        };
        let counts = PruneCounts {
            runs: count(&format!("SELECT COUNT(*) FROM ({OLD_RUNS}) AS old"))?,
            attempts: count(&format!(
                "SELECT COUNT(*) FROM attempts WHERE run_id IN ({OLD_RUNS})"
            ))?,
            events: count(&format!("SELECT COUNT(*) {OLD_EVENTS}"))?,
        };
        if !dry_run {
            self.execute(&format!("DELETE {OLD_EVENTS}"), &[&cutoff])?;
            self.execute(
                &format!("DELETE FROM attempts WHERE run_id IN ({OLD_RUNS})"),
                &[&cutoff],
            )?;
            self.execute(
                &format!("DELETE FROM runs WHERE id IN ({OLD_RUNS})"),
                &[&cutoff],
            )?;
        }
        Ok(counts)
    }
}

/// The finished runs [`Tx::prune`] removes: terminal before the cutoff `$1`, and not
/// the root of a cascade still going.
const OLD_RUNS: &str = "SELECT id FROM runs
    WHERE state IN ('succeeded', 'failed', 'timed_out', 'aborted', 'skipped')
      AND COALESCE(finished_at, queued_at) < $1
      AND id NOT IN (SELECT cascade FROM runs WHERE cascade IS NOT NULL
                     AND state IN ('queued', 'running', 'retry_wait', 'orphaned'))";

/// `FROM events WHERE …`: the events [`Tx::prune`] removes — before the cutoff `$1`,
/// and about no run, an old run or a run already gone.
const OLD_EVENTS: &str = "FROM events WHERE at < $1
    AND (run_id IS NULL
         OR run_id IN (SELECT id FROM runs
             WHERE state IN ('succeeded', 'failed', 'timed_out', 'aborted', 'skipped')
               AND COALESCE(finished_at, queued_at) < $1
               AND id NOT IN (SELECT cascade FROM runs WHERE cascade IS NOT NULL
                              AND state IN ('queued', 'running', 'retry_wait', 'orphaned')))
         OR run_id NOT IN (SELECT id FROM runs))";

fn instant_at(row: &Row, index: usize) -> Result<Option<Instant>, tokio_postgres::Error> {
    Ok(row.try_get::<_, Option<i64>>(index)?.map(from_micros))
}

fn attempt_at(row: &Row, index: usize) -> Result<Attempt, tokio_postgres::Error> {
    Ok(Attempt(row.try_get::<_, i64>(index)? as u32))
}

/// The newest event of some kinds (`$1`), about a task (`$2`) and/or a run (`$3`).
const LATEST_EVENT: &str =
    "SELECT seq, at, kind, task, run_id, attempt, message, instance FROM events
     WHERE kind = ANY($1) AND ($2::TEXT IS NULL OR task = $2)
       AND ($3::BIGINT IS NULL OR run_id = $3)
     ORDER BY seq DESC LIMIT 1";

fn read_task_state(row: &Row) -> Result<(TaskName, TaskStateRow), StoreError> {
    Ok((
        TaskName::from(row.try_get::<_, &str>(0)?),
        TaskStateRow {
            paused: row.try_get(1)?,
            last_fire_at: instant_at(row, 2)?,
            next_fire_at: instant_at(row, 3)?,
            schedule: row.try_get(4)?,
        },
    ))
}

fn read_instance(row: &Row) -> Result<InstanceRow, StoreError> {
    Ok(InstanceRow {
        id: row.try_get(0)?,
        pid: row.try_get(1)?,
        host: row.try_get(2)?,
        heartbeat_at: from_micros(row.try_get(3)?),
        stopped_at: instant_at(row, 4)?,
        serving: row.try_get(5)?,
        api: row.try_get(6)?,
        config_hash: row.try_get(7)?,
    })
}

fn read_run(row: &Row) -> Result<RunRow, StoreError> {
    let id = RunId(row.try_get(0)?);
    let trigger_text: String = row.try_get(2)?;
    let state_text: String = row.try_get(7)?;
    let trigger = Trigger::parse(&trigger_text).ok_or(StoreError::Corrupt {
        run: id,
        value: trigger_text.clone(),
    })?;
    let state = RunState::parse(&state_text).ok_or(StoreError::Corrupt {
        run: id,
        value: state_text.clone(),
    })?;
    Ok(RunRow {
        id,
        task: TaskName(row.try_get(1)?),
        trigger,
        scheduled_for: from_micros(row.try_get(3)?),
        queued_at: from_micros(row.try_get(4)?),
        started_at: instant_at(row, 5)?,
        finished_at: instant_at(row, 6)?,
        state,
        attempt: attempt_at(row, 8)?,
        max_attempts: row.try_get::<_, i64>(9)? as u32,
        next_attempt_at: instant_at(row, 10)?,
        exit_code: row.try_get(11)?,
        error: row.try_get(12)?,
        reason: row.try_get(13)?,
        progress: row.try_get(14)?,
        phase: row.try_get(15)?,
        checkpoint: row.try_get(16)?,
        result: row.try_get(17)?,
        owner: row.try_get(18)?,
        pid: row.try_get(19)?,
        heartbeat_at: instant_at(row, 20)?,
        abort_requested: row.try_get(21)?,
        force: row.try_get(22)?,
        downstream: row.try_get(23)?,
        cascade: row.try_get::<_, Option<i64>>(24)?.map(RunId),
        params: row.try_get(25)?,
    })
}

/// A database of its own for one test, on the PostgreSQL server of
/// `TURBOSCHED_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432`, the server
/// `.ci/run` starts): `CREATE DATABASE ts_<random>` through the `postgres` database,
/// and `DROP DATABASE … WITH (FORCE)` when dropped.
#[cfg(test)]
pub(super) struct ScratchDatabase {
    server: String,
    name: String,
}

#[cfg(test)]
impl ScratchDatabase {
    pub(super) fn create() -> ScratchDatabase {
        let server = std::env::var("TURBOSCHED_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string());
        let name = format!("ts_{}", uuid::Uuid::new_v4().simple());
        admin(&server, &format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|err| panic!("{}: create database {name}: {err}", redacted(&server)));
        ScratchDatabase { server, name }
    }

    /// The URL a `Store` opens.
    pub(super) fn url(&self) -> String {
        format!("{}/{}", self.server, self.name)
    }
}

#[cfg(test)]
impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        let drop_it = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(err) = admin(&self.server, &drop_it) {
            eprintln!("{}: {drop_it}: {err}", redacted(&self.server));
        }
    }
}

/// `meta.schema_version` of the database `tx` is in; `None` when it has no `meta` table
/// (a new database) or no such row.
async fn stored_schema_version(tx: &Transaction<'_>) -> Result<Option<i64>, StoreError> {
    let has_meta: bool = tx
        .query_one("SELECT to_regclass('meta') IS NOT NULL", &[])
        .await?
        .try_get(0)?;
    if !has_meta {
        return Ok(None);
    }
    Ok(tx
        .query_opt("SELECT value FROM meta WHERE key = 'schema_version'", &[])
        .await?
        .map(|row| row.try_get::<_, i64>(0))
        .transpose()?)
}

/// Runs `sql` on the `postgres` database of `server`, on a runtime of its own.
#[cfg(test)]
fn admin(server: &str, sql: &str) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| err.to_string())?;
    let result = block_on(&runtime, async {
        let (client, connection) = tokio_postgres::connect(&format!("{server}/postgres"), NoTls)
            .await
            .map_err(|err| with_causes(&err))?;
        let driver = tokio::spawn(connection);
        let result = client
            .batch_execute(sql)
            .await
            .map_err(|err| with_causes(&err));
        drop(client);
        let _ = driver.await;
        result
    });
    // A plain drop would block, which panics on an async thread.
    runtime.shutdown_background();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[test]
    fn the_url_is_shown_without_its_password() {
        assert_eq!(
            redacted("postgres://ts:secret@db:5432/runs"),
            "postgres://ts@db:5432/runs"
        );
        assert_eq!(redacted("postgresql://db/runs"), "postgresql://db/runs");
    }

    #[test]
    fn only_postgres_urls_open_postgres() {
        assert!(is_postgres_url("postgres://db/runs"));
        assert!(is_postgres_url("postgresql://db/runs"));
        assert!(!is_postgres_url("data/postgres://x.db"));
        assert!(!is_postgres_url("data/scheduler.db"));
    }

    #[test]
    fn a_server_that_does_not_answer_is_unavailable_and_named_without_password() {
        // Port 1 on the loopback: refused at once, nothing listens there.
        let url = std::path::Path::new("postgres://ts:secret@127.0.0.1:1/runs");
        let err = Store::open(url).err().expect("refused");
        assert!(err.is_unavailable(), "{err}");
        let text = err.to_string();
        assert!(
            text.starts_with("cannot open run database postgres://ts@127.0.0.1:1/runs: "),
            "{text}"
        );
        assert!(!text.contains("secret"), "{text}");
    }

    #[test]
    fn a_postgres_database_from_a_newer_turbosched_is_refused() {
        let database = ScratchDatabase::create();
        let url = std::path::PathBuf::from(database.url());
        drop(Store::open(&url).unwrap());
        admin_on(
            &database,
            "UPDATE meta SET value = 999 WHERE key = 'schema_version'",
        );
        let err = Store::open(&url).err().expect("refused").to_string();
        assert!(
            err.contains("schema version 999, newer than this turbosched (3)"),
            "{err}"
        );
    }

    /// A peer's transaction, begun with `sql` and held open until [`HeldOpen::commit`].
    struct HeldOpen {
        runtime: tokio::runtime::Runtime,
        client: tokio_postgres::Client,
        driver: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    }

    impl HeldOpen {
        fn begin(database: &ScratchDatabase, sql: &str) -> HeldOpen {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let (client, driver) = runtime.block_on(async {
                let (client, connection) = tokio_postgres::connect(&database.url(), NoTls)
                    .await
                    .unwrap();
                let driver = tokio::spawn(connection);
                client
                    .batch_execute(&format!("BEGIN; {sql}"))
                    .await
                    .unwrap();
                (client, driver)
            });
            HeldOpen {
                runtime,
                client,
                driver,
            }
        }

        fn commit(self) {
            let HeldOpen {
                runtime,
                client,
                driver,
            } = self;
            runtime.block_on(async {
                client.batch_execute("COMMIT").await.unwrap();
                drop(client);
                let _ = driver.await;
            });
        }
    }

    /// `Store::open` on a thread of its own: its answer (the error as text) arrives on
    /// the receiver.
    fn open_in_thread(
        database: &ScratchDatabase,
    ) -> (
        std::thread::JoinHandle<()>,
        std::sync::mpsc::Receiver<Result<(), String>>,
    ) {
        let url = std::path::PathBuf::from(database.url());
        let (opened_tx, opened_rx) = std::sync::mpsc::channel();
        let opener = std::thread::spawn(move || {
            let opened = Store::open(&url).map(drop).map_err(|err| err.to_string());
            let _ = opened_tx.send(opened);
        });
        (opener, opened_rx)
    }

    /// Opening a database already at this schema takes no lock on its tables: a
    /// `turbosched status`, or an instance joining a busy cluster, neither waits for the
    /// peers' writes nor holds them up (re-running `CREATE INDEX IF NOT EXISTS` took a
    /// SHARE lock on each table until the open's commit: a restarted instance queued
    /// behind every writer, and every writer behind it — the storm saw an instance not
    /// register within 20 s).
    #[test]
    fn opening_a_current_database_waits_for_no_writer() {
        let database = ScratchDatabase::create();
        drop(Store::open(std::path::Path::new(&database.url())).unwrap());
        let write = HeldOpen::begin(
            &database,
            "LOCK TABLE runs, events, task_state IN ROW EXCLUSIVE MODE",
        );
        let (opener, opened) = open_in_thread(&database);
        let opened = opened.recv_timeout(Duration::from_secs(10));
        write.commit();
        opener.join().unwrap();
        match opened {
            Ok(result) => result.unwrap(),
            Err(_) => panic!("the open waited more than 10 s for a peer's write"),
        }
    }

    /// An open during another turbosched's migration waits for it, and is refused when
    /// that migration brings a schema newer than its own (an old binary must not run on a
    /// new schema because it read the version a moment before the upgrade committed).
    #[test]
    fn an_open_during_a_newer_migration_waits_for_it_and_is_refused() {
        let database = ScratchDatabase::create();
        drop(Store::open(std::path::Path::new(&database.url())).unwrap());
        let migration = HeldOpen::begin(
            &database,
            &format!(
                "SELECT pg_advisory_xact_lock({MIGRATION_LOCK}); \
                 UPDATE meta SET value = 999 WHERE key = 'schema_version'"
            ),
        );
        let (opener, opened) = open_in_thread(&database);
        let early = opened.recv_timeout(Duration::from_millis(500));
        migration.commit();
        assert!(early.is_err(), "opened during the migration: {early:?}");
        let opened = opened
            .recv_timeout(Duration::from_secs(10))
            .expect("the open ends once the migration commits");
        opener.join().unwrap();
        let err = opened.expect_err("refused");
        assert!(err.contains("schema version 999"), "{err}");
    }

    /// `postgres.sql` runs only on a new or older database (a current one is opened
    /// without it), so a change to it must come with a new `POSTGRES_SCHEMA_VERSION` and
    /// its step in `MIGRATIONS`, or existing databases never see it. The file's digest is
    /// pinned to the version: changing the one without the other fails here.
    #[test]
    fn the_schema_file_changes_only_with_a_new_schema_version() {
        use sha2::Digest;
        let digest = crate::pipeline::hex(&sha2::Sha256::digest(SCHEMA.as_bytes()));
        assert_eq!(
            (POSTGRES_SCHEMA_VERSION, digest.as_str()),
            (
                3,
                "edbb19ffb739eba07905dc6881061fbaf2d8db954bb2484eb85c8d1bccc9b277"
            ),
            "postgres.sql changed: bump POSTGRES_SCHEMA_VERSION and add the step that takes \
             an existing database there to MIGRATIONS (a change to comments alone needs \
             neither), then put the new version and digest here"
        );
    }

    #[test]
    fn a_postgres_backup_says_to_use_pg_dump_and_the_integrity_check_says_ok() {
        let database = ScratchDatabase::create();
        let store = Store::open(std::path::Path::new(&database.url())).unwrap();
        let err = store
            .backup_to(std::path::Path::new("/tmp/x.db"))
            .unwrap_err();
        assert!(err.to_string().contains("use pg_dump"), "{err}");
        assert_eq!(store.integrity_check().unwrap(), "ok");
        store
            .probe_write(Duration::from_secs(5), crate::model::from_micros(1))
            .unwrap();
    }

    /// The engine calls the store from its runtime's threads too, not only under
    /// `block_in_place`; the last `Store` may be dropped there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_store_works_and_drops_on_an_async_thread_of_a_multi_thread_runtime() {
        let database = ScratchDatabase::create();
        let store = Store::open(std::path::Path::new(&database.url())).unwrap();
        let task = TaskName::from("ingest");
        store
            .set_paused(&task, true, crate::model::from_micros(1))
            .unwrap();
        assert!(store.task_state(&task).unwrap().paused);
        drop(store);
        drop(database);
    }

    /// Leaderless firing: while one instance holds a task's schedule row (it is firing
    /// it), another's hold skips that row at once instead of waiting, and takes the rest.
    #[test]
    fn a_schedule_row_held_by_one_instance_is_skipped_not_waited_for_by_another() {
        let database = ScratchDatabase::create();
        let url = std::path::PathBuf::from(database.url());
        let first = Store::open(&url).unwrap();
        let second = Store::open(&url).unwrap();
        let (ingest, train) = (TaskName::from("ingest"), TaskName::from("train"));
        let past = crate::model::from_micros(1_000_000);
        for task in [&ingest, &train] {
            first.set_next_fire(task, Some(past), Some("k")).unwrap();
        }
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            first
                .batch(|tx| {
                    let held =
                        tx.hold_schedules(std::slice::from_ref(&TaskName::from("ingest")))?;
                    held_tx.send(held.len()).unwrap();
                    release_rx.recv().unwrap();
                    Ok(())
                })
                .unwrap();
        });
        assert_eq!(held_rx.recv().unwrap(), 1);
        let started = std::time::Instant::now();
        let seen = second
            .batch(|tx| tx.hold_schedules(&[ingest.clone(), train.clone()]))
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "waited for the lock"
        );
        assert!(!seen.contains_key(&ingest), "{seen:?}");
        assert_eq!(seen[&train].state.next_fire_at, Some(past));
        assert!(seen[&train].due);
        release_tx.send(()).unwrap();
        holder.join().unwrap();
    }

    /// Due-ness is the server's clock's: a row whose next fire is an hour from now is
    /// held (its value is what a caller compares with) but not due, whatever the caller's
    /// clock says.
    #[test]
    fn a_schedule_row_is_due_by_the_servers_clock() {
        let database = ScratchDatabase::create();
        let store = Store::open(std::path::Path::new(&database.url())).unwrap();
        let task = TaskName::from("ingest");
        let later = chrono::Utc::now() + chrono::Duration::hours(1);
        store.set_next_fire(&task, Some(later), Some("k")).unwrap();
        let held = store
            .batch(|tx| tx.hold_schedules(std::slice::from_ref(&task)))
            .unwrap();
        assert!(!held[&task].due, "{held:?}");
        assert_eq!(
            held[&task].state.next_fire_at.map(|t| t.timestamp_micros()),
            Some(later.timestamp_micros())
        );
        let now = chrono::Utc::now() - chrono::Duration::seconds(1);
        store.set_next_fire(&task, Some(now), Some("k")).unwrap();
        let held = store
            .batch(|tx| tx.hold_schedules(std::slice::from_ref(&task)))
            .unwrap();
        assert!(held[&task].due, "{held:?}");
    }

    /// Runs `sql` on the scratch database itself.
    fn admin_on(database: &ScratchDatabase, sql: &str) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(&database.url(), NoTls)
                .await
                .unwrap();
            let driver = tokio::spawn(connection);
            client.batch_execute(sql).await.unwrap();
            drop(client);
            let _ = driver.await;
        });
    }

    #[test]
    fn a_hint_payload_names_its_origin_and_kinds_and_ones_own_are_left_out() {
        let mask = HINT_QUEUED | HINT_EVENT;
        assert_eq!(hint_payload("abc", mask), "abc queued,event");
        assert_eq!(parse_hint("abc queued,event", "other"), mask);
        assert_eq!(parse_hint("abc queued,event", "abc"), 0);
        assert_eq!(parse_hint("abc abort,later_kind", "other"), HINT_ABORT);
        assert_eq!(parse_hint("nonsense", "other"), 0);
    }

    /// LISTEN/NOTIFY: a subscriber hears what other stores commit, kind by kind, once a
    /// transaction, neither its own store's writes nor a rolled-back transaction's; a
    /// dropped listener connects again and then tells every kind (hints may be lost).
    #[test]
    fn hints_tell_other_stores_commits_by_kind_and_come_back_after_a_cut() {
        let database = ScratchDatabase::create();
        let url = std::path::PathBuf::from(database.url());
        let listening = Store::open(&url).unwrap();
        let other = Store::open(&url).unwrap();
        let mut hints = listening.hints().expect("PostgreSQL tells hints");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let next = |hints: &mut Hints| {
            runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), hints.next())
                    .await
                    .expect("a hint within 10 s")
                    .expect("the feed goes on")
            })
        };
        let until_live = |hints: &Hints, live: bool| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while hints.live() != live {
                assert!(std::time::Instant::now() < deadline, "live never {live}");
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        until_live(&hints, true);
        let task = TaskName::from("ingest");
        let now = crate::model::from_micros(1);
        // Its own write is not told; the other's enqueue is (a run queued, an event).
        listening.set_paused(&task, true, now).unwrap();
        let run = other
            .enqueue(&crate::store::conformance::scheduled("ingest", now), now)
            .unwrap();
        let queued = Hint {
            queued: true,
            event: true,
            ..Hint::default()
        };
        assert_eq!(next(&mut hints), queued);
        // A rolled-back enqueue sends nothing; a resume is a schedule change.
        let refused = other.batch(|tx| {
            tx.enqueue(&crate::store::conformance::scheduled("train", now), now)?;
            Err::<(), _>(StoreError::NotFound(run))
        });
        assert!(refused.is_err());
        other.set_paused(&task, false, now).unwrap();
        let schedule = Hint {
            schedule: true,
            event: true,
            ..Hint::default()
        };
        assert_eq!(next(&mut hints), schedule);
        // A next fire stored under another schedule is told; under the same one, not.
        other.set_next_fire(&task, Some(now), Some("a")).unwrap();
        let stored = Hint {
            schedule: true,
            ..Hint::default()
        };
        assert_eq!(next(&mut hints), stored);
        other.set_next_fire(&task, None, Some("a")).unwrap();
        other.batch(|tx| tx.flag_abort(run, "stop")).unwrap();
        let abort = Hint {
            abort: true,
            ..Hint::default()
        };
        assert_eq!(next(&mut hints), abort);
        // The listener cut by the server: not live, then back, telling every kind.
        admin_on(
            &database,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND query LIKE 'LISTEN%'",
        );
        assert_eq!(next(&mut hints), Hint::ALL);
        assert!(hints.live());
    }
}
