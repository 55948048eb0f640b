//! Attempts as child processes: timeout, abort, retries, reports, overlap, workers.

use std::time::Duration;

use turbosched::model::RunState;

use crate::support::*;

/// Waits for the process whose pid a task wrote to `file` in its sandbox to die.
fn await_death_of_pid_in(sandbox: &Sandbox, file: &str) {
    let pid: i64 = std::fs::read_to_string(sandbox.path().join(file))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_until(
        &format!("{file} ({pid}) to die"),
        Duration::from_secs(5),
        || (!process_alive(pid)).then_some(()),
    );
}

#[test]
fn a_command_that_traps_sigterm_is_killed_whole_with_its_child_on_timeout() {
    // The shell ignores SIGTERM (and so does the sleep it starts), so only the SIGKILL
    // to the whole process group after kill_grace can end them.
    let sandbox = Sandbox::new(
        r#"
[tasks.stubborn]
command = "trap '' TERM; echo $$ > shell.pid; sleep 300 & echo $! > child.pid; wait; wait; wait"
shell = true
timeout = "1s"
"#,
    );
    let started = std::time::Instant::now();
    let output = sandbox.cli(&["run", "stubborn", "--json"]);
    let elapsed = started.elapsed();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let runs = sandbox.runs_of("stubborn");
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].state, RunState::TimedOut);
    assert!(
        runs[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("timed out after 1s"),
        "{:?}",
        runs[0].error
    );
    assert!(
        elapsed >= Duration::from_millis(1500),
        "SIGKILL came only after timeout + kill_grace: {elapsed:?}"
    );
    for file in ["shell.pid", "child.pid"] {
        await_death_of_pid_in(&sandbox, file);
    }
    assert!(sandbox
        .log("stubborn")
        .contains("timed out after 1s; stopping process group"));
}

#[test]
fn a_command_that_answers_sigterm_has_its_last_words_logged_and_ends_without_waiting_for_sigkill() {
    // Its output is read while it is being stopped, and the attempt ends when it exits,
    // not when kill_grace (30 s here) would have sent SIGKILL.
    let sandbox = Sandbox::with_config(&format!(
        "{}\n{}",
        FAST_SCHEDULER.replace("kill_grace = \"500ms\"", "kill_grace = \"30s\""),
        r#"
[tasks.polite]
command = "trap 'echo caught TERM, cleaning up; echo bye >&2; exit 3' TERM; echo working; sleep 300 & wait"
shell = true
timeout = "1s"
"#
    ));
    let started = std::time::Instant::now();
    let output = sandbox.cli(&["run", "polite"]);
    let elapsed = started.elapsed();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let run = &sandbox.runs_of("polite")[0];
    assert_eq!(run.state, RunState::TimedOut);
    assert!(
        elapsed < Duration::from_secs(20),
        "ended at its exit, not at kill_grace: {elapsed:?}"
    );
    let log = sandbox.log("polite");
    for line in [
        "INFO - run=1 attempt=1 - working",
        "timed out after 1s; stopping process group",
        "INFO - run=1 attempt=1 - caught TERM, cleaning up",
        "WARN - run=1 attempt=1 - bye",
    ] {
        assert!(log.contains(line), "no {line:?} in:\n{log}");
    }
}

#[test]
fn a_command_that_exits_leaving_a_grandchild_on_its_pipes_ends_at_its_exit_and_the_grandchild_dies()
{
    // The grandchild keeps the shell's stdout and stderr open for five minutes: the
    // attempt must see the shell's exit by itself, not at the end of the output.
    let sandbox = Sandbox::new(
        r#"
[tasks.leaver]
command = "sleep 300 & echo $! > child.pid; echo left; exit 3"
shell = true
timeout = "120s"
"#,
    );
    let started = std::time::Instant::now();
    let output = sandbox.cli(&["run", "leaver"]);
    let elapsed = started.elapsed();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        elapsed < Duration::from_secs(60),
        "ended at the shell's exit, not at the timeout: {elapsed:?}"
    );
    let run = &sandbox.runs_of("leaver")[0];
    assert_eq!(run.state, RunState::Failed);
    assert_eq!(run.exit_code, Some(3));
    await_death_of_pid_in(&sandbox, "child.pid");
    assert!(sandbox
        .log("leaver")
        .contains("INFO - run=1 attempt=1 - left"));
}

