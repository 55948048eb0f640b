//! The HTTP API against a real server on a loopback port: every route's success and bad
//! input, auth, events, reload, health.

use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

/// A client for one service.
pub(crate) struct Api {
    base: String,
    agent: ureq::Agent,
    token: Option<String>,
}

impl Api {
    pub(crate) fn new(service: &Service, token: Option<&str>) -> Api {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        Api {
            base: service.api.clone(),
            agent,
            token: token.map(str::to_string),
        }
    }

    fn get(&self, path: &str) -> (u16, String) {
        let mut response = self
            .agent
            .get(format!("{}{path}", self.base))
            .call()
            .expect("GET");
        let status = response.status().as_u16();
        (
            status,
            response.body_mut().read_to_string().unwrap_or_default(),
        )
    }

    pub(crate) fn get_json(&self, path: &str) -> (u16, Value) {
        let (status, body) = self.get(path);
        (
            status,
            serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}")),
        )
    }

    /// POST with the client's token (if any) and an optional JSON body.
    fn post(&self, path: &str, body: Option<&str>) -> (u16, Value) {
        self.post_with(
            path,
            body,
            self.token
                .as_deref()
                .map(|t| format!("Bearer {t}"))
                .as_deref(),
        )
    }

    fn post_with(
        &self,
        path: &str,
        body: Option<&str>,
        authorization: Option<&str>,
    ) -> (u16, Value) {
        let mut request = self.agent.post(format!("{}{path}", self.base));
        if let Some(value) = authorization {
            request = request.header("Authorization", value);
        }
        let mut response = match body {
            Some(body) => request
                .header("Content-Type", "application/json")
                .send(body),
            None => request.send_empty(),
        }
        .expect("POST");
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        (
            status,
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("POST {path}: not JSON ({e}): {text}")),
        )
    }

    fn request(&self, method: &str, path: &str) -> (u16, Value) {
        let request = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .body(())
            .unwrap();
        let mut response = self.agent.run(request).expect("request");
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Waits until run `id` is in `state`, through the API.
    fn wait_for(&self, id: i64, state: &str) -> Value {
        wait_until(
            &format!("run {id} {state}"),
            Duration::from_secs(20),
            || {
                let (code, run) = self.get_json(&format!("/scheduler/runs/{id}"));
                (code == 200 && run["state"] == state).then_some(run)
            },
        )
    }
}

/// One server-sent event.
#[derive(Debug, Clone)]
pub(crate) struct Sse {
    pub(crate) id: i64,
    pub(crate) event: String,
    pub(crate) data: Value,
}

/// Reads `/scheduler/events` on a thread; events arrive on the returned channel.
pub(crate) fn subscribe(api: &Api, query: &str, last_event_id: Option<i64>) -> mpsc::Receiver<Sse> {
    let mut request = api
        .agent
        .get(format!("{}/scheduler/events{query}", api.base));
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id.to_string());
    }
    let response = request.call().expect("GET /scheduler/events");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response.headers().get("content-type").unwrap(),
        "text/event-stream"
    );
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let reader = BufReader::new(response.into_body().into_reader());
        let (mut id, mut event, mut data) = (None, String::new(), String::new());
        for line in reader.lines() {
            let Ok(line) = line else { return };
            if line.is_empty() {
                if let Some(seq) = id.take() {
                    let parsed = serde_json::from_str(&data).unwrap_or(Value::Null);
                    if sender
                        .send(Sse {
                            id: seq,
                            event: std::mem::take(&mut event),
                            data: parsed,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
                data.clear();
            } else if let Some(value) = line.strip_prefix("id: ") {
                id = value.parse().ok();
            } else if let Some(value) = line.strip_prefix("event: ") {
                event = value.to_string();
            } else if let Some(value) = line.strip_prefix("data: ") {
                data = value.to_string();
            }
        }
    });
    receiver
}

/// Collects events until `done` says so (or panics after 20 s).
pub(crate) fn collect(
    events: &mpsc::Receiver<Sse>,
    mut done: impl FnMut(&[Sse]) -> bool,
) -> Vec<Sse> {
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !done(&seen) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match events.recv_timeout(left) {
            Ok(event) => seen.push(event),
            Err(_) => panic!(
                "timed out waiting for events; got {:?}",
                seen.iter().map(|e| (e.id, &e.event)).collect::<Vec<_>>()
            ),
        }
    }
    seen
}

const TASKS: &str = r#"
[tasks.hello]
handler = "ping"
schedule = "0 0 3 * * *"
params = { sleep_sec = 0.2, progress = true }
[tasks.long]
handler = "ping"
params = { sleep_sec = 30.0, progress = true }
retries = 2
[tasks.broken]
handler = "ping"
params = { fail_times = 9 }
[tasks.after]
handler = "ping"
depends_on = ["hello"]
"#;

