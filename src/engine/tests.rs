//! The engine in-process with a fake clock: each test sets the wall clock, calls the
//! engine's own steps (start-up fires, a tick, a finished attempt, the orphan check) and
//! reads the store. No loop, no child process, no sleep: time is exactly what the test says.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::TimeZone;

use super::{Clock, Engine, Mode, Running};
use crate::config::Config;
use crate::model::{Attempt, Instant, RunId, RunState, Trigger};
use crate::runner::Outcome;
use crate::store::{Change, Move, NewRun, RunFilter, RunRow, Store};

/// A wall clock that only the test moves.
struct FakeClock(Mutex<Instant>);

impl FakeClock {
    fn set(&self, at: Instant) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = at;
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Instant {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Bench {
    _dir: tempfile::TempDir,
    clock: Arc<FakeClock>,
    store: Store,
    config: Arc<Config>,
}

/// 2026-06-01T12:00:00Z plus `seconds`.
fn t(seconds: i64) -> Instant {
    chrono::Utc
        .with_ymd_and_hms(2026, 6, 1, 12, 0, 0)
        .single()
        .expect("valid")
        + chrono::TimeDelta::seconds(seconds)
}

impl Bench {
    fn new(tasks: &str) -> Bench {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().display();
        let text = format!(
            "[scheduler]\ntimezone = \"UTC\"\ndatabase = \"{root}/runs.db\"\nlog_dir = \"{root}/logs\"\n\
             state_dir = \"{root}/state\"\nheartbeat_interval = \"1s\"\nheartbeat_timeout = \"10s\"\n{tasks}"
        );
        let config = crate::config::parse(&text, &dir.path().join("scheduler.toml"))
            .unwrap_or_else(|e| panic!("config: {e:?}"));
        let store = Store::open(&dir.path().join("runs.db")).expect("store");
        Bench {
            _dir: dir,
            clock: Arc::new(FakeClock(Mutex::new(t(0)))),
            store,
            config: Arc::new(config),
        }
    }

    /// An engine as a service starting at `at`.
    fn engine_at(&self, at: Instant) -> Engine {
        self.clock.set(at);
        Engine::new(
            self.config.clone(),
            self.store.clone(),
            self.clock.clone(),
            Mode::Serve,
        )
    }

    /// A manual run of task `t` queued at `t(0)`.
    fn manual_run(&self, max_attempts: u32) -> RunId {
        let run = NewRun {
            task: "t".into(),
            trigger: Trigger::Manual,
            scheduled_for: t(0),
            max_attempts,
            force: true,
            downstream: false,
            cascade: None,
            params: None,
        };
        self.store.enqueue(&run, t(0)).expect("queued")
    }

    /// The task's log, as written so far.
    fn log(&self, task: &str) -> String {
        let path = self
            ._dir
            .path()
            .join("logs")
            .join(crate::tasklog::task_log_name(task));
        std::fs::read_to_string(path).unwrap_or_default()
    }

    fn runs(&self, task: &str) -> Vec<RunRow> {
        let mut runs = self
            .store
            .runs(&RunFilter {
                task: Some(task.into()),
                limit: 100_000,
                ..RunFilter::default()
            })
            .expect("runs");
        runs.reverse();
        runs
    }
}

/// Ticks every second from 12:00:00 to 12:00:03, then the service is down until 12:00:10.
fn after_ten_seconds_down(policy: &str) -> (Bench, Vec<RunRow>) {
    let bench = Bench::new(&format!(
        "[tasks.t]\nhandler = \"ping\"\nschedule = \"* * * * * *\"\nmisfire = \"{policy}\"\noverlap = \"queue\"\n"
    ));
    let mut engine = bench.engine_at(t(0));
    engine.plan_startup_fires(t(0));
    for second in 1..=3 {
        bench.clock.set(t(second));
        engine.on_tick();
    }
    drop(engine);
    let mut engine = bench.engine_at(t(10));
    engine.plan_startup_fires(t(10));
    let runs = bench.runs("t");
    assert_eq!(
        engine.next_fire.get(&"t".into()),
        Some(&t(11)),
        "the schedule resumes after now"
    );
    (bench, runs)
}

#[test]
fn run_once_after_downtime_runs_the_latest_missed_tick_and_counts_the_others() {
    let (bench, runs) = after_ten_seconds_down("run_once");
    let ticks: Vec<(Instant, Trigger)> =
        runs.iter().map(|r| (r.scheduled_for, r.trigger)).collect();
    assert_eq!(
        ticks,
        vec![
            (t(1), Trigger::Schedule),
            (t(2), Trigger::Schedule),
            (t(3), Trigger::Schedule),
            (t(10), Trigger::Catchup)
        ]
    );
    let misfire = bench
        .store
        .events_after(0, 100)
        .expect("events")
        .into_iter()
        .find(|e| e.kind == "misfire")
        .expect("a misfire event");
    assert!(
        misfire.message.starts_with("6 missed tick(s)"),
        "{}",
        misfire.message
    );
}

#[test]
fn skip_after_downtime_records_each_missed_tick_as_skipped() {
    let (_bench, runs) = after_ten_seconds_down("skip");
    let catchups = ticks_of(&runs, Trigger::Catchup);
    assert_eq!(catchups, (4..=10).map(t).collect::<Vec<_>>());
    assert!(runs
        .iter()
        .filter(|r| r.trigger == Trigger::Catchup)
        .all(|r| r.state == RunState::Skipped));
}

#[test]
fn run_all_after_downtime_queues_every_missed_tick_in_order() {
    let (_bench, runs) = after_ten_seconds_down("run_all");
    let catchups = ticks_of(&runs, Trigger::Catchup);
    assert_eq!(catchups, (4..=10).map(t).collect::<Vec<_>>());
    assert!(runs.iter().all(|r| r.state == RunState::Queued));
}

/// The ticks of the runs with `trigger`, in order.
fn ticks_of(runs: &[RunRow], trigger: Trigger) -> Vec<Instant> {
    runs.iter()
        .filter(|r| r.trigger == trigger)
        .map(|r| r.scheduled_for)
        .collect()
}

#[test]
fn failed_attempts_wait_the_backoff_sequence_up_to_its_cap() {
    let bench = Bench::new(
        "[tasks.t]\nhandler = \"ping\"\nretries = 5\n\
         retry_backoff = { initial = \"10s\", factor = 3.0, max = \"2m\", jitter = false }\n",
    );
    let mut engine = bench.engine_at(t(0));
    let run = bench.manual_run(6);
    let mut delays = Vec::new();
    let mut now = t(0);
    for attempt in 1..=6u32 {
        let from = if attempt == 1 {
            RunState::Queued
        } else {
            RunState::RetryWait
        };
        let change = Change {
            owner: Some(engine.instance.clone()),
            ..Change::default()
        };
        bench
            .store
            .transition(
                &Move {
                    run,
                    attempt: Attempt(attempt - 1),
                    from,
                    to: RunState::Running,
                },
                &change,
                now,
            )
            .expect("running");
        engine.running.insert(run, running(Attempt(attempt), now));
        let failed = Outcome::Failed {
            exit_code: Some(1),
            error: "exit 1".into(),
            fatal: false,
        };
        let finish = engine
            .finish(run, Attempt(attempt), failed, Duration::from_secs(1), now)
            .expect("our attempt");
        bench
            .store
            .transition(
                &Move {
                    run,
                    attempt: Attempt(attempt),
                    from: RunState::Running,
                    to: finish.to,
                },
                &finish.change,
                now,
            )
            .expect("recorded");
        match finish.change.next_attempt_at {
            Some(at) => {
                delays.push((at - now).num_seconds());
                now = at;
            }
            None => assert_eq!(finish.to, RunState::Failed, "attempts exhausted"),
        }
    }
    assert_eq!(delays, vec![10, 30, 90, 120, 120]);
    assert_eq!(
        bench.store.run(run).expect("read").expect("run").state,
        RunState::Failed
    );
}

/// A running attempt as `start` would record it, without a child.
fn running(attempt: Attempt, now: Instant) -> Running {
    let (stop, _) = tokio::sync::watch::channel(None);
    Running {
        task: "t".into(),
        attempt,
        max_attempts: 6,
        cascade: None,
        trigger: Trigger::Manual,
        scheduled_for: now,
        first_started_at: now,
        attempt_started_at: now,
        stop,
        stopping: None,
        requests: Vec::new(),
        announce: None,
        beats: true,
        last_report: std::time::Instant::now(),
        handed_checkpoint: false,
        params: None,
        timeout: Duration::from_secs(60),
    }
}

#[test]
fn an_hourly_schedule_fires_25_times_on_the_day_berlin_falls_back() {
    let bench = Bench::new(
        "[tasks.hourly]\nhandler = \"ping\"\nschedule = \"0 0 * * * *\"\ntimezone = \"Europe/Berlin\"\noverlap = \"queue\"\n",
    );
    // 2026-10-25 00:00 CEST = 2026-10-24T22:00Z; the next midnight (CET) is 23:00Z.
    let start = chrono::Utc
        .with_ymd_and_hms(2026, 10, 24, 21, 59, 59)
        .single()
        .expect("valid");
    let end = chrono::Utc
        .with_ymd_and_hms(2026, 10, 25, 22, 59, 59)
        .single()
        .expect("valid");
    let mut engine = bench.engine_at(start);
    engine.plan_startup_fires(start);
    while let Some(next) = engine.next_fire.get(&"hourly".into()).copied() {
        if next > end {
            break;
        }
        bench.clock.set(next);
        engine.on_tick();
    }
    let ticks: Vec<Instant> = bench
        .runs("hourly")
        .iter()
        .map(|r| r.scheduled_for)
        .collect();
    assert_eq!(
        ticks.len(),
        25,
        "a 25-hour local day: both 02:00 passes fire"
    );
    assert!(ticks
        .windows(2)
        .all(|w| w[1] - w[0] == chrono::TimeDelta::hours(1)));
    assert!(bench
        .runs("hourly")
        .iter()
        .all(|r| r.trigger == Trigger::Schedule));
}

#[test]
fn a_run_is_orphaned_exactly_when_its_owner_has_been_silent_past_heartbeat_timeout() {
    let bench = Bench::new("[tasks.t]\nhandler = \"ping\"\nretries = 1\n");
    bench
        .store
        .register_instance("elsewhere", 4242, "another-host", true, t(0))
        .expect("instance");
    let run = bench.manual_run(2);
    let change = Change {
        owner: Some("elsewhere".into()),
        ..Change::default()
    };
    bench
        .store
        .transition(
            &Move {
                run,
                attempt: Attempt(0),
                from: RunState::Queued,
                to: RunState::Running,
            },
            &change,
            t(0),
        )
        .expect("running elsewhere");
    bench.store.heartbeat("elsewhere", t(5)).expect("beat");

    // heartbeat_timeout is 10 s: at 5 + 10 s the owner is still within it.
    let mut engine = bench.engine_at(t(15));
    engine.find_orphans(t(15)).expect("checked");
    assert_eq!(
        bench.store.run(run).expect("read").expect("run").state,
        RunState::Running
    );

    bench.clock.set(t(16));
    engine.find_orphans(t(16)).expect("checked");
    let row = bench.store.run(run).expect("read").expect("run");
    assert_eq!(
        row.state,
        RunState::Queued,
        "orphaned, then queued for its last attempt"
    );
    assert!(row
        .reason
        .unwrap_or_default()
        .contains("no heartbeat from owner instance elsewhere"));
    assert_eq!(engine.queue.len(), 1);
}

#[test]
fn a_timed_out_attempt_names_the_timeout_it_ran_under_not_a_reloaded_one() {
    // The config now says 5m; the attempt started under 1m (see `running`).
    let bench = Bench::new("[tasks.t]\nhandler = \"ping\"\ntimeout = \"5m\"\n");
    let mut engine = bench.engine_at(t(0));
    engine.running.insert(RunId(1), running(Attempt(1), t(0)));
    let finish = engine
        .finish(
            RunId(1),
            Attempt(1),
            Outcome::TimedOut,
            Duration::from_secs(60),
            t(60),
        )
        .expect("our attempt");
    let error = finish.change.error.unwrap_or_default();
    assert!(error.contains("timed out after 1m"), "{error}");
}

#[test]
fn the_board_wakes_its_readers_only_when_something_changed() {
    let bench = Bench::new("[tasks.t]\nhandler = \"ping\"\nschedule = \"* * * * * *\"\n");
    let mut engine = bench.engine_at(t(0));
    engine.plan_startup_fires(t(0));
    let mut readers = engine.board.subscribe();
    engine.publish(true);
    assert!(
        readers.has_changed().expect("open"),
        "the first board is news"
    );
    readers.borrow_and_update();
    let first = engine.board.snapshot().expect("published").version;

    // A heartbeat with nothing new: the snapshot is renewed (the loop is alive) but no
    // reader is woken.
    engine.publish(true);
    assert!(!readers.has_changed().expect("open"));
    assert!(engine.board.snapshot().expect("published").version > first);

    // A tick claims a run: news.
    bench.clock.set(t(1));
    engine.on_tick();
    engine.publish(true);
    assert!(readers.has_changed().expect("open"));
}

/// `t(0)` is 2026-06-01 12:00 UTC; a daily noon task whose calendar lists 2026-06-02.
fn daily_noon_with_a_holiday() -> Bench {
    Bench::new(
        "[calendars.holidays]\ndates = [\"2026-06-02\"]\n\
         [tasks.t]\nhandler = \"ping\"\nschedule = \"0 0 12 * * *\"\ncalendar = \"holidays\"\n",
    )
}

#[test]
fn a_tick_on_a_calendar_date_is_recorded_skipped_naming_the_calendar_and_the_next_day_fires() {
    let bench = daily_noon_with_a_holiday();
    let mut engine = bench.engine_at(t(1));
    engine.plan_startup_fires(t(1));
    for day in [1, 2] {
        let noon = t(day * 86_400);
        assert_eq!(engine.next_fire.get(&"t".into()), Some(&noon));
        bench.clock.set(noon);
        engine.on_tick();
    }
    let runs = bench.runs("t");
    let seen: Vec<(Instant, RunState, Trigger)> = runs
        .iter()
        .map(|r| (r.scheduled_for, r.state, r.trigger))
        .collect();
    assert_eq!(
        seen,
        vec![
            (t(86_400), RunState::Skipped, Trigger::Schedule),
            (t(2 * 86_400), RunState::Queued, Trigger::Schedule),
        ]
    );
    assert_eq!(
        runs[0].reason.as_deref(),
        Some("calendar holidays: 2026-06-02 is a listed date")
    );
    let skipped = bench
        .store
        .events_after(0, 100)
        .expect("events")
        .into_iter()
        .find(|e| e.kind == "run_skipped")
        .expect("a run_skipped event");
    assert!(
        skipped.message.contains("calendar holidays"),
        "{}",
        skipped.message
    );
}

/// A crash between a claim's commit and a later write of its skip left the run `queued`,
/// to be run at the next start on the calendar's closed date (seen in a cluster test
/// whose instances were killed at that instant): the skip is part of the claim's commit.
#[test]
fn a_tick_on_a_calendar_date_is_claimed_and_recorded_skipped_in_one_commit() {
    let bench = daily_noon_with_a_holiday();
    let mut engine = bench.engine_at(t(1));
    engine.plan_startup_fires(t(1));
    bench.clock.set(t(86_400));
    let commits = bench.store.commits();
    engine.on_tick();
    let run = the_one_run_skipped_in_one_commit(&bench, commits);
    assert_eq!(
        run.reason.as_deref(),
        Some("calendar holidays: 2026-06-02 is a listed date")
    );
    assert!(bench.log("t").contains("skipped: calendar holidays"));
}

/// Task `t`'s one run, after one commit since `commits`: skipped.
fn the_one_run_skipped_in_one_commit(bench: &Bench, commits: u64) -> RunRow {
    assert_eq!(
        bench.store.commits() - commits,
        1,
        "claim and skip: one commit"
    );
    let mut runs = bench.runs("t");
    assert_eq!(runs.len(), 1, "{runs:?}");
    let run = runs.remove(0);
    assert_eq!(run.state, RunState::Skipped, "{run:?}");
    run
}

#[test]
fn a_tick_missed_under_misfire_skip_is_claimed_and_recorded_skipped_in_one_commit() {
    let bench = Bench::new(
        "[tasks.t]\nhandler = \"ping\"\nschedule = \"0 0 12 * * *\"\nmisfire = \"skip\"\n",
    );
    let mut engine = bench.engine_at(t(1));
    engine.plan_startup_fires(t(1));
    drop(engine);
    // Down over the next noon; back at 12:30.
    let mut engine = bench.engine_at(t(86_400 + 1_800));
    let commits = bench.store.commits();
    engine.plan_startup_fires(t(86_400 + 1_800));
    let run = the_one_run_skipped_in_one_commit(&bench, commits);
    assert_eq!(
        run.reason.as_deref(),
        Some("misfire policy skip: tick missed while the scheduler was down")
    );
}

#[test]
fn a_tick_under_overlap_skip_while_its_task_runs_is_claimed_and_recorded_skipped_in_one_commit() {
    let bench = Bench::new(
        "[tasks.t]\nhandler = \"ping\"\nschedule = \"0 0 12 * * *\"\noverlap = \"skip\"\n",
    );
    let mut engine = bench.engine_at(t(1));
    engine.plan_startup_fires(t(1));
    // A manual run of `t` is running when the next noon comes.
    let manual = bench.manual_run(1);
    engine.running.insert(manual, running(Attempt(1), t(1)));
    engine.busy.insert("t".into(), manual);
    bench.clock.set(t(86_400));
    let commits = bench.store.commits();
    engine.on_tick();
    assert_eq!(
        bench.store.commits() - commits,
        1,
        "claim and skip: one commit"
    );
    let tick = bench
        .runs("t")
        .into_iter()
        .find(|run| run.trigger == Trigger::Schedule)
        .expect("the tick's run");
    assert_eq!(tick.state, RunState::Skipped, "{tick:?}");
    assert_eq!(
        tick.reason.as_deref(),
        Some(format!("overlap policy skip: run {manual} of t is still running").as_str())
    );
    assert!(bench.log("t").contains("skipped: overlap policy skip"));
}

#[test]
fn a_tick_skipped_by_the_calendar_is_not_fired_as_a_catch_up_after_a_restart() {
    let bench = daily_noon_with_a_holiday();
    let mut engine = bench.engine_at(t(1));
    engine.plan_startup_fires(t(1));
    bench.clock.set(t(86_400));
    engine.on_tick();
    drop(engine);
    // Back ten minutes after the holiday's tick: run_once would catch a missed tick up.
    let mut engine = bench.engine_at(t(86_400 + 600));
    engine.plan_startup_fires(t(86_400 + 600));
    let runs = bench.runs("t");
    assert_eq!(runs.len(), 1, "the holiday's tick was consumed by its skip");
    assert_eq!(runs[0].state, RunState::Skipped);
}

#[test]
fn a_tick_missed_during_downtime_on_a_calendar_date_is_skipped_not_caught_up() {
    let bench = daily_noon_with_a_holiday();
    let mut engine = bench.engine_at(t(1));
    engine.plan_startup_fires(t(1));
    drop(engine);
    // Down over the holiday's noon; back at 12:30 (within misfire_grace).
    let mut engine = bench.engine_at(t(86_400 + 1_800));
    engine.plan_startup_fires(t(86_400 + 1_800));
    let runs = bench.runs("t");
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].trigger, Trigger::Catchup);
    assert_eq!(runs[0].state, RunState::Skipped);
    assert!(runs[0]
        .reason
        .as_deref()
        .unwrap_or_default()
        .starts_with("calendar holidays"));
}

