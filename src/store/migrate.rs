//! Moving up: a SQLite history copied into an empty PostgreSQL database
//! (`turbosched migrate --to postgresql://…`), so an operator who outgrows one machine
//! keeps every run, attempt, event, task state and instance.
//!
//! Lifecycle: [`check_source`] says whether a file is a turbosched SQLite database this
//! build can read (the CLI then opens it as a [`Store`](super::Store), which brings an
//! older file forward and tells whether an instance is serving on it);
//! [`sqlite_to_postgres`] copies it and counts both sides:
//!
//! ```text
//! check_source("data/scheduler.db")?;
//! let migration = sqlite_to_postgres("data/scheduler.db", "postgresql://db/runs")?;
//! for table in &migration.tables { println!("{} {} {}", table.name, table.sqlite, table.postgres) }
//! ```
//!
//! How the copy stays whole:
//! - The source is opened read-only and read inside one read transaction: a consistent
//!   snapshot, even while a forced copy runs beside a live service (WAL readers do not
//!   block writers).
//! - The target is opened through the PostgreSQL backend ([`PostgresBackend::open`]), so
//!   its tables come from the backend's own schema and migrations; then one transaction
//!   locks the tables, refuses a database that holds any row ([`MigrateError::NotEmpty`]),
//!   streams each table with a binary `COPY`, sets `meta.event_seq` and the runs identity
//!   to where SQLite left them, counts every table and commits only if each count equals
//!   the source's. A failure anywhere leaves the target as it was.
//! - What is kept: run ids, attempt numbers, event `seq`s and the event counter
//!   (SQLite's `AUTOINCREMENT` high-water mark: pruned events are not numbered again),
//!   instants (µs on both sides). SQLite's 0/1 flags become BOOLEANs. `meta`'s other keys
//!   are not copied: `schema_version` is each backend's own, `health_probe` a scratch byte.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

use super::postgres::{self, PostgresBackend};
use super::{PostgresError, StoreError, SCHEMA_VERSION};

/// Why a migration did not happen, or did not verify.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The source file does not exist.
    #[error("{path}: no such file; expected the SQLite run database to copy (`[scheduler] database` of the config, or --from)")]
    MissingSource {
        /// The file.
        path: PathBuf,
    },
    /// The source is not a turbosched SQLite database.
    #[error("{path}: not a turbosched run database: expected a SQLite file with the tables {expected}, found {found}")]
    NotTurbosched {
        /// The file.
        path: PathBuf,
        /// The tables a turbosched database has.
        expected: String,
        /// What the file is, or holds.
        found: String,
    },
    /// The source was written by a newer turbosched (or an older one not yet brought
    /// forward), whose tables this copy does not know.
    #[error("{path}: schema version {found}, expected {expected}: {advice}")]
    SchemaVersion {
        /// The file.
        path: PathBuf,
        /// `meta.schema_version`.
        found: usize,
        /// The version this build copies.
        expected: usize,
        /// What to do.
        advice: &'static str,
    },
    /// The target is not a `postgres://` or `postgresql://` URL.
    #[error(
        "--to: expected a PostgreSQL URL such as postgresql://user@host:5432/db, found {found:?}"
    )]
    NotPostgres {
        /// The setting given.
        found: String,
    },
    /// The target PostgreSQL database already holds history: migrate copies into an
    /// empty database only, so nothing there is overwritten or interleaved.
    #[error("{database} is not empty: found {found}; migrate copies into an empty database only (create one: createdb <name>); nothing was written")]
    NotEmpty {
        /// The URL, without its password.
        database: String,
        /// The rows found, per table.
        found: String,
    },
    /// A table's row count differs between the two sides.
    #[error("{database}: counts differ from {path} ({differences}); {outcome}")]
    CountsDiffer {
        /// The source.
        path: PathBuf,
        /// The target, without its password.
        database: String,
        /// `table: sqlite N, postgresql M`, for each table that differs.
        differences: String,
        /// Whether the copy was rolled back or is committed.
        outcome: &'static str,
    },
    /// Reading the source failed.
    #[error("{path}: {step}: {source}")]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// What was being done.
        step: String,
        /// Why.
        source: rusqlite::Error,
    },
    /// Writing or counting the target failed; nothing was committed unless the step says
    /// it came after the commit.
    #[error("{database}: {step}: {source}")]
    Postgres {
        /// The URL, without its password.
        database: String,
        /// What was being done.
        step: String,
        /// Why.
        source: PostgresError,
    },
    /// The target could not be opened or prepared.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A finished migration: what was copied where, the counts of both sides, how long.
