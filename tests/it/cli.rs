//! The command line as an operator uses it.

use crate::support::*;

#[test]
fn validate_prints_every_error_with_file_line_and_column_and_exits_1() {
    let sandbox = Sandbox::with_config(
        "[tasks.training]\nhandler = \"trian\"\ntimeout = \"2 hourz\"\n[tasks.predictions]\nhandler = \"ping\"\ndepends_on = [\"traning\"]\n",
    );
    let output = sandbox.cli(&["validate"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let text = stderr(&output);
    assert!(text.contains("config/scheduler.toml:2:11: tasks.training.handler: unknown handler \"trian\" for task training (did you mean \"train\"?)"), "{text}");
    assert!(text.contains("config/scheduler.toml:3:11: tasks.training.timeout: expected a duration such as \"90m\", found \"2 hourz\""), "{text}");
    assert!(text.contains("config/scheduler.toml:6:15: tasks.predictions.depends_on: unknown task \"traning\" (did you mean \"training\"?)"), "{text}");
    assert!(text.contains("3 error(s)"), "{text}");
}

#[test]
fn validate_accepts_the_shipped_config_and_any_other_file() {
    let sandbox = Sandbox::new("[tasks.a]\nhandler = \"ping\"\n");
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/scheduler.toml");
    let output = sandbox.cli(&["validate", shipped]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stdout(&output).contains("ok"));
}

#[test]
fn serve_refuses_a_bad_config_with_exit_code_2() {
    let sandbox = Sandbox::with_config("[tasks.a]\nhandler = \"ping\"\nschedule = \"every day\"\n");
    let output = sandbox.cli(&["serve"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output)
            .contains("config/scheduler.toml:3:12: tasks.a.schedule: invalid cron expression"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn next_lists_fire_times_in_the_task_zone() {
    let sandbox = Sandbox::new("[tasks.close]\nhandler = \"ping\"\nschedule = \"0 30 16 * * Mon-Fri\"\ntimezone = \"America/New_York\"\n");
    let output = sandbox.cli(&["next", "close", "-n", "3"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    for line in lines {
        assert!(line.contains("16:30:00 E"), "{line}");
    }
}

#[test]
fn next_marks_the_ticks_a_calendar_skips_and_lists_the_count_that_fire() {
    let today = chrono::Utc::now().date_naive();
    let closed: Vec<String> = [1, 2]
        .iter()
        .map(|days| (today + chrono::Days::new(*days)).to_string())
        .collect();
    let sandbox = Sandbox::new(&format!(
        "[calendars.closed]\ndates = [\"{}\", \"{}\"]\n\
         [tasks.noon]\nhandler = \"ping\"\nschedule = \"0 0 12 * * *\"\ntimezone = \"UTC\"\ncalendar = \"closed\"\n",
        closed[0], closed[1]
    ));
    let output = sandbox.cli(&["next", "noon", "-n", "3"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    let (skipped, firing): (Vec<&str>, Vec<&str>) =
        text.lines().partition(|line| line.contains("skipped"));
    assert_eq!(firing.len(), 3, "{text}");
    assert_eq!(skipped.len(), 2, "{text}");
    for (line, date) in skipped.iter().zip(&closed) {
        assert!(
            line.starts_with(&format!("{date} 12:00:00 UTC"))
                && line.ends_with(&format!(
                    "skipped: calendar closed: {date} is a listed date"
                )),
            "{line}"
        );
    }
    assert!(
        firing
            .iter()
            .all(|line| closed.iter().all(|date| !line.starts_with(date.as_str()))),
        "{text}"
    );
}

#[test]
fn next_shows_the_same_jittered_times_from_two_processes_within_the_bound() {
    let sandbox = Sandbox::new(
        "[tasks.a]\nhandler = \"ping\"\nschedule = \"0 0 12 1 * *\"\ntimezone = \"UTC\"\njitter = \"6h\"\n\
         [tasks.b]\nhandler = \"ping\"\nschedule = \"0 0 12 1 * *\"\ntimezone = \"UTC\"\njitter = \"6h\"\n",
    );
    let listing = |task: &str| {
        let output = sandbox.cli(&["next", task, "-n", "6"]);
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        stdout(&output)
    };
    let first = listing("a");
    assert_eq!(
        first,
        listing("a"),
        "another process computes the same delays"
    );
    assert_ne!(first, listing("b"), "another task is spread elsewhere");
    let lines: Vec<&str> = first.lines().collect();
    assert_eq!(lines.len(), 6, "{first}");
    for line in lines {
        // "2027-01-01 14:03:07.123 UTC  (tick 12:00:00 UTC, jitter +2h 3m 7s 123ms)"
        let (due, tick) = line
            .split_once("  (tick ")
            .expect("a due time and its tick");
        assert!(tick.starts_with("12:00:00 UTC, jitter +"), "{line}");
        let at = chrono::NaiveDateTime::parse_from_str(
            due.trim_end_matches(" UTC"),
            "%Y-%m-%d %H:%M:%S%.3f",
        )
        .unwrap_or_else(|e| panic!("{line}: {e}"));
        let nominal = at.date().and_hms_opt(12, 0, 0).unwrap();
        let delay = at - nominal;
        assert!(
            delay >= chrono::TimeDelta::zero() && delay < chrono::TimeDelta::hours(6),
            "{line}"
        );
    }
}

#[test]
fn an_unknown_task_lists_the_known_ones() {
    let sandbox = Sandbox::new(
        "[tasks.ingestion]\nhandler = \"ping\"\n[tasks.training]\nhandler = \"ping\"\n",
    );
    let output = sandbox.cli(&["run", "ingest"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("unknown task \"ingest\" (known tasks: ingestion, training)"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn run_json_runs_and_show_report_times_state_trigger_and_attempts() {
    let sandbox = Sandbox::new(
        "[tasks.hello]\nhandler = \"ping\"\nparams = { sleep_sec = 0.1, progress = true }\n",
    );
    let (code, value) = sandbox.cli_json(&["run", "hello", "--json"]);
    assert_eq!(code, 0, "{value}");
    let run = &value["runs"][0];
    assert_eq!(run["state"], "succeeded");
    assert_eq!(run["trigger"], "manual");
    assert_eq!(run["attempts"], 1);
    assert_eq!(run["result"]["attempt"], 1);
    for field in ["scheduled_for", "started_at", "finished_at"] {
        assert!(
            run[field].as_str().is_some_and(|t| t.ends_with("+00:00")),
            "{field}: {run}"
        );
    }
    let (_, listed) = sandbox.cli_json(&["runs", "--task", "hello", "--json"]);
    assert_eq!(listed[0]["id"], run["id"]);
    let (_, shown) = sandbox.cli_json(&["show", &run["id"].to_string(), "--json"]);
    assert_eq!(shown["attempts_history"][0]["outcome"], "succeeded");
    assert_eq!(shown["progress"], 100.0);

    let table = stdout(&sandbox.cli(&["status"]));
    assert!(table.contains("service: not running"), "{table}");
    assert!(
        table.contains("hello") && table.contains("succeeded"),
        "{table}"
    );
    let bad = sandbox.cli(&["runs", "--state", "finished"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("unknown state \"finished\""),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn a_foreground_run_is_not_mistaken_for_a_service() {
    // Regression: a foreground `turbosched run` registers as an instance, but it adopts
    // no runs; a second `run` meanwhile must run its task itself, not hand it over.
    let sandbox = Sandbox::new("[tasks.long]\nhandler = \"ping\"\nparams = { sleep_sec = 3.0 }\n[tasks.short]\nhandler = \"ping\"\n");
    let mut first = sandbox
        .command(&["run", "long"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        "the foreground run to start",
        std::time::Duration::from_secs(10),
        || {
            sandbox
                .runs_of("long")
                .first()
                .filter(|r| r.state == turbosched::model::RunState::Running)
                .map(|_| ())
        },
    );
    let (code, value) = sandbox.cli_json(&["run", "short", "--json"]);
    assert_eq!(code, 0, "{value}");
    assert_eq!(value["runs"][0]["state"], "succeeded", "{value}");
    assert!(first.wait().unwrap().success());
    let status = stdout(&sandbox.cli(&["status"]));
    assert!(status.contains("service: not running"), "{status}");
}

/// Regression, "No fire lost under the faults operators meet", item 7: configs that can
/// never work are refused by `validate`, every one with its place, in one pass.
#[test]
fn validate_refuses_configs_that_can_never_work_naming_each_line() {
    let sandbox = Sandbox::with_config(
        r#"[scheduler]
kill_grace = "500000000000d"
[api]
bind = "127.0.0.1:99999"
[tasks.leap]
handler = "ping"
schedule = "0 0 31 2 *"
[tasks.yearly]
handler = "ping"
schedule = "0 0 0 1 1 * 2020"
timeout = "30d"
"#,
    );
    let output = sandbox.cli(&["validate"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let text = stderr(&output);
    for line in [
        "config/scheduler.toml:2:14: scheduler.kill_grace: expected a duration of at most 1h, found \"500000000000d\"",
        "config/scheduler.toml:4:8: api.bind: expected an address such as \"127.0.0.1:5000\", found \"127.0.0.1:99999\" (a port is 0 to 65535)",
        "config/scheduler.toml:7:12: tasks.leap.schedule: schedule \"0 0 31 2 *\" never fires (no date matches)",
        "config/scheduler.toml:10:12: tasks.yearly.schedule: invalid cron expression \"0 0 0 1 1 * 2020\": expected 5 or 6 fields (min hour dom month dow, or sec min hour dom month dow), found 7",
        "config/scheduler.toml:11:11: tasks.yearly.timeout: expected a duration of at most 7d, found \"30d\"",
        "5 error(s)",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
    }
}

#[test]
fn validate_refuses_an_empty_file_at_its_start() {
    let sandbox = Sandbox::with_config("# nothing yet\n");
    let output = sandbox.cli(&["validate"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("config/scheduler.toml:1:1: the file is empty: it defines no tasks (add a [tasks.<name>] table)"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn serve_refuses_an_out_of_range_port_naming_its_line() {
    let sandbox =
        Sandbox::with_config("[api]\nbind = \"127.0.0.1:99999\"\n[tasks.a]\nhandler = \"ping\"\n");
    let output = sandbox.cli(&["serve"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("config/scheduler.toml:2:8: api.bind: expected an address"),
        "{}",
        stderr(&output)
    );
}

/// Regression, "No fire lost under the faults operators meet", item 8: a value of the
/// wrong type, a duplicate key and a byte that is not UTF-8 are each named by their full
/// dotted key, line and column.
#[test]
fn validate_names_the_key_of_type_duplicate_and_encoding_errors() {
    let sandbox = Sandbox::with_config(
        "[scheduler]\nmax_workers = \"four\"\n[tasks.a]\nhandler = \"ping\"\nretries = \"three\"\n",
    );
    let output = sandbox.cli(&["validate"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let text = stderr(&output);
    for line in [
        "config/scheduler.toml:2:15: scheduler.max_workers: expected a whole number, found string \"four\"",
        "config/scheduler.toml:5:11: tasks.a.retries: expected a whole number from 0 to 4294967295, found string \"three\"",
        "2 error(s)",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
    }

    let duplicate = sandbox.path().join("duplicate.toml");
    std::fs::write(
        &duplicate,
        "[tasks.a]\nhandler = \"ping\"\ntimeout = \"1m\"\ntimeout = \"2m\"\n",
    )
    .unwrap();
    let output = sandbox.cli(&["validate", "duplicate.toml"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output)
            .contains("duplicate.toml:4:1: tasks.a.timeout: duplicate key (first set on line 3)"),
        "{}",
        stderr(&output)
    );

    let latin1 = sandbox.path().join("latin1.toml");
    std::fs::write(
        &latin1,
        b"[tasks.a]\nhandler = \"ping\"\ndescription = \"caf\xE9\"\n",
    )
    .unwrap();
    let output = sandbox.cli(&["validate", "latin1.toml"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("latin1.toml:3:19: tasks.a.description: expected UTF-8 text, found the byte 0xE9 (save the file as UTF-8)"),
        "{}",
        stderr(&output)
    );
}

/// `GET <path>` on a service's API, parsed.
fn api_json(service: &Service, path: &str) -> serde_json::Value {
    let mut response = ureq::get(format!("{}{path}", service.api))
        .call()
        .unwrap_or_else(|err| panic!("GET {path}: {err}"));
    let text = response.body_mut().read_to_string().unwrap();
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("GET {path}: not JSON ({err}): {text}"))
}

/// Issue "One room per job", item 4: one JSON edge. `show --json` printed a shape of its
/// own, without the attempts' `spawned_at` and the run's `links`; the CLI and the API now
/// print runs from one module, so a script sees the same run whichever it asks.
#[test]
fn show_runs_and_status_json_print_the_runs_the_api_returns() {
    let sandbox = Sandbox::new(
        "[tasks.hello]\nhandler = \"ping\"\nparams = { sleep_sec = 0.1, progress = true }\n",
    );
    let service = sandbox.serve();
    let (code, queued) = sandbox.cli_json(&["run", "hello", "--json"]);
    assert_eq!(code, 0, "{queued}");
    let id = run_id(&queued);
    sandbox.wait_for_state(
        id,
        turbosched::model::RunState::Succeeded,
        std::time::Duration::from_secs(20),
    );

    let (code, shown) = sandbox.cli_json(&["show", &id.to_string(), "--json"]);
    assert_eq!(code, 0, "{shown}");
    let served = api_json(&service, &format!("/scheduler/runs/{id}"));
    assert_eq!(shown, served, "show --json is the API's run");
    assert!(
        shown["attempts_history"][0]["spawned_at"].is_string() && shown["links"].is_object(),
        "{shown}"
    );

    // The human `show` prints the handler's JSON result one key a line, not in one line.
    let text = stdout(&sandbox.cli(&["show", &id.to_string()]));
    let result_lines: Vec<&str> = text
        .lines()
        .skip_while(|line| line.trim() != "result:")
        .skip(1)
        .take_while(|line| line.starts_with("    "))
        .collect();
    assert!(
        result_lines.len() >= 3 && result_lines[0].trim() == "{",
        "{text}"
    );
    assert!(
        text.lines().any(|line| line == "  progress      100%"),
        "a finished run is at 100 % in no phase: {text}"
    );

    let (_, listed) = sandbox.cli_json(&["runs", "--json"]);
    let page = api_json(&service, "/scheduler/runs");
    assert_eq!(listed, page["runs"], "runs --json lists the API's runs");

    let (_, status) = sandbox.cli_json(&["status", "--json"]);
    assert_eq!(
        status["tasks"][0]["last_run"], page["runs"][0],
        "status --json shows the last run as the API does"
    );
    drop(service);
}

/// What a command with a broken config says once on stderr.
const BROKEN_NOTE: &str = "config/scheduler.toml is invalid (1 error; `turbosched validate` shows them); reading the store at data/scheduler.db";

#[test]
fn a_broken_config_leaves_the_store_reading_commands_working() {
    // Issue 15, item 1: mid-edit, an operator can still read the history and the logs,
    // abort a run and hand a run to the service; `next` needs the schedule and refuses.
    let tasks = "[tasks.hello]\nhandler = \"ping\"\n";
    let sandbox = Sandbox::new(tasks);
    let (code, value) = sandbox.cli_json(&["run", "hello", "--json"]);
    assert_eq!(code, 0, "{value}");
    let id = value["runs"][0]["id"].to_string();
    let service = sandbox.serve();
    std::fs::write(
        sandbox.path().join("config/scheduler.toml"),
        format!("{FAST_SCHEDULER}\n{tasks}timout = \"10s\"\n"),
    )
    .unwrap();

    let check = |args: &[&str], code: i32, out: &str| {
        let output = sandbox.cli(args);
        let (text, err) = (stdout(&output), stderr(&output));
        assert_eq!(output.status.code(), Some(code), "{args:?}: {text}\n{err}");
        assert!(text.contains(out), "{args:?}: {text}");
        assert_eq!(err.matches(BROKEN_NOTE).count(), 1, "{args:?}: {err}");
    };
    check(&["status"], 0, "hello");
    check(&["status"], 0, "service: up");
    check(&["runs"], 0, "succeeded");
    check(&["show", &id], 0, "succeeded");
    check(&["logs", "hello"], 0, &format!("run={id} "));
    check(&["abort", &id], 1, "already finished");

    let (code, queued) = sandbox.cli_json(&["run", "hello", "--json"]);
    assert_eq!(code, 0, "{queued}");
    sandbox.wait_for_state(
        run_id(&queued),
        turbosched::model::RunState::Succeeded,
        std::time::Duration::from_secs(20),
    );

    let next = sandbox.cli(&["next", "hello"]);
    assert_eq!(next.status.code(), Some(2));
    assert!(
        stderr(&next).contains("timout") && stderr(&next).contains("`next` needs"),
        "{}",
        stderr(&next)
    );
    assert_eq!(sandbox.cli(&["validate"]).status.code(), Some(1));
    drop(service);
    assert_eq!(sandbox.cli(&["serve"]).status.code(), Some(2));
}

/// Runs `args` with stdout a pipe whose reader is already gone, as `… | head -1` leaves
/// it once `head` has its line, and asserts a quiet end: exit 0, no panic.
fn check_quiet_on_closed_pipe(sandbox: &Sandbox, args: &[&str]) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = sandbox
        .command(args)
        .stdin(std::process::Stdio::null())
        .stdout(writer)
        .output()
        .unwrap();
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(0), "{args:?}: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "{args:?}: {err}"
    );
}

#[test]
fn a_closed_stdout_pipe_ends_a_command_quietly() {
    // Issue 15, item 4: `turbosched logs heartbeat | head -1` and `status | head -3`
    // exited 101 with "failed printing to stdout: Broken pipe".
    let sandbox = Sandbox::new("[tasks.heartbeat]\nhandler = \"ping\"\n");
    assert_eq!(sandbox.cli(&["run", "heartbeat"]).status.code(), Some(0));
    for args in [
        &["logs", "heartbeat"][..],
        &["status"],
        &["runs"],
        &["show", "1"],
        &["next", "heartbeat"],
        &["validate"],
    ] {
        check_quiet_on_closed_pipe(&sandbox, args);
    }
}
