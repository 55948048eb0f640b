//! The hidden `worker` subcommand: runs one attempt of a built-in handler in a child
//! process, so a crash, a panic or an out-of-memory kill never touches the service.
//!
//! The runner starts `turbosched worker` with the attempt in its environment
//! (`TURBOSCHED_HANDLER`, `TURBOSCHED_PARAMS`, `TURBOSCHED_RUN_ID`, `TURBOSCHED_TASK`,
//! `TURBOSCHED_ATTEMPT`, `TURBOSCHED_TRIGGER`, `TURBOSCHED_CHECKPOINT`,
//! `TURBOSCHED_REPORT_FD`). The worker
//! builds a [`TaskContext`], heartbeats on the report pipe from a thread, looks the
//! handler up in [`builtins::BUILTINS`], calls its entry and reports its result. Exit
//! code 0 is success, 1 a retryable failure, 2 a fatal one.

pub mod protocol;

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::builtins::{self, Entry};
use crate::handlers::{HandlerError, Report, TaskContext};
use protocol::Msg;

/// Writes protocol messages to the report pipe (or nowhere when there is none).
#[derive(Clone)]
pub struct Reporter {
    pipe: Arc<Mutex<Option<File>>>,
}

impl Reporter {
    /// Opens the pipe named by `TURBOSCHED_REPORT_FD`.
    pub fn from_env() -> Reporter {
        let pipe = std::env::var("TURBOSCHED_REPORT_FD")
            .ok()
            .and_then(|fd| fd.parse::<u32>().ok())
            // Re-opening through /proc gives a new descriptor on the same pipe without
            // any unsafe adoption of a raw fd.
            .and_then(|fd| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(format!("/proc/self/fd/{fd}"))
                    .ok()
            });
        Reporter {
            pipe: Arc::new(Mutex::new(pipe)),
        }
    }

    /// Sends one message; a closed pipe (the service is gone) is ignored.
    pub fn send(&self, msg: &Msg) {
        let mut guard = self.pipe.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pipe) = guard.as_mut() {
            let line = format!("{}\n", msg.to_line());
            if pipe.write_all(line.as_bytes()).is_err() {
                *guard = None;
            }
        }
    }
}

impl Report for Reporter {
    fn progress(&self, pct: f64, phase: &str) {
        self.send(&Msg::Progress {
            pct,
            phase: Some(phase.to_string()),
        });
    }

    fn checkpoint(&self, data: serde_json::Value) {
        self.send(&Msg::Checkpoint { data });
    }
}

/// Entry point of `turbosched worker`; returns the process exit code.
pub fn main() -> i32 {
    let reporter = Reporter::from_env();
    let env = |name: &str| std::env::var(name).unwrap_or_default();
    let handler = env("TURBOSCHED_HANDLER");
    let params = serde_json::from_str(&env("TURBOSCHED_PARAMS")).unwrap_or(serde_json::Value::Null);
    let checkpoint_path = PathBuf::from(env("TURBOSCHED_CHECKPOINT"));
    let checkpoint = std::fs::read_to_string(&checkpoint_path)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok());
    let ctx = TaskContext::new(
        env("TURBOSCHED_RUN_ID").parse().unwrap_or(0),
        env("TURBOSCHED_TASK"),
        env("TURBOSCHED_ATTEMPT").parse().unwrap_or(1),
        params,
        checkpoint,
        Box::new(reporter.clone()),
    )
    .with_trigger(env("TURBOSCHED_TRIGGER"));

    let beat = reporter.clone();
    std::thread::spawn(move || loop {
        beat.send(&Msg::Heartbeat);
        std::thread::sleep(Duration::from_secs(1));
    });

    let outcome = match builtins::find(&handler).map(|builtin| builtin.entry) {
        Some(Entry::Task(run)) => run(&ctx),
        // Housekeeping of the service itself: not a TaskContext-only handler.
        Some(Entry::Maintenance) => crate::maintenance::handler(&ctx),
        None => Err(HandlerError::Fatal(format!(
            "unknown built-in handler \"{handler}\""
        ))),
    };
    match outcome {
        Ok(result) => {
            reporter.send(&Msg::Result { data: result });
            0
        }
        Err(err) => {
            let fatal = matches!(err, HandlerError::Fatal(_));
            let message = err.to_string();
            eprintln!("{message}");
            reporter.send(&Msg::Error { message, fatal });
            if fatal {
                2
            } else {
                1
            }
        }
    }
}