#[derive(Debug, Clone)]
pub struct Migration {
    /// The SQLite file read.
    pub from: PathBuf,
    /// The PostgreSQL database written, without its password.
    pub to: String,
    /// Each table's rows on both sides (equal, or the migration would have failed), then
    /// the event counter as a row named `meta.event_seq`.
    pub tables: Vec<TableCount>,
    /// The highest run id copied (new runs are numbered after it), if any run was.
    pub max_run_id: Option<i64>,
    /// From opening the source to the verified commit.
    pub elapsed: Duration,
}

/// One table's rows in the source and in the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCount {
    /// The table.
    pub name: &'static str,
    /// Rows in SQLite.
    pub sqlite: u64,
    /// Rows in PostgreSQL after the copy.
    pub postgres: u64,
}

/// Checks that `path` is a turbosched SQLite run database this build can copy: the file
/// exists, is SQLite, has the tables, and its schema is not newer than this build's (an
/// older one is brought forward by opening it as a `Store`, as every command does).
/// Opens read-only: changes nothing.
pub fn check_source(path: &Path) -> Result<(), MigrateError> {
    let connection = open_source(path)?;
    let version = source_version(&connection, path)?;
    if version > SCHEMA_VERSION {
        return Err(MigrateError::SchemaVersion {
            path: path.to_path_buf(),
            found: version,
            expected: SCHEMA_VERSION,
            advice: "it was written by a newer turbosched; migrate with that one",
        });
    }
    Ok(())
}

