//! `turbosched run <task> --downstream --wait` against a live service returns for every
//! way a member of the cascade can end — skipped, aborted while queued, replaced while
//! queued, orphaned, unconfigured — and the cascade moves on past each of them.

use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::Value;
use turbosched::model::{RunId, RunState};

use crate::support::*;

/// The fast scheduler with a long `kill_grace` (a replaced run that ignores SIGTERM keeps
/// its slot meanwhile), and the cascade's root task `a`.
fn chain() -> String {
    format!(
        "{}\n[tasks.a]\nhandler = \"ping\"\n",
        FAST_SCHEDULER.replace("kill_grace = \"500ms\"", "kill_grace = \"5s\"")
    )
}

/// `run a --downstream --wait --json`, started in the background.
fn start_cascade(sandbox: &Sandbox) -> Child {
    sandbox
        .command(&["run", "a", "--downstream", "--wait", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start run --wait")
}

/// Waits for the waiting CLI to return, and its JSON.
fn finished(child: Child) -> Value {
    let mut child = child;
    wait_until(
        "run --downstream --wait to return",
        Duration::from_secs(40),
        || child.try_wait().expect("try_wait"),
    );
    let output = child.wait_with_output().expect("output");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            stdout(&output),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// The cascade's run of `task`.
fn member(sandbox: &Sandbox, task: &str) -> Option<turbosched::store::RunRow> {
    sandbox
        .runs_of(task)
        .into_iter()
        .find(|r| r.cascade.is_some())
}

fn wait_member(sandbox: &Sandbox, task: &str, state: RunState) -> RunId {
    wait_until(
        &format!("the cascade's {task} to be {state}"),
        Duration::from_secs(20),
        || {
            member(sandbox, task)
                .filter(|r| r.state == state)
                .map(|r| r.id)
        },
    )
}

#[test]
fn a_member_skipped_by_its_dependency_check_moves_the_cascade_on() {
    let chain = chain();
    let sandbox = Sandbox::with_config(&format!(
        "{chain}params = {{ fail_times = 5, fatal = true }}\n\
         [tasks.b]\nhandler = \"ping\"\ndepends_on = [\"a\"]\n\
         [tasks.c]\nhandler = \"ping\"\ndepends_on = [\"b\"]\n"
    ));
    let service = sandbox.serve();
    let result = finished(start_cascade(&sandbox));
    service.stop();
    assert_eq!(result["runs"].as_array().map(Vec::len), Some(3), "{result}");
    assert_eq!(member(&sandbox, "a").unwrap().state, RunState::Failed);
    assert_eq!(member(&sandbox, "b").unwrap().state, RunState::Skipped);
    assert_eq!(member(&sandbox, "c").unwrap().state, RunState::Skipped);
}

#[test]
fn a_member_aborted_while_queued_moves_the_cascade_on() {
    let chain = chain();
    let sandbox = Sandbox::with_config(&format!(
        "{chain}[tasks.b]\nhandler = \"ping\"\ndepends_on = [\"a\"]\noverlap = \"queue\"\n\
         params = {{ sleep_sec = 8 }}\n\
         [tasks.c]\nhandler = \"ping\"\ndepends_on = [\"b\"]\n"
    ));
    let service = sandbox.serve();
    // A run of b outside the cascade holds b's slot, so the cascade's b waits queued.
    let (_, blocker) = sandbox.cli_json(&["run", "b", "--force", "--json"]);
    sandbox.wait_for_state(run_id(&blocker), RunState::Running, Duration::from_secs(20));
    let cascade = start_cascade(&sandbox);
    let b = wait_member(&sandbox, "b", RunState::Queued);
    let aborted = sandbox.cli(&["abort", &b.to_string()]);
    assert!(aborted.status.success(), "{}", stderr(&aborted));
    let result = finished(cascade);
    service.stop();
    assert_eq!(result["runs"].as_array().map(Vec::len), Some(3), "{result}");
    assert_eq!(member(&sandbox, "b").unwrap().state, RunState::Aborted);
    assert!(
        member(&sandbox, "c").unwrap().state.is_terminal(),
        "c was queued after b's abort and ended"
    );
}

#[test]
fn a_member_replaced_while_queued_moves_the_cascade_on() {
    let chain = chain();
    let sandbox = Sandbox::with_config(&format!(
        "{chain}[tasks.b]\ncommand = \"trap '' TERM; sleep 8\"\nshell = true\n\
         depends_on = [\"a\"]\noverlap = \"replace\"\n\
         [tasks.c]\nhandler = \"ping\"\ndepends_on = [\"b\"]\n"
    ));
    let service = sandbox.serve();
    // b ignores SIGTERM: a replaced b keeps its slot for the 5 s kill_grace, so the
    // cascade's b waits queued behind it, and a third b replaces the queued one.
    let (_, first) = sandbox.cli_json(&["run", "b", "--force", "--json"]);
    sandbox.wait_for_state(run_id(&first), RunState::Running, Duration::from_secs(20));
    let cascade = start_cascade(&sandbox);
    wait_member(&sandbox, "b", RunState::Queued);
    let (code, third) = sandbox.cli_json(&["run", "b", "--force", "--json"]);
    assert_eq!(code, 0, "{third}");
    let result = finished(cascade);
    service.stop();
    assert_eq!(result["runs"].as_array().map(Vec::len), Some(3), "{result}");
    let b = member(&sandbox, "b").unwrap();
    assert_eq!(b.state, RunState::Aborted);
    assert!(b.reason.unwrap_or_default().starts_with("replaced by run"));
    assert!(member(&sandbox, "c").unwrap().state.is_terminal());
}

#[test]
fn a_member_orphaned_with_no_attempt_left_moves_the_cascade_on() {
    let chain = chain();
    let sandbox = Sandbox::with_config(&format!(
        "{chain}[tasks.b]\nhandler = \"ping\"\ndepends_on = [\"a\"]\nparams = {{ sleep_sec = 30 }}\n\
         [tasks.c]\nhandler = \"ping\"\ndepends_on = [\"b\"]\n"
    ));
    let service = sandbox.serve();
    let cascade = start_cascade(&sandbox);
    let b = wait_member(&sandbox, "b", RunState::Running);
    let pid = wait_until("b's worker pid", Duration::from_secs(10), || {
        sandbox.run(b).pid
    });
    // Stopped, its heartbeats stop: orphaned, no retry left, failed.
    signal(pid as u32, nix::sys::signal::Signal::SIGSTOP);
    let result = finished(cascade);
    service.stop();
    assert_eq!(result["runs"].as_array().map(Vec::len), Some(3), "{result}");
    assert_eq!(member(&sandbox, "b").unwrap().state, RunState::Failed);
    assert_eq!(member(&sandbox, "c").unwrap().state, RunState::Skipped);
}

#[test]
fn a_cascade_whose_tasks_are_removed_while_it_waits_returns() {
    let tasks = "[tasks.b]\nhandler = \"ping\"\ndepends_on = [\"a\"]\n\
                 [tasks.c]\nhandler = \"ping\"\ndepends_on = [\"b\"]\n";
    let blocker = "[tasks.blocker]\nhandler = \"ping\"\nparams = { sleep_sec = 8 }\n";
    let chain = chain();
    let config = format!("{chain}{tasks}{blocker}").replace("max_workers = 4", "max_workers = 1");
    let sandbox = Sandbox::with_config(&config);
    let service = sandbox.serve();
    // The only worker slot is busy: the cascade's root waits queued.
    let (_, busy) = sandbox.cli_json(&["run", "blocker", "--json"]);
    sandbox.wait_for_state(run_id(&busy), RunState::Running, Duration::from_secs(20));
    let cascade = start_cascade(&sandbox);
    wait_member(&sandbox, "a", RunState::Queued);
    // The whole chain leaves the config while its root waits.
    let without: String = config
        .split("[tasks.")
        .filter(|part| {
            !part.starts_with("a]") && !part.starts_with("b]") && !part.starts_with("c]")
        })
        .collect::<Vec<_>>()
        .join("[tasks.");
    std::fs::write(sandbox.path().join("config/scheduler.toml"), without).unwrap();
    signal(service.pid(), nix::sys::signal::Signal::SIGHUP);
    let result = finished(cascade);
    service.stop();
    let a = member(&sandbox, "a").unwrap();
    assert_eq!(a.state, RunState::Failed, "{result}");
    assert!(a.error.unwrap_or_default().contains("no longer configured"));
}