#[test]
fn run_task_queues_a_run_that_finishes_while_its_events_stream_in_order() {
    let sandbox = Sandbox::new(TASKS);
    let service = sandbox.serve();
    let api = Api::new(&service, None);
    let events = subscribe(&api, "", None);

    let (code, body) = api.post("/scheduler/run_hello", None);
    assert_eq!(code, 202, "{body}");
    let id = body["run_id"].as_i64().unwrap();
    assert_eq!(body["links"]["self"], format!("/scheduler/runs/{id}"));
    let run = api.wait_for(id, "succeeded");
    assert_eq!(run["trigger"], "manual");
    assert_eq!(run["attempts_history"][0]["outcome"], "succeeded");
    assert_eq!(run["result"]["attempt"], 1);

    let seen = collect(&events, |seen| {
        seen.iter()
            .any(|e| e.event == "run_succeeded" && e.data["run_id"] == id)
    });
    let ours: Vec<&Sse> = seen.iter().filter(|e| e.data["run_id"] == id).collect();
    let kinds: Vec<&str> = ours
        .iter()
        .map(|e| e.event.as_str())
        .filter(|k| *k != "run_progress")
        .collect();
    assert_eq!(kinds, vec!["run_queued", "run_started", "run_succeeded"]);
    assert!(
        ours.iter().any(|e| e.event == "run_progress"),
        "progress events stream too"
    );
    assert!(seen.windows(2).all(|w| w[0].id < w[1].id), "ids increase");
    assert_eq!(ours[0].data["task"], "hello");

    // The other route does the same; wait=true answers when the run has finished.
    let (code, body) = api.post("/scheduler/tasks/hello/run?wait=true", None);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["run"]["state"], "succeeded");

    // The board shows it: last run, statistics.
    let status = wait_until(
        "the board to show two runs",
        Duration::from_secs(10),
        || {
            let (_, status) = api.get_json("/scheduler/status");
            let hello = status["tasks"]
                .as_array()?
                .iter()
                .find(|t| t["task"] == "hello")?
                .clone();
            (hello["stats"]["runs"] == 2).then_some(status)
        },
    );
    let hello = status["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["task"] == "hello")
        .unwrap();
    assert_eq!(hello["last_run"]["state"], "succeeded");
    assert_eq!(hello["stats"]["success_rate"], 1.0);
    assert!(hello["stats"]["p50_ms"].as_u64().unwrap() >= 200);
    assert_eq!(hello["schedule"], "0 0 3 * * *");
    assert!(hello["next_fire"].as_str().unwrap().ends_with("+00:00"));
    assert_eq!(status["scheduler"]["max_workers"], 4);
    let (code, detail) = api.get_json("/scheduler/tasks/hello");
    assert_eq!(code, 200);
    let last_runs: Vec<i64> = detail["last_runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect();
    assert_eq!(last_runs.len(), 2, "{detail}");
    assert_eq!(
        last_runs[1], id,
        "newest first: the first run is the older one"
    );
    assert_eq!(
        status["scheduler"]["config_hash"].as_str().unwrap().len(),
        64
    );
    drop(service);
}

#[test]
fn triggers_refuse_bad_input_unknown_tasks_and_overlap() {
    let sandbox = Sandbox::new(TASKS);
    let service = sandbox.serve();
    let api = Api::new(&service, None);

    let (code, body) = api.post("/scheduler/run_nope", None);
    assert_eq!(code, 404);
    assert_eq!(body["error"]["code"], "unknown_task");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("known tasks: after, broken, hello, long"),
        "{body}"
    );

    for (path, body_text, expected) in [
        ("/scheduler/run_hello?force=maybe", None, 400),
        ("/scheduler/run_hello?colour=red", None, 400),
        ("/scheduler/run_hello", Some("{not json"), 400),
        ("/scheduler/run_hello", Some("{\"force\": \"yes\"}"), 400),
        ("/scheduler/run_hello", Some("{\"speed\": 3}"), 400),
        // The body is exactly the spec's TriggerOptions: no nulls, an object.
        ("/scheduler/run_hello", Some("{\"force\": null}"), 400),
        ("/scheduler/run_hello", Some("[true]"), 400),
        // Not JSON's whitespace (space, tab, line feed, carriage return): a form feed is a
        // body, and not JSON (schemathesis found it taken for an empty body, 202).
        ("/scheduler/run_hello", Some("\x0c"), 400),
    ] {
        let (code, body) = api.post(path, body_text);
        assert_eq!(code, expected, "{path} {body_text:?}: {body}");
        assert!(
            body["error"]["code"].is_string() && body["error"]["message"].is_string(),
            "{body}"
        );
    }
    let huge = format!("{{\"force\": true, \"pad\": \"{}\"}}", "x".repeat(100_000));
    let (code, body) = api.post("/scheduler/run_hello", Some(&huge));
    assert_eq!(code, 413, "{body}");

    let (code, first) = api.post("/scheduler/run_long", None);
    assert_eq!(code, 202);
    let first = first["run_id"].as_i64().unwrap();
    api.wait_for(first, "running");
    wait_until(
        "the board to show the running run",
        Duration::from_secs(5),
        || {
            let (_, status) = api.get_json("/scheduler/status");
            let long = status["tasks"]
                .as_array()?
                .iter()
                .find(|t| t["task"] == "long")?
                .clone();
            (long["running"][0]["run_id"] == first && status["scheduler"]["workers_busy"] == 1)
                .then_some(())
        },
    );
    let (code, body) = api.post("/scheduler/run_long", None);
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["error"]["code"], "overlap");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("run {first} running")),
        "{body}"
    );

    // The dependency check, and force, through the API.
    let (code, body) = api.post("/scheduler/run_after?wait=10", None);
    assert_eq!(
        (code, body["run"]["state"].as_str()),
        (200, Some("skipped")),
        "{body}"
    );
    let (code, body) = api.post(
        "/scheduler/run_after",
        Some("{\"force\": true, \"wait\": 10}"),
    );
    assert_eq!(
        (code, body["run"]["state"].as_str()),
        (200, Some("succeeded")),
        "{body}"
    );
    drop(service);
}

#[test]
fn mutating_routes_need_the_bearer_token_and_reads_do_not() {
    let sandbox = Sandbox::new(TASKS);
    let service = sandbox.serve_with(&[("TURBOSCHED_TOKEN", "s3cret-token")]);
    let api = Api::new(&service, Some("s3cret-token"));
    for path in [
        "/scheduler/run_hello",
        "/scheduler/tasks/hello/pause",
        "/scheduler/reload",
        "/scheduler/runs/1/abort",
    ] {
        let (code, body) = api.post_with(path, None, None);
        assert_eq!(code, 401, "{path}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized");
        let (code, body) = api.post_with(path, None, Some("Bearer wrong-token"));
        assert_eq!(code, 403, "{path}: {body}");
        let (code, _) = api.post_with(path, None, Some("Basic czNjcmV0"));
        assert_eq!(code, 401, "{path}: not a bearer token");
    }
    let (code, body) = api.post("/scheduler/run_hello", None);
    assert_eq!(code, 202, "{body}");
    for path in [
        "/scheduler/status",
        "/scheduler/tasks",
        "/scheduler/runs",
        "/health",
        "/metrics",
    ] {
        assert_eq!(api.get(path).0, 200, "{path} is readable without a token");
    }
    // The start-up log says a token is in force, and never the token.
    let log = service.stderr_text();
    assert!(
        log.contains("token in force (from $TURBOSCHED_TOKEN)") && !log.contains("s3cret-token"),
        "{log}"
    );
    let unguarded = Sandbox::new(TASKS);
    let open = unguarded.serve();
    let log = open.stderr_text();
    assert!(log.contains("no token ($TURBOSCHED_TOKEN unset)"), "{log}");
    drop(service);
}