#[test]
fn a_jittered_task_fires_at_its_tick_plus_its_jitter_and_claims_the_nominal_tick() {
    let bench =
        Bench::new("[tasks.t]\nhandler = \"ping\"\nschedule = \"0 * * * * *\"\njitter = \"30s\"\n");
    let spec = bench.config.task("t").cloned().expect("task");
    let tick = t(60);
    let delay = chrono::TimeDelta::from_std(spec.jitter_for(tick)).expect("delay");
    assert!(delay > chrono::TimeDelta::zero() && delay < chrono::TimeDelta::seconds(30));
    let mut engine = bench.engine_at(t(1));
    engine.plan_startup_fires(t(1));
    assert_eq!(
        engine.next_fire.get(&"t".into()),
        Some(&tick),
        "the nominal tick"
    );

    // At the tick, the loop sleeps until the jittered instant.
    bench.clock.set(tick);
    assert_eq!(
        engine.next_deadline_delay(),
        delay.to_std().expect("positive")
    );
    engine.on_tick();
    bench
        .clock
        .set(tick + delay - chrono::TimeDelta::microseconds(1));
    engine.on_tick();
    assert!(
        bench.runs("t").is_empty(),
        "not before its jittered instant"
    );

    bench.clock.set(tick + delay);
    engine.on_tick();
    let runs = bench.runs("t");
    assert_eq!(runs.len(), 1);
    assert_eq!(
        runs[0].scheduled_for, tick,
        "the claim key is the nominal tick"
    );
    assert_eq!(runs[0].trigger, Trigger::Schedule);
    assert_eq!(runs[0].queued_at, tick + delay, "queued when it was due");
    assert_eq!(engine.next_fire.get(&"t".into()), Some(&t(120)));
}

