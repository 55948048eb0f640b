//! What every store backend guarantees, written once against [`Store`] (the façade over
//! any [`Backend`](super::Backend)) and run on each: a backend is done when this suite is
//! green on it. Each guarantee is a function taking `open`, which hands out another
//! `Store` over one fresh database each time it is called — as another process would
//! see it; [`conformance_suite!`] makes them `#[test]`s for a backend (SQLite below:
//! `conformance::sqlite::*`; PostgreSQL: `conformance::postgres::*`, each test on a
//! database of its own on the server `.ci/run` starts). A new backend adds one line: `conformance_suite!(name,
//! fresh_database)`.
//!
//! The guarantees:
//! 1. A scheduled or catch-up tick is claimed once per (task, tick), whatever process
//!    claims it; the loser gets `AlreadyClaimed`. Manual runs at the same instant are not
//!    claims. (`a_tick_is_claimed_once_whatever_process_claims`,
//!    `manual_runs_at_the_same_instant_are_not_claims`)
//! 2. A run walks through its states one fenced move at a time: entering `running` opens
//!    an attempts row (attempt + 1), leaving it closes that row with its outcome; each
//!    move appends one event, in order, with no gap in the sequence; instants keep their
//!    microseconds. (`a_run_walks_through_its_states_with_one_event_each`)
//! 3. An illegal move is refused (`IllegalTransition`) and writes nothing.
//!    (`an_illegal_move_is_refused_and_writes_nothing`)
//! 4. A stale (state, attempt) changes nothing and says `Fenced` with what it found; a
//!    replaced attempt's late reports are ignored. (`a_stale_attempt_is_fenced_off`)
//! 5. An attempt cut short (`running → queued`, as at shutdown) is closed as
//!    `interrupted` and refunded (`max_attempts` + 1), and its run loses its owner; the
//!    next start is the next attempt, without the last one's progress.
//!    (`an_interrupted_attempt_goes_back_to_the_queue_refunded`)
//! 6. A failed transaction writes nothing — no run, no move, no attempt, no event, no
//!    task state — and leaves no gap in the event sequence.
//!    (`a_failed_transaction_writes_nothing`)
//! 7. A refusal inside a transaction (`AlreadyClaimed`, `Fenced`, `IllegalTransition`)
//!    writes nothing for that operation and leaves the others of the transaction intact.
//!    (`a_refusal_inside_a_transaction_leaves_the_rest_of_it`)
//! 8. A heartbeat refreshes its instance and the running runs it owns, and nothing else.
//!    (`a_heartbeat_refreshes_the_running_runs_of_its_owner`)
//! 9. Live instances are those not stopped whose heartbeat is within the timeout.
//!    (`live_instances_are_those_beating_and_not_stopped`)
//! 10. Aborting a queued run is immediate; aborting a running one sets a flag its owner
//!     reads; a finished one says how it finished; an unknown one is `NotFound`.
//!     (`abort_stops_a_queued_run_at_once_and_flags_a_running_one`)
//! 11. Prune removes finished runs before the cutoff, their attempts and old events, but
//!     keeps what a running cascade references; a dry run removes nothing and counts the
//!     same. (`prune_removes_old_history_but_keeps_what_a_running_cascade_references`)
//! 12. Next-fire and pause state persist across a reopen.
//!     (`pause_and_next_fire_survive_a_reopen`)
//! 13. Progress: the run row takes every report; a `run_progress` event is appended only
//!     for news — the attempt's first report, then a new 5 % step or phase, at most once a
//!     second — and a stale attempt's report is ignored.
//!     (`a_thousand_progress_reports_in_a_second_append_one_event_and_the_row_stays_current`,
//!     `a_progress_event_marks_a_new_step_or_phase_at_most_once_a_second`)
//! 14. The compare-and-set on next fires: a holder of a task's schedule row sees the next
//!     fire and schedule key another instance wrote before it, so an instance that
//!     planned from an older value sees it moved and fires nothing; a task without a row
//!     is held as an empty one. (`a_next_fire_advanced_by_another_instance_is_what_the_next_holder_sees`)
//! 15. One attempt per task at a time, across every handle on the database: starting a
//!     second run of a task while one runs is `TaskBusy` naming the running one, and
//!     writes nothing; once that one ends, the other starts.
//!     (`a_task_runs_one_attempt_at_a_time_across_instances`)
//! 16. The database's clock: `None` for an embedded database (its time is the local
//!     clock), else the server's time now. (`the_database_clock_is_the_servers_time_now`)
//! 17. Each event names the instance whose store handle wrote it (`Store::written_by`),
//!     none for a handle writing for nobody (the CLI): one event stream for a cluster.
//!     (`each_event_names_the_instance_that_wrote_it`)
//! 18. The newest event of some kinds, about a task and/or a run, is found whoever wrote
//!     it; none when there is none (how `deadline_missed` is raised once across restarts
//!     and instances, and how a paused task's open circuit is told from a pause).
//!     (`the_latest_event_of_some_kinds_about_a_task_or_run_is_found`)
//! 19. Alert deliveries: one per alert and event however often (and by however many
//!     instances) they are derived; an alert's cursor never moves back.
//!     (`an_alert_delivery_is_derived_once_and_its_cursor_never_moves_back`)
//! 20. A delivery is held by one instance at a time: another instance's claim skips it
//!     until the holder records its outcome or the claim lapses; an outcome recorded by
//!     an instance that does not hold it changes nothing; a retry is due at its time, a
//!     delivered one never again; attempts, status and error are kept.
//!     (`a_delivery_is_claimed_by_one_instance_and_its_attempts_are_recorded`)
//! 21. A run's own params are kept as given, and a run without them has none.
//!     (`a_runs_own_params_are_kept_as_given`)
//! 22. A batch of claims (`claim_fires`) is each claim in order: a tick claimed already
//!     is `None` and writes nothing, the others are queued runs with ids in the batch's
//!     order, one `run_queued` event each in that order with no gap in the sequence, and
//!     each task ends with its last tick claimed and its next fire.
//!     (`a_batch_of_claims_is_each_claim_in_order`)
//! 23. A batch of starts (`transitions`) is each start in order: a run whose task runs
//!     elsewhere is `TaskBusy`, a stale one `Fenced`, both writing nothing; the others
//!     enter `running` at the next attempt with their owner, an open attempts row and one
//!     `run_started` event each, in the batch's order with no gap in the sequence.
//!     (`a_batch_of_starts_is_each_start_in_order`)
//! 24. A batch of moves that start nothing (`finishes`: attempts ending, a queued run
//!     skipped) writes exactly what the same moves one by one write — runs, attempts rows, events in order — and a stale one is `Fenced` and
//!     writes nothing. (`a_batch_of_finishes_writes_what_the_moves_one_by_one_write`)
//! 25. Starting a schedule (`start_schedule`, an instance's start-up) never undoes a
//!     peer: a row that holds the same schedule key keeps its next fire (another instance
//!     started it, or fired from it, since this one read it) and that next fire is the
//!     answer; a row without a key, with another one, or without a next fire takes the
//!     new next fire and key.
//!     (`starting_a_schedule_keeps_the_next_fire_a_peer_stored_under_the_same_key`)
//! 26. An event written once (`hold_events` then `record_event`: a `deadline_missed` per
//!     run, a `circuit_opened` per opening) is written once however many handles check
//!     and write it at the same instant; the answer is the kind of the newest of the
//!     kinds asked about that subject, none for another subject.
//!     (`an_event_checked_and_written_by_many_handles_at_once_is_written_once`)
//! 27. A batch of pids (`record_pids`, the children one dispatch spawned) writes what
//!     `record_pid` one by one writes: each attempt's pid and spawn instant, the run's
//!     pid; an attempt no longer current is `false` and its run keeps its pid.
//!     (`a_batch_of_pids_writes_what_each_pid_writes`)
//! 28. Ticks claimed and started in one transaction (`claim_fires`, then `transitions` of
//!     the runs it just queued: how the engine starts a tick that can start at once)
//!     commit both or neither: the runs enter `running` at attempt 1 with their owner
//!     and an open attempts row, each with `run_queued` then `run_started` in the
//!     sequence; a task running elsewhere is `TaskBusy` and its run stays claimed and
//!     queued; a transaction that fails after them leaves no run and no event.
//!     (`ticks_claimed_and_started_in_one_transaction_commit_together`)

use chrono::{TimeZone, Utc};