#[test]
fn serving_beyond_loopback_without_a_token_refuses_to_start() {
    let sandbox = Sandbox::with_config(&format!(
        "{}\n{TASKS}",
        FAST_SCHEDULER.replace("127.0.0.1:0", "0.0.0.0:0")
    ));
    let output = sandbox.cli(&["serve"]);
    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    assert!(
        text.contains(
            "refusing to serve the API on 0.0.0.0:0 without a token: set TURBOSCHED_TOKEN"
        ),
        "{text}"
    );
}

#[test]
fn runs_are_listed_newest_first_filtered_and_paginated() {
    let sandbox = Sandbox::new(TASKS);
    for _ in 0..3 {
        sandbox.cli(&["run", "hello"]);
    }
    sandbox.cli(&["run", "broken"]);
    let service = sandbox.serve();
    let api = Api::new(&service, None);
    let (code, page) = api.get_json("/scheduler/runs?limit=2");
    assert_eq!(code, 200);
    let ids: Vec<i64> = page["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![4, 3]);
    let cursor = page["next_cursor"].as_i64().unwrap();
    let (_, next) = api.get_json(&format!("/scheduler/runs?limit=2&cursor={cursor}"));
    let ids: Vec<i64> = next["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![2, 1]);
    let (_, failed) = api.get_json("/scheduler/runs?state=failed");
    assert_eq!(failed["runs"].as_array().unwrap().len(), 1);
    assert_eq!(failed["next_cursor"], Value::Null);
    let (_, hello) = api.get_json("/scheduler/runs?task=hello&since=2000-01-01T00:00:00Z");
    assert_eq!(hello["runs"].as_array().unwrap().len(), 3);
    let (_, future) = api.get_json("/scheduler/runs?since=2999-01-01T00:00:00Z");
    assert!(future["runs"].as_array().unwrap().is_empty());
    for bad in [
        "state=finished",
        "limit=0",
        "limit=5000",
        "since=yesterday",
        "cursor=abc",
        "colour=red",
    ] {
        let (code, body) = api.get_json(&format!("/scheduler/runs?{bad}"));
        assert_eq!(code, 400, "{bad}: {body}");
        assert!(body["error"]["message"].is_string());
    }
    drop(service);
}

#[test]
fn a_run_can_be_read_aborted_retried_from_its_checkpoint_and_its_log_followed() {
    let sandbox = Sandbox::new(TASKS);
    let service = sandbox.serve();
    let api = Api::new(&service, None);
    assert_eq!(api.get_json("/scheduler/runs/abc").0, 400);
    assert_eq!(api.get_json("/scheduler/runs/999").0, 404);
    assert_eq!(api.post("/scheduler/runs/999/abort", None).0, 404);
    assert_eq!(api.post("/scheduler/runs/999/retry", None).0, 404);

    let (_, body) = api.post("/scheduler/run_long", None);
    let id = body["run_id"].as_i64().unwrap();
    // Let it checkpoint a few of its ten steps (3 s each).
    let running = wait_until("two checkpointed steps", Duration::from_secs(20), || {
        let (_, run) = api.get_json(&format!("/scheduler/runs/{id}"));
        (run["checkpoint"]["step"].as_u64()? >= 2).then_some(run)
    });
    assert_eq!(running["state"], "running");
    assert_eq!(running["phase"], "sleeping");
    let (code, _) = api.post(&format!("/scheduler/runs/{id}/retry"), None);
    assert_eq!(code, 409, "a running run cannot be retried");

    // Follow the log while the run goes on; it ends when the run ends.
    let follower = {
        let agent = api.agent.clone();
        let url = format!("{}/scheduler/runs/{id}/log?follow=1", api.base);
        std::thread::spawn(move || {
            agent
                .get(url)
                .call()
                .map(|mut r| r.body_mut().read_to_string().unwrap_or_default())
        })
    };
    let (code, body) = api.post(&format!("/scheduler/runs/{id}/abort"), None);
    assert_eq!(code, 202, "{body}");
    let aborted = api.wait_for(id, "aborted");
    assert_eq!(aborted["attempts"], 1, "an aborted run is not retried");
    let followed = follower.join().unwrap().expect("log stream");
    assert!(
        followed.contains(&format!(" run={id} attempt=1 - attempt 1 of 3 started")),
        "{followed}"
    );
    assert!(
        followed.contains("aborted after"),
        "the stream went on until the end: {followed}"
    );
    let (code, body) = api.post(&format!("/scheduler/runs/{id}/abort"), None);
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (409, Some("already_finished"))
    );

    let (code, body) = api.post(&format!("/scheduler/runs/{id}/retry"), None);
    assert_eq!(code, 202, "{body}");
    let retry = body["run_id"].as_i64().unwrap();
    let resumed = wait_until("the retry to resume", Duration::from_secs(20), || {
        let (_, run) = api.get_json(&format!("/scheduler/runs/{retry}"));
        (run["checkpoint"]["step"].as_u64()? > running["checkpoint"]["step"].as_u64()?)
            .then_some(run)
    });
    assert_eq!(resumed["trigger"], "retry");
    assert_eq!(
        api.post(&format!("/scheduler/runs/{retry}/abort"), None).0,
        202
    );

    let (code, log) = api.get(&format!("/scheduler/runs/{id}/log"));
    assert_eq!(code, 200);
    assert!(
        log.lines().all(|l| l.contains(&format!(" run={id} "))),
        "{log}"
    );
    assert_eq!(
        api.get(&format!("/scheduler/runs/{id}/log?follow=maybe")).0,
        400
    );
    drop(service);
}

#[test]
fn pause_and_resume_are_persisted_and_shown() {
    let sandbox = Sandbox::new(TASKS);
    let service = sandbox.serve();
    let api = Api::new(&service, None);
    let (code, body) = api.post("/scheduler/tasks/hello/pause", None);
    assert_eq!((code, &body["paused"]), (200, &Value::Bool(true)));
    assert!(sandbox.store().task_state(&"hello".into()).unwrap().paused);
    let task = wait_until(
        "the board to show the pause",
        Duration::from_secs(5),
        || {
            let (_, task) = api.get_json("/scheduler/tasks/hello");
            (task["paused"] == true).then_some(task)
        },
    );
    assert_eq!(
        task["next_fire"],
        Value::Null,
        "a paused task shows no next fire"
    );
    assert_eq!(task["next_fires"].as_array().unwrap().len(), 5);
    assert_eq!(task["config"]["overlap"], "skip");
    assert_eq!(api.post("/scheduler/tasks/nope/pause", None).0, 404);
    assert_eq!(api.get_json("/scheduler/tasks/nope").0, 404);
    let (code, _) = api.post("/scheduler/tasks/hello/resume", None);
    assert_eq!(code, 200);
    assert!(!sandbox.store().task_state(&"hello".into()).unwrap().paused);
    let (_, tasks) = api.get_json("/scheduler/tasks");
    assert_eq!(tasks["tasks"].as_array().unwrap().len(), 4);
    drop(service);
}

#[test]
fn reload_with_a_broken_file_keeps_the_running_config() {
    let sandbox = Sandbox::new(TASKS);
    let service = sandbox.serve();
    let api = Api::new(&service, None);
    let path = sandbox.path().join("config/scheduler.toml");
    let original = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!("{original}\n[tasks.added]\nhandler = \"ping\"\n"),
    )
    .unwrap();
    let (code, body) = api.post("/scheduler/reload", None);
    assert_eq!(code, 200, "{body}");
    let good_hash = body["config_hash"].as_str().unwrap().to_string();
    let names = |api: &Api| -> Vec<String> {
        let (_, tasks) = api.get_json("/scheduler/tasks");
        tasks["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["task"].as_str().unwrap().to_string())
            .collect()
    };
    wait_until("the new task to show", Duration::from_secs(5), || {
        names(&api).contains(&"added".to_string()).then_some(())
    });

    std::fs::write(
        &path,
        format!("{original}\n[tasks.added]\nhandler = \"ping\"\ntimeout = \"soon\"\n"),
    )
    .unwrap();
    let (code, body) = api.post("/scheduler/reload", None);
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_config");
    let detail = &body["error"]["details"][0];
    assert_eq!(detail["key"], "tasks.added.timeout");
    assert!(
        detail["line"].as_u64().unwrap() > 20 && detail["column"] == 11,
        "{detail}"
    );
    // SIGHUP with the same broken file: the service keeps going on the old config.
    signal(service.pid(), nix::sys::signal::Signal::SIGHUP);
    wait_until("the failed reload event", Duration::from_secs(5), || {
        let events = sandbox.store().events_after(0, 10_000).unwrap();
        (events
            .iter()
            .filter(|e| e.kind == "config_reload_failed")
            .count()
            >= 2)
            .then_some(())
    });
    assert!(names(&api).contains(&"added".to_string()));
    let (_, status) = api.get_json("/scheduler/status");
    assert_eq!(status["scheduler"]["config_hash"], good_hash);
    let (code, body) = api.post("/scheduler/run_added?wait=10", None);
    assert_eq!(
        (code, body["run"]["state"].as_str()),
        (200, Some("succeeded")),
        "the old config still runs: {body}"
    );
    // Health says the file on disk is not what runs, and why, until a reload succeeds.
    let (code, health) = api.get_json("/health");
    assert_eq!(
        (code, health["status"].as_str()),
        (200, Some("degraded")),
        "{health}"
    );
    assert_eq!(health["checks"]["config"]["status"], "degraded", "{health}");
    let detail = health["checks"]["config"]["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains("failed to reload")
            && detail.contains(&good_hash)
            && detail.contains("timeout"),
        "{detail}"
    );
    std::fs::write(&path, &original).unwrap();
    assert_eq!(api.post("/scheduler/reload", None).0, 200);
    wait_until(
        "health to see the good reload",
        Duration::from_secs(5),
        || {
            let (_, health) = api.get_json("/health");
            (health["checks"]["config"]["status"] == "ok").then_some(())
        },
    );
    drop(service);
}

#[test]
fn an_event_stream_resumed_from_last_event_id_loses_nothing() {
    let sandbox = Sandbox::new(TASKS);
    let service = sandbox.serve();
    let api = Api::new(&service, None);
    for _ in 0..3 {
        assert_eq!(api.post("/scheduler/run_hello?wait=10", None).0, 200);
    }
    let all = collect(&subscribe(&api, "?since=0", None), |seen| {
        seen.iter().filter(|e| e.event == "run_succeeded").count() >= 3
    });
    let stored: Vec<i64> = sandbox
        .store()
        .events_after(0, 100_000)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    let streamed: Vec<i64> = all.iter().map(|e| e.id).collect();
    assert_eq!(
        streamed,
        stored[..streamed.len()].to_vec(),
        "?since=0 replays the whole log in order"
    );

    // A client that saw up to the middle event reconnects, then new events happen.
    let middle = streamed[streamed.len() / 2];
    let resumed = subscribe(&api, "", Some(middle));
    assert_eq!(api.post("/scheduler/run_hello?wait=10", None).0, 200);
    let got = collect(&resumed, |seen| {
        seen.iter().filter(|e| e.event == "run_succeeded").count() >= 3
    });
    let stored: Vec<i64> = sandbox
        .store()
        .events_after(middle, 100_000)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    let ids: Vec<i64> = got.iter().map(|e| e.id).collect();
    assert_eq!(
        ids,
        stored[..ids.len()].to_vec(),
        "everything after Last-Event-ID, no gap, no repeat"
    );
    assert_eq!(ids[0], middle + 1);
    for bad in ["?since=abc", "?since=-4"] {
        assert_eq!(api.get(&format!("/scheduler/events{bad}")).0, 400, "{bad}");
    }
    drop(service);
}

#[test]
fn health_turns_degraded_on_failures_and_unhealthy_when_the_store_cannot_write() {
    let sandbox = Sandbox::new(TASKS);
    let service = sandbox.serve();
    let api = Api::new(&service, None);
    // Registered is not yet serving: the engine's loop reports in a moment after.
    let health = wait_until("the service healthy", Duration::from_secs(20), || {
        let (code, health) = api.get_json("/health");
        (code == 200).then_some(health)
    });
    assert_eq!(health["status"].as_str(), Some("healthy"), "{health}");
    for check in [
        "store",
        "timer_loop",
        "disk",
        "stuck_runs",
        "errors_last_hour",
    ] {
        assert_eq!(health["checks"][check]["status"], "ok", "{check}: {health}");
    }

    assert_eq!(api.post("/scheduler/run_broken?wait=10", None).0, 200);
    let (code, health) = api.get_json("/health");
    assert_eq!(
        (code, health["status"].as_str()),
        (200, Some("degraded")),
        "{health}"
    );
    assert_eq!(health["checks"]["errors_last_hour"]["status"], "degraded");

    // Another process holds the database's write lock: the store check fails.
    let blocker = rusqlite::Connection::open(sandbox.path().join("data/scheduler.db")).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE;").unwrap();
    let (code, health) = api.get_json("/health");
    blocker.execute_batch("ROLLBACK;").unwrap();
    assert_eq!(
        (code, health["status"].as_str()),
        (503, Some("unhealthy")),
        "{health}"
    );
    assert_eq!(health["checks"]["store"]["status"], "failed");
    let (code, _) = api.get_json("/health");
    assert_eq!(code, 200, "recovers once the lock is gone");
    drop(service);
}

#[test]
fn metrics_count_runs_by_task_and_state_with_process_figures() {
    let sandbox = Sandbox::new(TASKS);
    let service = sandbox.serve();
    let api = Api::new(&service, None);
    assert_eq!(api.post("/scheduler/run_hello?wait=10", None).0, 200);
    assert_eq!(api.post("/scheduler/run_broken?wait=10", None).0, 200);
    let (code, text) = api.get("/metrics");
    assert_eq!(code, 200);
    for line in [
        "turbosched_runs_total{state=\"succeeded\",task=\"hello\"} 1",
        "turbosched_runs_total{state=\"failed\",task=\"broken\"} 1",
        "turbosched_run_duration_seconds_count{task=\"hello\"} 1",
        "turbosched_fire_lag_seconds_bucket",
        "turbosched_running ",
        "turbosched_queued ",
        "process_resident_memory_bytes ",
        "process_cpu_seconds_total ",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
    drop(service);
}

#[test]
fn unknown_routes_and_methods_get_json_errors_and_openapi_lists_every_route() {
    let sandbox = Sandbox::new(TASKS);
    let service = sandbox.serve();
    let api = Api::new(&service, None);
    let (code, body) = api.get_json("/nope");
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (code, body) = api.get_json("/scheduler/reload");
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
    let (code, body) = api.request("DELETE", "/scheduler/status");
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );

    let (code, spec) = api.get_json("/openapi.json");
    assert_eq!(code, 200);
    for (method, path) in turbosched::api::ROUTES {
        let operation = &spec["paths"][path][method.to_lowercase()];
        assert!(
            operation.is_object(),
            "{method} {path} is not in /openapi.json"
        );
        assert!(
            operation["responses"].is_object(),
            "{method} {path} has no responses"
        );
    }
    let documented = spec["paths"].as_object().unwrap().len();
    assert_eq!(
        documented,
        turbosched::api::ROUTES.len(),
        "no undocumented and no stale paths"
    );
    drop(service);
}

#[test]
fn an_idle_event_stream_sends_keep_alive_comments() {
    let sandbox = Sandbox::new(TASKS);
    let service = sandbox.serve();
    let api = Api::new(&service, None);
    let response = api
        .agent
        .get(format!("{}/scheduler/events", api.base))
        .call()
        .expect("GET /scheduler/events");
    let (lines, received) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let reader = BufReader::new(response.into_body().into_reader());
        for line in reader.lines() {
            let Ok(line) = line else { return };
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let first = received
        .recv_timeout(Duration::from_secs(5))
        .expect("a greeting");
    assert!(first.starts_with(": connected"), "{first}");
    // Nothing happens on this scheduler: within the 15 s keep-alive period a comment comes.
    let keep_alive = wait_until("a keep-alive comment", Duration::from_secs(25), || {
        received
            .try_recv()
            .ok()
            .filter(|line| line == ": keep-alive")
    });
    assert_eq!(keep_alive, ": keep-alive");
    drop(service);
}

// Issue "No fire lost under the faults operators meet", item 9: API edges.

/// One raw HTTP/1.1 exchange: writes `head` then `body` (ignoring write errors: the server
/// may answer and close before reading everything), reads until the server closes.
/// Returns the status, the lower-cased head and the body.
fn raw(service: &Service, head: &str, body: &[u8]) -> (u16, String, String) {
    use std::io::{Read, Write};
    let address = service.api.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
    let mut answer = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                answer.extend_from_slice(&chunk[..n]);
                // Keep-alive connections stay open: stop once a whole answer is in.
                let text = String::from_utf8_lossy(&answer).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length: ")
                                .map(|v| v.trim().to_string())
                        })
                        .and_then(|v| v.parse::<usize>().ok());
                    if length.is_some_and(|length| body.len() >= length) {
                        break;
                    }
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&answer).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// Asserts an error answer in the stable JSON shape and returns its code.
fn check_json_error(what: &str, status: u16, expected: u16, head: &str, body: &str) -> String {
    assert_eq!(status, expected, "{what}: {head}\n{body}");
    assert!(
        head.contains("content-type: application/json"),
        "{what}: not JSON: {head}"
    );
    let value: Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {body:?}"));
    assert!(
        value["error"]["code"].is_string() && value["error"]["message"].is_string(),
        "{what}: {value}"
    );
    value["error"]["code"].as_str().unwrap().to_string()
}

