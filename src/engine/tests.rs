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
