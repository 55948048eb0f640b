//! Run parameters (issue 16, feature 5): `turbosched run <task> --param k=v` and
//! `POST /scheduler/run_<task>` with `{"params": {…}}`, merged over the configured
//! params, refused when the handler does not read them, recorded on the run.

use std::time::Duration;

use serde_json::{json, Value};
use turbosched::model::{RunId, RunState};

use crate::support::{run_id, stderr, stdout, Sandbox};

const TASKS: &str = r#"
[tasks.writer]
command = ["sh", "-c", "printf '%s' \"$TURBOSCHED_PARAMS\" > params-$TURBOSCHED_RUN_ID.json"]
params = { a = 1, b = "x" }

[tasks.check]
handler = "ping"
params = { sleep_sec = 0.0 }
"#;

fn written(sandbox: &Sandbox, run: RunId) -> Value {
    let text = std::fs::read_to_string(sandbox.path().join(format!("params-{run}.json")))
        .unwrap_or_else(|err| panic!("params of run {run}: {err}"));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn run_params_are_merged_over_the_task_params_and_recorded_on_the_run() {
    let sandbox = Sandbox::new(TASKS);
    let (code, body) = sandbox.cli_json(&[
        "run",
        "writer",
        "--param",
        "b=2",
        "--param",
        "c=true",
        "--param",
        "d=hello world",
        "--json",
    ]);
    assert_eq!(code, 0, "{body}");
    let run = run_id(&body);
    assert_eq!(
        written(&sandbox, run),
        json!({"a": 1, "b": 2, "c": true, "d": "hello world"})
    );
    let (_, shown) = sandbox.cli_json(&["show", &run.to_string(), "--json"]);
    assert_eq!(
        shown["params"],
        json!({"b": 2, "c": true, "d": "hello world"})
    );
    let text = stdout(&sandbox.cli(&["show", &run.to_string()]));
    assert!(
        text.contains(r#"params        {"b":2,"c":true,"d":"hello world"}"#),
        "{text}"
    );
    // A run without params of its own records none and gets the task's.
    let (_, plain) = sandbox.cli_json(&["run", "writer", "--json"]);
    let plain = run_id(&plain);
    assert_eq!(written(&sandbox, plain), json!({"a": 1, "b": "x"}));
    assert_eq!(sandbox.run(plain).params, None);
}

#[test]
fn a_param_the_handler_does_not_read_is_refused_naming_it_and_the_known_ones() {
    let sandbox = Sandbox::new(TASKS);
    let output = sandbox.cli(&["run", "check", "--param", "sleep_secs=1"]);
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    let err = stderr(&output);
    assert!(
        err.contains(r#"params.sleep_secs: unknown param for handler "ping" (did you mean "sleep_sec"?); task check takes fail_times, fatal, progress, sleep_sec"#),
        "{err}"
    );
    assert!(sandbox.runs_of("check").is_empty(), "nothing was queued");
    let output = sandbox.cli(&["run", "check", "--param", "novalue"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("expected key=value"),
        "{}",
        stderr(&output)
    );
}

fn post(api: &str, path: &str, body: &str) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut response = agent
        .post(format!("{api}{path}"))
        .header("content-type", "application/json")
        .send(body)
        .expect("POST");
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[test]
fn the_api_takes_params_refuses_unknown_ones_and_the_service_runs_queued_runs_with_theirs() {
    let sandbox = Sandbox::new(TASKS);
    let service = sandbox.serve();
    let (status, body) = post(
        &service.api,
        "/scheduler/run_check",
        r#"{"params": {"colour": "red"}}"#,
    );
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "bad_params");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("params.colour") && message.contains("sleep_sec"),
        "{message}"
    );
    let (status, body) = post(
        &service.api,
        "/scheduler/run_check",
        r#"{"params": {"sleep_sec": [1]}}"#,
    );
    assert_eq!(status, 400, "{body}");

    let (status, body) = post(
        &service.api,
        "/scheduler/run_writer",
        r#"{"params": {"b": "from the api"}}"#,
    );
    assert_eq!(status, 202, "{body}");
    let run = run_id(&body);
    sandbox.wait_for_state(run, RunState::Succeeded, Duration::from_secs(20));
    assert_eq!(written(&sandbox, run), json!({"a": 1, "b": "from the api"}));
    let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
    let detail: Value = serde_json::from_str(
        &agent
            .get(format!("{}/scheduler/runs/{run}", service.api))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(detail["params"], json!({"b": "from the api"}));

    // `turbosched run` with a service up queues the run in the store; the service starts
    // it with the params recorded there.
    let (code, body) = sandbox.cli_json(&["run", "writer", "--param", "a=2.5", "--json"]);
    assert_eq!(code, 0, "{body}");
    let queued = run_id(&body);
    sandbox.wait_for_state(queued, RunState::Succeeded, Duration::from_secs(20));
    assert_eq!(written(&sandbox, queued), json!({"a": 2.5, "b": "x"}));
    service.stop();
}