/// Copies the SQLite history at `from` into the empty PostgreSQL database at `to`, in one
/// PostgreSQL transaction committed only once every table's count equals the source's
/// (see the module doc for what is kept and how).
pub fn sqlite_to_postgres(from: &Path, to: &str) -> Result<Migration, MigrateError> {
    if !postgres::is_postgres_url(to) {
        return Err(MigrateError::NotPostgres {
            found: postgres::redacted(to),
        });
    }
    let database = postgres::redacted(to);
    let started = std::time::Instant::now();
    let mut connection = open_source(from)?;
    let sqlite_fail = |step: String| {
        move |source| MigrateError::Sqlite {
            path: from.to_path_buf(),
            step,
            source,
        }
    };
    // One read transaction: every table below is read from the same snapshot.
    let snapshot = connection
        .transaction_with_behavior(TransactionBehavior::Deferred)
        .map_err(sqlite_fail("begin a read transaction".into()))?;
    let version = source_version(&snapshot, from)?;
    if version != SCHEMA_VERSION {
        return Err(MigrateError::SchemaVersion {
            path: from.to_path_buf(),
            found: version,
            expected: SCHEMA_VERSION,
            advice: if version > SCHEMA_VERSION {
                "it was written by a newer turbosched; migrate with that one"
            } else {
                "open it once with this turbosched (`turbosched status`) to bring it forward"
            },
        });
    }
    let mut sqlite_counts = Vec::with_capacity(TABLES.len());
    for table in &TABLES {
        let count: i64 = snapshot
            .query_row(&format!("SELECT count(*) FROM {}", table.name), [], |row| {
                row.get(0)
            })
            .map_err(sqlite_fail(format!("count {}", table.name)))?;
        sqlite_counts.push(count.max(0) as u64);
    }
    // The event counter: AUTOINCREMENT's high-water mark, never below the highest seq.
    let event_seq: i64 = snapshot
        .query_row(
            "SELECT max(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0),
                        COALESCE((SELECT max(seq) FROM events), 0))",
            [],
            |row| row.get(0),
        )
        .map_err(sqlite_fail("read the event counter".into()))?;
    let max_run_id: Option<i64> = snapshot
        .query_row("SELECT max(id) FROM runs", [], |row| row.get(0))
        .map_err(sqlite_fail("read the highest run id".into()))?;

    let backend = PostgresBackend::open(to)?;
    let pg_fail = |step: &str| {
        let database = database.clone();
        let step = step.to_string();
        move |err: tokio_postgres::Error| MigrateError::Postgres {
            database: database.clone(),
            step: step.clone(),
            source: err.into(),
        }
    };
    let (snapshot_ref, database_ref, sqlite_ref) = (&snapshot, &database, &sqlite_counts);
    backend.with_connection(|mut client| async move {
        let (snapshot, database, sqlite_counts) = (snapshot_ref, database_ref, sqlite_ref);
        let transaction = client
            .transaction()
            .await
            .map_err(pg_fail("begin a transaction"))?;
        let tx: &tokio_postgres::Transaction<'_> = &transaction;
        // Nobody writes the tables while they are checked empty and filled.
        tx.batch_execute(&format!(
            "LOCK TABLE {} IN EXCLUSIVE MODE",
            TABLES.map(|t| t.name).join(", ")
        ))
        .await
        .map_err(pg_fail("lock the tables"))?;
        let before = count_postgres(tx)
            .await
            .map_err(pg_fail("count the rows already there"))?;
        if before.iter().any(|&count| count > 0) {
            let found = TABLES
                .iter()
                .zip(&before)
                .map(|(table, count)| format!("{count} {}", table.noun))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(MigrateError::NotEmpty {
                database: database.clone(),
                found,
            });
        }
        for table in &TABLES {
            copy_table(snapshot, from, tx, table, database).await?;
        }
        tx.execute(
            "UPDATE meta SET value = $1 WHERE key = 'event_seq'",
            &[&event_seq],
        )
        .await
        .map_err(pg_fail("set meta.event_seq"))?;
        if let Some(max) = max_run_id {
            // DDL, so it rolls back with the rest (setval would not).
            let next = max.saturating_add(1).max(1);
            tx.batch_execute(&format!(
                "ALTER TABLE runs ALTER COLUMN id RESTART WITH {next}"
            ))
            .await
            .map_err(pg_fail("number new runs after the copied ones"))?;
        }
        let copied = count_postgres(tx)
            .await
            .map_err(pg_fail("count the copied rows"))?;
        if &copied != sqlite_counts {
            return Err(MigrateError::CountsDiffer {
                path: from.to_path_buf(),
                database: database.clone(),
                differences: differences(sqlite_counts, &copied),
                outcome: "rolled back, nothing was written",
            });
        }
        transaction.commit().await.map_err(pg_fail("commit"))?;
        Ok(())
    })?;
    drop(snapshot);
    let elapsed = started.elapsed();

    // Counted again outside the transaction: what a serving instance will see.
    let (committed, counter) = backend.with_connection(|client| async move {
        let fail = pg_fail("count the rows after the commit");
        let client: &tokio_postgres::Client = &client;
        let committed = count_postgres(client).await.map_err(&fail)?;
        let counter: i64 = client
            .query_one("SELECT value FROM meta WHERE key = 'event_seq'", &[])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(&fail)?;
        Ok::<_, MigrateError>((committed, counter))
    })?;
    if committed != sqlite_counts || counter != event_seq {
        let mut differences = differences(&sqlite_counts, &committed);
        if counter != event_seq {
            if !differences.is_empty() {
                differences.push_str("; ");
            }
            differences.push_str(&format!(
                "meta.event_seq: sqlite {event_seq}, postgresql {counter}"
            ));
        }
        return Err(MigrateError::CountsDiffer {
            path: from.to_path_buf(),
            database,
            differences,
            outcome: "the copy is committed: something wrote to the database since",
        });
    }
    let mut tables: Vec<TableCount> = TABLES
        .iter()
        .zip(sqlite_counts.iter().zip(&committed))
        .map(|(table, (&sqlite, &postgres))| TableCount {
            name: table.name,
            sqlite,
            postgres,
        })
        .collect();
    tables.push(TableCount {
        name: "meta.event_seq",
        sqlite: event_seq.max(0) as u64,
        postgres: counter.max(0) as u64,
    });
    Ok(Migration {
        from: from.to_path_buf(),
        to: database,
        tables,
        max_run_id,
        elapsed,
    })
}

/// What a column holds, and how it is read from SQLite and written to PostgreSQL.
#[derive(Clone, Copy)]
enum Kind {
    /// INTEGER → BIGINT.
    Int,
    /// INTEGER → INTEGER (exit codes).
    Int4,
    /// REAL → DOUBLE PRECISION.
    Real,
    /// TEXT → TEXT.
    Text,
    /// INTEGER 0/1 → BOOLEAN.
    Flag,
}