use super::{
    AbortOutcome, Change, DeliveryOutcome, Move, NewDelivery, NewRun, RunFilter, Store, StoreError,
};
use crate::model::{Attempt, Instant, RunId, RunState, TaskName, Trigger};

/// Hands out another [`Store`] over the one database of a test, each call a new handle
/// (connection, pool) onto the same data.
pub(crate) type Open<'a> = &'a dyn Fn() -> Store;

/// Makes every guarantee a `#[test]` in module `$backend`, each on a database of its own
/// from `$fresh()`, which returns `(guard, open)`: the guard keeps the database alive
/// until the test ends, `open` is the test's [`Open`].
macro_rules! conformance_suite {
    ($backend:ident, $fresh:ident) => {
        conformance_suite!(
            @tests $backend, $fresh;
            a_tick_is_claimed_once_whatever_process_claims,
            manual_runs_at_the_same_instant_are_not_claims,
            a_run_walks_through_its_states_with_one_event_each,
            an_illegal_move_is_refused_and_writes_nothing,
            a_stale_attempt_is_fenced_off,
            an_interrupted_attempt_goes_back_to_the_queue_refunded,
            a_failed_transaction_writes_nothing,
            a_refusal_inside_a_transaction_leaves_the_rest_of_it,
            a_heartbeat_refreshes_the_running_runs_of_its_owner,
            live_instances_are_those_beating_and_not_stopped,
            abort_stops_a_queued_run_at_once_and_flags_a_running_one,
            prune_removes_old_history_but_keeps_what_a_running_cascade_references,
            pause_and_next_fire_survive_a_reopen,
            a_thousand_progress_reports_in_a_second_append_one_event_and_the_row_stays_current,
            a_progress_event_marks_a_new_step_or_phase_at_most_once_a_second,
            a_next_fire_advanced_by_another_instance_is_what_the_next_holder_sees,
            a_task_runs_one_attempt_at_a_time_across_instances,
            the_database_clock_is_the_servers_time_now,
            each_event_names_the_instance_that_wrote_it,
            the_latest_event_of_some_kinds_about_a_task_or_run_is_found,
            an_alert_delivery_is_derived_once_and_its_cursor_never_moves_back,
            a_delivery_is_claimed_by_one_instance_and_its_attempts_are_recorded,
            a_runs_own_params_are_kept_as_given,
            a_batch_of_claims_is_each_claim_in_order,
            a_batch_of_starts_is_each_start_in_order,
            a_batch_of_finishes_writes_what_the_moves_one_by_one_write,
            starting_a_schedule_keeps_the_next_fire_a_peer_stored_under_the_same_key,
            an_event_checked_and_written_by_many_handles_at_once_is_written_once,
            a_batch_of_pids_writes_what_each_pid_writes,
            ticks_claimed_and_started_in_one_transaction_commit_together,
        );
    };
    (@tests $backend:ident, $fresh:ident; $($guarantee:ident),* $(,)?) => {
        mod $backend {
            $(
                #[test]
                fn $guarantee() {
                    let (_database, open) = super::$fresh();
                    super::$guarantee(&open);
                }
            )*
        }
    };
}

conformance_suite!(sqlite, fresh_sqlite);

/// A SQLite file in a temporary folder (in a folder yet to be made: `open` creates it).
fn fresh_sqlite() -> (tempfile::TempDir, impl Fn() -> Store) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/runs.db");
    (dir, move || Store::open(&path).unwrap())
}

conformance_suite!(postgres, fresh_postgres);

/// A PostgreSQL database of its own (`ts_<random>`, dropped with the guard), opened as
/// the `database` setting would: through its URL.
fn fresh_postgres() -> (super::postgres::ScratchDatabase, impl Fn() -> Store) {
    let database = super::postgres::ScratchDatabase::create();
    let url = std::path::PathBuf::from(database.url());
    (database, move || Store::open(&url).unwrap())
}

pub(super) fn at(second: u32, micros: i64) -> Instant {
    Utc.with_ymd_and_hms(2026, 6, 1, 12, 0, second).unwrap()
        + chrono::Duration::microseconds(micros)
}

