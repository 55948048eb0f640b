//! The store API against real SQLite files: claims, the one transition door, events.

use chrono::{TimeZone, Utc};

use super::*;

fn at(second: u32, micros: i64) -> Instant {
    Utc.with_ymd_and_hms(2026, 6, 1, 12, 0, second).unwrap()
        + chrono::Duration::microseconds(micros)
}

fn scheduled(task: &str, tick: Instant) -> NewRun {
    NewRun {
        task: TaskName::from(task),
        trigger: Trigger::Schedule,
        scheduled_for: tick,
        max_attempts: 2,
        force: false,
        downstream: false,
        cascade: None,
    }
}

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("nested/runs.db")).unwrap();
    (dir, store)
}

/// Claims the 12:00:00 tick of `task` and returns its queued run.
fn claim(store: &Store, task: &str) -> RunId {
    store
        .claim_fire(&scheduled(task, at(0, 0)), at(0, 5), None)
        .unwrap()
}

fn kinds(store: &Store) -> Vec<String> {
    store
        .events_after(0, 1000)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

#[test]
fn a_tick_is_claimed_once_even_from_a_second_connection() {
    let (dir, store) = open();
    let run = store
        .claim_fire(&scheduled("ingest", at(0, 0)), at(0, 10), Some(at(1, 0)))
        .unwrap();
    let other = Store::open(&dir.path().join("nested/runs.db")).unwrap();
    let again = other.claim_fire(&scheduled("ingest", at(0, 0)), at(0, 20), Some(at(1, 0)));
    assert!(
        matches!(again, Err(StoreError::AlreadyClaimed { .. })),
        "{again:?}"
    );
    let catchup = NewRun {
        trigger: Trigger::Catchup,
        ..scheduled("ingest", at(0, 0))
    };
    assert!(matches!(
        other.claim_fire(&catchup, at(0, 30), None),
        Err(StoreError::AlreadyClaimed { .. })
    ));
    // Another task, or the next tick, is a different claim.
    assert!(other
        .claim_fire(&scheduled("train", at(0, 0)), at(0, 40), None)
        .is_ok());
    assert!(other
        .claim_fire(&scheduled("ingest", at(1, 0)), at(1, 10), None)
        .is_ok());
    assert_eq!(store.count_runs(None).unwrap(), 3);
    let row = store.run(run).unwrap().unwrap();
    assert_eq!(row.state, RunState::Queued);
    assert_eq!(row.scheduled_for, at(0, 0));
    assert_eq!(
        store
            .task_state(&TaskName::from("ingest"))
            .unwrap()
            .next_fire_at,
        None
    );
}

#[test]
fn manual_runs_at_the_same_instant_are_not_claims() {
    let (_dir, store) = open();
    let manual = NewRun {
        trigger: Trigger::Manual,
        ..scheduled("ingest", at(0, 0))
    };
    store.enqueue(&manual, at(0, 0)).unwrap();
    store.enqueue(&manual, at(0, 0)).unwrap();
    assert_eq!(store.count_runs(Some(RunState::Queued)).unwrap(), 2);
}

#[test]
fn a_run_walks_through_its_states_with_one_event_each() {
    let (_dir, store) = open();
    let run = claim(&store, "ingest");
    let owner = Change {
        owner: Some("me".into()),
        ..Change::default()
    };
    let first = store
        .transition(
            run,
            Attempt(0),
            RunState::Queued,
            RunState::Running,
            &owner,
            at(0, 123_456),
        )
        .unwrap();
    assert_eq!(first, Attempt(1));
    let failed = Change {
        exit_code: Some(3),
        error: Some("boom".into()),
        next_attempt_at: Some(at(5, 0)),
        ..Change::default()
    };
    store
        .transition(
            run,
            first,
            RunState::Running,
            RunState::RetryWait,
            &failed,
            at(1, 0),
        )
        .unwrap();
    let second = store
        .transition(
            run,
            first,
            RunState::RetryWait,
            RunState::Running,
            &owner,
            at(5, 1),
        )
        .unwrap();
    assert_eq!(second, Attempt(2));
    store
        .transition(
            run,
            second,
            RunState::Running,
            RunState::Succeeded,
            &Change::default(),
            at(6, 0),
        )
        .unwrap();

    let row = store.run(run).unwrap().unwrap();
    assert_eq!(row.state, RunState::Succeeded);
    assert_eq!(row.attempt, Attempt(2));
    assert_eq!(
        row.started_at,
        Some(at(0, 123_456)),
        "µs precision and the first start are kept"
    );
    assert_eq!(row.finished_at, Some(at(6, 0)));
    assert_eq!(row.error.as_deref(), Some("boom"));
    let attempts = store.attempts(run).unwrap();
    let outcomes: Vec<_> = attempts
        .iter()
        .map(|a| a.outcome.clone().unwrap_or_default())
        .collect();
    assert_eq!(outcomes, vec!["retry_wait", "succeeded"]);
    assert_eq!(attempts[0].exit_code, Some(3));
    assert_eq!(
        kinds(&store),
        vec![
            "run_queued",
            "run_started",
            "run_retrying",
            "run_started",
            "run_succeeded"
        ]
    );
    let seqs: Vec<i64> = store
        .events_after(0, 100)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "sequence numbers increase: {seqs:?}"
    );
}