impl Kind {
    /// The kind of a PostgreSQL column, from `information_schema.columns.data_type`.
    fn of(data_type: &str) -> Option<Kind> {
        Some(match data_type {
            "bigint" => Kind::Int,
            "integer" => Kind::Int4,
            "double precision" => Kind::Real,
            "text" => Kind::Text,
            "boolean" => Kind::Flag,
            _ => return None,
        })
    }

    fn postgres_type(self) -> Type {
        match self {
            Kind::Int => Type::INT8,
            Kind::Int4 => Type::INT4,
            Kind::Real => Type::FLOAT8,
            Kind::Text => Type::TEXT,
            Kind::Flag => Type::BOOL,
        }
    }
}

/// A table copied. Its columns are PostgreSQL's (`postgres.sql`, read from
/// `information_schema` at copy time, so a column added to both schemas is copied
/// without a change here); SQLite's table (`schema.sql`) has the same names.
struct Table {
    name: &'static str,
    /// The plural in messages ("3 runs, 0 task_state rows").
    noun: &'static str,
    /// The primary key: rows are copied in its order.
    order: &'static str,
}

/// The tables every version of the schema has (the first of [`TABLES`]): what tells a
/// turbosched file, whatever its version, from another SQLite file.
const FIRST_TABLES: usize = 5;

/// Every table of history, parents first (attempts reference runs).
const TABLES: [Table; 7] = [
    Table {
        name: "runs",
        noun: "runs",
        order: "id",
    },
    Table {
        name: "attempts",
        noun: "attempts",
        order: "run_id, attempt",
    },
    Table {
        name: "task_state",
        noun: "task_state rows",
        order: "task",
    },
    Table {
        name: "events",
        noun: "events",
        order: "seq",
    },
    Table {
        name: "instances",
        noun: "instances",
        order: "id",
    },
    Table {
        name: "alerts",
        noun: "alert cursors",
        order: "name",
    },
    Table {
        name: "alert_deliveries",
        noun: "alert deliveries",
        order: "alert, event_seq",
    },
];

/// One value read from SQLite, typed for PostgreSQL.
enum Cell {
    Int(Option<i64>),
    Int4(Option<i32>),
    Real(Option<f64>),
    Text(Option<String>),
    Flag(Option<bool>),
}

impl Cell {
    fn read(row: &rusqlite::Row<'_>, index: usize, kind: Kind) -> rusqlite::Result<Cell> {
        Ok(match kind {
            Kind::Int => Cell::Int(row.get(index)?),
            Kind::Int4 => Cell::Int4(row.get(index)?),
            Kind::Real => Cell::Real(row.get(index)?),
            Kind::Text => Cell::Text(row.get(index)?),
            Kind::Flag => Cell::Flag(match row.get::<_, Option<i64>>(index)? {
                None => None,
                Some(0) => Some(false),
                Some(1) => Some(true),
                Some(other) => {
                    return Err(rusqlite::Error::IntegralValueOutOfRange(index, other));
                }
            }),
        })
    }

    fn value(&self) -> &(dyn ToSql + Sync) {
        match self {
            Cell::Int(value) => value,
            Cell::Int4(value) => value,
            Cell::Real(value) => value,
            Cell::Text(value) => value,
            Cell::Flag(value) => value,
        }
    }
}

/// The source, read-only; refused unless it is a SQLite file.
fn open_source(path: &Path) -> Result<Connection, MigrateError> {
    if !path.is_file() {
        return Err(MigrateError::MissingSource {
            path: path.to_path_buf(),
        });
    }
    let connection = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| MigrateError::Sqlite {
        path: path.to_path_buf(),
        step: "open read-only".into(),
        source,
    })?;
    connection
        .busy_timeout(Duration::from_secs(10))
        .map_err(|source| MigrateError::Sqlite {
            path: path.to_path_buf(),
            step: "set the busy timeout".into(),
            source,
        })?;
    Ok(connection)
}

