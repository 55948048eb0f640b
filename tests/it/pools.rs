//! Pools (issue 16, feature 8): `[pools.<name>] slots = N`, `pool = "<name>"`: at most N
//! runs of the pool's tasks at once, the rest wait in order, none dropped.

use std::time::Duration;

use turbosched::model::RunState;

use serde_json::{json, Value};

use crate::support::{run_id, stdout, wait_until, Sandbox};

/// A pool of one and two tasks of it that run until the sandbox holds a file `release`:
/// the second one triggered waits for the first.
pub(crate) const FULL_POOL_OF_ONE: &str = r#"
[pools.gpu]
slots = 1

[tasks.first]
command = ["sh", "-c", "while [ ! -e release ]; do sleep 0.05; done"]
pool = "gpu"

[tasks.second]
command = ["sh", "-c", "while [ ! -e release ]; do sleep 0.05; done"]
pool = "gpu"
"#;

#[test]
fn a_pool_of_one_serialises_two_tasks_that_would_otherwise_overlap() {
    let sandbox = Sandbox::new(
        r#"
[pools.gpu]
slots = 1

[tasks.first]
command = ["sh", "-c", "sleep 0.6"]
pool = "gpu"

[tasks.second]
command = ["sh", "-c", "sleep 0.6"]
pool = "gpu"

[tasks.free]
command = ["sh", "-c", "sleep 0.6"]
"#,
    );
    let service = sandbox.serve();
    let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
    let trigger = |task: &str| {
        let text = agent
            .post(format!("{}/scheduler/run_{task}", service.api))
            .send_empty()
            .expect("POST")
            .body_mut()
            .read_to_string()
            .unwrap();
        run_id(&serde_json::from_str(&text).unwrap())
    };
    let runs: Vec<_> = ["first", "second", "free"].map(trigger).into();
    let rows: Vec<_> = runs
        .iter()
        .map(|run| sandbox.wait_for_state(*run, RunState::Succeeded, Duration::from_secs(20)))
        .collect();
    let store = sandbox.store();
    let span = |run| {
        let attempts = store.attempts(run).unwrap();
        assert_eq!(attempts.len(), 1);
        (attempts[0].started_at, attempts[0].finished_at.unwrap())
    };
    let (first, second, free) = (span(rows[0].id), span(rows[1].id), span(rows[2].id));
    assert!(
        first.1 <= second.0,
        "the pool's runs overlapped: first {first:?}, second {second:?}"
    );
    // The task outside the pool was not held back: it overlapped the first.
    assert!(free.0 < first.1, "free {free:?} first {first:?}");
    service.stop();
}

/// Occupancy where operators look: while one run of a pool of one runs and another
/// waits, the status API, `/metrics`, and `turbosched status` (human and JSON) say so.
#[test]
fn a_full_pool_shows_one_running_and_one_waiting_in_status_metrics_and_the_cli() {
    let sandbox = Sandbox::new(FULL_POOL_OF_ONE);
    let service = sandbox.serve();
    let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
    let get = |route: &str| {
        agent
            .get(format!("{}{route}", service.api))
            .call()
            .expect("GET")
            .body_mut()
            .read_to_string()
            .unwrap()
    };
    let trigger = |task: &str| {
        let text = agent
            .post(format!("{}/scheduler/run_{task}", service.api))
            .send_empty()
            .expect("POST")
            .body_mut()
            .read_to_string()
            .unwrap();
        run_id(&serde_json::from_str(&text).unwrap())
    };
    let runs: Vec<_> = ["first", "second"].map(trigger).into();
    let gpu = json!({"name": "gpu", "slots": 1, "running": 1, "waiting": 1});
    wait_until(
        "the status API to show the pool full with one waiting",
        Duration::from_secs(20),
        || {
            let status: Value = serde_json::from_str(&get("/scheduler/status")).ok()?;
            (status["pools"] == json!([gpu])).then_some(())
        },
    );
    let metrics = get("/metrics");
    for line in [
        "turbosched_pool_slots{pool=\"gpu\"} 1",
        "turbosched_pool_running{pool=\"gpu\"} 1",
        "turbosched_pool_waiting{pool=\"gpu\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
    let human = stdout(&sandbox.cli(&["status"]));
    assert!(
        human.contains("pool gpu: 1/1 running, 1 waiting"),
        "{human}"
    );
    let (code, status) = sandbox.cli_json(&["status", "--json"]);
    assert_eq!((code, &status["pools"]), (0, &json!([gpu])), "{status}");

    std::fs::write(sandbox.path().join("release"), "").unwrap();
    for run in runs {
        sandbox.wait_for_state(run, RunState::Succeeded, Duration::from_secs(20));
    }
    let idle = json!([{"name": "gpu", "slots": 1, "running": 0, "waiting": 0}]);
    wait_until(
        "the status API to show the pool idle",
        Duration::from_secs(20),
        || {
            let status: Value = serde_json::from_str(&get("/scheduler/status")).ok()?;
            (status["pools"] == idle).then_some(())
        },
    );
    service.stop();
}

#[test]
fn status_shows_no_pools_when_none_is_configured() {
    let sandbox = Sandbox::new("[tasks.alone]\ncommand = [\"true\"]\n");
    let (code, status) = sandbox.cli_json(&["status", "--json"]);
    assert_eq!((code, &status["pools"]), (0, &json!([])), "{status}");
    let human = stdout(&sandbox.cli(&["status"]));
    assert!(!human.contains("pool "), "{human}");
}
