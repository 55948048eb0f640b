//! The faults operators meet, each made real: a full disk (a small tmpfs filled to the
//! last byte), a journal made immutable, a wall clock stepped back (the clock injected
//! into an engine in this process), a deleted log folder, a stopped worker (SIGSTOP).
//! Whatever happens, every tick is accounted for and none runs twice.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use turbosched::engine::{Clock, Engine, Mode};
use turbosched::model::{Instant, RunState, Trigger};
use turbosched::store::{RunFilter, RunRow, Store};

use crate::support::*;

/// A tmpfs mounted over a sandbox folder: a real file system with a real size limit.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "this test mounts a {size} tmpfs as the disk that fills up: it needs root (CI runs as root)"
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    /// Writes a file until the file system says it is full.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).expect("create filler");
        let chunk = vec![0u8; 16 * 1024];
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(err) if err.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(err) => panic!("filling the tmpfs: {err}"),
            }
        }
        // The last partial page too.
        while let Ok(1) = file.write(&[0u8]) {}
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

pub(crate) fn get_json(service: &Service, path: &str) -> (u16, Value) {
    read_json(
        "GET",
        path,
        agent().get(format!("{}{path}", service.api)).call(),
    )
}

pub(crate) fn post_json(service: &Service, path: &str) -> (u16, Value) {
    read_json(
        "POST",
        path,
        agent().post(format!("{}{path}", service.api)).send_empty(),
    )
}