#[test]
fn a_restart_inside_a_ticks_jitter_waits_for_the_jittered_instant() {
    let bench =
        Bench::new("[tasks.t]\nhandler = \"ping\"\nschedule = \"0 * * * * *\"\njitter = \"30s\"\n");
    let spec = bench.config.task("t").cloned().expect("task");
    let tick = t(60);
    let due = spec.due_at(tick);
    let mut engine = bench.engine_at(t(1));
    engine.plan_startup_fires(t(1));
    drop(engine);
    // Back between the tick and its jittered instant: it is not a missed tick.
    let back = tick + (due - tick) / 2;
    let mut engine = bench.engine_at(back);
    engine.plan_startup_fires(back);
    assert!(bench.runs("t").is_empty());
    bench.clock.set(due);
    engine.on_tick();
    let runs = bench.runs("t");
    assert_eq!(runs.len(), 1);
    assert_eq!(
        (runs[0].scheduled_for, runs[0].trigger),
        (tick, Trigger::Schedule)
    );
}

/// A manual run of `t` that ends in `state` at `now`, as the engine notes a run's end.
fn end_run(bench: &Bench, engine: &mut Engine, state: RunState, now: Instant) -> RunId {
    let run = bench.manual_run(1);
    let start = Move {
        run,
        attempt: Attempt(0),
        from: RunState::Queued,
        to: RunState::Running,
    };
    let owner = Change {
        owner: Some(engine.instance.clone()),
        ..Change::default()
    };
    bench
        .store
        .transition(&start, &owner, now)
        .expect("running");
    let end = Move {
        run,
        attempt: Attempt(1),
        from: RunState::Running,
        to: state,
    };
    bench
        .store
        .transition(&end, &Change::default(), now)
        .expect("ended");
    engine.note_finished(&"t".into(), run, state, None, now);
    run
}