pub(super) fn scheduled(task: &str, tick: Instant) -> NewRun {
    NewRun {
        task: TaskName::from(task),
        trigger: Trigger::Schedule,
        scheduled_for: tick,
        max_attempts: 2,
        force: false,
        downstream: false,
        cascade: None,
        params: None,
    }
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

pub(crate) fn a_tick_is_claimed_once_whatever_process_claims(open: Open<'_>) {
    let store = open();
    let run = store
        .claim_fire(&scheduled("ingest", at(0, 0)), at(0, 10), Some(at(1, 0)))
        .unwrap();
    let other = open();
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
    let all = RunFilter {
        limit: 100,
        ..RunFilter::default()
    };
    assert_eq!(store.runs(&all).unwrap().len(), 3);
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

pub(crate) fn manual_runs_at_the_same_instant_are_not_claims(open: Open<'_>) {
    let store = open();
    let manual = NewRun {
        trigger: Trigger::Manual,
        ..scheduled("ingest", at(0, 0))
    };
    store.enqueue(&manual, at(0, 0)).unwrap();
    store.enqueue(&manual, at(0, 0)).unwrap();
    assert_eq!(store.ids_in_states(&[RunState::Queued]).unwrap().len(), 2);
}

pub(crate) fn a_run_walks_through_its_states_with_one_event_each(open: Open<'_>) {
    let store = open();
    let run = claim(&store, "ingest");
    let owner = Change {
        owner: Some("me".into()),
        ..Change::default()
    };
    let first = store
        .transition(
            &Move {
                run,
                attempt: Attempt(0),
                from: RunState::Queued,
                to: RunState::Running,
            },
            &owner,
            at(0, 123_456),
        )
        .unwrap();
    assert_eq!(first, Attempt(1));
    let opened = store.attempts(run).unwrap();
    assert_eq!(opened.len(), 1, "entering running opens an attempts row");
    assert_eq!(
        (
            opened[0].attempt,
            opened[0].started_at,
            opened[0].finished_at
        ),
        (Attempt(1), at(0, 123_456), None)
    );
    let failed = Change {
        exit_code: Some(3),
        error: Some("boom".into()),
        next_attempt_at: Some(at(5, 0)),
        ..Change::default()
    };
    store
        .transition(
            &Move {
                run,
                attempt: first,
                from: RunState::Running,
                to: RunState::RetryWait,
            },
            &failed,
            at(1, 0),
        )
        .unwrap();
    let second = store
        .transition(
            &Move {
                run,
                attempt: first,
                from: RunState::RetryWait,
                to: RunState::Running,
            },
            &owner,
            at(5, 1),
        )
        .unwrap();
    assert_eq!(second, Attempt(2));
    store
        .transition(
            &Move {
                run,
                attempt: second,
                from: RunState::Running,
                to: RunState::Succeeded,
            },
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
        seqs.windows(2).all(|w| w[0] + 1 == w[1]),
        "sequence numbers increase without a gap: {seqs:?}"
    );
}

pub(crate) fn an_illegal_move_is_refused_and_writes_nothing(open: Open<'_>) {
    let store = open();
    let run = claim(&store, "ingest");
    let result = store.transition(
        &Move {
            run,
            attempt: Attempt(0),
            from: RunState::Queued,
            to: RunState::Succeeded,
        },
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

pub(crate) fn a_stale_attempt_is_fenced_off(open: Open<'_>) {
    let store = open();
    let run = claim(&store, "drift");
    let first = store
        .transition(
            &Move {
                run,
                attempt: Attempt(0),
                from: RunState::Queued,
                to: RunState::Running,
            },
            &Change::default(),
            at(1, 0),
        )
        .unwrap();
    store
        .transition(
            &Move {
                run,
                attempt: first,
                from: RunState::Running,
                to: RunState::Orphaned,
            },
            &Change::default(),
            at(2, 0),
        )
        .unwrap();
    store
        .transition(
            &Move {
                run,
                attempt: first,
                from: RunState::Orphaned,
                to: RunState::Queued,
            },
            &Change::default(),
            at(2, 1),
        )
        .unwrap();
    let second = store
        .transition(
            &Move {
                run,
                attempt: first,
                from: RunState::Queued,
                to: RunState::Running,
            },
            &Change::default(),
            at(3, 0),
        )
        .unwrap();
    // The first attempt's worker reports late: it must not overwrite attempt 2.
    let late = store.transition(
        &Move {
            run,
            attempt: first,
            from: RunState::Running,
            to: RunState::Succeeded,
        },
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
    assert!(!store
        .batch(|tx| tx.record_result(run, first, "{\"late\":true}"))
        .unwrap());
    assert!(store
        .batch(|tx| tx.record_result(run, second, "{\"ok\":true}"))
        .unwrap());
    assert_eq!(
        store.run(run).unwrap().unwrap().result.as_deref(),
        Some("{\"ok\":true}")
    );
    let outcomes: Vec<_> = store
        .attempts(run)
        .unwrap()
        .into_iter()
        .map(|a| a.outcome)
        .collect();
    assert_eq!(
        outcomes,
        vec![Some("orphaned".to_string()), None],
        "the orphaned attempt is closed, its successor open"
    );
}

pub(crate) fn an_interrupted_attempt_goes_back_to_the_queue_refunded(open: Open<'_>) {
    let store = open();
    let run = claim(&store, "train");
    let owner = Change {
        owner: Some("me".into()),
        ..Change::default()
    };
    let first = start_with(&store, run, Attempt(0), &owner, at(1, 0));
    store
        .batch(|tx| tx.record_progress(run, first, 40.0, Some("fit"), at(2, 0)))
        .unwrap();
    let shutdown = Change {
        reason: Some("shutdown".into()),
        refund_attempt: true,
        ..Change::default()
    };
    let back = Move {
        run,
        attempt: first,
        from: RunState::Running,
        to: RunState::Queued,
    };
    assert_eq!(store.transition(&back, &shutdown, at(3, 0)).unwrap(), first);
    let row = store.run(run).unwrap().unwrap();
    assert_eq!((row.state, row.attempt), (RunState::Queued, first));
    assert_eq!(row.max_attempts, 3, "an attempt cut short does not count");
    assert_eq!(row.owner, None, "a queued run has no owner");
    assert_eq!(row.finished_at, None);
    let attempts = store.attempts(run).unwrap();
    assert_eq!(attempts[0].outcome.as_deref(), Some("interrupted"));
    assert_eq!(attempts[0].finished_at, Some(at(3, 0)));
    let second = start_with(&store, run, first, &owner, at(4, 0));
    assert_eq!(second, Attempt(2));
    let row = store.run(run).unwrap().unwrap();
    assert_eq!(
        (row.progress, row.owner.as_deref(), row.heartbeat_at),
        (None, Some("me"), Some(at(4, 0))),
        "a new attempt starts without the last one's progress"
    );
    assert_eq!(
        kinds(&store),
        vec![
            "run_queued",
            "run_started",
            "run_progress",
            "run_requeued",
            "run_started"
        ]
    );
}

/// Starts the queued run `run` (last attempt `attempt`) for `change.owner`.
fn start_with(
    store: &Store,
    run: RunId,
    attempt: Attempt,
    change: &Change,
    now: Instant,
) -> Attempt {
    let step = Move {
        run,
        attempt,
        from: RunState::Queued,
        to: RunState::Running,
    };
    store.transition(&step, change, now).unwrap()
}

pub(crate) fn abort_stops_a_queued_run_at_once_and_flags_a_running_one(open: Open<'_>) {
    let store = open();
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
            &Move {
                run: running,
                attempt: Attempt(0),
                from: RunState::Queued,
                to: RunState::Running,
            },
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

pub(crate) fn pause_and_next_fire_survive_a_reopen(open: Open<'_>) {
    let store = open();
    let task = TaskName::from("ingest");
    store.set_paused(&task, true, at(0, 0)).unwrap();
    store
        .set_next_fire(&task, Some(at(30, 0)), Some("*/30 * * * * * @ UTC"))
        .unwrap();
    drop(store);
    let reopened = open();
    let state = reopened.task_state(&task).unwrap();
    assert!(state.paused);
    assert_eq!(state.next_fire_at, Some(at(30, 0)));
    assert_eq!(state.schedule.as_deref(), Some("*/30 * * * * * @ UTC"));
    assert_eq!(kinds(&reopened), vec!["task_paused"]);
}

pub(crate) fn a_failed_transaction_writes_nothing(open: Open<'_>) {
    let store = open();
    let run = claim(&store, "ingest");
    let before = store.last_event_seq().unwrap();
    let task = TaskName::from("ingest");
    let failed: Result<(), StoreError> = store.batch(|tx| {
        tx.claim_fire(&scheduled("ingest", at(1, 0)), at(1, 1), Some(at(2, 0)))?;
        let step = Move {
            run,
            attempt: Attempt(0),
            from: RunState::Queued,
            to: RunState::Running,
        };
        tx.transition(&step, &Change::default(), at(1, 2))?;
        tx.record_event("misfire", Some("ingest"), None, "late", at(1, 3))?;
        tx.set_paused(&task, true, at(1, 4))?;
        Err(StoreError::NotFound(RunId(424_242)))
    });
    assert!(
        matches!(failed, Err(StoreError::NotFound(RunId(424_242)))),
        "{failed:?}"
    );
    let row = store.run(run).unwrap().unwrap();
    assert_eq!((row.state, row.attempt), (RunState::Queued, Attempt(0)));
    assert!(store.attempts(run).unwrap().is_empty());
    let all = RunFilter {
        limit: 100,
        ..RunFilter::default()
    };
    assert_eq!(store.runs(&all).unwrap().len(), 1);
    let state = store.task_state(&task).unwrap();
    assert!(!state.paused);
    assert_eq!(state.last_fire_at, Some(at(0, 0)));
    assert_eq!(state.next_fire_at, None);
    assert_eq!(store.last_event_seq().unwrap(), before);
    assert_eq!(kinds(&store), vec!["run_queued"]);
    // The tick it tried is still free, and the next event follows without a gap.
    store
        .claim_fire(&scheduled("ingest", at(1, 0)), at(1, 5), None)
        .unwrap();
    assert_eq!(store.last_event_seq().unwrap(), before + 1);
}

pub(crate) fn a_refusal_inside_a_transaction_leaves_the_rest_of_it(open: Open<'_>) {
    let store = open();
    let run = claim(&store, "ingest");
    let (next, again, fenced, illegal) = store
        .batch(|tx| {
            let next = tx.claim_fire(&scheduled("ingest", at(1, 0)), at(1, 1), Some(at(2, 0)))?;
            let again = tx.claim_fire(&scheduled("ingest", at(0, 0)), at(1, 2), Some(at(9, 0)));
            let stale = Move {
                run,
                attempt: Attempt(3),
                from: RunState::Queued,
                to: RunState::Running,
            };
            let fenced = tx.transition(&stale, &Change::default(), at(1, 3));
            let skip = Move {
                run,
                attempt: Attempt(0),
                from: RunState::Queued,
                to: RunState::Succeeded,
            };
            let illegal = tx.transition(&skip, &Change::default(), at(1, 4));
            tx.record_event("note", Some("ingest"), None, "after the refusals", at(1, 5))?;
            Ok((next, again, fenced, illegal))
        })
        .unwrap();
    assert!(
        matches!(again, Err(StoreError::AlreadyClaimed { .. })),
        "{again:?}"
    );
    match fenced {
        Err(StoreError::Fenced {
            found_state,
            found_attempt,
            ..
        }) => assert_eq!((found_state, found_attempt), (RunState::Queued, Attempt(0))),
        other => panic!("expected Fenced, got {other:?}"),
    }
    assert!(
        matches!(illegal, Err(StoreError::IllegalTransition { .. })),
        "{illegal:?}"
    );
    assert_eq!(store.run(next).unwrap().unwrap().state, RunState::Queued);
    let row = store.run(run).unwrap().unwrap();
    assert_eq!((row.state, row.attempt), (RunState::Queued, Attempt(0)));
    let state = store.task_state(&TaskName::from("ingest")).unwrap();
    assert_eq!(
        (state.last_fire_at, state.next_fire_at),
        (Some(at(1, 0)), Some(at(2, 0))),
        "the refused claim moved nothing on"
    );
    assert_eq!(kinds(&store), vec!["run_queued", "run_queued", "note"]);
}

pub(crate) fn a_heartbeat_refreshes_the_running_runs_of_its_owner(open: Open<'_>) {
    let store = open();
    store
        .register_instance("mine", 1, "host", true, at(0, 0))
        .unwrap();
    store
        .register_instance("theirs", 2, "host", true, at(0, 0))
        .unwrap();
    let start_as = |task: &str, owner: &str| {
        let run = store
            .claim_fire(&scheduled(task, at(0, 0)), at(0, 1), None)
            .unwrap();
        let change = Change {
            owner: Some(owner.into()),
            ..Change::default()
        };
        let step = Move {
            run,
            attempt: Attempt(0),
            from: RunState::Queued,
            to: RunState::Running,
        };
        store.transition(&step, &change, at(1, 0)).unwrap();
        run
    };
    let running = start_as("a", "mine");
    let finished = start_as("b", "mine");
    let step = Move {
        run: finished,
        attempt: Attempt(1),
        from: RunState::Running,
        to: RunState::Succeeded,
    };
    store
        .transition(&step, &Change::default(), at(2, 0))
        .unwrap();
    let others = start_as("c", "theirs");
    let queued = claim(&store, "d");

    store.heartbeat("mine", at(40, 0)).unwrap();
    let beat = |run| store.run(run).unwrap().unwrap().heartbeat_at;
    assert_eq!(beat(running), Some(at(40, 0)));
    assert_eq!(
        beat(finished),
        Some(at(1, 0)),
        "a finished run keeps its last"
    );
    assert_eq!(
        beat(others),
        Some(at(1, 0)),
        "another owner's run is not refreshed"
    );
    assert_eq!(beat(queued), None);
    assert_eq!(
        store.instance("mine").unwrap().unwrap().heartbeat_at,
        at(40, 0)
    );
    assert_eq!(
        store.instance("theirs").unwrap().unwrap().heartbeat_at,
        at(0, 0)
    );
}

pub(crate) fn live_instances_are_those_beating_and_not_stopped(open: Open<'_>) {
    let store = open();
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
        params: None,
    };
    let run = store.enqueue(&new_run, queued).unwrap();
    let (mut from, mut attempt) = (RunState::Queued, Attempt(0));
    for to in states {
        attempt = store
            .transition(
                &Move {
                    run,
                    attempt,
                    from,
                    to: *to,
                },
                &Change::default(),
                queued,
            )
            .unwrap();
        from = *to;
    }
    run
}

pub(crate) fn prune_removes_old_history_but_keeps_what_a_running_cascade_references(
    open: Open<'_>,
) {
    let store = open();
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
                &Move {
                    run: root,
                    attempt: Attempt(0),
                    from: RunState::Queued,
                    to: RunState::Running,
                },
                &Change::default(),
                old,
            )
            .unwrap();
        store
            .transition(
                &Move {
                    run: root,
                    attempt,
                    from: RunState::Running,
                    to: RunState::Succeeded,
                },
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
        store
            .runs(&RunFilter {
                limit: 100,
                ..RunFilter::default()
            })
            .unwrap()
            .len(),
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

/// Reports `(seconds after 12:00:00 in ms, percent, phase)` for `run` at `attempt`, then
/// returns the messages of its `run_progress` events.
pub(super) fn report_progress(
    store: &Store,
    run: RunId,
    attempt: Attempt,
    reports: &[(i64, f64, Option<&str>)],
) -> Vec<String> {
    for (millis, percent, phase) in reports {
        let now = at(0, 0) + chrono::Duration::milliseconds(*millis);
        assert!(store
            .batch(|tx| tx.record_progress(run, attempt, *percent, *phase, now))
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

pub(super) fn start(store: &Store, run: RunId, attempt: Attempt, from: RunState) -> Attempt {
    store
        .transition(
            &Move {
                run,
                attempt,
                from,
                to: RunState::Running,
            },
            &Change::default(),
            at(0, 0),
        )
        .unwrap()
}

/// Issue "One room per job", item 7: a handler reporting progress a thousand times wrote
/// a thousand event rows.
pub(crate) fn a_thousand_progress_reports_in_a_second_append_one_event_and_the_row_stays_current(
    open: Open<'_>,
) {
    let store = open();
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
    // A run that succeeded is at 100 % and in no phase any more.
    let done = Move {
        run,
        attempt,
        from: RunState::Running,
        to: RunState::Succeeded,
    };
    store
        .transition(&done, &Change::default(), at(59, 0))
        .unwrap();
    let row = store.run(run).unwrap().unwrap();
    assert_eq!((row.progress, row.phase), (Some(100.0), None));
}

pub(crate) fn a_progress_event_marks_a_new_step_or_phase_at_most_once_a_second(open: Open<'_>) {
    let store = open();
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
            &Move {
                run,
                attempt,
                from: RunState::Running,
                to: RunState::RetryWait,
            },
            &Change::default(),
            at(10, 0),
        )
        .unwrap();
    let second = start(&store, run, attempt, RunState::RetryWait);
    assert!(
        !store
            .batch(|tx| tx.record_progress(run, attempt, 50.0, None, at(20, 0)))
            .unwrap(),
        "a stale attempt's report is ignored"
    );
    assert_eq!(
        report_progress(&store, run, second, &[(9100, 14.5, Some("fit"))]),
        vec!["1% load", "5% load", "14% fit", "14% fit"]
    );
}

pub(crate) fn a_next_fire_advanced_by_another_instance_is_what_the_next_holder_sees(
    open: Open<'_>,
) {
    let first = open();
    let second = open();
    let task = TaskName::from("ingest");
    let key = "* * * * * * @ UTC";
    first
        .set_next_fire(&task, Some(at(0, 0)), Some(key))
        .unwrap();
    // Both planned from 12:00:00. The first to hold the row fires that tick and moves
    // the next fire on, in the same transaction.
    let fired = first
        .batch(|tx| {
            let held = tx.hold_schedules(std::slice::from_ref(&task))?;
            let held = held.get(&task).cloned().unwrap_or_default();
            assert!(held.due);
            let state = held.state;
            assert_eq!(state.next_fire_at, Some(at(0, 0)));
            assert_eq!(state.schedule.as_deref(), Some(key));
            tx.claim_fire(&scheduled("ingest", at(0, 0)), at(0, 1), Some(at(1, 0)))
        })
        .unwrap();
    // The second holder sees the moved next fire, not the one it planned from.
    let seen = second
        .batch(|tx| tx.hold_schedules(std::slice::from_ref(&task)))
        .unwrap();
    let seen = &seen[&task].state;
    assert_eq!(seen.next_fire_at, Some(at(1, 0)));
    assert_eq!(seen.schedule.as_deref(), Some(key));
    assert_eq!(seen.last_fire_at, Some(at(0, 0)));
    assert_eq!(second.run(fired).unwrap().unwrap().state, RunState::Queued);
    // A task nobody has written is held as an empty row.
    let fresh = TaskName::from("never_seen");
    let held = second
        .batch(|tx| tx.hold_schedules(std::slice::from_ref(&fresh)))
        .unwrap();
    assert_eq!(held[&fresh].state.next_fire_at, None);
    assert_eq!(held[&fresh].state.schedule, None);
    assert!(held[&fresh].due);
}

pub(crate) fn a_task_runs_one_attempt_at_a_time_across_instances(open: Open<'_>) {
    let here = open();
    let there = open();
    let manual = NewRun {
        trigger: Trigger::Manual,
        ..scheduled("ingest", at(0, 0))
    };
    let first = here.enqueue(&manual, at(0, 0)).unwrap();
    let second = there.enqueue(&manual, at(0, 1)).unwrap();
    let start = |run| Move {
        run,
        attempt: Attempt(0),
        from: RunState::Queued,
        to: RunState::Running,
    };
    let owner = |name: &str| Change {
        owner: Some(name.into()),
        ..Change::default()
    };
    here.transition(&start(first), &owner("a"), at(1, 0))
        .unwrap();
    let events_before = here.last_event_seq().unwrap();
    let refused = there.transition(&start(second), &owner("b"), at(1, 1));
    match refused {
        Err(StoreError::TaskBusy { run, task, running }) => {
            assert_eq!((run, task.as_str(), running), (second, "ingest", first));
        }
        other => panic!("expected TaskBusy, got {other:?}"),
    }
    let row = there.run(second).unwrap().unwrap();
    assert_eq!(
        (row.state, row.attempt, row.owner),
        (RunState::Queued, Attempt(0), None)
    );
    assert!(there.attempts(second).unwrap().is_empty());
    assert_eq!(there.last_event_seq().unwrap(), events_before);
    // Another task is not held up.
    let other = there
        .enqueue(
            &NewRun {
                task: TaskName::from("train"),
                ..manual.clone()
            },
            at(1, 2),
        )
        .unwrap();
    there
        .transition(&start(other), &owner("b"), at(1, 3))
        .unwrap();
    // Once the first ends, the second starts.
    let finish = Move {
        run: first,
        attempt: Attempt(1),
        from: RunState::Running,
        to: RunState::Succeeded,
    };
    here.transition(&finish, &Change::default(), at(2, 0))
        .unwrap();
    assert_eq!(
        there
            .transition(&start(second), &owner("b"), at(2, 1))
            .unwrap(),
        Attempt(1)
    );
    // Each attempt names the instance that ran it.
    assert_eq!(here.attempts(first).unwrap()[0].owner.as_deref(), Some("a"));
    assert_eq!(
        here.attempts(second).unwrap()[0].owner.as_deref(),
        Some("b")
    );
}

pub(crate) fn the_database_clock_is_the_servers_time_now(open: Open<'_>) {
    let store = open();
    let before = Utc::now();
    let reading = store.database_now().unwrap();
    let after = Utc::now();
    match reading {
        // SQLite: the local clock is the database's.
        None => {}
        // The server runs on this machine in the tests: its clock is ours.
        Some(now) => {
            assert!(
                now >= before - chrono::Duration::seconds(1)
                    && now <= after + chrono::Duration::seconds(1),
                "database time {now} outside [{before}, {after}]"
            );
            let later = store.database_now().unwrap().unwrap();
            assert!(
                later >= now,
                "the server's clock went back: {now} then {later}"
            );
        }
    }
}

pub(crate) fn each_event_names_the_instance_that_wrote_it(open: Open<'_>) {
    let cli = open();
    let first = cli.written_by("instance-a");
    let second = open().written_by("instance-b");
    let run = first
        .claim_fire(&scheduled("ingest", at(0, 0)), at(0, 1), None)
        .unwrap();
    let start = Move {
        run,
        attempt: Attempt(0),
        from: RunState::Queued,
        to: RunState::Running,
    };
    second
        .transition(&start, &Change::default(), at(0, 2))
        .unwrap();
    cli.record_event("note", None, None, "by hand", at(0, 3))
        .unwrap();
    let events: Vec<(String, Option<String>)> = cli
        .events_after(0, 100)
        .unwrap()
        .into_iter()
        .map(|e| (e.kind, e.instance))
        .collect();
    assert_eq!(
        events,
        vec![
            ("run_queued".to_string(), Some("instance-a".to_string())),
            ("run_started".to_string(), Some("instance-b".to_string())),
            ("note".to_string(), None),
        ]
    );
}

pub(crate) fn the_latest_event_of_some_kinds_about_a_task_or_run_is_found(open: Open<'_>) {
    let one = open().written_by("instance-a");
    let other = open().written_by("instance-b");
    let run = one
        .claim_fire(&scheduled("ingest", at(0, 0)), at(0, 1), None)
        .unwrap();
    one.record_event(
        "circuit_opened",
        Some("ingest"),
        None,
        "3 failed runs in a row",
        at(0, 2),
    )
    .unwrap();
    other
        .record_event("task_resumed", Some("ingest"), None, "resumed", at(0, 3))
        .unwrap();
    other
        .record_event(
            "circuit_opened",
            Some("train"),
            None,
            "other task",
            at(0, 4),
        )
        .unwrap();
    other
        .record_event(
            "deadline_missed",
            Some("ingest"),
            Some(run),
            "late",
            at(0, 5),
        )
        .unwrap();
    let reader = open();
    let kinds = [
        "circuit_opened",
        "circuit_closed",
        "task_resumed",
        "task_paused",
    ];
    let newest = reader
        .latest_event(&kinds, Some("ingest"), None)
        .unwrap()
        .expect("an event");
    assert_eq!(
        (newest.kind.as_str(), newest.at, newest.instance.as_deref()),
        ("task_resumed", at(0, 3), Some("instance-b"))
    );
    let opened = reader
        .latest_event(&["circuit_opened"], Some("ingest"), None)
        .unwrap()
        .expect("an event");
    assert_eq!(
        (opened.message.as_str(), opened.task.as_deref()),
        ("3 failed runs in a row", Some("ingest"))
    );
    let missed = reader
        .latest_event(&["deadline_missed"], None, Some(run))
        .unwrap()
        .expect("an event");
    assert_eq!((missed.run_id, missed.at), (Some(run), at(0, 5)));
    assert!(reader
        .latest_event(&["deadline_missed"], None, Some(RunId(run.0 + 1000)))
        .unwrap()
        .is_none());
    assert!(reader
        .latest_event(&["circuit_closed"], Some("ingest"), None)
        .unwrap()
        .is_none());
}

fn delivery(seq: i64) -> NewDelivery {
    NewDelivery {
        event_seq: seq,
        kind: "run_failed".into(),
        task: Some("ingest".into()),
        run_id: Some(RunId(seq)),
        payload: format!("{{\"seq\": {seq}}}"),
    }
}

pub(crate) fn an_alert_delivery_is_derived_once_and_its_cursor_never_moves_back(open: Open<'_>) {
    let (a, b) = (open(), open());
    let now = at(0, 0);
    assert_eq!(a.alert_cursor("ops").unwrap(), None);
    a.batch(|tx| tx.add_deliveries("ops", &[], 3, now)).unwrap();
    assert_eq!(b.alert_cursor("ops").unwrap(), Some(3));
    // Two instances derive the same events: one delivery each.
    a.batch(|tx| tx.add_deliveries("ops", &[delivery(4), delivery(6)], 6, now))
        .unwrap();
    b.batch(|tx| tx.add_deliveries("ops", &[delivery(4), delivery(6)], 6, now))
        .unwrap();
    // A late deriver with an older view does not move the cursor back.
    b.batch(|tx| tx.add_deliveries("ops", &[delivery(4)], 4, now))
        .unwrap();
    // Another alert has its own deliveries and cursor.
    b.batch(|tx| tx.add_deliveries("pager", &[delivery(6)], 9, now))
        .unwrap();
    assert_eq!(a.alert_cursor("ops").unwrap(), Some(6));
    assert_eq!(a.alert_cursor("pager").unwrap(), Some(9));
    let rows = a.alert_deliveries(10).unwrap();
    let keys: Vec<(String, i64, &str, u32)> = rows
        .iter()
        .map(|r| (r.alert.clone(), r.event_seq, r.state.as_str(), r.attempts))
        .collect();
    assert_eq!(
        keys,
        [
            ("ops".to_string(), 6, "pending", 0),
            ("pager".to_string(), 6, "pending", 0),
            ("ops".to_string(), 4, "pending", 0),
        ]
    );
    assert_eq!(rows[2].payload, "{\"seq\": 4}");
    assert_eq!(rows[2].run_id, Some(RunId(4)));
    assert_eq!(rows[2].next_attempt_at, now);
}

pub(crate) fn a_delivery_is_claimed_by_one_instance_and_its_attempts_are_recorded(open: Open<'_>) {
    let (a, b) = (open(), open());
    a.batch(|tx| tx.add_deliveries("ops", &[delivery(1), delivery(2)], 2, at(0, 0)))
        .unwrap();
    let held = a
        .batch(|tx| tx.claim_deliveries("instance-a", at(1, 0), at(31, 0), 1))
        .unwrap();
    assert_eq!(held.iter().map(|d| d.event_seq).collect::<Vec<_>>(), [1]);
    // The other instance gets the other one only, and nothing more while both are held.
    let other = b
        .batch(|tx| tx.claim_deliveries("instance-b", at(1, 0), at(31, 0), 10))
        .unwrap();
    assert_eq!(other.iter().map(|d| d.event_seq).collect::<Vec<_>>(), [2]);
    assert!(b
        .batch(|tx| tx.claim_deliveries("instance-b", at(2, 0), at(32, 0), 10))
        .unwrap()
        .is_empty());
    // Only the holder records an outcome.
    let retry = DeliveryOutcome::Retry {
        status: Some(500),
        error: "the endpoint answered 500".into(),
        at: at(5, 0),
    };
    assert!(!b
        .batch(|tx| tx.record_delivery("ops", 1, "instance-b", &retry, at(2, 0)))
        .unwrap());
    assert!(a
        .batch(|tx| tx.record_delivery("ops", 1, "instance-a", &retry, at(2, 0)))
        .unwrap());
    // Not due before its retry time; due at it, for anyone.
    assert!(b
        .batch(|tx| tx.claim_deliveries("instance-b", at(4, 0), at(34, 0), 10))
        .unwrap()
        .is_empty());
    let again = b
        .batch(|tx| tx.claim_deliveries("instance-b", at(5, 0), at(35, 0), 10))
        .unwrap();
    assert_eq!(again.iter().map(|d| d.event_seq).collect::<Vec<_>>(), [1]);
    assert_eq!(again[0].attempts, 1);
    assert_eq!(again[0].last_status, Some(500));
    assert!(b
        .batch(|tx| tx.record_delivery(
            "ops",
            1,
            "instance-b",
            &DeliveryOutcome::Delivered { status: 204 },
            at(6, 0)
        ))
        .unwrap());
    // Instance a's claim on 2 lapses (it died): another instance takes it over.
    let lapsed = b
        .batch(|tx| tx.claim_deliveries("instance-b", at(32, 0), at(59, 0), 10))
        .unwrap();
    assert_eq!(lapsed.iter().map(|d| d.event_seq).collect::<Vec<_>>(), [2]);
    assert!(b
        .batch(|tx| tx.record_delivery(
            "ops",
            2,
            "instance-b",
            &DeliveryOutcome::GaveUp {
                status: None,
                error: "connection refused".into()
            },
            at(33, 0)
        ))
        .unwrap());
    // The late report of the instance whose claim lapsed changes nothing.
    assert!(!a
        .batch(|tx| tx.record_delivery(
            "ops",
            2,
            "instance-a",
            &DeliveryOutcome::Delivered { status: 200 },
            at(34, 0)
        ))
        .unwrap());
    assert!(a
        .batch(|tx| tx.claim_deliveries("instance-a", at(58, 0), at(59, 0), 10))
        .unwrap()
        .is_empty());
    let rows = a.alert_deliveries(10).unwrap();
    let summary: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r.event_seq,
                r.state.as_str(),
                r.attempts,
                r.last_status,
                r.last_error.as_deref(),
                r.finished_at,
                r.claimed_by.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                2,
                "failed",
                1,
                None,
                Some("connection refused"),
                Some(at(33, 0)),
                None
            ),
            (1, "delivered", 2, Some(204), None, Some(at(6, 0)), None),
        ]
    );
}

pub(crate) fn a_runs_own_params_are_kept_as_given(open: Open<'_>) {
    let store = open();
    let with = NewRun {
        trigger: Trigger::Manual,
        params: Some("{\"sleep_sec\":2,\"label\":\"é\"}".into()),
        ..scheduled("a", at(1, 0))
    };
    let id = store.enqueue(&with, at(1, 0)).unwrap();
    let without = store
        .enqueue(
            &NewRun {
                trigger: Trigger::Manual,
                ..scheduled("a", at(2, 0))
            },
            at(2, 0),
        )
        .unwrap();
    let other = open();
    assert_eq!(
        other.run(id).unwrap().unwrap().params.as_deref(),
        Some("{\"sleep_sec\":2,\"label\":\"é\"}")
    );
    assert_eq!(other.run(without).unwrap().unwrap().params, None);
    let listed = other.runs(&RunFilter::default()).unwrap();
    assert!(listed.iter().any(|r| r.id == id && r.params.is_some()));
}

pub(crate) fn a_batch_of_claims_is_each_claim_in_order(open: Open<'_>) {
    let store = open().written_by("instance-a");
    let taken = open()
        .claim_fire(&scheduled("ingest", at(0, 0)), at(0, 1), Some(at(1, 0)))
        .unwrap();
    let catchup = NewRun {
        trigger: Trigger::Catchup,
        ..scheduled("train", at(1, 0))
    };
    let claims = vec![
        (scheduled("ingest", at(0, 0)), Some(at(2, 0))),
        (scheduled("train", at(0, 0)), Some(at(2, 0))),
        (scheduled("ingest", at(1, 0)), Some(at(2, 0))),
        (catchup, Some(at(2, 0))),
    ];
    let ids = store
        .batch(|batch| batch.claim_fires(&claims, at(1, 5)))
        .unwrap();
    assert_eq!(ids.len(), 4);
    assert_eq!(ids[0], None, "the tick claimed already is refused");
    let claimed: Vec<RunId> = ids.iter().flatten().copied().collect();
    assert_eq!(claimed.len(), 3);
    assert!(claimed.windows(2).all(|w| w[0] < w[1]), "{claimed:?}");
    assert!(claimed[0] > taken);
    for (id, (run, _)) in ids.iter().zip(&claims).skip(1) {
        let row = store.run(id.unwrap()).unwrap().unwrap();
        assert_eq!(row.task, run.task);
        assert_eq!(row.trigger, run.trigger);
        assert_eq!(row.scheduled_for, run.scheduled_for);
        assert_eq!(row.state, RunState::Queued);
        assert_eq!(row.max_attempts, 2);
    }
    let events = store.events_after(0, 100).unwrap();
    assert_eq!(events.len(), 4, "{events:?}");
    assert!(events.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    let batch_events: Vec<_> = events[1..]
        .iter()
        .map(|e| {
            (
                e.kind.clone(),
                e.task.clone(),
                e.run_id,
                e.attempt,
                e.message.clone(),
                e.instance.clone(),
            )
        })
        .collect();
    let expected: Vec<_> = ids
        .iter()
        .zip(&claims)
        .skip(1)
        .map(|(id, (run, _))| {
            (
                "run_queued".to_string(),
                Some(run.task.as_str().to_string()),
                *id,
                Some(Attempt(0)),
                format!("{} for {}", run.trigger, run.scheduled_for.to_rfc3339()),
                Some("instance-a".to_string()),
            )
        })
        .collect();
    assert_eq!(batch_events, expected);
    assert_eq!(events[1].at, at(1, 5));
    for task in ["ingest", "train"] {
        let state = store.task_state(&TaskName::from(task)).unwrap();
        assert_eq!(state.last_fire_at, Some(at(1, 0)), "{task}");
        assert_eq!(state.next_fire_at, Some(at(2, 0)), "{task}");
    }
    // The sequence goes on from the batch without a gap.
    store
        .claim_fire(&scheduled("ingest", at(2, 0)), at(2, 1), None)
        .unwrap();
    let last = store.events_after(0, 100).unwrap();
    assert_eq!(last.len(), 5);
    assert_eq!(last[4].seq, last[3].seq + 1);
    // An empty batch writes nothing.
    assert!(store
        .batch(|batch| batch.claim_fires(&[], at(3, 0)))
        .unwrap()
        .is_empty());
    assert_eq!(store.events_after(0, 100).unwrap().len(), 5);
}

pub(crate) fn a_batch_of_starts_is_each_start_in_order(open: Open<'_>) {
    let here = open().written_by("instance-a");
    let there = open();
    let manual = |task: &str| NewRun {
        trigger: Trigger::Manual,
        ..scheduled(task, at(0, 0))
    };
    let start = |run| Move {
        run,
        attempt: Attempt(0),
        from: RunState::Queued,
        to: RunState::Running,
    };
    let owner = |name: &str| Change {
        owner: Some(name.into()),
        ..Change::default()
    };
    // "ingest" runs on another instance; "report" was started already (a stale view).
    let elsewhere = there.enqueue(&manual("ingest"), at(0, 0)).unwrap();
    there
        .transition(&start(elsewhere), &owner("b"), at(0, 1))
        .unwrap();
    let stale = there.enqueue(&manual("report"), at(0, 2)).unwrap();
    there
        .transition(&start(stale), &owner("b"), at(0, 3))
        .unwrap();
    let train = here.enqueue(&manual("train"), at(0, 4)).unwrap();
    let waiting = here.enqueue(&manual("ingest"), at(0, 5)).unwrap();
    let score = here.enqueue(&manual("score"), at(0, 6)).unwrap();
    let before = here.last_event_seq().unwrap();
    let steps = [start(train), start(waiting), start(stale), start(score)];
    let outcomes = here
        .batch(|batch| Ok(batch.transitions(&steps, &owner("a"), at(1, 0))))
        .unwrap();
    assert_eq!(outcomes.len(), 4);
    assert!(matches!(outcomes[0], Ok(Attempt(1))), "{:?}", outcomes[0]);
    match &outcomes[1] {
        Err(StoreError::TaskBusy { run, task, running }) => {
            assert_eq!(
                (*run, task.as_str(), *running),
                (waiting, "ingest", elsewhere)
            );
        }
        other => panic!("expected TaskBusy, got {other:?}"),
    }
    match &outcomes[2] {
        Err(StoreError::Fenced {
            found_state,
            found_attempt,
            ..
        }) => assert_eq!(
            (*found_state, *found_attempt),
            (RunState::Running, Attempt(1))
        ),
        other => panic!("expected Fenced, got {other:?}"),
    }
    assert!(matches!(outcomes[3], Ok(Attempt(1))), "{:?}", outcomes[3]);
    for run in [train, score] {
        let row = here.run(run).unwrap().unwrap();
        assert_eq!(
            (row.state, row.attempt, row.owner.as_deref(), row.started_at),
            (RunState::Running, Attempt(1), Some("a"), Some(at(1, 0)))
        );
        let attempts = here.attempts(run).unwrap();
        assert_eq!(attempts.len(), 1);
        assert_eq!(
            (
                attempts[0].attempt,
                attempts[0].started_at,
                attempts[0].finished_at
            ),
            (Attempt(1), at(1, 0), None)
        );
    }
    let row = here.run(waiting).unwrap().unwrap();
    assert_eq!(
        (row.state, row.attempt, row.owner),
        (RunState::Queued, Attempt(0), None)
    );
    assert!(here.attempts(waiting).unwrap().is_empty());
    let row = here.run(stale).unwrap().unwrap();
    assert_eq!(row.owner.as_deref(), Some("b"));
    let events: Vec<_> = here
        .events_after(before, 100)
        .unwrap()
        .into_iter()
        .map(|e| (e.seq, e.kind, e.run_id, e.attempt, e.instance))
        .collect();
    let started = |seq: i64, run| {
        (
            seq,
            "run_started".to_string(),
            Some(run),
            Some(Attempt(1)),
            Some("instance-a".to_string()),
        )
    };
    assert_eq!(
        events,
        vec![started(before + 1, train), started(before + 2, score)]
    );
    // A batch naming one task twice starts the first and refuses the second.
    let first = here.enqueue(&manual("fresh"), at(2, 0)).unwrap();
    let second = here.enqueue(&manual("fresh"), at(2, 1)).unwrap();
    let twice = here
        .batch(|batch| Ok(batch.transitions(&[start(first), start(second)], &owner("a"), at(2, 2))))
        .unwrap();
    assert!(matches!(twice[0], Ok(Attempt(1))), "{twice:?}");
    match &twice[1] {
        Err(StoreError::TaskBusy { running, .. }) => assert_eq!(*running, first),
        other => panic!("expected TaskBusy, got {other:?}"),
    }
}

pub(crate) fn ticks_claimed_and_started_in_one_transaction_commit_together(open: Open<'_>) {
    let here = open().written_by("instance-a");
    let there = open();
    let owner = Change {
        owner: Some("instance-a".into()),
        ..Change::default()
    };
    let start = |run| Move {
        run,
        attempt: Attempt(0),
        from: RunState::Queued,
        to: RunState::Running,
    };
    // "ingest" runs on another instance.
    let elsewhere = there
        .enqueue(
            &NewRun {
                trigger: Trigger::Manual,
                ..scheduled("ingest", at(0, 0))
            },
            at(0, 0),
        )
        .unwrap();
    there
        .transition(&start(elsewhere), &owner, at(0, 1))
        .unwrap();
    let claim_and_start = |batch: &dyn super::Tx, tick: Instant| {
        let claims = vec![
            (
                scheduled("ingest", tick),
                Some(tick + chrono::TimeDelta::seconds(1)),
            ),
            (
                scheduled("train", tick),
                Some(tick + chrono::TimeDelta::seconds(1)),
            ),
        ];
        let ids = batch.claim_fires(&claims, tick)?;
        let steps: Vec<Move> = ids.iter().flatten().map(|run| start(*run)).collect();
        Ok((ids, batch.transitions(&steps, &owner, tick)))
    };

    // A transaction that fails after its claims and starts writes none of them.
    let before = here.last_event_seq().unwrap();
    let failed = here.batch(|batch| {
        claim_and_start(batch, at(1, 0))?;
        Err::<(), _>(StoreError::NotFound(RunId(424_242)))
    });
    assert!(failed.is_err());
    assert_eq!(here.last_event_seq().unwrap(), before);
    assert!(here
        .claimed_ticks(&"train".into(), at(0, 0), at(9, 0))
        .unwrap()
        .is_empty());

    let (ids, started) = here
        .batch(|batch| claim_and_start(batch, at(2, 0)))
        .unwrap();
    let [Some(ingest), Some(train)] = ids[..] else {
        panic!("both ticks claimed: {ids:?}");
    };
    match &started[0] {
        Err(StoreError::TaskBusy { run, running, .. }) => {
            assert_eq!((*run, *running), (ingest, elsewhere))
        }
        other => panic!("expected TaskBusy, got {other:?}"),
    }
    assert!(matches!(started[1], Ok(Attempt(1))), "{:?}", started[1]);
    let row = here.run(ingest).unwrap().unwrap();
    assert_eq!(
        (row.state, row.attempt, row.owner),
        (RunState::Queued, Attempt(0), None)
    );
    let row = here.run(train).unwrap().unwrap();
    assert_eq!(
        (row.state, row.attempt, row.owner.as_deref(), row.started_at),
        (
            RunState::Running,
            Attempt(1),
            Some("instance-a"),
            Some(at(2, 0))
        )
    );
    let attempts = here.attempts(train).unwrap();
    assert_eq!(
        attempts
            .iter()
            .map(|a| (a.attempt, a.started_at, a.finished_at))
            .collect::<Vec<_>>(),
        vec![(Attempt(1), at(2, 0), None)]
    );
    let events: Vec<_> = here
        .events_after(before, 100)
        .unwrap()
        .into_iter()
        .map(|e| (e.seq - before, e.kind, e.run_id))
        .collect();
    assert_eq!(
        events,
        vec![
            (1, "run_queued".to_string(), Some(ingest)),
            (2, "run_queued".to_string(), Some(train)),
            (3, "run_started".to_string(), Some(train)),
        ]
    );
}

pub(crate) fn a_batch_of_finishes_writes_what_the_moves_one_by_one_write(open: Open<'_>) {
    let store = open();
    let endings: Vec<(&str, RunState, Change, Attempt)> = vec![
        (
            "ok",
            RunState::Succeeded,
            Change {
                exit_code: Some(0),
                ..Change::default()
            },
            Attempt(1),
        ),
        (
            "fail",
            RunState::Failed,
            Change {
                exit_code: Some(3),
                error: Some("boom".into()),
                ..Change::default()
            },
            Attempt(1),
        ),
        (
            "retry",
            RunState::RetryWait,
            Change {
                exit_code: Some(1),
                error: Some("again".into()),
                next_attempt_at: Some(at(5, 0)),
                ..Change::default()
            },
            Attempt(1),
        ),
        (
            "requeue",
            RunState::Queued,
            Change {
                reason: Some("shut down".into()),
                refund_attempt: true,
                ..Change::default()
            },
            Attempt(1),
        ),
        ("stale", RunState::Succeeded, Change::default(), Attempt(7)),
        (
            "waiting",
            RunState::Skipped,
            Change {
                reason: Some("overlap".into()),
                ..Change::default()
            },
            Attempt(0),
        ),
    ];
    // Two sets of the same runs: one ended in a batch, the other move by move.
    let mut sets: Vec<Vec<(Move, Change)>> = Vec::new();
    for prefix in ["batch", "single"] {
        let mut moves = Vec::new();
        for (name, to, change, attempt) in &endings {
            let run = store
                .enqueue(
                    &NewRun {
                        trigger: Trigger::Manual,
                        ..scheduled(&format!("{prefix}-{name}"), at(0, 0))
                    },
                    at(0, 0),
                )
                .unwrap();
            let start = Move {
                run,
                attempt: Attempt(0),
                from: RunState::Queued,
                to: RunState::Running,
            };
            let owner = Change {
                owner: Some("a".into()),
                ..Change::default()
            };
            // "waiting" never starts: it is skipped from the queue.
            let from = if *name == "waiting" {
                RunState::Queued
            } else {
                store.transition(&start, &owner, at(1, 0)).unwrap();
                RunState::Running
            };
            let step = Move {
                run,
                attempt: *attempt,
                from,
                to: *to,
            };
            moves.push((step, change.clone()));
        }
        sets.push(moves);
    }
    let before = store.last_event_seq().unwrap();
    let batched = store
        .batch(|batch| Ok(batch.finishes(&sets[0], at(2, 0))))
        .unwrap();
    let middle = store.last_event_seq().unwrap();
    let single: Vec<Result<Attempt, StoreError>> = sets[1]
        .iter()
        .map(|(step, change)| store.transition(step, change, at(2, 0)))
        .collect();
    let outcome = |r: &Result<Attempt, StoreError>| match r {
        Ok(attempt) => format!("ok {attempt}"),
        Err(StoreError::Fenced {
            found_state,
            found_attempt,
            ..
        }) => format!("fenced {found_state} {found_attempt}"),
        Err(other) => format!("error {other}"),
    };
    let batched: Vec<String> = batched.iter().map(outcome).collect();
    let single: Vec<String> = single.iter().map(outcome).collect();
    assert_eq!(batched, single);
    assert_eq!(batched[4], "fenced running 1");
    let written = |moves: &[(Move, Change)]| -> Vec<String> {
        moves
            .iter()
            .map(|(step, _)| {
                let mut row = store.run(step.run).unwrap().unwrap();
                row.id = RunId(0);
                row.task = TaskName::from("-");
                row.queued_at = at(0, 0);
                let attempts = store.attempts(step.run).unwrap();
                format!("{row:?} {attempts:?}")
            })
            .collect()
    };
    assert_eq!(written(&sets[0]), written(&sets[1]));
    let events = |from: i64, to: i64| -> Vec<(String, Option<Attempt>, String)> {
        store
            .events_after(from, 100)
            .unwrap()
            .into_iter()
            .filter(|e| e.seq <= to)
            .map(|e| (e.kind, e.attempt, e.message))
            .collect()
    };
    let after = store.last_event_seq().unwrap();
    let batch_events = events(before, middle);
    assert_eq!(batch_events.len(), 5, "{batch_events:?}");
    assert_eq!(batch_events, events(middle, after));
    let seqs: Vec<i64> = store
        .events_after(before, 100)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
}

pub(crate) fn starting_a_schedule_keeps_the_next_fire_a_peer_stored_under_the_same_key(
    open: Open<'_>,
) {
    let peer = open();
    let starting = open();
    let task = TaskName::from("ingest");
    let key = "* * * * * * @ UTC";
    // A task nobody has written: the start stores its next fire and key.
    let started = starting
        .batch(|tx| tx.start_schedule(&task, Some(at(1, 0)), Some(key)))
        .unwrap();
    assert_eq!(started, Some(at(1, 0)));
    // A peer fires 12:00:01 and moves the next fire on ...
    peer.batch(|tx| tx.claim_fire(&scheduled("ingest", at(1, 0)), at(1, 0), Some(at(2, 0))))
        .unwrap();
    // ... then an instance that read the schedules before that starts it from 12:00:01:
    // the peer's advance stands, and is the answer.
    let started = starting
        .batch(|tx| tx.start_schedule(&task, Some(at(1, 0)), Some(key)))
        .unwrap();
    assert_eq!(started, Some(at(2, 0)));
    let state = peer.task_state(&task).unwrap();
    assert_eq!(state.next_fire_at, Some(at(2, 0)));
    assert_eq!(state.last_fire_at, Some(at(1, 0)));
    assert_eq!(state.schedule.as_deref(), Some(key));
    // Another schedule (a new config) replaces the next fire and the key.
    let other = "*/5 * * * * * @ UTC";
    let started = starting
        .batch(|tx| tx.start_schedule(&task, Some(at(5, 0)), Some(other)))
        .unwrap();
    assert_eq!(started, Some(at(5, 0)));
    let state = peer.task_state(&task).unwrap();
    assert_eq!(state.next_fire_at, Some(at(5, 0)));
    assert_eq!(state.schedule.as_deref(), Some(other));
    // A row without a key (written by a pause) takes both.
    let paused = TaskName::from("report");
    peer.set_paused(&paused, true, at(6, 0)).unwrap();
    let started = starting
        .batch(|tx| tx.start_schedule(&paused, Some(at(7, 0)), Some(key)))
        .unwrap();
    assert_eq!(started, Some(at(7, 0)));
    let state = peer.task_state(&paused).unwrap();
    assert!(state.paused);
    assert_eq!(state.next_fire_at, Some(at(7, 0)));
    assert_eq!(state.schedule.as_deref(), Some(key));
    // A row with the key and no next fire (a schedule that had ended) takes the new one.
    peer.set_next_fire(&paused, None, Some(key)).unwrap();
    let started = starting
        .batch(|tx| tx.start_schedule(&paused, Some(at(8, 0)), Some(key)))
        .unwrap();
    assert_eq!(started, Some(at(8, 0)));
}

pub(crate) fn an_event_checked_and_written_by_many_handles_at_once_is_written_once(open: Open<'_>) {
    let first = open();
    let run = claim(&first, "ingest");
    let handles: Vec<Store> = (0..4).map(|_| open()).collect();
    let start = std::sync::Barrier::new(handles.len());
    let written: Vec<bool> = std::thread::scope(|scope| {
        let writers: Vec<_> = handles
            .iter()
            .map(|store| {
                let start = &start;
                scope.spawn(move || {
                    start.wait();
                    store
                        .batch(|tx| {
                            let kinds = &["deadline_missed"];
                            if tx.hold_events(kinds, Some("ingest"), Some(run))?.is_some() {
                                return Ok(false);
                            }
                            tx.record_event(
                                "deadline_missed",
                                Some("ingest"),
                                Some(run),
                                "late",
                                at(1, 0),
                            )?;
                            Ok(true)
                        })
                        .unwrap()
                })
            })
            .collect();
        writers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    assert_eq!(written.iter().filter(|w| **w).count(), 1, "{written:?}");
    let missed = first
        .events_after(0, 100)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "deadline_missed")
        .count();
    assert_eq!(missed, 1);
    // The answer is the newest of the kinds asked about, for that subject only.
    let kinds = &["circuit_opened", "circuit_closed"];
    first
        .batch(|tx| {
            tx.record_event("circuit_opened", Some("ingest"), None, "opened", at(2, 0))?;
            tx.record_event("circuit_closed", Some("ingest"), None, "closed", at(3, 0))
        })
        .unwrap();
    let newest = first
        .batch(|tx| tx.hold_events(kinds, Some("ingest"), None))
        .unwrap();
    assert_eq!(newest.as_deref(), Some("circuit_closed"));
    let other = first
        .batch(|tx| tx.hold_events(kinds, Some("report"), None))
        .unwrap();
    assert_eq!(other, None);
}

pub(crate) fn a_batch_of_pids_writes_what_each_pid_writes(open: Open<'_>) {
    let store = open();
    // Three running runs and one that ended: the batch and, for comparison, one by one.
    let mut runs = Vec::new();
    for task in ["a", "b", "c", "ended"] {
        let run = claim(&store, task);
        start_with(&store, run, Attempt(0), &Change::default(), at(1, 0));
        runs.push(run);
    }
    let ended = runs[3];
    store
        .transition(
            &Move {
                run: ended,
                attempt: Attempt(1),
                from: RunState::Running,
                to: RunState::Succeeded,
            },
            &Change::default(),
            at(1, 5),
        )
        .unwrap();
    let pids: Vec<(RunId, Attempt, u32, Instant)> = runs
        .iter()
        .enumerate()
        .map(|(i, run)| (*run, Attempt(1), 4200 + i as u32, at(1, 10 + i as i64)))
        .collect();
    let answers: Vec<bool> = store
        .batch(|tx| {
            tx.record_pids(&pids)
                .into_iter()
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap();
    assert_eq!(answers, vec![true, true, true, false]);
    for (run, _, pid, spawned_at) in &pids {
        let attempts = store.attempts(*run).unwrap();
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0].pid, Some(i64::from(*pid)));
        assert_eq!(attempts[0].spawned_at, Some(*spawned_at));
        let row = store.run(*run).unwrap().unwrap();
        let expected = (*run != ended).then_some(i64::from(*pid));
        assert_eq!(row.pid, expected, "run {run}");
    }
    // A stale attempt of a running run is not current either.
    let stale = store
        .batch(|tx| {
            tx.record_pids(&[
                (runs[0], Attempt(2), 1, at(2, 0)),
                (runs[1], Attempt(1), 4301, at(2, 1)),
            ])
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
        })
        .unwrap();
    assert_eq!(stale, vec![false, true]);
    assert_eq!(store.run(runs[0]).unwrap().unwrap().pid, Some(4200));
    assert_eq!(store.run(runs[1]).unwrap().unwrap().pid, Some(4301));
}
