//! Crash and shutdown: kill -9 mid-run, SIGTERM with work in flight.

use std::collections::BTreeSet;
use std::time::Duration;

use turbosched::model::{RunState, Trigger};

use crate::support::*;

#[test]
fn kill_9_during_a_run_then_restart_orphans_and_retries_it_none_lost_none_doubled() {
    let sandbox = Sandbox::new(
        r#"
[tasks.long]
handler = "ping"
params = { sleep_sec = 2.0 }
retries = 1
[tasks.ticker]
handler = "ping"
schedule = "* * * * * *"
misfire = "run_all"
"#,
    );
    let service = sandbox.serve();
    let run = run_id(&sandbox.cli_json(&["run", "long", "--json"]).1);
    sandbox.wait_for_state(run, RunState::Running, Duration::from_secs(10));
    let first_pid = wait_until("worker pid recorded", Duration::from_secs(10), || {
        sandbox.run(run).pid
    });
    wait_until("a few ticks", Duration::from_secs(10), || {
        (sandbox.runs_of("ticker").len() >= 2).then_some(())
    });
    service.kill9();
    assert!(
        process_alive(first_pid),
        "the worker outlives a kill -9 of the service"
    );
    assert_eq!(
        sandbox.run(run).state,
        RunState::Running,
        "the store still says running"
    );
    // Stay down until the ticker's next persisted tick has passed: it is missed for sure.
    let next_tick = sandbox
        .store()
        .task_state(&"ticker".into())
        .unwrap()
        .next_fire_at
        .unwrap();
    wait_until("a tick missed while down", Duration::from_secs(5), || {
        (chrono::Utc::now() > next_tick + chrono::Duration::milliseconds(100)).then_some(())
    });

    let service = sandbox.serve();
    let done = sandbox.wait_for_state(run, RunState::Succeeded, Duration::from_secs(30));
    wait_until("ticks after the restart", Duration::from_secs(10), || {
        (sandbox
            .runs_of("ticker")
            .iter()
            .filter(|r| r.started_at.is_some_and(|s| s > done.finished_at.unwrap()))
            .count()
            >= 1)
            .then_some(())
    });
    service.stop();

    assert!(
        !process_alive(first_pid),
        "the orphaned worker's process group was killed"
    );
    assert_eq!(
        sandbox.runs_of("long").len(),
        1,
        "one run, retried in place: none doubled"
    );
    assert_eq!(done.attempt.0, 2);
    let outcomes: Vec<String> = sandbox
        .store()
        .attempts(run)
        .unwrap()
        .into_iter()
        .map(|a| a.outcome.unwrap_or_default())
        .collect();
    assert_eq!(outcomes, vec!["orphaned", "succeeded"]);
    let kinds = sandbox.event_kinds(run);
    assert!(kinds.contains(&"run_orphaned".to_string()), "{kinds:?}");
    assert!(
        done.reason.as_deref().unwrap_or("").contains("is gone"),
        "{:?}",
        done.reason
    );

    let ticker = sandbox.runs_of("ticker");
    let ticks: BTreeSet<_> = ticker.iter().map(|r| r.scheduled_for).collect();
    assert_eq!(ticks.len(), ticker.len(), "no tick doubled");
    let span = (*ticks.last().unwrap() - *ticks.first().unwrap()).num_seconds() as usize;
    assert_eq!(ticker.len(), span + 1, "no tick lost across the crash");
    assert!(
        ticker.iter().any(|r| r.trigger == Trigger::Catchup),
        "missed ticks were caught up"
    );
    assert!(ticker.iter().all(|r| r.state.is_terminal()));
}

#[test]
fn graceful_shutdown_lets_short_work_finish_and_requeues_long_work() {
    let sandbox = Sandbox::new(
        r#"
[tasks.short]
handler = "ping"
params = { sleep_sec = 0.5 }
[tasks.long]
handler = "ping"
params = { sleep_sec = 30.0 }
"#,
    );
    let service = sandbox.serve();
    let long = run_id(&sandbox.cli_json(&["run", "long", "--json"]).1);
    let short = run_id(&sandbox.cli_json(&["run", "short", "--json"]).1);
    sandbox.wait_for_state(long, RunState::Running, Duration::from_secs(10));
    sandbox.wait_for_state(short, RunState::Running, Duration::from_secs(10));
    let long_pid = wait_until("worker pid recorded", Duration::from_secs(10), || {
        sandbox.run(long).pid
    });
    let status = service.stop();
    assert!(status.success(), "clean exit: {status:?}");

    assert_eq!(
        sandbox.run(short).state,
        RunState::Succeeded,
        "finished within shutdown_grace"
    );
    let requeued = sandbox.run(long);
    assert_eq!(requeued.state, RunState::Queued, "nothing stays running");
    assert_eq!(
        requeued.max_attempts, 2,
        "the interrupted attempt does not use up a retry"
    );
    assert!(!process_alive(long_pid));
    let outcomes: Vec<String> = sandbox
        .store()
        .attempts(long)
        .unwrap()
        .into_iter()
        .map(|a| a.outcome.unwrap_or_default())
        .collect();
    assert_eq!(outcomes, vec!["interrupted"]);
    let stopped = sandbox.store().events_after(0, 1000).unwrap();
    assert!(stopped.iter().any(|e| e.kind == "scheduler_stopping"));

    // The next start picks the interrupted run up again.
    let service = sandbox.serve();
    sandbox.wait_for_state(long, RunState::Running, Duration::from_secs(10));
    assert_eq!(sandbox.run(long).attempt.0, 2);
    drop(service);
}