#[test]
fn every_route_refuses_bodies_over_64_kib_with_a_json_413() {
    let sandbox = Sandbox::new(TASKS);
    let service = sandbox.serve();
    // A declared length over the limit is refused before the body is read, on every
    // route, including those that read no body (reload) and GET routes.
    for (method, path) in [
        ("POST", "/scheduler/reload"),
        ("POST", "/scheduler/run_hello"),
        ("POST", "/scheduler/tasks/hello/pause"),
        ("GET", "/health"),
        ("GET", "/nope"),
    ] {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: 10485760\r\nConnection: close\r\n\r\n"
        );
        let (status, head, body) = raw(&service, &head, b"");
        let code = check_json_error(&format!("{method} {path}"), status, 413, &head, &body);
        assert_eq!(code, "payload_too_large");
    }
    // A chunked body has no declared length: it is counted as it comes.
    let mut chunked = Vec::new();
    for _ in 0..5 {
        chunked.extend_from_slice(format!("{:x}\r\n", 16 * 1024).as_bytes());
        chunked.extend_from_slice(&[b' '; 16 * 1024]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    for path in ["/scheduler/reload", "/scheduler/run_hello"] {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        );
        let (status, head, body) = raw(&service, &head, &chunked);
        check_json_error(&format!("chunked {path}"), status, 413, &head, &body);
    }
    // Under the limit still works, chunked too.
    let small = b"2\r\n{}\r\n0\r\n\r\n";
    let head = "POST /scheduler/reload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    let (status, _, body) = raw(&service, head, small);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        sandbox
            .store()
            .events_after(0, 10_000)
            .unwrap()
            .iter()
            .filter(|e| e.kind == "config_reloaded")
            .count(),
        1,
        "only the small request reloaded"
    );
    drop(service);
}