fn paused_in_store(bench: &Bench) -> bool {
    bench.store.task_state(&"t".into()).expect("state").paused
}

fn circuit_events(bench: &Bench) -> Vec<String> {
    bench
        .store
        .events_after(0, 1000)
        .expect("events")
        .into_iter()
        .filter(|e| e.kind.starts_with("circuit_"))
        .map(|e| e.kind)
        .collect()
}

const BREAKER: &str =
    "[tasks.t]\nhandler = \"ping\"\nschedule = \"0 0 * * * *\"\nmax_consecutive_failures = 3\n";

#[test]
fn the_circuit_opens_at_exactly_n_failed_runs_in_a_row_and_a_manual_run_still_goes() {
    let bench = Bench::new(BREAKER);
    let mut engine = bench.engine_at(t(0));
    engine.seed_board();
    end_run(&bench, &mut engine, RunState::Failed, t(1));
    end_run(&bench, &mut engine, RunState::TimedOut, t(2));
    assert!(!paused_in_store(&bench), "two failures: still closed");
    assert!(circuit_events(&bench).is_empty());
    // Skipped and aborted runs neither count nor reset the streak.
    end_run(&bench, &mut engine, RunState::Aborted, t(3));
    assert!(!paused_in_store(&bench));
    end_run(&bench, &mut engine, RunState::Failed, t(4));
    assert!(
        paused_in_store(&bench),
        "the third failure in a row opens it"
    );
    assert_eq!(circuit_events(&bench), vec!["circuit_opened"]);
    let opened = super::open_circuit(&bench.store, "t")
        .expect("read")
        .expect("open");
    assert!(
        opened
            .message
            .starts_with("circuit opened: 3 runs in a row failed"),
        "{}",
        opened.message
    );
    assert!(engine.circuits.contains("t"));
    assert!(engine
        .metrics
        .render()
        .contains("turbosched_circuit_opened_total{task=\"t\"} 1"));
    engine.publish(true);
    let board = engine.board.snapshot().expect("published");
    let task = board.tasks.iter().find(|task| task.name == "t").expect("t");
    assert!(task.paused && task.circuit_open);
    // A manual trigger still queues a run.
    assert!(engine.trigger("t", false, false, None, t(5)).is_ok());
}

