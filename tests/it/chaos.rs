//! A kill -9 storm: the service killed at arbitrary instants, restarted each time, under
//! every misfire policy, with runs in flight at the kills. Afterwards `turbosched audit`
//! accounts for every tick (none lost, none doubled), nothing is left running, no child
//! outlives its service, and the database is sound. `bench/storm.sh` runs the same with a
//! hundred kills.

use std::collections::BTreeMap;
use std::time::Duration;

use turbosched::model::RunState;

use crate::support::*;

/// Every per-second task under each misfire policy, some slow enough to be running when
/// the kill comes.
pub const STORM_TASKS: &str = r#"
[defaults]
handler = "ping"
schedule = "* * * * * *"
misfire_grace = "1h"
[tasks.once]
misfire = "run_once"
[tasks.skipper]
misfire = "skip"
[tasks.every]
misfire = "run_all"
[tasks.queued]
misfire = "run_all"
overlap = "queue"
params = { sleep_sec = 0.3 }
[tasks.slow]
misfire = "run_once"
retries = 2
params = { sleep_sec = 1.5 }
"#;

#[test]
fn a_kill_9_storm_loses_no_tick_doubles_none_and_leaves_nothing_running() {
    let sandbox = Sandbox::new(STORM_TASKS);
    // Kill instants after each start: spread over and between ticks.
    let pauses_ms = [450u64, 1300, 700, 2100, 250, 1650];
    let mut pids = Vec::new();
    for pause in pauses_ms {
        let service = sandbox.serve();
        pids.push(service.pid());
        let up = std::time::Instant::now();
        wait_until("the kill instant", Duration::from_secs(10), || {
            (up.elapsed() >= Duration::from_millis(pause)).then_some(())
        });
        service.kill9();
    }
    let service = sandbox.serve();
    let back = chrono::Utc::now() + chrono::Duration::seconds(2);
    wait_until(
        "every task to run again after the storm, and every earlier run to settle",
        Duration::from_secs(60),
        || {
            ["once", "skipper", "every", "queued", "slow"]
                .iter()
                .all(|task| {
                    let runs = sandbox.runs_of(task);
                    runs.iter()
                        .any(|r| r.scheduled_for > back && r.state.is_terminal())
                        && runs
                            .iter()
                            .all(|r| r.state.is_terminal() || r.scheduled_for > back)
                })
                .then_some(())
        },
    );
    service.stop_cleanly();

    let (code, audit) = sandbox.cli_json(&["audit", "--since", "1h", "--json"]);
    assert_eq!(code, 0, "every tick accounted for: {audit:#}");
    assert_eq!(audit["integrity"], "ok");
    for task in audit["tasks"].as_array().expect("tasks") {
        assert_eq!(task["doubled"], 0, "{task}");
        assert_eq!(task["missing"], 0, "{task}");
        assert!(task["expected"].as_u64().unwrap_or(0) >= 5, "{task}");
    }
    // Nothing left running or orphaned after the clean stop (interrupted runs are queued
    // for the next start), and no child outlives the services that started it.
    let mut states: BTreeMap<String, usize> = BTreeMap::new();
    for task in ["once", "skipper", "every", "queued", "slow"] {
        for run in sandbox.runs_of(task) {
            *states.entry(run.state.to_string()).or_default() += 1;
            assert!(
                !matches!(run.state, RunState::Running | RunState::Orphaned),
                "run {} of {task} left {}",
                run.id,
                run.state
            );
            for attempt in sandbox.store().attempts(run.id).unwrap() {
                if let Some(pid) = attempt.pid {
                    assert!(
                        !process_alive(pid),
                        "attempt {} of run {} (pid {pid}) outlived its service",
                        attempt.attempt,
                        run.id
                    );
                }
            }
        }
    }
    assert!(
        !states.contains_key("orphaned") && states.contains_key("succeeded"),
        "{states:?}"
    );
    let orphaned_events = sandbox
        .store()
        .events_after(0, 100_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "run_orphaned")
        .count();
    assert!(
        orphaned_events > 0,
        "the slow runs in flight at the kills were found orphaned and settled"
    );
    assert!(pids.iter().all(|pid| !process_alive(*pid as i64)));
}