#[test]
fn request_heads_over_the_limits_or_malformed_get_json_errors() {
    let sandbox = Sandbox::new(TASKS);
    let service = sandbox.serve();
    let long_query = format!(
        "GET /scheduler/runs?task={} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "a".repeat(70_000)
    );
    let (status, head, body) = raw(&service, &long_query, b"");
    assert_eq!(
        check_json_error("70 KB query", status, 414, &head, &body),
        "uri_too_long"
    );

    let mut many = String::from("GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for i in 0..500 {
        many.push_str(&format!("X-Header-{i}: {i}\r\n"));
    }
    many.push_str("\r\n");
    let (status, head, body) = raw(&service, &many, b"");
    assert_eq!(
        check_json_error("500 headers", status, 431, &head, &body),
        "headers_too_large"
    );

    let big_header = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "b".repeat(40_000)
    );
    let (status, head, body) = raw(&service, &big_header, b"");
    check_json_error("a 40 KB header", status, 431, &head, &body);

    for (what, request) in [
        ("garbage", "NOT HTTP AT ALL\r\n\r\n"),
        (
            "no Host",
            "GET /health HTTP/1.1\r\nConnection: close\r\n\r\n",
        ),
        (
            "bad content-length",
            "POST /scheduler/reload HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n",
        ),
        (
            "bad header name",
            "GET /health HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
        ),
    ] {
        let (status, head, body) = raw(&service, request, b"");
        check_json_error(what, status, 400, &head, &body);
    }

    // The body's framing is the codec's too: a malformed chunk is a JSON 400.
    let (status, head, body) = raw(
        &service,
        "POST /scheduler/reload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n",
        b"zz\r\nnot a chunk\r\n",
    );
    check_json_error("a malformed chunk", status, 400, &head, &body);

    // A head that does not come within 5 s.
    let started = std::time::Instant::now();
    let (status, head, body) = raw(&service, "GET /health HTTP/1.1\r\nHost: x\r\n", b"");
    assert_eq!(
        check_json_error("a slow head", status, 408, &head, &body),
        "request_timeout"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    // Within the limits all is normal.
    let (status, _, body) = raw(
        &service,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"",
    );
    assert_eq!(status, 200, "{body}");
    drop(service);
}