#[test]
fn a_success_between_failures_starts_the_count_again() {
    let bench = Bench::new(BREAKER);
    let mut engine = bench.engine_at(t(0));
    for (second, state) in [
        RunState::Failed,
        RunState::Failed,
        RunState::Succeeded,
        RunState::Failed,
        RunState::Failed,
    ]
    .into_iter()
    .enumerate()
    {
        end_run(&bench, &mut engine, state, t(second as i64 + 1));
    }
    assert!(!paused_in_store(&bench), "two in a row since the success");
    end_run(&bench, &mut engine, RunState::Failed, t(10));
    assert!(paused_in_store(&bench));
}

#[test]
fn resume_closes_the_circuit_and_the_count_starts_again() {
    let bench = Bench::new(BREAKER);
    let mut engine = bench.engine_at(t(0));
    for second in 1..=3 {
        end_run(&bench, &mut engine, RunState::Failed, t(second));
    }
    assert!(paused_in_store(&bench));
    engine.pause("t", false, t(10)).expect("resumed");
    assert!(!paused_in_store(&bench));
    assert!(!engine.circuits.contains("t"));
    assert_eq!(
        circuit_events(&bench),
        vec!["circuit_opened", "circuit_closed"]
    );
    assert!(super::open_circuit(&bench.store, "t")
        .expect("read")
        .is_none());
    // The failures before the resume no longer count: two new ones keep it closed.
    end_run(&bench, &mut engine, RunState::Failed, t(11));
    end_run(&bench, &mut engine, RunState::Failed, t(12));
    assert!(!paused_in_store(&bench));
    end_run(&bench, &mut engine, RunState::Failed, t(13));
    assert!(paused_in_store(&bench), "three new failures open it again");
    // After a restart the engine knows the pause is the circuit's.
    drop(engine);
    let mut engine = bench.engine_at(t(20));
    engine.seed_board();
    assert!(engine.circuits.contains("t"));
}

#[test]
fn an_operators_pause_is_not_an_open_circuit() {
    let bench = Bench::new(BREAKER);
    let mut engine = bench.engine_at(t(0));
    engine.pause("t", true, t(1)).expect("paused");
    assert!(super::open_circuit(&bench.store, "t")
        .expect("read")
        .is_none());
    engine.pause("t", false, t(2)).expect("resumed");
    assert!(circuit_events(&bench).is_empty());
}

