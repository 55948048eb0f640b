//! Issue 15, item 6: one time story. Every time in JSON — the API's answers, the event
//! stream, the command line's `--json` — is RFC 3339 in UTC with its offset written out
//! (`+00:00`), whatever zone the scheduler or a task is in; every time shown to people
//! carries its zone: the scheduler's (`[scheduler] timezone`) by default, UTC with `--utc`.

use serde_json::Value;

use crate::api::{collect, subscribe, Api};
use crate::support::*;

/// The scheduler in New York, a task scheduled in London: three zones in play.
fn sandbox() -> Sandbox {
    Sandbox::with_config(&format!(
        "{}\n[tasks.hello]\nhandler = \"ping\"\nschedule = \"0 0 3 * * *\"\ntimezone = \"Europe/London\"\nparams = {{ sleep_sec = 0.1, progress = true }}\n",
        FAST_SCHEDULER.replace("timezone = \"UTC\"", "timezone = \"America/New_York\"")
    ))
}

/// `2026-…T…`: a string that is meant as a time.
fn looks_like_a_time(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() >= 19
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
}

/// Every time-looking string in `value`, with where it is.
fn times_in(value: &Value, at: &str, found: &mut Vec<(String, String)>) {
    match value {
        Value::String(text) if looks_like_a_time(text) => {
            found.push((at.to_string(), text.clone()));
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                times_in(item, &format!("{at}[{i}]"), found);
            }
        }
        Value::Object(map) => {
            for (key, item) in map {
                times_in(item, &format!("{at}.{key}"), found);
            }
        }
        _ => {}
    }
}

/// Checks every time in `value` against the convention; returns how many there were.
fn check_convention(source: &str, value: &Value) -> usize {
    let mut found = Vec::new();
    times_in(value, source, &mut found);
    for (at, text) in &found {
        assert!(
            chrono::DateTime::parse_from_rfc3339(text).is_ok(),
            "{at}: {text} is not RFC 3339"
        );
        assert!(
            text.ends_with("+00:00"),
            "{at}: {text} is not UTC written +00:00"
        );
    }
    found.len()
}

#[test]
fn every_time_in_the_api_events_and_cli_json_is_rfc3339_utc_written_plus_00_00() {
    let sandbox = sandbox();
    let service = sandbox.serve();
    let api = Api::new(&service, None);
    let events = subscribe(&api, "", None);
    let (code, ran) = sandbox.cli_json(&["run", "hello", "--wait", "--json"]);
    assert_eq!(code, 0, "{ran}");
    let id = ran["runs"][0]["id"].as_i64().expect("run id");
    assert!(check_convention("run --wait --json", &ran) >= 4);

    let mut checked = 0;
    for path in [
        "/scheduler/status".to_string(),
        "/scheduler/tasks".to_string(),
        "/scheduler/tasks/hello".to_string(),
        "/scheduler/runs".to_string(),
        format!("/scheduler/runs/{id}"),
        "/health".to_string(),
    ] {
        let (code, value) = api.get_json(&path);
        assert_eq!(code, 200, "{path}: {value}");
        checked += check_convention(&path, &value);
    }
    // A task's detail: its next fires (read in London) and its runs, one form.
    let (_, detail) = api.get_json("/scheduler/tasks/hello");
    assert!(
        check_convention("next_fires", &detail["next_fires"]) == 5,
        "{detail}"
    );
    assert!(checked >= 20, "only {checked} times seen");

    let seen = collect(&events, |seen| {
        seen.iter()
            .any(|e| e.data["run_id"] == id && e.event == "run_succeeded")
    });
    let in_events: usize = seen
        .iter()
        .map(|e| check_convention(&format!("event {}", e.id), &e.data))
        .sum();
    assert!(in_events >= seen.len(), "every event carries its time");

    for args in [
        vec!["runs", "--json"],
        vec!["show", &id.to_string(), "--json"],
        vec!["status", "--json"],
        vec!["audit", "--json"],
    ] {
        let args: Vec<&str> = args.iter().map(|a| &**a).collect();
        let (code, value) = sandbox.cli_json(&args);
        assert!(code == 0 || args[0] == "audit", "{args:?}: {value}");
        assert!(
            check_convention(&args.join(" "), &value) >= 1,
            "{args:?}: {value}"
        );
    }
    drop(service);
}

/// The abbreviations New York's times are shown with.
fn in_new_york(text: &str) -> bool {
    text.contains(" EST") || text.contains(" EDT")
}

#[test]
fn people_see_times_in_the_scheduler_zone_named_and_in_utc_with_the_utc_flag() {
    let sandbox = sandbox();
    let ran = sandbox.cli(&["run", "hello"]);
    assert_eq!(ran.status.code(), Some(0), "{}", stderr(&ran));
    assert!(in_new_york(&stdout(&ran)), "{}", stdout(&ran));
    let id = sandbox.runs_of("hello")[0].id.to_string();

    for args in [
        vec!["runs"],
        vec!["show", id.as_str()],
        vec!["status"],
        vec!["next", "hello", "-n", "2"],
    ] {
        let text = stdout(&sandbox.cli(&args));
        assert!(
            in_new_york(&text),
            "{args:?} names New York's zone:\n{text}"
        );
        assert!(!text.contains(" UTC"), "{args:?}:\n{text}");

        let mut utc_args = vec!["--utc"];
        utc_args.extend(&args);
        let text = stdout(&sandbox.cli(&utc_args));
        assert!(text.contains(" UTC"), "{utc_args:?}:\n{text}");
        assert!(!in_new_york(&text), "{utc_args:?}:\n{text}");
    }
    // `next` also gives the task's own wall-clock time, in its own zone, by name.
    let text = stdout(&sandbox.cli(&["next", "hello", "-n", "1"]));
    assert!(
        text.contains("03:00:00 GMT Europe/London") || text.contains("03:00:00 BST Europe/London"),
        "{text}"
    );
}
