//! Pools (issue 16, feature 8): `[pools.<name>] slots = N`, `pool = "<name>"`: at most N
//! runs of the pool's tasks at once, the rest wait in order, none dropped.

use std::time::Duration;

use turbosched::model::RunState;

use crate::support::{run_id, Sandbox};

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