const DEADLINE: &str =
    "[tasks.t]\nhandler = \"ping\"\nschedule = \"0 0 * * * *\"\ndeadline = \"45m\"\noverlap = \"queue\"\n";

/// The `deadline_missed` events, as (run, message).
fn deadline_events(store: &Store) -> Vec<(Option<RunId>, String)> {
    store
        .events_after(0, 10_000)
        .expect("events")
        .into_iter()
        .filter(|e| e.kind == "deadline_missed")
        .map(|e| (e.run_id, e.message))
        .collect()
}

/// The engine started at `t(1)` has claimed the 13:00 tick (`t(3600)`); returns its run.
fn claim_the_one_oclock_tick(bench: &Bench, engine: &mut Engine) -> RunId {
    engine.plan_startup_fires(t(1));
    bench.clock.set(t(3600));
    engine.on_tick();
    let runs = bench.runs("t");
    assert_eq!(runs.len(), 1);
    runs[0].id
}

/// Moves `run` through running to `to`, starting at `start` and ending at `end`.
fn run_through(bench: &Bench, run: RunId, start: Instant, to: RunState, end: Instant) {
    let change = Change {
        owner: Some("someone".into()),
        ..Change::default()
    };
    let started = Move {
        run,
        attempt: Attempt(0),
        from: RunState::Queued,
        to: RunState::Running,
    };
    bench
        .store
        .transition(&started, &change, start)
        .expect("running");
    let ended = Move {
        run,
        attempt: Attempt(1),
        from: RunState::Running,
        to,
    };
    bench
        .store
        .transition(&ended, &Change::default(), end)
        .expect("ended");
}

#[test]
fn a_run_not_started_by_its_deadline_raises_deadline_missed_once_not_at_every_heartbeat() {
    let bench = Bench::new(DEADLINE);
    let mut engine = bench.engine_at(t(1));
    let run = claim_the_one_oclock_tick(&bench, &mut engine);
    // 44:59 after the tick: not yet.
    bench.clock.set(t(3600 + 2699));
    engine.on_heartbeat();
    assert!(deadline_events(&bench.store).is_empty());
    // 45:00 after the tick, measured from the tick though the run never started.
    for seconds in [2700, 2705, 2710, 3000] {
        bench.clock.set(t(3600 + seconds));
        engine.on_heartbeat();
    }
    let events = deadline_events(&bench.store);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].0, Some(run));
    assert!(
        events[0]
            .1
            .contains("did not succeed within its deadline of 45m"),
        "{}",
        events[0].1
    );
    assert!(
        events[0].1.ends_with("it has not started"),
        "{}",
        events[0].1
    );
    assert!(engine
        .metrics
        .render()
        .contains("turbosched_deadline_missed_total{task=\"t\"} 1"));
}

#[test]
fn a_run_that_succeeds_within_its_deadline_raises_nothing_and_one_that_succeeds_late_does() {
    let bench = Bench::new(DEADLINE);
    let mut engine = bench.engine_at(t(1));
    let run = claim_the_one_oclock_tick(&bench, &mut engine);
    // Started late (40 min after its tick), succeeded at 44 min: in time.
    run_through(
        &bench,
        run,
        t(3600 + 2400),
        RunState::Succeeded,
        t(3600 + 2640),
    );
    bench.clock.set(t(3600 + 3000));
    engine.on_heartbeat();
    assert!(deadline_events(&bench.store).is_empty());

    // The 14:00 tick's run succeeds at 14:46: late.
    bench.clock.set(t(7200));
    engine.on_tick();
    let late = bench.runs("t")[1].id;
    run_through(
        &bench,
        late,
        t(7200 + 60),
        RunState::Succeeded,
        t(7200 + 2760),
    );
    bench.clock.set(t(7200 + 2770));
    engine.on_heartbeat();
    let events = deadline_events(&bench.store);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].0, Some(late));
    assert!(
        events[0].1.contains("it succeeded only at"),
        "{}",
        events[0].1
    );
}

#[test]
fn a_missed_deadline_is_raised_once_across_a_restart_and_one_missed_while_down_at_start() {
    let bench = Bench::new(DEADLINE);
    let mut engine = bench.engine_at(t(1));
    let first = claim_the_one_oclock_tick(&bench, &mut engine);
    run_through(&bench, first, t(3600 + 10), RunState::Failed, t(3600 + 20));
    bench.clock.set(t(3600 + 2700));
    engine.on_heartbeat();
    assert_eq!(deadline_events(&bench.store).len(), 1);
    // The 14:00 tick is claimed, then the service stops before its deadline.
    bench.clock.set(t(7200));
    engine.on_tick();
    drop(engine);

    // Another process on the same database file, after the second deadline passed.
    let reopened = Store::open(&bench._dir.path().join("runs.db")).expect("reopened");
    bench.clock.set(t(7200 + 2800));
    let mut engine = Engine::new(
        bench.config.clone(),
        reopened.clone(),
        bench.clock.clone(),
        Mode::Serve,
    );
    engine.on_heartbeat();
    engine.on_heartbeat();
    let events = deadline_events(&reopened);
    let runs: Vec<Option<RunId>> = events.iter().map(|(run, _)| *run).collect();
    let second = bench.runs("t")[1].id;
    assert_eq!(runs, vec![Some(first), Some(second)], "{events:?}");
    assert!(events[0].1.ends_with("it is failed"), "{}", events[0].1);
}