#[test]
fn an_illegal_move_is_refused_and_writes_nothing() {
    let (_dir, store) = open();
    let run = claim(&store, "ingest");
    let result = store.transition(
        run,
        Attempt(0),
        RunState::Queued,
        RunState::Succeeded,
        &Change::default(),
        at(1, 0),
    );
    assert!(matches!(
        result,
        Err(StoreError::IllegalTransition {
            from: RunState::Queued,
            to: RunState::Succeeded,
            ..
        })
    ));
    assert_eq!(store.run(run).unwrap().unwrap().state, RunState::Queued);
    assert_eq!(kinds(&store), vec!["run_queued"]);
}

#[test]
fn a_stale_attempt_is_fenced_off() {
    let (_dir, store) = open();
    let run = claim(&store, "drift");
    let first = store
        .transition(
            run,
            Attempt(0),
            RunState::Queued,
            RunState::Running,
            &Change::default(),
            at(1, 0),
        )
        .unwrap();
    store
        .transition(
            run,
            first,
            RunState::Running,
            RunState::Orphaned,
            &Change::default(),
            at(2, 0),
        )
        .unwrap();
    store
        .transition(
            run,
            first,
            RunState::Orphaned,
            RunState::Queued,
            &Change::default(),
            at(2, 1),
        )
        .unwrap();
    let second = store
        .transition(
            run,
            first,
            RunState::Queued,
            RunState::Running,
            &Change::default(),
            at(3, 0),
        )
        .unwrap();
    // The first attempt's worker reports late: it must not overwrite attempt 2.
    let late = store.transition(
        run,
        first,
        RunState::Running,
        RunState::Succeeded,
        &Change::default(),
        at(4, 0),
    );
    match late {
        Err(StoreError::Fenced {
            found_state,
            found_attempt,
            ..
        }) => {
            assert_eq!((found_state, found_attempt), (RunState::Running, second));
        }
        other => panic!("expected Fenced, got {other:?}"),
    }
    assert!(!store.record_result(run, first, "{\"late\":true}").unwrap());
    assert!(store.record_result(run, second, "{\"ok\":true}").unwrap());
    assert_eq!(
        store.run(run).unwrap().unwrap().result.as_deref(),
        Some("{\"ok\":true}")
    );
}