#[test]
fn a_run_of_a_silent_instance_on_another_host_is_orphaned_but_a_beating_one_is_left_alone() {
    use turbosched::model::{Attempt, TaskName};
    use turbosched::store::{Change, Move, NewRun};

    let sandbox = Sandbox::new(
        "[tasks.silent]\nhandler = \"ping\"\nretries = 1\n[tasks.beating]\nhandler = \"ping\"\nretries = 1\n",
    );
    let store = sandbox.store();
    let now = chrono::Utc::now();
    let long_ago = now - chrono::Duration::seconds(60);
    // Two instances on another host: pids there mean nothing here, only heartbeats count.
    store
        .register_instance("ghost", 4_000_000, "another-host", true, long_ago)
        .unwrap();
    store
        .register_instance("alive", 4_000_001, "another-host", true, now)
        .unwrap();
    let mut runs = Vec::new();
    for (task, owner, at) in [("silent", "ghost", long_ago), ("beating", "alive", now)] {
        let new_run = NewRun {
            task: TaskName::from(task),
            trigger: Trigger::Manual,
            scheduled_for: at,
            max_attempts: 2,
            force: false,
            downstream: false,
            cascade: None,
            params: None,
        };
        let run = store.enqueue(&new_run, at).unwrap();
        let change = Change {
            owner: Some(owner.into()),
            ..Change::default()
        };
        store
            .transition(
                &Move {
                    run,
                    attempt: Attempt(0),
                    from: RunState::Queued,
                    to: RunState::Running,
                },
                &change,
                at,
            )
            .unwrap();
        runs.push(run);
    }
    // Keep "alive" beating while our service looks around.
    let keep_beating = std::thread::spawn({
        let store = sandbox.store();
        move || {
            for _ in 0..40 {
                store.heartbeat("alive", chrono::Utc::now()).unwrap();
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    });
    let service = sandbox.serve();
    let retried = sandbox.wait_for_state(runs[0], RunState::Succeeded, Duration::from_secs(20));
    assert_eq!(retried.attempt.0, 2);
    assert!(
        retried
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("no heartbeat from owner instance ghost"),
        "{:?}",
        retried.reason
    );
    // Several heartbeats of our service later, the other instance's run is untouched.
    wait_until("a few orphan checks", Duration::from_secs(5), || {
        (chrono::Utc::now() > now + chrono::Duration::milliseconds(1500)).then_some(())
    });
    let untouched = sandbox.run(runs[1]);
    assert_eq!(
        (untouched.state, untouched.owner.as_deref()),
        (RunState::Running, Some("alive"))
    );
    keep_beating.join().unwrap();
    drop(service);
}

#[test]
fn sigterm_during_a_long_start_up_stops_the_service_promptly() {
    let mut config = String::from(FAST_SCHEDULER);
    for i in 0..10_000 {
        config.push_str(&format!(
            "[tasks.t{i}]\ncommand = [\"/bin/true\"]\nschedule = \"{} {} * * * *\"\n",
            i % 60,
            (i / 60) % 60
        ));
    }
    let sandbox = Sandbox::with_config(&config);
    let stderr_path = sandbox.path().join("serve.log");
    let mut child = sandbox
        .command(&["serve"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("start serve");
    // The API answers before the engine has finished starting its ten thousand tasks.
    wait_until("the API to listen", Duration::from_secs(60), || {
        std::fs::read_to_string(&stderr_path)
            .ok()
            .filter(|log| log.contains("API listening"))
    });
    signal(child.id(), nix::sys::signal::Signal::SIGTERM);
    let sent = std::time::Instant::now();
    let status = wait_until("the service to exit", Duration::from_secs(30), || {
        child.try_wait().expect("try_wait")
    });
    let took = sent.elapsed();
    let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert!(status.success(), "a clean stop: {status:?}\n{log}");
    assert!(
        took < Duration::from_secs(2),
        "stopped {took:?} after SIGTERM\n{log}"
    );
}

/// Issue 13: commits overwrite a write-ahead log of its working size from the service's
/// first tick, rather than growing the file (a second sync of its size per commit) for
/// the first thousand pages of every start.
#[test]
fn a_serving_service_has_given_its_database_log_its_working_size() {
    let sandbox =
        Sandbox::new("[tasks.tick]\ncommand = [\"/bin/true\"]\nschedule = \"* * * * * *\"\n");
    let fs = nix::sys::statvfs::statvfs(sandbox.path()).unwrap();
    let room = fs.blocks_available() * fs.fragment_size();
    assert!(
        room >= 66_000_000,
        "this test needs 66 MB free in the temp folder: {room}"
    );
    let service = sandbox.serve();
    let log = sandbox.path().join("data/scheduler.db-wal");
    let length = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    assert!(
        length >= 32 + 1000 * (24 + 4096),
        "{} is {length} bytes\n{}",
        log.display(),
        service.stderr_text()
    );
    service.stop();
}
