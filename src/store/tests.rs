//! What only SQLite has: WAL files, migrations from older schema versions, query plans,
//! the online backup. The guarantees every backend shares are `conformance.rs`.

use std::path::Path;
use std::sync::Arc;

use rusqlite::Connection;

use super::conformance::{at, report_progress, scheduled, start};
use super::sqlite::{
    old_events, SqliteBackend, CLAIMED, COUNT_EVENTS, EVENTS_AFTER, INSERT_RUN, TRANSITION,
    UNFINISHED,
};
use super::{Change, Move, Store, SCHEMA_VERSION};
use crate::model::{Attempt, RunId, RunState};

/// The store over the SQLite file at `path`, and its backend (for its connection).
fn open_at(path: &Path) -> (Arc<SqliteBackend>, Store) {
    let backend = Arc::new(SqliteBackend::open(path).unwrap());
    (backend.clone(), Store::from_backend(backend))
}

fn open() -> (tempfile::TempDir, Arc<SqliteBackend>, Store) {
    let dir = tempfile::tempdir().unwrap();
    let (backend, store) = open_at(&dir.path().join("nested/runs.db"));
    (dir, backend, store)
}

/// Rows per table of a turbosched database (a backup included).
fn row_counts(connection: &Connection) -> [(String, i64); 4] {
    ["runs", "attempts", "events", "task_state"].map(|table| {
        let count = connection
            .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |row| {
                row.get(0)
            })
            .unwrap();
        (table.to_string(), count)
    })
}

#[test]
fn a_backup_is_a_valid_database_with_the_same_rows() {
    let (dir, backend, store) = open();
    for second in 0..20 {
        let run = store
            .claim_fire(
                &scheduled(&format!("task{second}"), at(second, 0)),
                at(second, 1),
                None,
            )
            .unwrap();
        store
            .transition(
                &Move {
                    run,
                    attempt: Attempt(0),
                    from: RunState::Queued,
                    to: RunState::Running,
                },
                &Change::default(),
                at(second, 2),
            )
            .unwrap();
    }
    let destination = dir.path().join("backup.db");
    store.backup_to(&destination).unwrap();
    let copy = Connection::open(&destination).unwrap();
    let integrity: String = copy
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
    let original = row_counts(&backend.lock());
    assert_eq!(row_counts(&copy), original);
    assert_eq!(original[0], ("runs".to_string(), 20));
}