#[test]
fn abort_stops_a_queued_run_at_once_and_flags_a_running_one() {
    let (_dir, store) = open();
    let queued = claim(&store, "a");
    assert_eq!(
        store.request_abort(queued, "by test", at(0, 2)).unwrap(),
        AbortOutcome::AbortedNow
    );
    assert_eq!(store.run(queued).unwrap().unwrap().state, RunState::Aborted);
    assert_eq!(
        store.request_abort(queued, "again", at(0, 3)).unwrap(),
        AbortOutcome::AlreadyFinished(RunState::Aborted)
    );

    let running = claim(&store, "b");
    let owner = Change {
        owner: Some("engine-1".into()),
        ..Change::default()
    };
    store
        .transition(
            running,
            Attempt(0),
            RunState::Queued,
            RunState::Running,
            &owner,
            at(0, 2),
        )
        .unwrap();
    assert_eq!(
        store.request_abort(running, "by test", at(0, 3)).unwrap(),
        AbortOutcome::Requested
    );
    assert_eq!(
        store.abort_requests("engine-1").unwrap(),
        vec![(running, Some("by test".to_string()))]
    );
    assert!(store.abort_requests("engine-2").unwrap().is_empty());
    assert!(matches!(
        store.request_abort(RunId(999), "x", at(0, 4)),
        Err(StoreError::NotFound(RunId(999)))
    ));
}

#[test]
fn pause_and_next_fire_survive_a_reopen() {
    let (dir, store) = open();
    let task = TaskName::from("ingest");
    store.set_paused(&task, true, at(0, 0)).unwrap();
    store
        .set_next_fire(&task, Some(at(30, 0)), Some("*/30 * * * * * @ UTC"))
        .unwrap();
    drop(store);
    let reopened = Store::open(&dir.path().join("nested/runs.db")).unwrap();
    let state = reopened.task_state(&task).unwrap();
    assert!(state.paused);
    assert_eq!(state.next_fire_at, Some(at(30, 0)));
    assert_eq!(state.schedule.as_deref(), Some("*/30 * * * * * @ UTC"));
    assert_eq!(kinds(&reopened), vec!["task_paused"]);
}

#[test]
fn live_instances_are_those_beating_and_not_stopped() {
    let (_dir, store) = open();
    store
        .register_instance("old", 1, "host", true, at(0, 0))
        .unwrap();
    store
        .register_instance("new", 2, "host", true, at(0, 0))
        .unwrap();
    store
        .register_instance("gone", 3, "host", true, at(0, 0))
        .unwrap();
    store.heartbeat("new", at(50, 0)).unwrap();
    store.heartbeat("gone", at(50, 0)).unwrap();
    store.stop_instance("gone", at(51, 0)).unwrap();
    let live: Vec<String> = store
        .live_instances(std::time::Duration::from_secs(30), at(55, 0))
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(live, vec!["new"]);
}

/// A run of `task` queued at `queued`, taken through `states` (from queued).
fn run_through(
    store: &Store,
    task: &str,
    queued: Instant,
    cascade: Option<RunId>,
    states: &[RunState],
) -> RunId {
    let new_run = NewRun {
        task: TaskName::from(task),
        trigger: Trigger::Manual,
        scheduled_for: queued,
        max_attempts: 1,
        force: false,
        downstream: false,
        cascade,
    };
    let run = store.enqueue(&new_run, queued).unwrap();
    let (mut from, mut attempt) = (RunState::Queued, Attempt(0));
    for to in states {
        attempt = store
            .transition(run, attempt, from, *to, &Change::default(), queued)
            .unwrap();
        from = *to;
    }
    run
}