#[test]
fn method_not_allowed_says_which_methods_the_route_accepts() {
    let sandbox = Sandbox::new(TASKS);
    let service = sandbox.serve();
    for (method, path) in turbosched::api::ROUTES {
        let path = path.replace("{task}", "hello").replace("{id}", "1");
        let other = if *method == "GET" { "POST" } else { "GET" };
        for wrong in [other, "DELETE", "PUT"] {
            let (status, head, body) = raw(
                &service,
                &format!("{wrong} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
                b"",
            );
            let code = check_json_error(&format!("{wrong} {path}"), status, 405, &head, &body);
            assert_eq!(code, "method_not_allowed");
            assert!(
                head.contains(&format!("\r\nallow: {method}").to_ascii_lowercase()),
                "{wrong} {path}: no Allow: {method}: {head}"
            );
        }
    }
    drop(service);
}

#[test]
fn openapi_states_the_bounds_and_enums_the_server_enforces() {
    let sandbox = Sandbox::new(TASKS);
    sandbox.cli(&["run", "hello"]);
    let service = sandbox.serve();
    let api = Api::new(&service, None);
    let (_, spec) = api.get_json("/openapi.json");
    let parameter = |path: &str, method: &str, name: &str| -> Value {
        spec["paths"][path][method]["parameters"]
            .as_array()
            .unwrap_or_else(|| panic!("{method} {path} has no parameters"))
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{method} {path} has no parameter {name}"))["schema"]
            .clone()
    };
    let run_id = serde_json::json!({"type": "integer", "format": "int64", "minimum": 1, "maximum": i64::MAX});
    for (method, path) in turbosched::api::ROUTES {
        if path.contains("{id}") {
            assert_eq!(
                parameter(path, &method.to_lowercase(), "id"),
                run_id,
                "{method} {path}"
            );
        }
    }
    assert_eq!(parameter("/scheduler/runs", "get", "cursor"), run_id);
    // A run id beyond int64 is a 400 (not a 404, not a 5xx).
    assert_eq!(api.get_json("/scheduler/runs/9223372036854775807").0, 404);
    assert_eq!(api.get_json("/scheduler/runs/9223372036854775808").0, 400);
    assert_eq!(api.get_json("/scheduler/runs/0").0, 400);

    let states = parameter("/scheduler/runs", "get", "state");
    let names: Vec<String> = turbosched::model::RunState::names()
        .split(", ")
        .map(str::to_string)
        .collect();
    assert_eq!(states["enum"], serde_json::json!(names));
    for name in &names {
        assert_eq!(
            api.get_json(&format!("/scheduler/runs?state={name}")).0,
            200
        );
    }
    let limit = parameter("/scheduler/runs", "get", "limit");
    assert_eq!(
        (&limit["minimum"], &limit["maximum"]),
        (&1.into(), &1000.into())
    );
    assert_eq!(
        parameter("/scheduler/runs", "get", "since")["format"],
        "date-time"
    );
    let since = parameter("/scheduler/events", "get", "since");
    assert_eq!(
        (&since["minimum"], &since["maximum"]),
        (&0.into(), &i64::MAX.into())
    );

    // The flags: exactly the spellings the server takes.
    let follow = parameter("/scheduler/runs/{id}/log", "get", "follow");
    let force = parameter("/scheduler/tasks/{task}/run", "post", "force");
    assert_eq!(follow, force, "one flag syntax");
    for spelling in follow["enum"].as_array().unwrap() {
        let spelling = spelling.as_str().unwrap();
        assert_eq!(
            api.get(&format!("/scheduler/runs/1/log?follow={spelling}"))
                .0,
            200,
            "follow={spelling}"
        );
    }
    assert_eq!(api.get("/scheduler/runs/1/log?follow=maybe").0, 400);

    // wait: a flag (not 0/1, which are seconds) or 0 to 3600 seconds; the body says the same.
    let wait = parameter("/scheduler/tasks/{task}/run", "post", "wait");
    let seconds = wait["anyOf"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["type"] == "integer")
        .unwrap()
        .clone();
    assert_eq!(
        (&seconds["minimum"], &seconds["maximum"]),
        (&0.into(), &3600.into())
    );
    let body_wait = &spec["components"]["schemas"]["TriggerOptions"]["properties"]["wait"];
    assert!(
        body_wait["oneOf"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["maximum"] == 3600),
        "{body_wait}"
    );
    for (route, path) in [
        ("/scheduler/run_{task}", "/scheduler/run_hello"),
        ("/scheduler/tasks/{task}/run", "/scheduler/tasks/hello/run"),
    ] {
        assert_eq!(parameter(route, "post", "wait"), wait);
        let (code, _) = api.post(&format!("{path}?wait=3601"), None);
        assert_eq!(code, 400, "{path}?wait=3601");
        let (code, _) = api.post(path, Some("{\"wait\": 3601}"));
        assert_eq!(code, 400, "{path} wait 3601 in the body");
    }
    drop(service);
}

#[test]
fn a_bad_wait_says_what_wait_accepts() {
    let sandbox = Sandbox::new(TASKS);
    let service = sandbox.serve();
    let api = Api::new(&service, None);
    for (query, body) in [
        ("?wait=-1", None),
        ("?wait=soon", None),
        ("", Some("{\"wait\": -1}")),
        ("", Some("{\"wait\": \"yes\"}")),
    ] {
        let (code, answer) = api.post(&format!("/scheduler/run_hello{query}"), body);
        assert_eq!(code, 400, "{query} {body:?}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("wait: expected true, false or a number of seconds from 0 to 3600"),
            "{query} {body:?}: {message}"
        );
    }
    drop(service);
}

#[test]
fn a_set_but_empty_token_variable_refuses_to_start() {
    let sandbox = Sandbox::new(TASKS);
    for value in ["", "   ", " s3cret "] {
        let mut child = sandbox
            .command(&["serve"])
            .env("TURBOSCHED_TOKEN", value)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let exited = wait_until_or_none(Duration::from_secs(10), || child.try_wait().unwrap());
        if exited.is_none() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("TURBOSCHED_TOKEN={value:?}: serve started without a usable token");
        }
        let output = child.wait_with_output().unwrap();
        let text = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{value:?}: {text}");
        assert!(
            text.contains("TURBOSCHED_TOKEN (named by [api] token_env)"),
            "{value:?}: {text}"
        );
    }
}