/// Start-up must not cost a log-folder scan per task (`file-rotate` stats every entry of
/// the folder when it takes a file over: quadratic in the task count, 10,000 tasks not
/// serving after 80 s). Opened lazily, no task log is even opened by a start-up with
/// nothing to say: the log folder does not exist once every start-up step has run.
#[test]
fn a_start_up_of_two_thousand_tasks_opens_no_task_log() {
    let tasks: String = (0..2000)
        .map(|n| {
            format!("[tasks.t{n:04}]\ncommand = [\"/bin/true\"]\nschedule = \"0 0 * * * *\"\n")
        })
        .collect();
    let bench = Bench::new(&tasks);
    let logs = bench.config.scheduler.log_dir.clone();
    let mut engine = bench.engine_at(t(1));
    engine.seed_board();
    engine.recover(t(1)).expect("recovered");
    engine.plan_startup_fires(t(1));
    assert_eq!(
        engine.next_fire.len(),
        2000,
        "every task's next fire planned"
    );
    assert!(
        !logs.exists(),
        "start-up touched the log folder {}",
        logs.display()
    );
}

/// Two tasks every second and one worker slot: at a tick, the run that can start at once
/// is claimed and started in one transaction (one commit; no moment when it is claimed
/// but not started for a crash to leave behind), and the other one, with no slot left,
/// is claimed and waits in the queue as before. A kill -9 right after that commit leaves
/// a `running` run without a child; the next instance orphans it and queues it again.
#[test]
fn a_tick_that_can_start_at_once_is_claimed_and_started_in_one_commit_and_a_full_slot_still_queues()
{
    let bench = Bench::new(
        "max_workers = 1\n\
         [tasks.a]\ncommand = [\"/bin/true\"]\nschedule = \"* * * * * *\"\nretries = 1\n\
         [tasks.b]\ncommand = [\"/bin/true\"]\nschedule = \"* * * * * *\"\nretries = 1\n",
    );
    // The runner of a started attempt is a tokio task (its child a real /bin/true).
    let runtime = one_thread_runtime();
    let _entered = runtime.enter();
    let mut engine = bench.engine_at(t(0));
    // Its owner process is gone by the time the next instance looks (as after kill -9).
    let gone = {
        let mut child = std::process::Command::new("/bin/true")
            .spawn()
            .expect("spawn");
        let pid = child.id();
        child.wait().expect("reaped");
        pid
    };
    bench
        .store
        .register_instance(engine.instance(), gone, &super::hostname(), true, t(0))
        .expect("instance");
    engine.plan_startup_fires(t(0));
    engine.start_with_claim = true;
    bench.clock.set(t(1));
    let before = bench.store.last_event_seq().expect("seq");
    let commits = bench.store.commits();
    engine.on_tick();
    assert_eq!(
        bench.store.commits() - commits,
        1,
        "both claims and the start of a: one commit"
    );
    let a = bench.runs("a").remove(0);
    let b = bench.runs("b").remove(0);
    assert_eq!(
        (a.state, a.attempt, a.owner.as_deref()),
        (RunState::Running, Attempt(1), Some(engine.instance()))
    );
    assert_eq!((b.state, b.attempt), (RunState::Queued, Attempt(0)));
    assert!(engine.running.contains_key(&a.id));
    assert_eq!(
        engine.queue.iter().map(|p| p.run).collect::<Vec<_>>(),
        vec![b.id],
        "no slot for b: it waits"
    );
    let events: Vec<(String, Option<RunId>)> = bench
        .store
        .events_after(before, 100)
        .expect("events")
        .into_iter()
        .map(|e| (e.kind, e.run_id))
        .collect();
    assert_eq!(
        events,
        vec![
            ("run_queued".to_string(), Some(a.id)),
            ("run_queued".to_string(), Some(b.id)),
            ("run_started".to_string(), Some(a.id)),
        ]
    );
    // The dispatch after the tick has nothing to start: the slot is a's.
    engine.dispatch();
    assert_eq!(bench.store.commits() - commits, 1);

    // kill -9 after the commit: the runner's report never reached the store.
    drop(engine);
    let mut next = bench.engine_at(t(2));
    next.find_orphans(t(2)).expect("checked");
    let a = bench.store.run(a.id).expect("read").expect("run");
    assert_eq!((a.state, a.attempt), (RunState::Queued, Attempt(1)));
    assert!(
        a.reason.unwrap_or_default().contains("is gone"),
        "orphaned: its owner's process is gone"
    );
}