/// The plan SQLite chooses for `sql`, one line per step.
fn plan(backend: &SqliteBackend, sql: &str) -> String {
    let connection = backend.lock();
    let mut statement = connection
        .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
        .unwrap();
    let unbound = vec![rusqlite::types::Null; statement.parameter_count()];
    let lines: Vec<String> = statement
        .query_map(rusqlite::params_from_iter(unbound), |row| {
            row.get::<_, String>(3)
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    lines.join("\n")
}

/// Start-up read each task's recent runs with `(?1 IS NULL OR task = ?1)`, which scanned
/// the whole history once per task.
#[test]
fn the_runs_of_one_task_are_read_through_the_task_index() {
    let (_dir, backend, _store) = open();
    let filter = super::RunFilter {
        task: Some("t".into()),
        limit: 100,
        ..super::RunFilter::default()
    };
    let one_task = plan(&backend, &super::sqlite::runs_sql(&filter));
    assert!(
        one_task.contains("SEARCH runs USING INDEX runs_task (task=?)"),
        "{one_task}"
    );
}

/// Issue "One room per job", item 7: `/health` and prune scanned the whole event log.
#[test]
fn event_queries_search_an_index_instead_of_scanning_the_log() {
    let (_dir, backend, _store) = open();
    let health = plan(&backend, COUNT_EVENTS);
    assert!(
        health.contains("SEARCH events USING COVERING INDEX events_kind_at (kind=? AND at>?)"),
        "{health}"
    );
    for statement in [
        format!("SELECT COUNT(*) {}", old_events()),
        format!("DELETE {}", old_events()),
    ] {
        let prune = plan(&backend, &statement);
        assert!(
            prune.contains("SEARCH events USING INDEX events_at (at<?)"),
            "{statement}:\n{prune}"
        );
        assert!(!prune.contains("SCAN events"), "{statement}:\n{prune}");
    }
    let stream = plan(&backend, EVENTS_AFTER);
    assert!(
        stream.contains("SEARCH events USING INTEGER PRIMARY KEY (rowid>?)"),
        "{stream}"
    );
    // The benchmark's start-up probe (`bench.rs`).
    let first_start = plan(
        &backend,
        "SELECT MIN(at) FROM events WHERE kind = 'scheduler_started'",
    );
    assert!(first_start.contains("events_kind_at"), "{first_start}");
}

fn columns(connection: &Connection, table: &str) -> Vec<String> {
    let mut statement = connection
        .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
        .unwrap();
    let names = statement
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    names
}

fn indexes(connection: &Connection, table: &str) -> Vec<String> {
    let mut statement = connection
        .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?1 AND sql IS NOT NULL ORDER BY name")
        .unwrap();
    let names = statement
        .query_map([table], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    names
}

/// The opcodes SQLite compiles `sql` to.
fn opcodes(backend: &SqliteBackend, sql: &str) -> Vec<String> {
    let connection = backend.lock();
    let mut statement = connection.prepare(&format!("EXPLAIN {sql}")).unwrap();
    let unbound = vec![rusqlite::types::Null; statement.parameter_count()];
    statement
        .query_map(rusqlite::params_from_iter(unbound), |row| {
            row.get::<_, String>(1)
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Issue 13: every run is inserted once and changes state at least twice, and each of
/// those writes evaluates the conditions of the partial indexes on `runs`. Written as
/// `IN (…)` lists (schema v4), each condition built and dropped a temporary b-tree
/// (`OpenEphemeral`): 9 per run, ~15 % of the service's instructions in a burst.
#[test]
fn a_runs_insert_and_its_state_changes_build_no_temporary_b_tree() {
    let (_dir, backend, _store) = open();
    for (what, sql) in [("insert", INSERT_RUN), ("state change", TRANSITION)] {
        let ops = opcodes(&backend, sql);
        assert!(!ops.is_empty());
        assert!(
            !ops.iter().any(|op| op == "OpenEphemeral"),
            "a run's {what} builds a temporary b-tree: {ops:?}"
        );
    }
}

/// The conditions the queries state are the partial indexes' own, so the queries use
/// them (a condition written otherwise, say as `IN (…)`, makes SQLite scan every run).
#[test]
fn the_unfinished_runs_and_the_claimed_ticks_are_read_through_their_partial_indexes() {
    let (_dir, backend, _store) = open();
    let unfinished = plan(
        &backend,
        &format!("SELECT id FROM runs WHERE {UNFINISHED} ORDER BY id"),
    );
    assert!(unfinished.contains("runs_state"), "{unfinished}");
    let claimed = plan(
        &backend,
        &format!("SELECT scheduled_for FROM runs WHERE task = ?1 AND {CLAIMED} AND scheduled_for BETWEEN ?2 AND ?3"),
    );
    assert!(claimed.contains("runs_claim"), "{claimed}");
}

/// Issue "One room per job", item 7: `runs.version` was written and never read.
#[test]
fn a_new_database_has_no_run_version_and_indexes_its_events() {
    let (_dir, backend, _store) = open();
    let connection = backend.lock();
    assert!(!columns(&connection, "runs").contains(&"version".to_string()));
    assert_eq!(
        indexes(&connection, "events"),
        vec!["events_at", "events_kind_at"]
    );
    let version: String = connection
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION.to_string());
}

#[test]
fn a_version_1_database_is_migrated_on_open_and_keeps_its_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    {
        let old = Connection::open(&path).unwrap();
        old.execute_batch(include_str!("testdata/schema_v1.sql"))
            .unwrap();
        old.execute_batch(
            "INSERT INTO meta(key, value) VALUES ('schema_version', '1');
             INSERT INTO runs(id, task, trigger, scheduled_for, queued_at, state, attempt, max_attempts, version)
                 VALUES (7, 'train', 'manual', 0, 0, 'queued', 0, 2, 3);
             INSERT INTO events(at, kind, task, run_id, attempt, message)
                 VALUES (0, 'run_queued', 'train', 7, 0, 'manual');",
        )
        .unwrap();
        assert!(columns(&old, "runs").contains(&"version".to_string()));
        assert!(indexes(&old, "events").is_empty());
    }
    for _ in 0..2 {
        // The second open finds nothing left to do.
        let (backend, store) = open_at(&path);
        {
            let connection = backend.lock();
            assert!(!columns(&connection, "runs").contains(&"version".to_string()));
            // 3 → 4: a run's params; the claim covers backfill; the alert tables.
            assert!(columns(&connection, "runs").contains(&"params".to_string()));
            let claim: String = connection
                .query_row(
                    "SELECT sql FROM sqlite_master WHERE name = 'runs_claim'",
                    [],
                    |row| row.get(0),
                )
                .unwrap();
            assert!(claim.contains("'backfill'"), "{claim}");
            // 4 → 5: the partial indexes' conditions are ORs, not `IN (…)` lists.
            for index in ["runs_claim", "runs_state"] {
                let sql: String = connection
                    .query_row(
                        "SELECT sql FROM sqlite_master WHERE name = ?1",
                        [index],
                        |row| row.get(0),
                    )
                    .unwrap();
                assert!(sql.contains(" OR ") && !sql.contains(" IN "), "{sql}");
            }
            assert!(columns(&connection, "alert_deliveries").contains(&"attempts".to_string()));
            assert_eq!(
                indexes(&connection, "events"),
                vec!["events_at", "events_kind_at"]
            );
            let version: String = connection
                .query_row(
                    "SELECT value FROM meta WHERE key = 'schema_version'",
                    [],
                    |row| row.get(0),
                )
                .unwrap();
            assert_eq!(version, SCHEMA_VERSION.to_string());
        }
        assert_eq!(
            store.run(RunId(7)).unwrap().unwrap().state,
            RunState::Queued
        );
        let health = plan(&backend, COUNT_EVENTS);
        assert!(health.contains("events_kind_at"), "{health}");
        drop(store);
    }
    // The old run goes on living: it starts, reports progress, succeeds.
    let store = Store::open(&path).unwrap();
    let attempt = start(&store, RunId(7), Attempt(0), RunState::Queued);
    assert_eq!(
        report_progress(&store, RunId(7), attempt, &[(0, 30.0, Some("fit"))]),
        vec!["30% fit"]
    );
    store
        .transition(
            &Move {
                run: RunId(7),
                attempt,
                from: RunState::Running,
                to: RunState::Succeeded,
            },
            &Change::default(),
            at(1, 0),
        )
        .unwrap();
    assert_eq!(store.run(RunId(7)).unwrap().unwrap().progress, Some(100.0));
}

#[test]
fn a_database_from_a_newer_turbosched_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("runs.db");
    drop(Store::open(&path).unwrap());
    Connection::open(&path)
        .unwrap()
        .execute(
            "UPDATE meta SET value = '999' WHERE key = 'schema_version'",
            [],
        )
        .unwrap();
    let err = Store::open(&path).err().expect("refused").to_string();
    assert!(
        err.contains("schema version 999, newer than this turbosched"),
        "{err}"
    );
}

/// Issue 13, "durability first": every commit is synced before it returns, so a power cut
/// cannot roll back a committed claim or terminal state; commits are counted for the bench.
#[test]
fn every_commit_is_synced_to_disk_before_it_returns() {
    let (_dir, backend, store) = open();
    let synchronous: i64 = backend
        .lock()
        .query_row("PRAGMA synchronous", [], |row| row.get(0))
        .unwrap();
    assert_eq!(synchronous, 2, "2 is FULL (1 NORMAL, 0 OFF)");
    let journal: String = backend
        .lock()
        .query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .unwrap();
    assert_eq!(journal, "wal");
    let before = store.commits();
    store
        .batch(|tx| {
            tx.claim_fire(&scheduled("a", at(0, 0)), at(0, 1), None)?;
            tx.claim_fire(&scheduled("b", at(0, 0)), at(0, 1), None)
        })
        .unwrap();
    store
        .record_event("note", None, None, "", at(0, 2))
        .unwrap();
    assert_eq!(store.commits() - before, 2, "one commit per transaction");
}

/// Issue 13, the service's CPU per run: a cached statement whose plan SQLite ties to its
/// bound values (a partial index matched against a parameter) is compiled again at every
/// execution — the transition's UPDATE and its one-attempt-per-task check were, a few
/// percent of the service's CPU at a thousand runs a second. A hundred runs started and
/// finished re-prepare neither.
#[test]
fn the_hot_transition_statements_are_compiled_once_not_at_every_run() {
    use rusqlite::StatementStatus;
    let (_dir, backend, store) = open();
    for n in 0..100u32 {
        let run = store
            .claim_fire(&scheduled("t", at(n % 60, i64::from(n))), at(0, 1), None)
            .unwrap();
        let attempt = start(&store, run, Attempt(0), RunState::Queued);
        store
            .transition(
                &Move {
                    run,
                    attempt,
                    from: RunState::Running,
                    to: RunState::Succeeded,
                },
                &Change::default(),
                at(0, 2),
            )
            .unwrap();
    }
    let busy = plan(&backend, super::sqlite::TASK_BUSY);
    assert!(
        busy.contains("SEARCH runs USING COVERING INDEX runs_running_task (task=?)"),
        "the check reads the running runs of one task: {busy}"
    );
    let connection = backend.lock();
    for sql in [super::sqlite::TRANSITION, super::sqlite::TASK_BUSY] {
        let statement = connection.prepare_cached(sql).unwrap();
        let recompiled = statement.get_status(StatementStatus::RePrepare);
        let runs = statement.get_status(StatementStatus::Run);
        assert!(runs >= 100, "the cached statement ran {runs} times: {sql}");
        assert!(
            recompiled <= 1,
            "compiled again {recompiled} times in {runs} executions: {sql}"
        );
    }
}

/// The bytes of a `-wal` file given its working size (`wal_autocheckpoint` = `pages`).
fn working_log(pages: u64) -> u64 {
    32 + pages * (24 + 4096)
}

/// Free room in `dir`, which a presized log needs sixteen times over.
fn assert_room_for_a_presized_log(dir: &Path, pages: u64) {
    let fs = nix::sys::statvfs::statvfs(dir).unwrap();
    let room = fs.blocks_available() * fs.fragment_size();
    assert!(
        room >= 16 * working_log(pages),
        "this test needs {} bytes free in {}, which has {room}",
        16 * working_log(pages),
        dir.display()
    );
}

/// The runs per task in a crash image of the database at `database` (the database and its
/// log copied as they are, with the connection still open and nothing checkpointed),
/// after SQLite's recovery, which also passes its integrity check.
fn runs_in_a_crash_image(database: &Path) -> Vec<(String, i64)> {
    let image = tempfile::tempdir().unwrap();
    std::fs::copy(database, image.path().join("runs.db")).unwrap();
    let log = format!("{}-wal", database.display());
    std::fs::copy(log, image.path().join("runs.db-wal")).unwrap();
    let crashed = Connection::open(image.path().join("runs.db")).unwrap();
    let check: String = crashed
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let mut statement = crashed
        .prepare("SELECT task, COUNT(*) FROM runs GROUP BY task ORDER BY task")
        .unwrap();
    let runs = statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    runs
}

fn claim_ticks(store: &Store, task: &str, ticks: std::ops::Range<u32>) {
    for n in ticks {
        store
            .claim_fire(&scheduled(task, at(n, 0)), at(n, 1), None)
            .unwrap();
    }
}

/// Issue 13: the engine's poll reads the unfinished runs only when another process has
/// written since its last read; the store tells it so. The service's own commits (a
/// thousand runs a second) leave the number as it was; a commit of another connection
/// to the same file (the CLI queueing a run) changes it.
#[test]
fn the_data_version_moves_with_another_connections_commit_and_never_with_our_own() {
    let (dir, _backend, store) = open();
    let first = store.data_version().unwrap();
    assert!(first.is_some());
    claim_ticks(&store, "ours", 0..3);
    assert_eq!(store.data_version().unwrap(), first, "our own commits");
    let other = Connection::open(dir.path().join("nested/runs.db")).unwrap();
    other
        .execute(
            "INSERT INTO meta(key, value) VALUES ('written_by', 'another process')",
            [],
        )
        .unwrap();
    let second = store.data_version().unwrap();
    assert_ne!(second, first, "another connection's commit");
    // Asked again with nothing written elsewhere: the same number.
    claim_ticks(&store, "ours", 3..4);
    assert_eq!(store.data_version().unwrap(), second);
}

/// Issue 13, the lone fire: a commit that grows the `-wal` file syncs its new size as well
/// as its frames (on ext4 a journal commit besides: 0.6 ms against 0.35 overwriting). The
/// service gives the log its working size once at start-up; commits then land inside it,
/// and a crash image still holds every committed row, those from before the zeros and
/// after.
#[test]
fn a_presized_log_takes_later_commits_without_growing_and_loses_no_committed_row() {
    let (dir, _backend, store) = open();
    assert_room_for_a_presized_log(dir.path(), 1000);
    let database = dir.path().join("nested/runs.db");
    let log = dir.path().join("nested/runs.db-wal");
    let length = || std::fs::metadata(&log).unwrap().len();
    claim_ticks(&store, "before", 0..1);
    let grown = length();

    let added = store.presize_log().unwrap();
    assert_eq!(
        length(),
        working_log(1000),
        "a checkpoint's worth of frames"
    );
    assert_eq!(
        added,
        working_log(1000) - grown,
        "zeros only after its frames"
    );
    assert_eq!(store.presize_log().unwrap(), 0, "once is enough");

    claim_ticks(&store, "after", 0..20);
    assert_eq!(
        length(),
        working_log(1000),
        "twenty commits, not a byte grown"
    );
    assert_eq!(
        runs_in_a_crash_image(&database),
        [("after".to_string(), 20), ("before".to_string(), 1)]
    );
}

/// The two other logs a service can start on: an empty one (the last connection of a
/// clean stop deleted it; SQLite makes it again, empty), whose zeros another connection
/// reads as no frames at all; and a rewound one (checkpointed, then written again from
/// its start), whose zeros land after the stale frames of before the rewind.
#[test]
fn an_empty_or_rewound_log_presized_reads_as_it_was_and_keeps_every_later_commit() {
    let dir = tempfile::tempdir().unwrap();
    assert_room_for_a_presized_log(dir.path(), 1500);
    let database = dir.path().join("runs.db");
    let log = dir.path().join("runs.db-wal");
    let (backend, store) = open_at(&database);
    claim_ticks(&store, "first", 0..1);
    drop((backend, store));
    assert!(!log.exists(), "a clean stop deletes the log");

    let (backend, store) = open_at(&database);
    assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
    assert_eq!(store.presize_log().unwrap(), working_log(1000));
    let reader = Connection::open(&database).unwrap();
    let count = |reader: &Connection| -> i64 {
        reader
            .query_row("SELECT COUNT(*) FROM runs", [], |row| row.get(0))
            .unwrap()
    };
    assert_eq!(count(&reader), 1, "a log of zeros is an empty log");
    claim_ticks(&store, "empty", 0..5);
    assert_eq!(count(&reader), 6);

    // Every frame copied into the database; the next commit rewinds the log.
    let (busy, _, _): (i64, i64, i64) = backend
        .lock()
        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .unwrap();
    assert_eq!(busy, 0);
    drop(reader);
    let sequence = || std::fs::read(&log).unwrap()[12..16].to_vec();
    let before = sequence();
    claim_ticks(&store, "rewound", 0..1);
    assert_ne!(
        sequence(),
        before,
        "rewound: a new header, its checkpoint sequence on"
    );
    backend
        .lock()
        .execute_batch("PRAGMA wal_autocheckpoint = 1500;")
        .unwrap();
    assert_eq!(
        store.presize_log().unwrap(),
        working_log(1500) - working_log(1000)
    );
    claim_ticks(&store, "rewound", 1..6);
    assert_eq!(std::fs::metadata(&log).unwrap().len(), working_log(1500));
    assert_eq!(
        runs_in_a_crash_image(&database),
        [
            ("empty".to_string(), 5),
            ("first".to_string(), 1),
            ("rewound".to_string(), 6)
        ]
    );
}
