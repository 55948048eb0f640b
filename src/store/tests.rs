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