/// A lone fire's child is spawned by the engine in the wake that claimed and started
/// it, not left to its runner task (which waits for a runtime thread to take it: here
/// the only one is held busy, so the runner cannot run until the check is over).
#[test]
fn a_lone_fire_spawns_its_child_in_the_wake_that_claims_it() {
    let marker_dir = tempfile::tempdir().expect("temp dir");
    let bench = touching_bench(marker_dir.path(), &["lone"]);
    let runtime = one_thread_runtime();
    let _entered = runtime.enter();
    // The runtime's one thread held until the end.
    let (holding_tx, holding_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    runtime.spawn(async move {
        let _ = holding_tx.send(());
        let _ = release_rx.recv();
    });
    holding_rx.recv().expect("the runtime's thread is held");
    let mut engine = bench.engine_at(t(0));
    engine.plan_startup_fires(t(0));
    engine.start_with_claim = true;
    bench.clock.set(t(1));
    engine.on_tick();
    let run = bench.runs("lone").remove(0);
    assert_eq!(run.state, RunState::Running);
    // Within 10 s, or its spawn waits for the runner task.
    await_markers(marker_dir.path(), &["lone"]);
    release_tx.send(()).expect("released");
}

/// Woken ahead of a lone fire's tick, the engine claims and starts the run in one commit
/// as of the tick, while the tick is still ahead (the disk's sync is not paid after the
/// tick), and spawns its child only once the tick has come. (The wake comes 3 ms ahead
/// in service; here 400 ms, to watch the order from another thread.)
#[test]
fn a_wake_ahead_of_a_tick_commits_the_claim_before_the_tick_and_spawns_the_child_at_it() {
    let marker_dir = tempfile::tempdir().expect("temp dir");
    let marker = marker_dir.path().join("lone");
    let bench = touching_bench(marker_dir.path(), &["lone"]);
    let runtime = one_thread_runtime();
    let _entered = runtime.enter();
    let mut engine = bench.engine_at(t(0));
    engine.plan_startup_fires(t(0));
    engine.start_with_claim = true;
    engine.wake_early = Duration::from_millis(400);
    // The engine's clock stands 400 ms before the tick t(1) throughout.
    bench.clock.set(t(1) - chrono::TimeDelta::milliseconds(400));
    let commits = bench.store.commits();
    let woke = std::time::Instant::now();
    let tick = woke + Duration::from_millis(400);
    // Another thread notes when the commit lands and when the child has run.
    let store = bench.store.clone();
    let seen = marker.clone();
    let watcher = std::thread::spawn(move || {
        let give_up = std::time::Instant::now() + Duration::from_secs(10);
        let mut committed = None;
        while std::time::Instant::now() < give_up {
            if committed.is_none() && store.commits() > commits {
                committed = Some(std::time::Instant::now());
            }
            if seen.exists() {
                return (committed, Some(std::time::Instant::now()));
            }
            std::hint::spin_loop();
        }
        (committed, None)
    });
    engine.on_tick_wake();
    let (committed, spawned) = watcher.join().expect("watcher");
    let committed = committed.expect("the claim was committed");
    let spawned = spawned.expect("the child ran");
    assert!(
        committed < tick,
        "committed {:?} after the tick",
        committed - tick
    );
    assert!(
        spawned >= tick,
        "the child ran {:?} before its tick",
        tick - spawned
    );
    assert_eq!(
        bench.store.commits() - commits,
        1,
        "claim and start: one commit"
    );
    let run = bench.runs("lone").remove(0);
    assert_eq!(run.state, RunState::Running);
    assert_eq!(
        (run.scheduled_for, run.started_at),
        (t(1), Some(t(1))),
        "claimed and started as of its tick, not as of the wake"
    );
}

/// A bench of tasks, each touching the marker `markers/<name>` every second; a task named
/// `forked` has a working directory (the `fork` road).
fn touching_bench(markers: &std::path::Path, names: &[&str]) -> Bench {
    let mut config = String::new();
    for name in names {
        config.push_str(&format!(
            "[tasks.{name}]\ncommand = [\"/usr/bin/touch\", \"{}\"]\nschedule = \"* * * * * *\"\n",
            markers.join(name).display()
        ));
        if *name == "forked" {
            config.push_str("cwd = \"/tmp\"\n");
        }
    }
    Bench::new(&config)
}

/// Three tasks of the spawners' road and one of the `fork` road (see [`touching_bench`]).
const GATHERED: [&str; 4] = ["a", "b", "c", "forked"];

fn await_markers(markers: &std::path::Path, names: &[&str]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !names.iter().all(|name| markers.join(name).exists()) {
        assert!(
            std::time::Instant::now() < deadline,
            "not every child of {names:?} ran within 10 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// In the loop, the starts of a wake's dispatch are spawned together at its end, from the
/// spawner threads while the engine waits once (`launch_waiting`), each child then handed
/// to its runner. A start on the `fork` road (here a working directory) is left to its
/// runner task, which would otherwise fork on the engine's thread.
#[test]
fn the_starts_of_a_wake_are_spawned_together_at_its_end() {
    let markers = tempfile::tempdir().expect("temp dir");
    let bench = touching_bench(markers.path(), &GATHERED);
    let runtime = one_thread_runtime();
    let _entered = runtime.enter();
    let mut engine = bench.engine_at(t(0));
    engine.plan_startup_fires(t(0));
    engine.launching = Some(Vec::new());
    bench.clock.set(t(1));
    // Claimed and queued (the steps alone start nothing), then dispatched.
    engine.on_tick();
    engine.dispatch();
    for name in GATHERED {
        assert_eq!(bench.runs(name).remove(0).state, RunState::Running);
    }
    let waiting: Option<Vec<&str>> = engine
        .launching
        .as_ref()
        .map(|launching| launching.iter().map(|l| l.spec.task.as_str()).collect());
    assert_eq!(
        waiting,
        Some(vec!["a", "b", "c"]),
        "the spawners' starts wait for the end of the wake; the forked one does not"
    );
    assert!(
        ["a", "b", "c"]
            .iter()
            .all(|name| !markers.path().join(name).exists()),
        "a child was spawned before the end of its wake"
    );
    engine.launch_waiting();
    assert!(engine.launching.is_none());
    await_markers(markers.path(), &GATHERED);
}

/// The starts made with their claims are spawned as the claims are handed out, before the
/// wake writes its skips or dispatches (each a commit the children would wait behind).
#[test]
fn the_starts_made_with_their_claims_are_spawned_before_the_rest_of_the_wake() {
    let markers = tempfile::tempdir().expect("temp dir");
    let bench = touching_bench(markers.path(), &GATHERED);
    let runtime = one_thread_runtime();
    let _entered = runtime.enter();
    let mut engine = bench.engine_at(t(0));
    engine.plan_startup_fires(t(0));
    engine.start_with_claim = true;
    engine.launching = Some(Vec::new());
    bench.clock.set(t(1));
    engine.on_tick();
    assert_eq!(
        engine.launching.as_ref().map(Vec::len),
        Some(0),
        "the claims' starts were left for the end of the wake"
    );
    await_markers(markers.path(), &GATHERED);
}

/// A runtime with one worker thread, for runner tasks (their children real processes).
fn one_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}
