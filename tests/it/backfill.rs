//! `turbosched backfill` (issue 16, feature 4): past ticks queued under the claim of
//! scheduled ticks — a tick that already ran is not run again —, oldest first, one at a
//! time per task, with `--downstream` the dependent tasks after each.

use serde_json::Value;
use turbosched::model::{RunState, Trigger};

use crate::support::{stderr, stdout, Sandbox};

const TASKS: &str = r#"
[tasks.tick]
schedule = "0 * * * *"
timezone = "Europe/Berlin"
command = ["sh", "-c", "sleep 0.2"]

[tasks.down]
depends_on = ["tick"]
command = ["true"]
"#;

fn backfill(sandbox: &Sandbox, args: &[&str]) -> (i32, Value) {
    let mut all = vec!["backfill", "tick"];
    all.extend_from_slice(args);
    all.push("--json");
    sandbox.cli_json(&all)
}

fn ticks(value: &Value) -> Vec<(String, bool, bool)> {
    value["ticks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["tick"].as_str().unwrap().to_string(),
                t["already_ran"].as_bool().unwrap(),
                t["run_id"].is_i64(),
            )
        })
        .collect()
}

#[test]
fn a_backfill_runs_only_the_ticks_not_run_yet_oldest_first_then_their_downstream_tasks() {
    let sandbox = Sandbox::new(TASKS);
    let (code, first) = backfill(
        &sandbox,
        &[
            "--from",
            "2025-01-01T01:00:00Z",
            "--to",
            "2025-01-01T02:00:00Z",
        ],
    );
    assert_eq!(code, 0, "{first}");
    assert_eq!(sandbox.runs_of("tick").len(), 2);

    let (code, dry) = backfill(
        &sandbox,
        &[
            "--from",
            "2025-01-01T00:00:00Z",
            "--to",
            "2025-01-01T04:00:00Z",
            "--dry-run",
        ],
    );
    assert_eq!(code, 0, "{dry}");
    let t = |h: u32| format!("2025-01-01T0{h}:00:00.000000+00:00");
    assert_eq!(
        ticks(&dry),
        [
            (t(0), false, false),
            (t(1), true, false),
            (t(2), true, false),
            (t(3), false, false),
            (t(4), false, false),
        ]
    );
    assert_eq!(sandbox.runs_of("tick").len(), 2, "a dry run queues nothing");

    let (code, done) = backfill(
        &sandbox,
        &[
            "--from",
            "2025-01-01T00:00:00Z",
            "--to",
            "2025-01-01T04:00:00Z",
            "--downstream",
        ],
    );
    assert_eq!(code, 0, "{done}");
    assert_eq!(
        ticks(&done),
        [
            (t(0), false, true),
            (t(1), true, false),
            (t(2), true, false),
            (t(3), false, true),
            (t(4), false, true),
        ]
    );
    let runs = sandbox.runs_of("tick");
    let mut nominal: Vec<_> = runs.iter().map(|r| r.scheduled_for).collect();
    nominal.sort();
    nominal.dedup();
    assert_eq!(nominal.len(), 5, "each tick ran once: {runs:?}");
    assert!(runs
        .iter()
        .all(|r| r.trigger == Trigger::Backfill && r.state == RunState::Succeeded));
    // The three new ones ran oldest first, one after the other.
    let mut new: Vec<_> = runs.iter().filter(|r| r.downstream).collect();
    assert_eq!(new.len(), 3);
    new.sort_by_key(|r| r.started_at);
    let order: Vec<_> = new.iter().map(|r| r.scheduled_for.to_rfc3339()).collect();
    assert_eq!(
        order,
        [
            "2025-01-01T00:00:00+00:00",
            "2025-01-01T03:00:00+00:00",
            "2025-01-01T04:00:00+00:00"
        ]
    );
    for pair in new.windows(2) {
        assert!(pair[0].finished_at.unwrap() <= pair[1].started_at.unwrap());
    }
    // Each one's downstream task ran after it, in its cascade.
    let down = sandbox.runs_of("down");
    assert_eq!(down.len(), 3, "{down:?}");
    for upstream in &new {
        let after = down
            .iter()
            .find(|d| d.cascade == Some(upstream.id))
            .unwrap_or_else(|| panic!("no downstream run after run {}", upstream.id));
        assert_eq!(after.state, RunState::Succeeded);
        assert_eq!(
            after.scheduled_for, upstream.scheduled_for,
            "for the same tick"
        );
        assert!(after.started_at.unwrap() >= upstream.finished_at.unwrap());
    }
}