fn read_json(
    method: &str,
    path: &str,
    response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> (u16, Value) {
    let mut response = response.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string().unwrap_or_default();
    let value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {body}"));
    (status, value)
}

/// Every tick from the task's first run to its last is there exactly once.
fn assert_every_tick_once(task: &str, runs: &[RunRow]) {
    let ticks: Vec<Instant> = runs
        .iter()
        .filter(|r| matches!(r.trigger, Trigger::Schedule | Trigger::Catchup))
        .map(|r| r.scheduled_for)
        .collect();
    let unique: BTreeSet<&Instant> = ticks.iter().collect();
    assert_eq!(unique.len(), ticks.len(), "{task}: a tick ran twice");
    let first = **unique.first().expect("some runs");
    let last = **unique.last().expect("some runs");
    let span = (last - first).num_seconds() as usize;
    assert_eq!(
        ticks.len(),
        span + 1,
        "{task}: every second from {first} to {last} has its run (no tick lost)"
    );
}

const EVERY_SECOND_UNDER_EACH_POLICY: &str = r#"
[defaults]
handler = "ping"
schedule = "* * * * * *"
misfire_grace = "1h"
[tasks.every]
misfire = "run_all"
[tasks.skipper]
misfire = "skip"
[tasks.once]
misfire = "run_once"
"#;

#[test]
fn ticks_due_while_the_disk_is_full_stay_due_and_meet_their_misfire_policy_once_space_returns() {
    let sandbox = Sandbox::new(EVERY_SECOND_UNDER_EACH_POLICY);
    let disk = Tmpfs::mount(&sandbox.path().join("data"), "3m");
    let service = sandbox.serve();
    // The write-ahead log is not given its working size (4 MB) on so small a disk: the
    // room is the database's and the logs'.
    let log = sandbox.path().join("data/scheduler.db-wal");
    let length = std::fs::metadata(&log)
        .expect("the log of a serving service")
        .len();
    assert!(length < 1024 * 1024, "{} is {length} bytes", log.display());
    wait_until(
        "each task to succeed twice",
        Duration::from_secs(20),
        || {
            ["every", "skipper", "once"]
                .iter()
                .all(|t| {
                    sandbox
                        .runs_of(t)
                        .iter()
                        .filter(|r| r.state == RunState::Succeeded)
                        .count()
                        >= 2
                })
                .then_some(())
        },
    );

    let filler = disk.fill();
    let full_at = chrono::Utc::now();
    // /health says so, with the reason, and a mutation is refused with 503, not 500.
    let health = wait_until("/health to say unhealthy", Duration::from_secs(10), || {
        let (status, body) = get_json(&service, "/health");
        (status == 503).then_some(body)
    });
    assert_eq!(health["status"], "unhealthy");
    assert_eq!(health["checks"]["store"]["status"], "failed", "{health}");
    let detail = health["checks"]["store"]["detail"].as_str().unwrap_or("");
    assert!(detail.contains("full"), "the reason is named: {detail}");
    let (status, body) = post_json(&service, "/scheduler/run_every");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("full"));

    // Several ticks pass while nothing can be written.
    wait_until("four ticks on a full disk", Duration::from_secs(10), || {
        (chrono::Utc::now() - full_at >= chrono::Duration::milliseconds(4200)).then_some(())
    });
    std::fs::remove_file(&filler).unwrap();
    let freed_at = chrono::Utc::now();
    wait_until("/health to recover", Duration::from_secs(10), || {
        let (status, body) = get_json(&service, "/health");
        (status == 200 && body["checks"]["store"]["status"] == "ok").then_some(())
    });
    wait_until(
        "every task to run a tick after the outage, and all to settle",
        Duration::from_secs(30),
        || {
            ["every", "skipper", "once"]
                .iter()
                .all(|t| {
                    let runs = sandbox.runs_of(t);
                    runs.iter().any(|r| {
                        r.scheduled_for > freed_at + chrono::Duration::seconds(1)
                            && r.state == RunState::Succeeded
                    }) && runs.iter().all(|r| {
                        r.state.is_terminal()
                            || r.scheduled_for > freed_at + chrono::Duration::seconds(1)
                    })
                })
                .then_some(())
        },
    );
    service.stop();

    let outage = |r: &RunRow| r.scheduled_for > full_at && r.scheduled_for < freed_at;
    // run_all: every tick, the ones due during the outage included, ran and succeeded.
    let every = sandbox.runs_of("every");
    assert_every_tick_once("every", &every);
    let missed: Vec<&RunRow> = every.iter().filter(|r| outage(r)).collect();
    assert!(missed.len() >= 4, "{} ticks in the outage", missed.len());
    assert!(
        missed.iter().all(|r| r.state == RunState::Succeeded),
        "run_all runs each missed tick: {:?}",
        missed
            .iter()
            .map(|r| (r.state, r.reason.clone()))
            .collect::<Vec<_>>()
    );
    // skip: every tick is accounted for; the missed ones are recorded as skipped.
    let skipper = sandbox.runs_of("skipper");
    assert_every_tick_once("skipper", &skipper);
    let skipped: Vec<&RunRow> = skipper
        .iter()
        .filter(|r| outage(r) && r.state == RunState::Skipped)
        .collect();
    assert!(skipped.len() >= 3, "{} skipped", skipped.len());
    assert!(skipped.iter().all(|r| r
        .reason
        .as_deref()
        .unwrap_or("")
        .starts_with("misfire policy skip")));
    // run_once: one catch-up for the whole outage, and a misfire event counts the rest.
    let once = sandbox.runs_of("once");
    let after: Vec<&RunRow> = once.iter().filter(|r| r.scheduled_for > full_at).collect();
    assert!(after.iter().all(|r| r.state == RunState::Succeeded));
    let events = sandbox.store().events_after(0, 100_000).unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == "misfire" && e.task.as_deref() == Some("once")),
        "run_once reports the ticks it folded into one run"
    );
    assert!(
        events.iter().any(|e| e.kind == "store_recovered"),
        "the outage is on record"
    );
    let integrity: String = rusqlite::Connection::open(sandbox.path().join("data/scheduler.db"))
        .unwrap()
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
}