#[test]
fn retries_wait_for_an_exponential_backoff_and_resume_from_the_checkpoint() {
    let sandbox = Sandbox::new(
        r#"
[tasks.flaky]
handler = "ping"
params = { sleep_sec = 0.2, fail_times = 2 }
retries = 3
retry_backoff = { initial = "400ms", factor = 2.0, max = "10s", jitter = false }
"#,
    );
    let output = sandbox.cli(&["run", "flaky"]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    let run = &sandbox.runs_of("flaky")[0];
    assert_eq!(run.state, RunState::Succeeded);
    let attempts = sandbox.store().attempts(run.id).unwrap();
    let outcomes: Vec<&str> = attempts
        .iter()
        .map(|a| a.outcome.as_deref().unwrap_or(""))
        .collect();
    assert_eq!(outcomes, vec!["retry_wait", "retry_wait", "succeeded"]);
    let gap = |n: usize| {
        (attempts[n + 1].started_at - attempts[n].finished_at.unwrap()).num_milliseconds()
    };
    assert!(gap(0) >= 400, "first backoff {}ms", gap(0));
    assert!(gap(1) >= 800, "second backoff {}ms", gap(1));
    assert!(gap(1) < 3_000, "second backoff {}ms", gap(1));
    // Every attempt checkpointed all ten steps, so the third resumed from step 10.
    let result: serde_json::Value = serde_json::from_str(run.result.as_deref().unwrap()).unwrap();
    assert_eq!(result["resumed_from_step"], 10);
    assert_eq!(result["attempt"], 3);
    // The checkpoint lives in the store; the copy handed to the child is gone with the run.
    assert!(run.checkpoint.as_deref().unwrap_or("").contains("step"));
    let folder = sandbox.path().join("data/state/checkpoints");
    assert!(folder.is_dir(), "the retries were handed copies");
    let copies = std::fs::read_dir(&folder)
        .map(|dir| dir.count())
        .unwrap_or(0);
    assert_eq!(copies, 0, "no checkpoint file left behind");
    assert_eq!(
        sandbox.event_kinds(run.id),
        vec![
            "run_queued",
            "run_started",
            "run_retrying",
            "run_started",
            "run_retrying",
            "run_started",
            "run_succeeded"
        ]
    );
}

#[test]
fn a_fatal_failure_is_not_retried() {
    let sandbox = Sandbox::new(
        "[tasks.broken]\nhandler = \"ping\"\nparams = { fail_times = 9, fatal = true }\nretries = 3\nretry_backoff = { initial = \"1ms\" }\n",
    );
    let output = sandbox.cli(&["run", "broken"]);
    assert_eq!(output.status.code(), Some(1));
    let run = &sandbox.runs_of("broken")[0];
    assert_eq!((run.state, run.attempt.0), (RunState::Failed, 1));
    let error = run.error.clone().unwrap_or_default();
    assert!(
        error.starts_with(&format!(
            "run {} (broken, attempt 1): exited with code 2",
            run.id
        )),
        "{error}"
    );
    assert!(error.contains("failing attempt 1"), "{error}");
}

#[test]
fn an_external_command_reports_progress_result_and_gets_its_environment() {
    let sandbox = Sandbox::new(
        r#"
[tasks.script]
command = ["/bin/sh", "-c", "echo \"id=$TURBOSCHED_RUN_ID task=$TURBOSCHED_TASK attempt=$TURBOSCHED_ATTEMPT trigger=$TURBOSCHED_TRIGGER greeting=$GREETING\"; echo '::progress::50 halfway'; echo oops >&2; echo '::result::{\"rows\":42}'"]
env = { GREETING = "hello" }
"#,
    );
    let output = sandbox.cli(&["run", "script"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let run = &sandbox.runs_of("script")[0];
    assert_eq!(run.result.as_deref(), Some("{\"rows\":42}"));
    // The phase was reported (its progress event says so); a succeeded run is in none.
    assert_eq!(run.phase, None);
    let progress: Vec<String> = sandbox
        .store()
        .events_after(0, 1000)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "run_progress" && e.run_id == Some(run.id))
        .map(|e| e.message)
        .collect();
    assert!(
        progress.iter().any(|m| m.contains("halfway")),
        "{progress:?}"
    );
    let log = sandbox.log("script");
    let line = format!(
        "task.script - INFO - run={} attempt=1 - id={} task=script attempt=1 trigger=manual greeting=hello",
        run.id, run.id
    );
    assert!(log.contains(&line), "{log}");
    assert!(
        log.contains(&format!(
            "task.script - WARN - run={} attempt=1 - oops",
            run.id
        )),
        "{log}"
    );
    assert!(sandbox
        .event_kinds(run.id)
        .contains(&"run_progress".to_string()));
}

#[test]
fn a_command_that_cannot_start_fails_with_the_reason() {
    let sandbox = Sandbox::new("[tasks.missing]\ncommand = [\"/nonexistent/tool\", \"--flag\"]\n");
    let output = sandbox.cli(&["run", "missing"]);
    assert_eq!(output.status.code(), Some(1));
    let run = &sandbox.runs_of("missing")[0];
    assert_eq!(run.state, RunState::Failed);
    assert!(
        run.error
            .as_deref()
            .unwrap_or("")
            .contains("cannot start /nonexistent/tool --flag"),
        "{:?}",
        run.error
    );
}

#[test]
fn dependencies_skip_with_the_reason_pass_when_satisfied_and_force_bypasses() {
    let sandbox = Sandbox::new(
        r#"
[tasks.upstream]
handler = "ping"
params = { fail_times = 1 }
[tasks.downstream]
handler = "ping"
depends_on = ["upstream"]
"#,
    );
    assert_eq!(sandbox.cli(&["run", "downstream"]).status.code(), Some(1));
    let skipped = &sandbox.runs_of("downstream")[0];
    assert_eq!(skipped.state, RunState::Skipped);
    assert_eq!(
        skipped.reason.as_deref(),
        Some("dependency upstream has never run")
    );

    // Attempt 1 of upstream fails (fail_times = 1, no retries): still not satisfied.
    assert_eq!(sandbox.cli(&["run", "upstream"]).status.code(), Some(1));
    let failed_upstream = sandbox.runs_of("upstream")[0].id;
    assert_eq!(sandbox.cli(&["run", "downstream"]).status.code(), Some(1));
    let reason = sandbox.runs_of("downstream")[1].reason.clone();
    assert_eq!(
        reason,
        Some(format!(
            "dependency upstream: latest run {failed_upstream} failed"
        ))
    );

    let forced = sandbox.cli(&["run", "downstream", "--force"]);
    assert_eq!(forced.status.code(), Some(0), "{}", stderr(&forced));
    assert_eq!(sandbox.runs_of("downstream")[2].state, RunState::Succeeded);
    assert!(sandbox
        .event_kinds(skipped.id)
        .contains(&"run_skipped".to_string()));
}

#[test]
fn downstream_runs_follow_in_dependency_order_and_a_satisfied_dependency_passes() {
    let sandbox = Sandbox::new(
        r#"
[tasks.ingestion]
handler = "ping"
[tasks.training]
handler = "ping"
depends_on = ["ingestion"]
[tasks.backtest]
handler = "ping"
depends_on = ["ingestion"]
[tasks.drift]
handler = "ping"
depends_on = ["training", "backtest"]
[tasks.unrelated]
handler = "ping"
"#,
    );
    let (code, value) = sandbox.cli_json(&["run", "ingestion", "--downstream", "--json"]);
    assert_eq!(code, 0, "{value}");
    let runs = value["runs"].as_array().unwrap();
    let tasks: Vec<&str> = runs.iter().map(|r| r["task"].as_str().unwrap()).collect();
    assert_eq!(tasks.len(), 4, "{value}");
    assert_eq!(tasks[0], "ingestion");
    assert_eq!(tasks[3], "drift");
    assert!(runs.iter().all(|r| r["state"] == "succeeded"), "{value}");
    assert!(runs[1..].iter().all(|r| r["trigger"] == "downstream"));
    let drift = sandbox.runs_of("drift")[0].started_at.unwrap();
    for upstream in ["training", "backtest"] {
        assert!(
            sandbox.runs_of(upstream)[0].finished_at.unwrap() <= drift,
            "{upstream} finished before drift started"
        );
    }
    assert!(sandbox.runs_of("unrelated").is_empty());
}

#[test]
fn max_workers_queues_excess_runs_in_fifo_order_and_drops_none() {
    let sandbox = Sandbox::with_config(&(FAST_SCHEDULER.replace("max_workers = 4", "max_workers = 1")
        + "\n[tasks.a]\nhandler = \"ping\"\nparams = { sleep_sec = 0.3 }\n[tasks.b]\nhandler = \"ping\"\nparams = { sleep_sec = 0.3 }\n[tasks.c]\nhandler = \"ping\"\nparams = { sleep_sec = 0.3 }\n"));
    let service = sandbox.serve();
    let mut ids = Vec::new();
    for task in ["a", "b", "c"] {
        let (code, value) = sandbox.cli_json(&["run", task, "--json"]);
        assert_eq!(code, 0, "{value}");
        ids.push(run_id(&value));
    }
    let rows: Vec<_> = ids
        .iter()
        .map(|id| sandbox.wait_for_state(*id, RunState::Succeeded, Duration::from_secs(20)))
        .collect();
    for pair in rows.windows(2) {
        assert!(
            pair[0].finished_at.unwrap() <= pair[1].started_at.unwrap(),
            "one worker: {} ran before {}",
            pair[0].task,
            pair[1].task
        );
    }
    drop(service);
}

#[test]
fn overlap_skip_records_the_new_run_as_skipped_naming_the_running_one() {
    let sandbox = Sandbox::new(
        "[tasks.long]\nhandler = \"ping\"\nparams = { sleep_sec = 2.0 }\noverlap = \"skip\"\n",
    );
    let _service = sandbox.serve();
    let first = run_id(&sandbox.cli_json(&["run", "long", "--json"]).1);
    sandbox.wait_for_state(first, RunState::Running, Duration::from_secs(10));
    let second = run_id(&sandbox.cli_json(&["run", "long", "--json"]).1);
    let skipped = sandbox.wait_for_state(second, RunState::Skipped, Duration::from_secs(10));
    assert_eq!(
        skipped.reason,
        Some(format!(
            "overlap policy skip: run {first} of long is still running"
        ))
    );
    sandbox.wait_for_state(first, RunState::Succeeded, Duration::from_secs(20));
}

#[test]
fn overlap_queue_starts_the_new_run_after_the_running_one() {
    let sandbox = Sandbox::new(
        "[tasks.long]\nhandler = \"ping\"\nparams = { sleep_sec = 1.0 }\noverlap = \"queue\"\n",
    );
    let _service = sandbox.serve();
    let first = run_id(&sandbox.cli_json(&["run", "long", "--json"]).1);
    sandbox.wait_for_state(first, RunState::Running, Duration::from_secs(10));
    let second = run_id(&sandbox.cli_json(&["run", "long", "--json"]).1);
    let second_row = sandbox.wait_for_state(second, RunState::Succeeded, Duration::from_secs(20));
    let first_row = sandbox.run(first);
    assert_eq!(first_row.state, RunState::Succeeded);
    assert!(first_row.finished_at.unwrap() <= second_row.started_at.unwrap());
}

#[test]
fn overlap_replace_aborts_the_running_one_and_runs_the_new_one() {
    let sandbox = Sandbox::new("[tasks.long]\nhandler = \"ping\"\nparams = { sleep_sec = 30.0 }\noverlap = \"replace\"\nretries = 2\n");
    let _service = sandbox.serve();
    let first = run_id(&sandbox.cli_json(&["run", "long", "--json"]).1);
    sandbox.wait_for_state(first, RunState::Running, Duration::from_secs(10));
    let second = run_id(&sandbox.cli_json(&["run", "long", "--json"]).1);
    let aborted = sandbox.wait_for_state(first, RunState::Aborted, Duration::from_secs(10));
    assert_eq!(aborted.reason, Some(format!("replaced by run {second}")));
    assert_eq!(aborted.attempt.0, 1, "an aborted run is never retried");
    sandbox.wait_for_state(second, RunState::Running, Duration::from_secs(10));
}

#[test]
fn abort_from_the_cli_stops_a_running_run_of_the_service_and_it_is_not_retried() {
    let sandbox = Sandbox::new("[tasks.long]\nhandler = \"ping\"\nparams = { sleep_sec = 30.0, progress = true }\nretries = 2\n");
    let _service = sandbox.serve();
    let run = run_id(&sandbox.cli_json(&["run", "long", "--json"]).1);
    let running = sandbox.wait_for_state(run, RunState::Running, Duration::from_secs(10));
    let pid = wait_until("worker pid recorded", Duration::from_secs(10), || {
        sandbox.run(run).pid
    });
    let output = sandbox.cli(&["abort", &run.to_string()]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("abort of run"),
        "{}",
        stdout(&output)
    );
    let aborted = sandbox.wait_for_state(run, RunState::Aborted, Duration::from_secs(10));
    assert_eq!(aborted.attempt, running.attempt);
    assert_eq!(
        aborted.reason.as_deref(),
        Some("abort requested from the command line")
    );
    wait_until("aborted worker to die", Duration::from_secs(5), || {
        (!process_alive(pid)).then_some(())
    });
    let again = sandbox.cli(&["abort", &run.to_string()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(stdout(&again).contains("already finished: aborted"));
}

#[test]
fn a_dependency_older_than_dependency_max_age_is_not_satisfied() {
    let sandbox = Sandbox::new(
        "[tasks.upstream]\nhandler = \"ping\"\n[tasks.downstream]\nhandler = \"ping\"\ndepends_on = [\"upstream\"]\ndependency_max_age = \"1s\"\n",
    );
    assert_eq!(sandbox.cli(&["run", "upstream"]).status.code(), Some(0));
    let fresh = sandbox.cli(&["run", "downstream"]);
    assert_eq!(
        fresh.status.code(),
        Some(0),
        "fresh upstream success satisfies: {}",
        stderr(&fresh)
    );
    let finished = sandbox.runs_of("upstream")[0].finished_at.unwrap();
    wait_until(
        "the upstream success to age past 1s",
        Duration::from_secs(5),
        || (chrono::Utc::now() > finished + chrono::Duration::milliseconds(1100)).then_some(()),
    );
    assert_eq!(sandbox.cli(&["run", "downstream"]).status.code(), Some(1));
    let reason = sandbox.runs_of("downstream")[1]
        .reason
        .clone()
        .unwrap_or_default();
    assert!(
        reason.contains("more than dependency_max_age 1s"),
        "{reason}"
    );
}

#[test]
fn without_max_age_an_upstream_success_must_be_newer_than_its_latest_tick() {
    // Disabled: the schedules never fire here, they only define freshness.
    let sandbox = Sandbox::new(
        r#"
[tasks.yearly]
handler = "ping"
schedule = "0 0 1 1 *"
enabled = false
[tasks.every_second]
handler = "ping"
schedule = "* * * * * *"
enabled = false
[tasks.after_yearly]
handler = "ping"
depends_on = ["yearly"]
[tasks.after_every_second]
handler = "ping"
depends_on = ["every_second"]
"#,
    );
    assert_eq!(sandbox.cli(&["run", "yearly"]).status.code(), Some(0));
    assert_eq!(sandbox.cli(&["run", "every_second"]).status.code(), Some(0));
    let succeeded = sandbox.runs_of("every_second")[0].scheduled_for;
    wait_until(
        "a tick of every_second after its success",
        Duration::from_secs(5),
        || (chrono::Utc::now() > succeeded + chrono::Duration::milliseconds(1100)).then_some(()),
    );
    assert_eq!(
        sandbox.cli(&["run", "after_yearly"]).status.code(),
        Some(0),
        "newer than Jan 1st"
    );
    assert_eq!(
        sandbox.cli(&["run", "after_every_second"]).status.code(),
        Some(1)
    );
    let reason = sandbox.runs_of("after_every_second")[0]
        .reason
        .clone()
        .unwrap_or_default();
    assert!(
        reason.contains("is older than its latest scheduled fire"),
        "{reason}"
    );
}

#[test]
fn run_wait_hands_the_run_to_the_service_and_reports_its_end() {
    let sandbox = Sandbox::new("[tasks.hello]\nhandler = \"ping\"\nparams = { sleep_sec = 0.3 }\n[tasks.after]\nhandler = \"ping\"\ndepends_on = [\"hello\"]\n");
    let service = sandbox.serve();
    let (code, value) = sandbox.cli_json(&["run", "hello", "--wait", "--downstream", "--json"]);
    assert_eq!(code, 0, "{value}");
    let runs = value["runs"].as_array().unwrap();
    let summary: Vec<(&str, &str)> = runs
        .iter()
        .map(|r| (r["task"].as_str().unwrap(), r["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        summary,
        vec![("hello", "succeeded"), ("after", "succeeded")]
    );
    let instance = sandbox
        .store()
        .live_instances(Duration::from_secs(30), chrono::Utc::now())
        .unwrap();
    let owner = sandbox.runs_of("hello")[0].owner.clone();
    assert_eq!(
        owner,
        Some(instance[0].id.clone()),
        "the service ran it, not the CLI"
    );
    drop(service);
}

#[test]
fn a_result_may_ask_for_runs_and_an_event_which_the_engine_grants_only_on_success() {
    let request = r#"{"request_runs":[{"task":"target","trigger":"drift","reason":"features moved"}],"event":{"kind":"drift_detected","message":"3 of 18 drifted"}}"#;
    let refused = r#"{"request_runs":[{"task":"nope","trigger":"drift","reason":"x"},{"task":"target","trigger":"manual","reason":"y"}],"event":{"kind":"run_succeeded","message":"forged"}}"#;
    let sandbox = Sandbox::new(&format!(
        r#"
[tasks.check]
command = ["/bin/sh", "-c", '''echo '::result::{request}' ''']
[tasks.failing]
command = ["/bin/sh", "-c", '''echo '::result::{request}'; exit 2''']
[tasks.refused]
command = ["/bin/sh", "-c", '''echo '::result::{refused}' ''']
[tasks.target]
command = ["true"]
"#
    ));
    let _service = sandbox.serve();
    let targets = |n: usize| {
        wait_until(
            &format!("{n} target run(s) succeeded"),
            Duration::from_secs(20),
            || {
                let runs = sandbox.runs_of("target");
                (runs.len() == n && runs.iter().all(|r| r.state == RunState::Succeeded))
                    .then_some(runs)
            },
        )
    };

    assert_eq!(
        sandbox.cli(&["run", "check", "--wait"]).status.code(),
        Some(0)
    );
    let runs = targets(1);
    assert_eq!(runs[0].trigger, turbosched::model::Trigger::Drift);
    let check = sandbox.runs_of("check")[0].id;
    assert!(sandbox.log("target").contains(&format!(
        "queued at the request of run {check}: features moved"
    )));
    assert!(sandbox
        .event_kinds(check)
        .contains(&"drift_detected".to_string()));

    // A failed run's requests and event are dropped; unknown tasks, other triggers and
    // the engine's own event kinds are refused.
    assert_ne!(
        sandbox.cli(&["run", "failing", "--wait"]).status.code(),
        Some(0)
    );
    assert_eq!(
        sandbox.cli(&["run", "refused", "--wait"]).status.code(),
        Some(0)
    );
    // A second granted request: once it is there, the earlier finishes were all handled.
    assert_eq!(
        sandbox.cli(&["run", "check", "--wait"]).status.code(),
        Some(0)
    );
    assert_eq!(targets(2).len(), 2);
    assert_eq!(sandbox.runs_of("nope").len(), 0);
    let failing = sandbox.runs_of("failing")[0].id;
    assert!(!sandbox
        .event_kinds(failing)
        .contains(&"drift_detected".to_string()));
    let refused = sandbox.runs_of("refused")[0].id;
    let kinds = sandbox.event_kinds(refused);
    assert_eq!(
        kinds.iter().filter(|k| *k == "run_succeeded").count(),
        1,
        "{kinds:?}"
    );
}

#[test]
fn a_child_printing_a_huge_line_has_it_cut_to_the_limit_and_the_service_log_names_the_run() {
    let sandbox = Sandbox::new(
        "[tasks.big]\ncommand = \"head -c 3000000 /dev/zero | tr '\\\\0' x; echo; echo done\"\nshell = true\n",
    );
    let service = sandbox.serve();
    let output = sandbox.cli(&["run", "big", "--wait", "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let run = sandbox.runs_of("big").pop().expect("a run");
    assert_eq!(run.state, RunState::Succeeded);
    assert_eq!(run.exit_code, Some(0), "a success records its exit code");
    service.stop();
    let log = sandbox.log("big");
    let cut = log
        .lines()
        .find(|l| l.contains("more bytes of this line cut"))
        .unwrap_or_else(|| panic!("no cut line in {} bytes of log", log.len()));
    assert!(cut.len() < 70_000, "a cut line is {} bytes", cut.len());
    assert!(
        cut.contains("2934464 more bytes"),
        "it says how much was cut"
    );
    assert!(log.contains("- done"), "the next line is whole");
    let service_log = std::fs::read_to_string(sandbox.path().join("logs/scheduler.log")).unwrap();
    let started = service_log
        .lines()
        .find(|l| l.contains("child started"))
        .expect("the runner's line");
    assert!(
        started.contains(&format!("task=big run={} attempt=1", run.id)),
        "the run's span: {started}"
    );
}