/// The schema version of a turbosched SQLite file (1 when it has runs but no version, as
/// the SQLite backend reads it), or why it is no turbosched file.
fn source_version(connection: &Connection, path: &Path) -> Result<usize, MigrateError> {
    let expected = || {
        TABLES[..FIRST_TABLES]
            .iter()
            .map(|t| t.name)
            .chain(["meta"])
            .collect::<Vec<_>>()
            .join(", ")
    };
    let not_turbosched = |found: String| MigrateError::NotTurbosched {
        path: path.to_path_buf(),
        expected: expected(),
        found,
    };
    let tables: Vec<String> = connection
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .and_then(|mut statement| {
            statement
                .query_map([], |row| row.get(0))?
                .collect::<Result<Vec<String>, _>>()
        })
        .map_err(|err| match err.sqlite_error_code() {
            Some(rusqlite::ErrorCode::NotADatabase) => {
                not_turbosched("a file that is not a SQLite database".into())
            }
            _ => MigrateError::Sqlite {
                path: path.to_path_buf(),
                step: "list the tables".into(),
                source: err,
            },
        })?;
    let missing: Vec<&str> = TABLES[..FIRST_TABLES]
        .iter()
        .map(|t| t.name)
        .chain(["meta"])
        .filter(|name| !tables.iter().any(|t| t == name))
        .collect();
    if !missing.is_empty() {
        let found = if tables.is_empty() {
            "no table".to_string()
        } else {
            format!("the tables {}", tables.join(", "))
        };
        return Err(not_turbosched(format!(
            "{found} (missing {})",
            missing.join(", ")
        )));
    }
    let stored: Option<String> = connection
        .query_row(
            "SELECT CAST(value AS TEXT) FROM meta WHERE key = 'schema_version'",
            [],
            |row| row.get(0),
        )
        .optional()
        .map_err(|source| MigrateError::Sqlite {
            path: path.to_path_buf(),
            step: "read meta.schema_version".into(),
            source,
        })?;
    match stored {
        None => Ok(1),
        Some(text) => text
            .trim()
            .parse()
            .map_err(|_| not_turbosched(format!("meta.schema_version = {text:?}"))),
    }
}

/// Rows per table of [`TABLES`], in its order.
async fn count_postgres(
    client: &impl tokio_postgres::GenericClient,
) -> Result<Vec<u64>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT {}",
        TABLES
            .iter()
            .map(|t| format!("(SELECT count(*) FROM {})", t.name))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let row = client.query_one(&sql, &[]).await?;
    (0..TABLES.len())
        .map(|index| row.try_get::<_, i64>(index).map(|n| n.max(0) as u64))
        .collect()
}