#[test]
fn prune_removes_old_history_but_keeps_what_a_running_cascade_references() {
    let (_dir, store) = open();
    let old = at(0, 0);
    let new = at(50, 0);
    let done = [RunState::Running, RunState::Succeeded];
    let old_done = run_through(&store, "a", old, None, &done);
    let old_skipped = run_through(&store, "a", old, None, &[RunState::Skipped]);
    let new_done = run_through(&store, "a", new, None, &done);
    // An old cascade root that finished, with a member still running: the root stays.
    let root = {
        let new_run = NewRun {
            downstream: true,
            ..scheduled("root", old)
        };
        let root = store
            .enqueue(
                &NewRun {
                    trigger: Trigger::Manual,
                    ..new_run
                },
                old,
            )
            .unwrap();
        let attempt = store
            .transition(
                root,
                Attempt(0),
                RunState::Queued,
                RunState::Running,
                &Change::default(),
                old,
            )
            .unwrap();
        store
            .transition(
                root,
                attempt,
                RunState::Running,
                RunState::Succeeded,
                &Change::default(),
                old,
            )
            .unwrap();
        root
    };
    let member = run_through(&store, "member", new, Some(root), &[RunState::Running]);
    let old_queued = run_through(&store, "a", old, None, &[]);
    let cutoff = at(30, 0);

    let preview = store.prune(cutoff, true).unwrap();
    assert_eq!(
        store.row_counts().unwrap().runs,
        6,
        "a dry run removes nothing"
    );
    let pruned = store.prune(cutoff, false).unwrap();
    assert_eq!(pruned, preview, "the dry run said what would go");
    // Only finished runs older than the cutoff go; the old queued one and the referenced
    // root stay.
    assert_eq!(pruned.runs, 2);
    assert_eq!(pruned.attempts, 1);
    for gone in [old_done, old_skipped] {
        assert!(store.run(gone).unwrap().is_none());
    }
    for kept in [new_done, root, member, old_queued] {
        assert!(store.run(kept).unwrap().is_some(), "run {kept} kept");
    }
    assert!(store
        .events_after(0, 1000)
        .unwrap()
        .iter()
        .all(|e| e.run_id != Some(old_done)));
    assert!(
        store
            .events_after(0, 1000)
            .unwrap()
            .iter()
            .any(|e| e.run_id == Some(root)),
        "a kept run keeps its events"
    );
}