/// Polls `check` every 20 ms for at most `within`.
fn wait_until_or_none<T>(within: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if let Some(value) = check() {
            return Some(value);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn only_exactly_bearer_space_token_is_accepted() {
    let sandbox = Sandbox::new(TASKS);
    let service = sandbox.serve_with(&[("TURBOSCHED_TOKEN", "s3cret-token")]);
    let post = |authorization: &str| {
        let (status, head, body) = raw(
            &service,
            &format!(
                "POST /scheduler/tasks/hello/pause HTTP/1.1\r\nHost: x\r\n\
                 Authorization: {authorization}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
            b"",
        );
        if status >= 400 {
            check_json_error(authorization, status, status, &head, &body);
        }
        status
    };
    assert_eq!(post("Bearer s3cret-token"), 200);
    assert_eq!(
        post("bearer s3cret-token"),
        200,
        "the scheme is case-insensitive"
    );
    for bad in [
        "Bearer  s3cret-token",
        "Bearer\ts3cret-token",
        "Bearer s3cret-token\tx",
        "Bearer s3cret-token x",
        "Bearer",
        "Bearer ",
        "Bearers3cret-token",
        " s3cret-token",
    ] {
        assert_eq!(post(bad), 401, "{bad:?}");
    }
    assert_eq!(post("Bearer s3cret-tokenx"), 403);
    drop(service);
}

#[test]
fn an_event_stream_ahead_of_the_store_is_told_and_resynchronised() {
    // Issue 15, item 3: `Last-Event-ID: 1200` on a store whose newest event is far lower
    // (a restored or new database) delivered nothing, ever. The stream now says so with a
    // `resync` event whose id is the newest, and goes on from there.
    let sandbox = Sandbox::new(TASKS);
    let service = sandbox.serve();
    let api = Api::new(&service, None);
    for (query, last_event_id) in [("", Some(1200)), ("?since=1200", None)] {
        let newest = sandbox.store().last_event_seq().unwrap();
        assert!(newest < 1200, "{newest}");
        let stream = subscribe(&api, query, last_event_id);
        assert_eq!(api.post("/scheduler/run_hello?wait=10", None).0, 200);
        let got = collect(&stream, |seen| {
            seen.iter().any(|e| e.event == "run_succeeded")
        });
        let resync = &got[0];
        assert_eq!(resync.event, "resync", "{query}: {got:?}");
        assert_eq!(resync.data["requested_after"], 1200, "{}", resync.data);
        assert_eq!(resync.data["newest"], resync.id, "{}", resync.data);
        assert!(resync.id >= newest, "{}", resync.data);
        let ids: Vec<i64> = got[1..].iter().map(|e| e.id).collect();
        let stored: Vec<i64> = sandbox
            .store()
            .events_after(resync.id, 100_000)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(
            ids,
            stored[..ids.len()].to_vec(),
            "{query}: from the newest on"
        );
        assert!(got[1..].iter().any(|e| e.event == "run_started"), "{got:?}");
    }
    drop(service);
}

#[test]
fn a_cascade_is_listed_whole_by_its_root_and_tasks_describe_their_schedules_in_words() {
    let sandbox = Sandbox::new(
        "[tasks.a]\nhandler = \"ping\"\nschedule = \"0 0 3 * * *\"\n\
         [tasks.b]\nhandler = \"ping\"\ndepends_on = [\"a\"]\n",
    );
    let service = sandbox.serve();
    let api = Api::new(&service, None);
    let (code, tasks) = api.get_json("/scheduler/tasks");
    assert_eq!(code, 200);
    let describe = |task: &str| {
        tasks["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["task"] == task)
            .unwrap()["schedule_description"]
            .clone()
    };
    assert_eq!(describe("a"), "at 03:00, every day");
    assert_eq!(describe("b"), Value::Null, "a manual task has no schedule");

    let (code, body) = api.post("/scheduler/run_a?downstream=true", None);
    assert_eq!(code, 202, "{body}");
    let root = body["run_id"].as_i64().unwrap();
    let page = wait_until("the whole cascade", Duration::from_secs(30), || {
        let (code, page) = api.get_json(&format!("/scheduler/runs?cascade={root}"));
        assert_eq!(code, 200, "{page}");
        let runs = page["runs"].as_array()?;
        (runs.len() == 2 && runs.iter().all(|r| r["state"] == "succeeded")).then_some(page)
    });
    let runs = page["runs"].as_array().unwrap();
    assert_eq!(
        (
            runs[0]["id"].as_i64(),
            runs[0]["task"].as_str(),
            runs[0]["downstream"].as_bool()
        ),
        (Some(root), Some("a"), Some(true)),
        "the root first"
    );
    assert_eq!(
        (runs[1]["task"].as_str(), runs[1]["cascade"].as_i64()),
        (Some("b"), Some(root))
    );
    assert_eq!(page["next_cursor"], Value::Null);

    for (query, code) in [
        ("cascade=abc", 400),
        (&format!("cascade={root}&limit=5") as &str, 400),
        ("cascade=9999", 404),
    ] {
        let (status, body) = api.get_json(&format!("/scheduler/runs?{query}"));
        assert_eq!(status, code, "{query}: {body}");
    }
}

#[test]
fn a_task_failing_n_runs_in_a_row_opens_its_circuit_and_manual_runs_say_so_until_resume() {
    let sandbox = Sandbox::new(
        "[tasks.flaky]\ncommand = [\"/bin/false\"]\nschedule = \"* * * * * *\"\nmax_consecutive_failures = 2\n",
    );
    let service = sandbox.serve();
    let api = Api::new(&service, None);
    let task = wait_until("the circuit to open", Duration::from_secs(30), || {
        let (_, task) = api.get_json("/scheduler/tasks/flaky");
        (task["circuit_open"] == true).then_some(task)
    });
    assert_eq!(task["paused"], true);
    let store = sandbox.store();
    let opened = store
        .latest_event(&["circuit_opened"], Some("flaky"), None)
        .unwrap()
        .expect("a circuit_opened event");
    assert!(
        opened
            .message
            .starts_with("circuit opened: 2 runs in a row failed"),
        "{}",
        opened.message
    );
    let metrics = api.get("/metrics").1;
    assert!(
        metrics.contains("turbosched_circuit_opened_total{task=\"flaky\"} 1"),
        "{metrics}"
    );

    // A manual run goes ahead, and the answer says the circuit is open.
    let (code, body) = api.post("/scheduler/tasks/flaky/run", None);
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["circuit_open"], true, "{body}");
    assert!(
        body["circuit"]
            .as_str()
            .unwrap_or_default()
            .starts_with("circuit opened"),
        "{body}"
    );
    let output = sandbox.cli(&["run", "flaky"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        stdout(&output).starts_with("note: the circuit of flaky is open since "),
        "{}",
        stdout(&output)
    );
    let (_, status) = sandbox.cli_json(&["status", "--json"]);
    let flaky = status["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["task"] == "flaky")
        .cloned()
        .unwrap();
    assert_eq!(flaky["circuit_open"], true, "{flaky}");

    // Resume closes it.
    let (code, _) = api.post("/scheduler/tasks/flaky/resume", None);
    assert_eq!(code, 200);
    assert!(store
        .latest_event(&["circuit_closed"], Some("flaky"), None)
        .unwrap()
        .is_some());
    drop(service);
}

#[test]
fn a_task_shows_its_jittered_next_fire_and_the_ticks_its_calendar_skips() {
    let today = chrono::Utc::now().date_naive();
    let closed = [today + chrono::Days::new(1), today + chrono::Days::new(2)];
    let sandbox = Sandbox::new(&format!(
        "[calendars.shut]\ndates = [\"{}\", \"{}\"]\n\
         [tasks.noon]\nhandler = \"ping\"\nschedule = \"0 0 12 * * *\"\ncalendar = \"shut\"\njitter = \"1h\"\n",
        closed[0], closed[1]
    ));
    let service = sandbox.serve();
    let api = Api::new(&service, None);
    let (code, task) = api.get_json("/scheduler/tasks/noon");
    assert_eq!(code, 200, "{task}");
    assert_eq!(task["circuit_open"], false);
    let next = chrono::DateTime::parse_from_rfc3339(task["next_fire"].as_str().unwrap()).unwrap();
    let due = chrono::DateTime::parse_from_rfc3339(task["next_due"].as_str().unwrap()).unwrap();
    assert!(
        due >= next && due - next < chrono::TimeDelta::hours(1),
        "{task}"
    );
    let upcoming = task["upcoming"].as_array().unwrap();
    let skipped: Vec<&Value> = upcoming
        .iter()
        .filter(|u| !u["skipped"].is_null())
        .collect();
    assert_eq!(skipped.len(), 2, "{task}");
    for (entry, date) in skipped.iter().zip(&closed) {
        assert_eq!(
            entry["skipped"],
            format!("calendar shut: {date} is a listed date"),
            "{task}"
        );
    }
    drop(service);
}

#[test]
fn an_output_folder_of_dot_is_refused_so_the_working_directory_is_never_served() {
    let sandbox = Sandbox::new(TASKS);
    let service = sandbox.serve();
    let api = Api::new(&service, None);
    let path = sandbox.path().join("config/scheduler.toml");
    let original = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!("{original}\n[tasks.report]\nhandler = \"backtest\"\nparams = {{ report_dir = \".\" }}\n"),
    )
    .unwrap();
    let (code, body) = api.post("/scheduler/reload", None);
    assert_eq!(code, 422, "{body}");
    let detail = &body["error"]["details"][0];
    assert_eq!(detail["key"], "tasks.report.params.report_dir", "{body}");
    assert!(
        detail["message"]
            .as_str()
            .unwrap_or_default()
            .contains("would serve the service's working directory"),
        "{body}"
    );
    // The running config is kept: the config file and the database stay out of reach.
    for file in ["config/scheduler.toml", "data/scheduler.db", "."] {
        let (status, body) =
            crate::faults::get_json(&service, &format!("/scheduler/files?path={file}"));
        assert_eq!(status, 403, "{file}: {body}");
    }
    // Nor does the file start a service: `validate` names it.
    let output = sandbox.cli(&["validate"]);
    assert_ne!(output.status.code(), Some(0));
    assert!(
        stderr(&output).contains("tasks.report.params.report_dir")
            || stdout(&output).contains("tasks.report.params.report_dir"),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
}
