//! Logs, archive and maintenance with real files: what is archived, that the zip holds
//! the originals byte for byte, that a bad zip deletes nothing, and the CLI around it.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use turbosched::maintenance::{archive_logs, Fault, MaintenanceError, Options};
use turbosched::model::{Attempt, RunId, RunState, TaskName, Trigger};
use turbosched::store::{Change, Move, NewRun};

use crate::support::*;

const DAY: Duration = Duration::from_secs(86_400);

/// Writes `name` in `dir` with distinct content and sets its last write `age` ago.
fn log_file(dir: &Path, name: &str, age: Duration) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(name);
    let body: String = (0..200)
        .map(|n| format!("[2026-01-01T00:00:00Z] {name} - INFO - run=7 attempt=1 - line {n}\n"))
        .collect();
    std::fs::write(&path, body).unwrap();
    let file = std::fs::File::options().write(true).open(&path).unwrap();
    file.set_modified(SystemTime::now() - age).unwrap();
    path
}

fn options() -> Options {
    Options {
        archive_after_days: 30,
        retention_days: 90,
        keep_backups: 2,
        dry_run: false,
        now: chrono::Utc::now(),
        fault: None,
    }
}

fn zips(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "zip") || p.to_string_lossy().ends_with(".partial")
        })
        .collect();
    found.sort();
    found
}

const TASKS: &str = "[tasks.ingestion]\nhandler = \"ping\"\n[tasks.maintenance]\nhandler = \"maintenance\"\nparams = { archive_after_days = 30, retention_days = 90, keep_backups = 2 }\n";

#[test]
fn only_old_rotated_and_orphaned_logs_are_archived_byte_for_byte_then_deleted() {
    let sandbox = Sandbox::new(TASKS);
    let logs = sandbox.path().join("logs");
    let archived = [
        log_file(&logs, "task_ingestion.log.2", 40 * DAY),
        log_file(&logs, "task_ingestion.log.1", 31 * DAY),
        log_file(&logs, "task_retired.log", 45 * DAY),
        log_file(&logs, "scheduler.log.1", 60 * DAY),
    ];
    let kept = [
        log_file(&logs, "task_ingestion.log", 90 * DAY), // current log of a configured task
        log_file(&logs, "scheduler.log", 90 * DAY),      // current service log
        log_file(&logs, "task_ingestion.log.3", 29 * DAY), // rotated, but recent
        log_file(&logs, "task_retired.log.1", 2 * DAY),
    ];
    let originals: Vec<(String, Vec<u8>)> = archived
        .iter()
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(p).unwrap(),
            )
        })
        .collect();

    let dry = sandbox.cli(&["archive", "--dry-run"]);
    assert_eq!(dry.status.code(), Some(0), "{}", stderr(&dry));
    let text = stdout(&dry);
    assert!(text.contains("would archive 4 log file(s)"), "{text}");
    assert!(
        archived.iter().all(|p| p.exists()),
        "a dry run changes nothing"
    );
    assert!(zips(&sandbox.path().join("archive")).is_empty());

    let output = sandbox.cli(&["archive"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(
        text.contains("archived 4 log file(s)") && text.contains("4 original(s) deleted"),
        "{text}"
    );
    let found = zips(&sandbox.path().join("archive"));
    assert_eq!(found.len(), 1, "{found:?}");
    let name = found[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("logs_archive_") && name.ends_with("Z.zip"),
        "{name}"
    );

    let mut zip = zip::ZipArchive::new(std::fs::File::open(&found[0]).unwrap()).unwrap();
    let entries: BTreeSet<String> = zip
        .file_names()
        .filter_map(|n| n.ok())
        .map(|n| n.to_string())
        .collect();
    let expected: BTreeSet<String> = originals.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(entries, expected);
    for (entry, bytes) in &originals {
        let mut copy = Vec::new();
        zip.by_name(entry).unwrap().read_to_end(&mut copy).unwrap();
        assert_eq!(&copy, bytes, "{entry} byte for byte");
    }
    assert!(
        archived.iter().all(|p| !p.exists()),
        "originals deleted after verification"
    );
    assert!(
        kept.iter().all(|p| p.exists()),
        "current and recent logs untouched"
    );
    let backups: Vec<_> = std::fs::read_dir(sandbox.path().join("archive"))
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("scheduler_backup_")
        })
        .collect();
    assert_eq!(backups.len(), 1);
}