#[test]
fn a_backup_is_a_valid_database_with_the_same_rows() {
    let (dir, store) = open();
    for second in 0..20 {
        let run = store
            .claim_fire(&scheduled("a", at(second, 0)), at(second, 1), None)
            .unwrap();
        store
            .transition(
                run,
                Attempt(0),
                RunState::Queued,
                RunState::Running,
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
    assert_eq!(row_counts(&copy).unwrap(), store.row_counts().unwrap());
    assert_eq!(store.row_counts().unwrap().runs, 20);
}

/// Reports `(seconds after 12:00:00 in ms, percent, phase)` for `run` at `attempt`, then
/// returns the messages of its `run_progress` events.
fn report_progress(
    store: &Store,
    run: RunId,
    attempt: Attempt,
    reports: &[(i64, f64, Option<&str>)],
) -> Vec<String> {
    for (millis, percent, phase) in reports {
        let now = at(0, 0) + chrono::Duration::milliseconds(*millis);
        assert!(store
            .record_progress(run, attempt, *percent, *phase, now)
            .unwrap());
    }
    progress_messages(store, run)
}

fn progress_messages(store: &Store, run: RunId) -> Vec<String> {
    store
        .events_after(0, 100_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "run_progress" && e.run_id == Some(run))
        .map(|e| e.message)
        .collect()
}

fn start(store: &Store, run: RunId, attempt: Attempt, from: RunState) -> Attempt {
    store
        .transition(
            run,
            attempt,
            from,
            RunState::Running,
            &Change::default(),
            at(0, 0),
        )
        .unwrap()
}

/// Issue "One room per job", item 7: a handler reporting progress a thousand times wrote
/// a thousand event rows.
#[test]
fn a_thousand_progress_reports_in_a_second_append_one_event_and_the_row_stays_current() {
    let (_dir, store) = open();
    let run = claim(&store, "train");
    let attempt = start(&store, run, Attempt(0), RunState::Queued);
    let reports: Vec<(i64, f64, Option<&str>)> = (0..1000)
        .map(|i: i32| (i64::from(i), f64::from(i) / 10.0, Some("fit")))
        .collect();
    assert_eq!(
        report_progress(&store, run, attempt, &reports),
        vec!["0% fit"]
    );
    let row = store.run(run).unwrap().unwrap();
    assert_eq!(
        (row.progress, row.phase.as_deref()),
        (Some(99.9), Some("fit")),
        "the run row has every report"
    );
    // A second later, 100 % is a step of its own.
    assert_eq!(
        report_progress(&store, run, attempt, &[(1000, 100.0, None)]),
        vec!["0% fit", "100% fit"]
    );
}

#[test]
fn a_progress_event_marks_a_new_step_or_phase_at_most_once_a_second() {
    let (_dir, store) = open();
    let run = claim(&store, "train");
    let attempt = start(&store, run, Attempt(0), RunState::Queued);
    let messages = report_progress(
        &store,
        run,
        attempt,
        &[
            (0, 1.0, Some("load")),    // the attempt's first report: always
            (2000, 4.9, None),         // same 5 % step, same phase: no
            (3000, 5.0, None),         // a new step: yes
            (3500, 12.0, None),        // a new step, but within a second: no…
            (3600, 13.0, Some("fit")), // …nor a new phase…
            (4500, 14.0, Some("fit")), // …which the next report a second on carries
            (9000, 14.5, Some("fit")), // nothing new since the last event: no
        ],
    );
    assert_eq!(messages, vec!["1% load", "5% load", "14% fit"]);
    let row = store.run(run).unwrap().unwrap();
    assert_eq!(
        (row.progress, row.phase.as_deref()),
        (Some(14.5), Some("fit"))
    );

    // A new attempt starts its own count: its first report is an event again.
    store
        .transition(
            run,
            attempt,
            RunState::Running,
            RunState::RetryWait,
            &Change::default(),
            at(10, 0),
        )
        .unwrap();
    let second = start(&store, run, attempt, RunState::RetryWait);
    assert!(
        !store
            .record_progress(run, attempt, 50.0, None, at(20, 0))
            .unwrap(),
        "a stale attempt's report is ignored"
    );
    assert_eq!(
        report_progress(&store, run, second, &[(9100, 14.5, Some("fit"))]),
        vec!["1% load", "5% load", "14% fit", "14% fit"]
    );
}

/// The plan SQLite chooses for `sql`, one line per step.
fn plan(store: &Store, sql: &str) -> String {
    let connection = store.lock();
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

/// Issue "One room per job", item 7: `/health` and prune scanned the whole event log.
#[test]
fn event_queries_search_an_index_instead_of_scanning_the_log() {
    let (_dir, store) = open();
    let health = plan(&store, COUNT_EVENTS);
    assert!(
        health.contains("SEARCH events USING COVERING INDEX events_kind_at (kind=? AND at>?)"),
        "{health}"
    );
    for statement in [
        format!("SELECT COUNT(*) {}", old_events()),
        format!("DELETE {}", old_events()),
    ] {
        let prune = plan(&store, &statement);
        assert!(
            prune.contains("SEARCH events USING INDEX events_at (at<?)"),
            "{statement}:\n{prune}"
        );
        assert!(!prune.contains("SCAN events"), "{statement}:\n{prune}");
    }
    let stream = plan(&store, EVENTS_AFTER);
    assert!(
        stream.contains("SEARCH events USING INTEGER PRIMARY KEY (rowid>?)"),
        "{stream}"
    );
    // The benchmark's start-up probe (`bench.rs`).
    let first_start = plan(
        &store,
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

/// Issue "One room per job", item 7: `runs.version` was written and never read.
#[test]
fn a_new_database_has_no_run_version_and_indexes_its_events() {
    let (_dir, store) = open();
    let connection = store.lock();
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
        let store = Store::open(&path).unwrap();
        {
            let connection = store.lock();
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
        assert_eq!(
            store.run(RunId(7)).unwrap().unwrap().state,
            RunState::Queued
        );
        let health = plan(&store, COUNT_EVENTS);
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
            RunId(7),
            attempt,
            RunState::Running,
            RunState::Succeeded,
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
