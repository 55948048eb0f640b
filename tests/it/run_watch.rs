//! Issue 15, item 5: `turbosched run <task> [--downstream]` behaves one way whether a
//! service takes the run or it is made here: the members shown as they go (a table
//! redrawn on a terminal, a line per move on a pipe), waited on until every one has
//! ended, an exit code from the outcome, and where the outputs are at the end.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use crate::market::shipped;
use crate::support::*;

const TASKS: [&str; 5] = ["ingestion", "backtest", "training", "predictions", "drift"];

/// What `run` printed from its outcome line on, with the numbers that change from run
/// to run (ids, durations) left out: the summary, each member's task and state, and the
/// outputs listed per task (labels and paths, digits masked).
fn outcome_shape(text: &str) -> Vec<String> {
    // Each run of digits becomes one `#`.
    let mask = |line: &str| -> String {
        let mut out = String::new();
        for c in line.chars() {
            if !c.is_ascii_digit() {
                out.push(c);
            } else if !out.ends_with('#') {
                out.push('#');
            }
        }
        out
    };
    let mut shape = Vec::new();
    let mut in_table = false;
    for line in text.lines().skip_while(|l| !l.contains("and its cascade:")) {
        if line.starts_with("TASK ") {
            in_table = true;
            shape.push("TASK STATE".to_string());
        } else if line.starts_with("outputs") {
            in_table = false;
            shape.push(line.to_string());
        } else if in_table {
            let cols: Vec<&str> = line.split_whitespace().collect();
            shape.push(format!("{} {}", cols[0], cols[2]));
        } else {
            shape.push(mask(line));
        }
    }
    shape
}

/// The paths listed under `outputs:`, each checked to exist under the sandbox.
fn listed_outputs(sandbox: &Sandbox, text: &str) -> Vec<(String, String)> {
    let mut listed = Vec::new();
    for line in text.lines().skip_while(|l| *l != "outputs:").skip(1) {
        if line.starts_with("    ") {
            let (label, path) = line.trim().rsplit_once(' ').expect("label and path");
            let path = path.trim().to_string();
            assert!(
                sandbox.path().join(&path).exists(),
                "{path} listed but absent"
            );
            listed.push((label.trim().to_string(), path));
        }
    }
    listed
}

fn check_market_cascade(sandbox: &Sandbox, output: &Output) -> Vec<String> {
    let text = stdout(output);
    assert_eq!(output.status.code(), Some(0), "{text}\n{}", stderr(output));
    assert!(
        text.lines()
            .any(|l| l.starts_with("run ") && l.ends_with("and its cascade: 5 of 5 succeeded")),
        "{text}"
    );
    // Not a terminal: a line for each member's moves, as they happened.
    for task in TASKS {
        assert!(
            text.lines()
                .any(|l| l.contains(&format!(" {task}: succeeded after "))),
            "no progress line for {task}:\n{text}"
        );
    }
    let outputs = listed_outputs(sandbox, &text);
    let labels: Vec<&str> = outputs.iter().map(|(label, _)| label.as_str()).collect();
    for label in [
        "market database",
        "report folder",
        "chart",
        "metrics JSON",
        "SHAP log",
        "model file",
    ] {
        assert!(labels.contains(&label), "{label} not listed:\n{text}");
    }
    assert!(
        outputs
            .iter()
            .any(|(label, path)| label == "chart" && path.ends_with("equity.svg")),
        "{text}"
    );
    assert!(
        outputs
            .iter()
            .any(|(label, path)| label == "chart" && path.ends_with("psi.svg")),
        "{text}"
    );
    outcome_shape(&text)
}

#[test]
fn the_market_cascade_is_waited_on_and_its_outputs_listed_alike_with_the_service_up_or_down() {
    // Down: the run is made here (which waits, even on a pipe).
    let here = shipped();
    let output = here.cli(&["run", "ingestion", "--downstream"]);
    assert!(
        stdout(&output).contains("no service is up, running it here"),
        "{}",
        stdout(&output)
    );
    let made_here = check_market_cascade(&here, &output);

    // Up: the service takes the run, and `--wait` follows it to its end the same way.
    let there = shipped();
    let service = there.serve();
    let output = there.cli(&["run", "ingestion", "--downstream", "--wait"]);
    assert!(
        stdout(&output).contains("queued with the running service; waiting"),
        "{}",
        stdout(&output)
    );
    let by_service = check_market_cascade(&there, &output);
    assert_eq!(made_here, by_service, "one outcome, whoever made the runs");
    drop(service);
}

const FAILING: &str = r#"
[tasks.a]
handler = "ping"
[tasks.b]
command = ["sh", "-c", "echo broken >&2; exit 3"]
depends_on = ["a"]
[tasks.c]
handler = "ping"
depends_on = ["b"]
"#;

#[test]
fn a_failed_member_makes_run_exit_1_naming_it_with_the_service_up_or_down() {
    let sandbox = Sandbox::new(FAILING);
    let check = |output: &Output| {
        let text = stdout(output);
        assert_eq!(output.status.code(), Some(1), "{text}\n{}", stderr(output));
        let summary = text
            .lines()
            .find(|l| l.contains("and its cascade:"))
            .unwrap_or_else(|| panic!("no summary:\n{text}"));
        assert!(
            summary.contains("1 of 3 succeeded; not: b failed (run "),
            "{summary}"
        );
        assert!(
            text.lines().any(
                |l| l.split_whitespace().collect::<Vec<_>>()[..].starts_with(&["b"])
                    && l.contains(" failed ")
            ),
            "{text}"
        );
        assert!(
            text.contains("outputs: none named in the runs' results"),
            "{text}"
        );
        outcome_shape(&text)
    };
    let here = check(&sandbox.cli(&["run", "a", "--downstream"]));
    let service = sandbox.serve();
    let there = check(&sandbox.cli(&["run", "a", "--downstream", "--wait"]));
    assert_eq!(here, there);
    let (code, value) = sandbox.cli_json(&["run", "a", "--downstream", "--wait", "--json"]);
    assert_eq!(code, 1, "{value}");
    assert_eq!(value["runs"][1]["state"], "failed", "{value}");
    assert!(value["runs"][1]["outputs"].is_array(), "{value}");
    drop(service);
}