#[test]
fn a_corrupt_or_partial_zip_leaves_the_originals_in_place() {
    for fault in [Fault::CorruptBeforeVerify, Fault::TruncateBeforeVerify] {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        let archive = dir.path().join("archive");
        let files = [
            log_file(&logs, "task_a.log.1", 40 * DAY),
            log_file(&logs, "task_a.log.2", 50 * DAY),
        ];
        let before: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();
        let configured: BTreeSet<String> = ["a".to_string()].into();
        let result = archive_logs(
            &logs,
            &archive,
            &configured,
            &Options {
                fault: Some(fault),
                ..options()
            },
        );
        assert!(
            matches!(result, Err(MaintenanceError::Verify { .. })),
            "{fault:?}: {result:?}"
        );
        let after: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();
        assert_eq!(after, before, "{fault:?}: originals untouched");
        assert!(
            zips(&archive).is_empty(),
            "{fault:?}: no zip under any name: {:?}",
            zips(&archive)
        );

        // The next, healthy run archives them.
        let report = archive_logs(&logs, &archive, &configured, &options()).unwrap();
        assert_eq!((report.files.len(), report.deleted), (2, 2));
    }
}

#[test]
fn the_maintenance_task_reports_counts_and_bytes_and_keeps_the_newest_backups() {
    let sandbox = Sandbox::new(TASKS);
    let logs = sandbox.path().join("logs");
    log_file(&logs, "task_ingestion.log.1", 40 * DAY);
    let mut results = Vec::new();
    for _ in 0..3 {
        let (code, value) = sandbox.cli_json(&["run", "maintenance", "--json"]);
        assert_eq!(code, 0, "{value}");
        results.push(value["runs"][0]["result"].clone());
        // Backups are named by the second: let the next one get its own name.
        let now = chrono::Utc::now();
        wait_until("the next second", Duration::from_secs(3), || {
            (chrono::Utc::now().timestamp() > now.timestamp()).then_some(())
        });
    }
    let first = &results[0];
    assert_eq!(first["archive"]["files_archived"], 1, "{first}");
    assert!(first["archive"]["bytes_before"].as_u64().unwrap() > 0);
    assert!(first["archive"]["bytes_after"].as_u64().unwrap() > 0);
    assert_eq!(first["archive"]["originals_deleted"], 1);
    assert!(first["backup"]
        .as_str()
        .unwrap()
        .contains("scheduler_backup_"));
    assert_eq!(
        results[1]["archive"]["files_archived"], 0,
        "nothing left to archive"
    );
    assert_eq!(results[2]["backups_removed"], 1, "keep_backups = 2");
    let backups = std::fs::read_dir(sandbox.path().join("archive"))
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("scheduler_backup_")
        })
        .count();
    assert_eq!(backups, 2);
    let log = sandbox.log("maintenance");
    assert!(log.contains("archived 1 log file(s)"), "{log}");
    let run = &sandbox.runs_of("maintenance")[0];
    assert_eq!(run.state, RunState::Succeeded);
}