/// `runs: sqlite 10, postgresql 9; …` for the tables whose counts differ.
fn differences(sqlite: &[u64], postgres: &[u64]) -> String {
    TABLES
        .iter()
        .zip(sqlite.iter().zip(postgres))
        .filter(|(_, (a, b))| a != b)
        .map(|(table, (a, b))| format!("{}: sqlite {a}, postgresql {b}", table.name))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Streams one table from the SQLite snapshot into PostgreSQL with a binary `COPY`.
async fn copy_table(
    snapshot: &Connection,
    path: &Path,
    tx: &tokio_postgres::Transaction<'_>,
    table: &Table,
    database: &str,
) -> Result<u64, MigrateError> {
    let pg_fail = |err: tokio_postgres::Error| MigrateError::Postgres {
        database: database.to_string(),
        step: format!("copy {}", table.name),
        source: err.into(),
    };
    let mut columns: Vec<(String, Kind)> = Vec::new();
    let described = tx
        .query(
            "SELECT column_name::TEXT, data_type::TEXT FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
            &[&table.name],
        )
        .await
        .map_err(pg_fail)?;
    for row in described {
        let name: String = row.try_get(0).map_err(pg_fail)?;
        let data_type: String = row.try_get(1).map_err(pg_fail)?;
        let kind = Kind::of(&data_type).ok_or_else(|| MigrateError::Postgres {
            database: database.to_string(),
            step: format!("copy {}", table.name),
            source: PostgresError {
                message: format!(
                    "column {}.{name} is {data_type}; expected bigint, integer, double precision, text or boolean",
                    table.name
                ),
                code: None,
                unavailable: false,
            },
        })?;
        columns.push((name, kind));
    }
    let types: Vec<Type> = columns
        .iter()
        .map(|(_, kind)| kind.postgres_type())
        .collect();
    let sqlite_fail = |row: u64| {
        move |source| MigrateError::Sqlite {
            path: path.to_path_buf(),
            step: format!("read {} (row {row} in {} order)", table.name, table.order),
            source,
        }
    };
    // Quoted: `trigger` and `force` are keywords in one dialect or the other.
    let quoted = columns
        .iter()
        .map(|(name, _)| format!("\"{name}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let sink = tx
        .copy_in(&format!(
            "COPY {} ({quoted}) FROM STDIN (FORMAT binary)",
            table.name
        ))
        .await
        .map_err(pg_fail)?;
    let mut writer = std::pin::pin!(BinaryCopyInWriter::new(sink, &types));
    let mut statement = snapshot
        .prepare(&format!(
            "SELECT {quoted} FROM {} ORDER BY {}",
            table.name, table.order
        ))
        .map_err(sqlite_fail(0))?;
    let mut rows = statement.query([]).map_err(sqlite_fail(0))?;
    let mut count = 0u64;
    let mut cells: Vec<Cell> = Vec::with_capacity(columns.len());
    while let Some(row) = rows.next().map_err(sqlite_fail(count + 1))? {
        count += 1;
        cells.clear();
        for (index, (_, kind)) in columns.iter().enumerate() {
            cells.push(Cell::read(row, index, *kind).map_err(sqlite_fail(count))?);
        }
        let values: Vec<&(dyn ToSql + Sync)> = cells.iter().map(Cell::value).collect();
        writer.as_mut().write(&values).await.map_err(pg_fail)?;
    }
    writer.as_mut().finish().await.map_err(pg_fail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{from_micros, Attempt, RunId, RunState, TaskName, Trigger};
    use crate::store::postgres::ScratchDatabase;
    use crate::store::{Change, DeliveryOutcome, Move, NewDelivery, NewRun, Store};

    /// A history with every kind of value a column holds: flags set, NULLs, a fraction, a
    /// paused task, a stopped instance; and its newest event pruned, so the event counter
    /// is ahead of the highest `seq`.
    fn history(path: &Path) -> Store {
        let store = Store::open(path).unwrap();
        let at = |second: i64| from_micros(1_700_000_000_000_000 + second * 1_000_000 + 7);
        let task = TaskName::from("ingest");
        let run = |force, downstream| NewRun {
            task: task.clone(),
            trigger: Trigger::Manual,
            scheduled_for: at(1),
            max_attempts: 3,
            force,
            downstream,
            cascade: None,
            params: None,
        };
        let first = store.enqueue(&run(true, true), at(1)).unwrap();
        store.enqueue(&run(false, false), at(2)).unwrap();
        store
            .transition(
                &Move {
                    run: first,
                    attempt: Attempt(0),
                    from: RunState::Queued,
                    to: RunState::Running,
                },
                &Change {
                    owner: Some("instance-a".into()),
                    ..Change::default()
                },
                at(3),
            )
            .unwrap();
        store.request_abort(first, "operator", at(4)).unwrap();
        store.set_paused(&task, true, at(5)).unwrap();
        store
            .set_next_fire(&task, Some(at(60)), Some("0 * * * * *"))
            .unwrap();
        store
            .register_instance("instance-a", 4242, "host-a", true, at(0))
            .unwrap();
        store.stop_instance("instance-a", at(6)).unwrap();
        store
            .batch(|tx| {
                let delivery = NewDelivery {
                    event_seq: 2,
                    kind: "run_failed".into(),
                    task: Some("ingest".into()),
                    run_id: Some(first),
                    payload: "{\"event\": \"run_failed\"}".into(),
                };
                tx.add_deliveries("ops", &[delivery], 3, at(6))?;
                let retry = DeliveryOutcome::Retry {
                    status: Some(503),
                    error: "the endpoint answered 503".into(),
                    at: at(9),
                };
                tx.claim_deliveries("instance-a", at(6), at(36), 1)?;
                tx.record_delivery("ops", 2, "instance-a", &retry, at(7))
                    .map(|_| ())
            })
            .unwrap();
        let last = store
            .record_event("note", None, None, "pruned", at(7))
            .unwrap();
        Connection::open(path)
            .unwrap()
            .execute("DELETE FROM events WHERE seq = ?1", [last])
            .unwrap();
        store
    }

    #[test]
    fn every_value_is_copied_as_it_was_and_new_events_and_runs_number_after_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scheduler.db");
        let sqlite = history(&path);
        let counter = sqlite.last_event_seq().unwrap() + 1; // the pruned event
        let database = ScratchDatabase::create();

        check_source(&path).unwrap();
        let migration = sqlite_to_postgres(&path, &database.url()).unwrap();
        let counts: Vec<(&str, u64)> = migration
            .tables
            .iter()
            .map(|t| {
                assert_eq!(t.sqlite, t.postgres, "{}", t.name);
                (t.name, t.postgres)
            })
            .collect();
        assert_eq!(
            counts,
            [
                ("runs", 2),
                ("attempts", 1),
                ("task_state", 1),
                ("events", counter as u64 - 1),
                ("instances", 1),
                ("alerts", 1),
                ("alert_deliveries", 1),
                ("meta.event_seq", counter as u64)
            ]
        );
        assert_eq!(migration.max_run_id, Some(2));

        let postgres = Store::open(Path::new(&database.url())).unwrap();
        for id in [RunId(1), RunId(2)] {
            assert_eq!(
                format!("{:?}", sqlite.run(id).unwrap()),
                format!("{:?}", postgres.run(id).unwrap())
            );
            assert_eq!(
                format!("{:?}", sqlite.attempts(id).unwrap()),
                format!("{:?}", postgres.attempts(id).unwrap())
            );
        }
        let aborting = postgres.run(RunId(1)).unwrap().unwrap();
        assert!(aborting.abort_requested && aborting.force && aborting.downstream);
        assert_eq!(
            format!("{:?}", sqlite.task_states().unwrap()),
            format!("{:?}", postgres.task_states().unwrap())
        );
        assert!(postgres.paused_tasks().unwrap().contains("ingest"));
        assert_eq!(
            format!("{:?}", sqlite.instance("instance-a").unwrap()),
            format!("{:?}", postgres.instance("instance-a").unwrap())
        );
        assert_eq!(
            format!("{:?}", sqlite.events_after(0, 100).unwrap()),
            format!("{:?}", postgres.events_after(0, 100).unwrap())
        );
        assert_eq!(
            format!("{:?}", sqlite.alert_deliveries(10).unwrap()),
            format!("{:?}", postgres.alert_deliveries(10).unwrap())
        );
        assert_eq!(postgres.alert_deliveries(10).unwrap()[0].attempts, 1);
        assert_eq!(postgres.alert_cursor("ops").unwrap(), Some(3));
        assert_eq!(postgres.integrity_check().unwrap(), "ok");
        let now = from_micros(1_800_000_000_000_000);
        assert_eq!(
            postgres
                .record_event("note", None, None, "after", now)
                .unwrap(),
            counter + 1,
            "the pruned event's seq is not given again"
        );
        let next = postgres
            .enqueue(
                &NewRun {
                    task: TaskName::from("ingest"),
                    trigger: Trigger::Manual,
                    scheduled_for: now,
                    max_attempts: 1,
                    force: false,
                    downstream: false,
                    cascade: None,
                    params: None,
                },
                now,
            )
            .unwrap();
        assert_eq!(next, RunId(3));
    }

    #[test]
    fn a_source_from_a_newer_turbosched_or_of_another_program_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scheduler.db");
        drop(history(&path));
        Connection::open(&path)
            .unwrap()
            .execute(
                "UPDATE meta SET value = '999' WHERE key = 'schema_version'",
                [],
            )
            .unwrap();
        let err = check_source(&path).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{}: schema version 999, expected {SCHEMA_VERSION}: it was written by a newer turbosched; migrate with that one",
                path.display()
            )
        );

        let other = dir.path().join("other.db");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE notes (body TEXT); CREATE TABLE runs (id INTEGER);")
            .unwrap();
        let err = check_source(&other).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{}: not a turbosched run database: expected a SQLite file with the tables \
                 runs, attempts, task_state, events, instances, meta, found the tables notes, \
                 runs (missing attempts, task_state, events, instances, meta)",
                other.display()
            )
        );
    }

    #[test]
    fn a_target_that_is_not_postgres_is_refused_before_anything_is_read() {
        let err = sqlite_to_postgres(Path::new("/nonexistent.db"), "data/other.db")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "--to: expected a PostgreSQL URL such as postgresql://user@host:5432/db, found \"data/other.db\""
        );
    }
}