#[test]
fn health_probes_with_a_real_write_so_an_immutable_journal_is_unhealthy() {
    let sandbox = Sandbox::new("[tasks.tick]\nhandler = \"ping\"\nschedule = \"0 0 * * * *\"\n");
    let service = sandbox.serve();
    // Registered is not yet serving: the engine's loop reports in a moment after.
    let body = wait_until("the service healthy", Duration::from_secs(20), || {
        let (status, body) = get_json(&service, "/health");
        (status == 200).then_some(body)
    });
    assert_eq!(body["checks"]["store"]["status"], "ok");

    let wal = sandbox.path().join("data/scheduler.db-wal");
    assert!(wal.exists(), "WAL mode");
    let chattr = |flag: &str| {
        let status = Command::new("chattr").arg(flag).arg(&wal).status();
        assert!(
            matches!(status, Ok(s) if s.success()),
            "chattr {flag} on the WAL (needs root on a file system with attributes)"
        );
    };
    chattr("+i");
    let (status, body) = get_json(&service, "/health");
    chattr("-i");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "unhealthy");
    assert_eq!(body["checks"]["store"]["status"], "failed", "{body}");
    let (status, body) = get_json(&service, "/health");
    assert_eq!(status, 200, "healthy again once writable: {body}");
    service.stop();
}

#[test]
fn run_all_runs_every_missed_tick_under_the_default_overlap_policy() {
    let sandbox = Sandbox::new(
        "[tasks.every]\nhandler = \"ping\"\nschedule = \"* * * * * *\"\nmisfire = \"run_all\"\n",
    );
    let service = sandbox.serve();
    wait_until("a first run", Duration::from_secs(20), || {
        (!sandbox.runs_of("every").is_empty()).then_some(())
    });
    service.stop();
    let stopped = chrono::Utc::now();
    wait_until("four ticks of downtime", Duration::from_secs(10), || {
        (chrono::Utc::now() - stopped >= chrono::Duration::milliseconds(4200)).then_some(())
    });
    let service = sandbox.serve();
    let restarted = chrono::Utc::now();
    wait_until("catch-ups to settle", Duration::from_secs(30), || {
        let runs = sandbox.runs_of("every");
        (runs
            .iter()
            .any(|r| r.trigger == Trigger::Schedule && r.scheduled_for > restarted)
            && runs
                .iter()
                .all(|r| r.state.is_terminal() || r.scheduled_for > restarted))
        .then_some(())
    });
    service.stop();
    let runs = sandbox.runs_of("every");
    let catchups: Vec<&RunRow> = runs
        .iter()
        .filter(|r| r.trigger == Trigger::Catchup)
        .collect();
    assert!(catchups.len() >= 4, "{} catch-ups", catchups.len());
    assert!(
        catchups.iter().all(|r| r.state == RunState::Succeeded),
        "no catch-up refused by its own overlap policy: {:?}",
        catchups
            .iter()
            .map(|r| (r.state, r.reason.clone()))
            .collect::<Vec<_>>()
    );
    // One at a time, in tick order.
    for pair in catchups.windows(2) {
        assert!(pair[0].scheduled_for < pair[1].scheduled_for);
        assert!(pair[0].finished_at.unwrap() <= pair[1].started_at.unwrap());
    }
    assert_every_tick_once("every", &runs);
}

/// The system clock plus an offset the test steps.
struct SteppedClock {
    offset_ms: AtomicI64,
}

impl Clock for SteppedClock {
    fn now(&self) -> Instant {
        chrono::Utc::now() + chrono::Duration::milliseconds(self.offset_ms.load(Ordering::SeqCst))
    }
}