#[test]
fn logs_reads_a_run_across_current_rotated_and_archived_files() {
    // A 2 KiB limit: the 120 lines of each run rotate the log several times.
    let sandbox = Sandbox::with_config(&format!(
        "{FAST_SCHEDULER}\n[logging]\nmax_size = \"2KiB\"\ntask_backups = 50\n\
         [tasks.chatty]\ncommand = [\"/bin/sh\", \"-c\", \"for i in $(seq 1 120); do echo chatty line $i; done\"]\n{TASKS}"
    ));
    let first = run_id(&sandbox.cli_json(&["run", "chatty", "--json"]).1);
    let second = run_id(&sandbox.cli_json(&["run", "chatty", "--json"]).1);
    let files: Vec<_> = std::fs::read_dir(sandbox.path().join("logs"))
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("task_chatty.log.")
        })
        .collect();
    assert!(files.len() >= 3, "rotated: {} files", files.len());
    // Age the rotated files and archive them.
    for file in &files {
        std::fs::File::options()
            .write(true)
            .open(file.path())
            .unwrap()
            .set_modified(SystemTime::now() - 40 * DAY)
            .unwrap();
    }
    let output = sandbox.cli(&["archive"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));

    let output = sandbox.cli(&["logs", "chatty", "--run", &first.to_string(), "--all"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    let numbers: Vec<u32> = text
        .lines()
        .filter_map(|l| l.split("chatty line ").nth(1))
        .map(|n| n.trim().parse().unwrap())
        .collect();
    assert_eq!(
        numbers,
        (1..=120).collect::<Vec<_>>(),
        "every line of run {first}, in order, once"
    );
    assert!(
        text.lines().all(|l| l.contains(&format!(" run={first} "))),
        "only that run"
    );
    assert!(!text.contains(&format!(" run={second} ")));

    let tail = stdout(&sandbox.cli(&["logs", "chatty", "-n", "3"]));
    assert_eq!(tail.lines().count(), 3, "{tail}");
    assert!(
        tail.lines()
            .last()
            .unwrap()
            .contains(&format!("run={second} ")),
        "{tail}"
    );
    let unknown = sandbox.cli(&["logs", "nope"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(
        stderr(&unknown).contains("unknown task \"nope\""),
        "{}",
        stderr(&unknown)
    );
}

#[test]
fn logs_follow_prints_new_lines_as_they_are_written() {
    let sandbox =
        Sandbox::new("[tasks.echo]\ncommand = [\"/bin/echo\", \"hello from the task\"]\n");
    sandbox.cli(&["run", "echo"]);
    let existing = sandbox.log("echo").matches("hello from the task").count();
    assert_eq!(existing, 1);
    let mut follower = sandbox
        .command(&["logs", "echo", "--follow", "-n", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = follower.stdout.take().unwrap();
    let (chunks, received) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(read) = stdout.read(&mut buffer) {
            if read == 0
                || chunks
                    .send(String::from_utf8_lossy(&buffer[..read]).into_owned())
                    .is_err()
            {
                break;
            }
        }
    });
    let mut seen = String::new();
    // With -n 1 the follower first prints the last existing line ("succeeded in …"):
    // once that shows, it is following, and only new lines come after.
    wait_until(
        "the follower to print the last existing line",
        Duration::from_secs(10),
        || {
            while let Ok(chunk) = received.try_recv() {
                seen.push_str(&chunk);
            }
            seen.contains("succeeded in").then_some(())
        },
    );
    let wait_for = |count: usize, seen: &mut String| {
        wait_until(
            &format!("{count} line(s) followed"),
            Duration::from_secs(10),
            || {
                while let Ok(chunk) = received.try_recv() {
                    seen.push_str(&chunk);
                }
                (seen.matches("hello from the task").count() >= count).then_some(())
            },
        )
    };
    sandbox.cli(&["run", "echo"]);
    wait_for(1, &mut seen);
    sandbox.cli(&["run", "echo"]);
    wait_for(2, &mut seen);
    follower.kill().unwrap();
    follower.wait().unwrap();
    assert_eq!(
        seen.matches("hello from the task").count(),
        2,
        "only the two new runs: {seen}"
    );
}

#[test]
fn the_service_log_and_task_logs_share_one_line_format() {
    let sandbox = Sandbox::new("[tasks.echo]\ncommand = [\"/bin/echo\", \"hi\"]\n");
    let service = sandbox.serve();
    let run = run_id(&sandbox.cli_json(&["run", "echo", "--json"]).1);
    sandbox.wait_for_state(run, RunState::Succeeded, Duration::from_secs(10));
    // A reload of a file with two errors logs one warning of several lines: each keeps
    // the prefix.
    let config = sandbox.path().join("config/scheduler.toml");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!(
            "{good}timout = \"1s\"\n[tasks.bad]\nschedule = \"61 * * * *\"\ncommand = [\"true\"]\n"
        ),
    )
    .unwrap();
    signal(service.pid(), nix::sys::signal::Signal::SIGHUP);
    wait_until(
        "the reload's errors in the log",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(sandbox.path().join("logs/scheduler.log"))
                .ok()
                .filter(|log| log.contains("timout") && log.contains("minute field"))
        },
    );
    service.stop_cleanly();
    let format = |line: &str| -> Option<(String, String)> {
        // [2026-11-22T16:30:00.001234Z] <logger> - <LEVEL> - <message>
        let rest = line.strip_prefix('[')?;
        let (time, rest) = rest.split_once("] ")?;
        chrono::DateTime::parse_from_rfc3339(time).ok()?;
        let (logger, rest) = rest.split_once(" - ")?;
        let (level, _message) = rest.split_once(" - ")?;
        ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"]
            .contains(&level)
            .then(|| (logger.to_string(), level.to_string()))
    };
    let service_log = std::fs::read_to_string(sandbox.path().join("logs/scheduler.log")).unwrap();
    assert!(service_log.lines().count() >= 3, "{service_log}");
    for line in service_log.lines() {
        let (logger, _) = format(line).unwrap_or_else(|| panic!("not in the log format: {line}"));
        assert!(
            !logger.is_empty()
                && logger
                    .chars()
                    .all(|c| c.is_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
    }
    assert!(
        service_log.contains("turbosched::engine - INFO - scheduler started"),
        "{service_log}"
    );
    let task_log = sandbox.log("echo");
    for line in task_log.lines() {
        let (logger, _) = format(line).unwrap_or_else(|| panic!("not in the log format: {line}"));
        assert_eq!(logger, "task.echo");
        assert!(
            line.contains(&format!(" - run={run} attempt=1 - ")),
            "{line}"
        );
    }
    assert!(
        task_log.contains("INFO - run=") && task_log.contains(" - hi"),
        "{task_log}"
    );
}

/// A run of `task` moved through `path` (from queued), straight in the store.
fn run_through(store: &turbosched::store::Store, task: &str, path: &[RunState]) -> RunId {
    let now = chrono::Utc::now();
    let run = store
        .enqueue(
            &NewRun {
                task: TaskName::from(task),
                trigger: Trigger::Manual,
                scheduled_for: now,
                max_attempts: 3,
                force: false,
                downstream: false,
                cascade: None,
                params: None,
            },
            now,
        )
        .unwrap();
    let mut from = RunState::Queued;
    let mut attempt = Attempt(0);
    for &to in path {
        let change = Change {
            owner: Some("gone".into()),
            ..Change::default()
        };
        attempt = store
            .transition(
                &Move {
                    run,
                    attempt,
                    from,
                    to,
                },
                &change,
                now,
            )
            .unwrap();
        from = to;
    }
    run
}

#[test]
fn maintenance_removes_the_checkpoints_of_runs_that_are_over_and_keeps_those_a_retry_needs() {
    let sandbox = Sandbox::new(TASKS);
    let store = sandbox.store();
    use RunState::*;
    let finished = run_through(&store, "ingestion", &[Running, Succeeded]);
    let orphaned = run_through(&store, "ingestion", &[Running, Orphaned, Failed]);
    let retrying = run_through(&store, "ingestion", &[Running, RetryWait]);
    let queued = run_through(&store, "ingestion", &[]);
    let dir = sandbox.path().join("data/state/checkpoints");
    std::fs::create_dir_all(&dir).unwrap();
    let checkpoint = |name: String| {
        let path = dir.join(name);
        std::fs::write(&path, br#"{"step": 3}"#).unwrap();
        path
    };
    let removed = [
        checkpoint(format!("run_{finished}.json")),
        checkpoint(format!("run_{finished}.json.tmp")), // a write cut short
        checkpoint(format!("run_{orphaned}.json")),
        checkpoint("run_987654.json".into()), // unknown to the store (pruned, older database)
    ];
    let kept = [
        checkpoint(format!("run_{retrying}.json")),
        checkpoint(format!("run_{queued}.json")),
        checkpoint("notes.txt".into()), // not a checkpoint: not ours to remove
    ];
    let bytes: usize = 4 * br#"{"step": 3}"#.len();

    let dry = sandbox.cli(&["archive", "--dry-run"]);
    assert_eq!(dry.status.code(), Some(0), "{}", stderr(&dry));
    let text = stdout(&dry);
    assert!(
        text.contains(&format!(
            "would remove 4 checkpoint file(s) of runs that are over, {bytes} bytes"
        )),
        "{text}"
    );
    for path in &removed {
        assert!(
            text.contains(&path.file_name().unwrap().to_string_lossy().to_string()),
            "the dry run names {}: {text}",
            path.display()
        );
    }
    assert!(!text.contains("notes.txt"), "{text}");
    assert!(
        removed.iter().chain(&kept).all(|p| p.exists()),
        "a dry run removes nothing"
    );

    let (code, value) = sandbox.cli_json(&["run", "maintenance", "--json"]);
    assert_eq!(code, 0, "{value}");
    let result = &value["runs"][0]["result"]["checkpoints"];
    assert_eq!(result["files_removed"], 4, "{result}");
    assert_eq!(result["bytes"], bytes, "{result}");
    assert!(
        sandbox
            .log("maintenance")
            .contains("removed 4 checkpoint file(s)"),
        "{}",
        sandbox.log("maintenance")
    );
    for path in &removed {
        assert!(!path.exists(), "{} removed", path.display());
    }
    for path in &kept {
        assert!(path.exists(), "{} kept", path.display());
    }
}