#[test]
fn a_backfill_date_is_that_whole_day_in_the_tasks_zone_and_bad_ranges_are_refused() {
    let sandbox = Sandbox::new(TASKS);
    let (code, dry) = backfill(
        &sandbox,
        &["--from", "2025-01-02", "--to", "2025-01-02", "--dry-run"],
    );
    assert_eq!(code, 0, "{dry}");
    let ticks = ticks(&dry);
    assert_eq!(ticks.len(), 24);
    // Berlin's midnight is 23:00 UTC in winter.
    assert_eq!(ticks[0].0, "2025-01-01T23:00:00.000000+00:00");
    assert_eq!(ticks[23].0, "2025-01-02T22:00:00.000000+00:00");

    let text = stdout(&sandbox.cli(&[
        "backfill",
        "tick",
        "--from",
        "2025-01-02T00:00:00Z",
        "--to",
        "2025-01-02T01:00:00Z",
        "--dry-run",
    ]));
    assert!(
        text.contains("2025-01-02 00:00:00 UTC  would be queued")
            && text.contains("2 ticks of tick: 2 to queue, 0 already ran"),
        "{text}"
    );

    for (args, expected) in [
        (
            vec![
                "backfill",
                "down",
                "--from",
                "2025-01-01",
                "--to",
                "2025-01-02",
            ],
            "task down has no schedule",
        ),
        (
            vec![
                "backfill",
                "tick",
                "--from",
                "2025-01-03",
                "--to",
                "2025-01-02",
            ],
            "holds no past tick",
        ),
        (
            vec![
                "backfill",
                "tick",
                "--from",
                "yesterday",
                "--to",
                "2025-01-02",
            ],
            "--from \"yesterday\": expected RFC 3339",
        ),
    ] {
        let output = sandbox.cli(&args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(stderr(&output).contains(expected), "{}", stderr(&output));
    }
    assert!(sandbox.runs_of("tick").is_empty());
}

#[test]
fn the_api_backfills_a_range_and_the_service_runs_it() {
    let sandbox = Sandbox::new(TASKS);
    let service = sandbox.serve();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let post = |body: &str| {
        let mut response = agent
            .post(format!("{}/scheduler/tasks/tick/backfill", service.api))
            .header("content-type", "application/json")
            .send(body)
            .expect("POST");
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap();
        (
            status,
            serde_json::from_str::<Value>(&text).unwrap_or(Value::Null),
        )
    };
    let (status, body) = post(r#"{"from": "2025-01-01T00:00:00Z", "to": "2025-01-01T01:00:00Z"}"#);
    assert_eq!(status, 202, "{body}");
    let ids: Vec<i64> = body["ticks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["run_id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    for id in ids {
        sandbox.wait_for_state(
            turbosched::model::RunId(id),
            RunState::Succeeded,
            std::time::Duration::from_secs(20),
        );
    }
    let (status, again) =
        post(r#"{"from": "2025-01-01T00:00:00Z", "to": "2025-01-01T01:00:00Z", "dry_run": true}"#);
    assert_eq!(status, 200, "{again}");
    assert!(ticks(&again)
        .iter()
        .all(|(_, already, run)| *already && !run));
    let (status, refused) = post(r#"{"from": "soon", "to": "2025-01-01"}"#);
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["error"]["code"], "bad_backfill");
    let (status, _) = post(r#"{"to": "2025-01-01"}"#);
    assert_eq!(status, 400);
    service.stop();
}