#[test]
fn a_clock_stepped_back_resumes_from_the_new_wall_time_without_running_a_claimed_tick_again() {
    let sandbox = Sandbox::new("");
    let root = sandbox.path();
    let text = format!(
        r#"
[scheduler]
timezone = "UTC"
database = "{db}"
log_dir = "{root}/logs"
state_dir = "{root}/state"
heartbeat_interval = "200ms"
heartbeat_timeout = "3s"
[tasks.tick]
command = ["/bin/true"]
schedule = "* * * * * *"
"#,
        db = root.join("data/scheduler.db").display(),
        root = root.display()
    );
    let config = turbosched::config::parse(&text, &root.join("config/scheduler.toml"))
        .expect("valid config");
    let store = Store::open(&root.join("data/scheduler.db")).unwrap();
    let clock = Arc::new(SteppedClock {
        offset_ms: AtomicI64::new(0),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let engine = Engine::new(Arc::new(config), store.clone(), clock.clone(), Mode::Serve);
    let handle = engine.handle();
    let board = engine.board();
    let engine = runtime.spawn(engine.run());
    let ticks = || -> Vec<RunRow> {
        let mut rows = store
            .runs(&RunFilter {
                task: Some("tick".into()),
                limit: 10_000,
                ..RunFilter::default()
            })
            .unwrap();
        rows.reverse();
        rows
    };
    wait_until(
        "two ticks on the true clock",
        Duration::from_secs(10),
        || (ticks().len() >= 2).then_some(()),
    );

    // An excursion ten seconds ahead, for a little over two seconds, then back.
    clock.offset_ms.store(10_000, Ordering::SeqCst);
    let ahead = wait_until("a tick claimed ahead", Duration::from_secs(10), || {
        let rows = ticks();
        let ahead: Vec<Instant> = rows
            .iter()
            .filter(|r| r.scheduled_for > chrono::Utc::now() + chrono::Duration::seconds(5))
            .map(|r| r.scheduled_for)
            .collect();
        (ahead.len() >= 2).then_some(ahead)
    });
    clock.offset_ms.store(0, Ordering::SeqCst);
    let back_at = chrono::Utc::now();

    // Firing resumes from the wall time at once (the ticks between were never claimed)…
    wait_until(
        "a tick within 3 s of the step back",
        Duration::from_secs(6),
        || {
            ticks()
                .iter()
                .any(|r| {
                    r.scheduled_for > back_at
                        && r.scheduled_for <= back_at + chrono::Duration::seconds(3)
                })
                .then_some(())
        },
    );
    // …the step is on record and on the board (so /health is degraded)…
    let snapshot = wait_until("the board to show the step", Duration::from_secs(5), || {
        board.snapshot().filter(|s| s.clock_step.is_some())
    });
    let step = snapshot.clock_step.clone().unwrap();
    assert!(step.by < -chrono::Duration::seconds(5), "{step:?}");
    assert!(step.repeating(chrono::Utc::now()));
    let events = store.events_after(0, 10_000).unwrap();
    let steps: Vec<_> = events.iter().filter(|e| e.kind == "clock_step").collect();
    assert!(
        steps.iter().any(|e| e.message.contains("stepped back")),
        "{steps:?}"
    );
    assert!(
        steps.iter().any(|e| e.message.contains("stepped forward")),
        "{steps:?}"
    );
    // …and once the wall clock has passed the excursion, each tick ran exactly once: the
    // ones claimed ahead were not run again, none was lost.
    let last_ahead = *ahead.iter().max().unwrap();
    wait_until(
        "the wall clock to pass the excursion",
        Duration::from_secs(20),
        || {
            ticks()
                .iter()
                .any(|r| r.scheduled_for > last_ahead + chrono::Duration::seconds(1))
                .then_some(())
        },
    );
    handle.shutdown();
    runtime.block_on(engine).unwrap().unwrap();
    let rows = ticks();
    let unique: BTreeSet<Instant> = rows.iter().map(|r| r.scheduled_for).collect();
    assert_eq!(unique.len(), rows.len(), "no tick claimed twice");
    for tick in &ahead {
        assert_eq!(
            rows.iter().filter(|r| r.scheduled_for == *tick).count(),
            1,
            "{tick} claimed during the excursion is not run again"
        );
    }
    let after_back: Vec<Instant> = unique.iter().copied().filter(|t| *t > back_at).collect();
    let span = (*after_back.last().unwrap() - after_back[0]).num_seconds() as usize;
    assert_eq!(
        after_back.len(),
        span + 1,
        "from the step back on, every second has its one run"
    );
}

#[test]
fn a_deleted_log_folder_is_recreated_on_the_next_write() {
    let sandbox = Sandbox::new("[tasks.tick]\nhandler = \"ping\"\nschedule = \"* * * * * *\"\n");
    let service = sandbox.serve();
    wait_until("a run", Duration::from_secs(20), || {
        sandbox
            .runs_of("tick")
            .iter()
            .any(|r| r.state == RunState::Succeeded)
            .then_some(())
    });
    std::fs::remove_dir_all(sandbox.path().join("logs")).unwrap();
    let deleted_at = chrono::Utc::now();
    let run = wait_until(
        "a run after the deletion to succeed",
        Duration::from_secs(20),
        || {
            sandbox
                .runs_of("tick")
                .into_iter()
                .find(|r| r.queued_at > deleted_at && r.state == RunState::Succeeded)
        },
    );
    let log = wait_until("the task log to come back", Duration::from_secs(5), || {
        let log = sandbox.log("tick");
        log.contains(&format!("run={} ", run.id)).then_some(log)
    });
    assert!(log.contains("succeeded"), "{log}");
    let mut response = agent()
        .get(format!("{}/scheduler/runs/{}/log", service.api, run.id))
        .call()
        .expect("GET log");
    assert_eq!(response.status().as_u16(), 200);
    let body = response.body_mut().read_to_string().unwrap_or_default();
    assert!(
        body.contains("succeeded"),
        "the API serves the new lines: {body}"
    );
    let scheduler_log = wait_until(
        "the service log to come back",
        Duration::from_secs(10),
        || std::fs::read_to_string(sandbox.path().join("logs/scheduler.log")).ok(),
    );
    service.stop();
    let scheduler_log =
        std::fs::read_to_string(sandbox.path().join("logs/scheduler.log")).unwrap_or(scheduler_log);
    assert_eq!(
        scheduler_log.matches("the log folder was missing").count(),
        1,
        "said once: {scheduler_log}"
    );
}

#[test]
fn a_stopped_worker_is_noticed_by_its_silent_heartbeat_killed_and_retried() {
    let sandbox = Sandbox::new(
        "[tasks.slow]\nhandler = \"ping\"\nparams = { sleep_sec = 60 }\ntimeout = \"10m\"\nretries = 1\n",
    );
    let service = sandbox.serve();
    let (status, body) = post_json(&service, "/scheduler/run_slow");
    assert_eq!(status, 202, "{body}");
    let id = run_id(&body);
    let running = wait_until("the worker to start", Duration::from_secs(20), || {
        let row = sandbox.run(id);
        (row.state == RunState::Running && row.pid.is_some()).then_some(row)
    });
    let pid = running.pid.unwrap();
    signal(pid as u32, nix::sys::signal::Signal::SIGSTOP);
    let stopped_at = std::time::Instant::now();
    // heartbeat_timeout is 3 s here: the stall is seen well before the 10 min timeout.
    let retried = wait_until("a second attempt", Duration::from_secs(20), || {
        let row = sandbox.run(id);
        (row.attempt.0 == 2 && row.state == RunState::Running).then_some(row)
    });
    assert!(stopped_at.elapsed() < Duration::from_secs(15));
    assert!(!process_alive(pid), "the stopped worker's group was killed");
    let attempts = sandbox.store().attempts(id).unwrap();
    assert!(
        attempts[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("no heartbeat from its worker"),
        "{:?}",
        attempts[0]
    );
    assert!(sandbox
        .event_kinds(id)
        .contains(&"run_orphaned".to_string()));
    assert_eq!(retried.state, RunState::Running);
    service.stop();
}