#[test]
fn no_wait_returns_once_the_service_has_queued_the_run_as_a_pipe_does_by_default() {
    let sandbox = Sandbox::new("[tasks.long]\nhandler = \"ping\"\nparams = { sleep_sec = 60.0 }\n");
    let service = sandbox.serve();
    for args in [
        &["run", "long", "--no-wait"][..],
        &["run", "long"][..], // stdout a pipe: no wait unless asked
    ] {
        let started = Instant::now();
        let output = sandbox.cli(args);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{args:?} waited {:?}",
            started.elapsed()
        );
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        assert!(
            stdout(&output).contains("queued; the service will start it"),
            "{}",
            stdout(&output)
        );
    }
    let (code, value) = sandbox.cli_json(&["run", "long", "--no-wait", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(value["handed_to_service"], true, "{value}");
    let runs = sandbox.runs_of("long");
    assert_eq!(runs.len(), 3, "{runs:?}");
    assert!(!runs[0].state.is_terminal(), "{:?}", runs[0]);
    for run in runs.iter().filter(|r| !r.state.is_terminal()) {
        sandbox.cli(&["abort", &run.id.to_string()]);
    }
    drop(service);
}

/// `script` gives the command a terminal (a pty) as stdout, as a person's shell does.
fn on_a_terminal(dir: &Path, command: &str) -> Output {
    std::process::Command::new("script")
        .args(["-qec", command, "/dev/null"])
        .current_dir(dir)
        .env_remove("TURBOSCHED_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("run script (util-linux)")
}

/// How many cursor-up escapes (`ESC [ <n> A`, what indicatif writes to redraw its lines
/// in place) `text` holds.
fn cursor_ups(text: &str) -> usize {
    text.split("\x1b[")
        .skip(1)
        .filter(|rest| {
            let digits = rest.chars().take_while(char::is_ascii_digit).count();
            digits > 0 && rest[digits..].starts_with('A')
        })
        .count()
}

#[test]
fn cursor_ups_counts_only_the_cursor_up_escape() {
    assert_eq!(cursor_ups("TASK  RUN\x1b[2K\x1b[1m"), 0);
    assert_eq!(cursor_ups("a\x1b[3Ab\x1b[2K\x1b[12A"), 2);
}

#[test]
fn on_a_terminal_run_waits_by_default_redrawing_a_table_of_the_members() {
    let sandbox = Sandbox::new(
        "[tasks.d]\nhandler = \"ping\"\nparams = { sleep_sec = 1.0, progress = true }\n\
         [tasks.e]\nhandler = \"ping\"\ndepends_on = [\"d\"]\n",
    );
    let service = sandbox.serve();
    let output = on_a_terminal(
        sandbox.path(),
        &format!("{} run d --downstream", env!("CARGO_BIN_EXE_turbosched")),
    );
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.contains("waiting (Ctrl-C stops waiting"), "{text}");
    // The table drawn while the cascade goes, with `e` not queued yet, then redrawn in
    // place (cursor moved up over it) …
    assert!(text.contains("TASK             RUN"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("e ") && l.contains("waiting")),
        "{text}"
    );
    assert!(
        cursor_ups(&text) > 0,
        "no redraw (no cursor-up escape ESC [ <n> A): {text:?}"
    );
    // … and the outcome once both have ended.
    assert!(text.contains("and its cascade: 2 of 2 succeeded"), "{text}");
    assert!(
        sandbox.runs_of("e").iter().all(|r| r.state.is_terminal()),
        "returned before the cascade ended"
    );
    drop(service);
}

#[test]
fn run_wait_exits_2_naming_the_open_runs_when_the_service_dies_mid_run() {
    let sandbox = Sandbox::new(
        "[tasks.slow]\nhandler = \"ping\"\nparams = { sleep_sec = 60.0 }\ntimeout = \"5m\"\n",
    );
    let service = sandbox.serve();
    // Killed if the test fails, rather than left waiting.
    struct Reaped(Option<std::process::Child>);
    impl Drop for Reaped {
        fn drop(&mut self) {
            if let Some(child) = self.0.as_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
    let mut cli = Reaped(Some(
        sandbox
            .command(&["run", "slow", "--wait"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let run = wait_until("the run to start", Duration::from_secs(20), || {
        sandbox
            .runs_of("slow")
            .into_iter()
            .find(|r| r.state == turbosched::model::RunState::Running)
    });
    service.kill9();
    let killed = Instant::now();
    let status = wait_until(
        "the CLI to give up waiting",
        Duration::from_secs(30),
        || cli.0.as_mut().and_then(|child| child.try_wait().unwrap()),
    );
    let output = cli.0.take().unwrap().wait_with_output().unwrap();
    let message = stderr(&output);
    assert_eq!(status.code(), Some(2), "{message}");
    assert!(
        message.contains("the service stopped while waiting")
            && message.contains(&format!("slow running (run {})", run.id)),
        "{message}"
    );
    // The heartbeat timeout is 3 s: noticed soon after it lapses, not never.
    assert!(
        killed.elapsed() < Duration::from_secs(15),
        "{:?}",
        killed.elapsed()
    );
}
