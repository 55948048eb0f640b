//! Per-task log files, `logs/task_<name>.log`: every line a child prints, prefixed with
//! time, task, run and attempt:
//!
//! ```text
//! [2026-11-22T16:30:00.001234Z] task.ingestion - INFO - run=12 attempt=1 - loaded SPX.csv
//! ```
//!
//! Each line is written with one `write` call on a file opened in append mode, so lines
//! from several runs of one task never interleave inside a line. A write failure is
//! reported once in the service log and the run goes on: a full disk must not fail a run.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::model::{Attempt, RunId};

/// The log folder and its open files.
#[derive(Clone)]
pub struct TaskLogs {
    dir: PathBuf,
    files: Arc<Mutex<HashMap<String, TaskLog>>>,
}

/// One task's log.
#[derive(Clone)]
pub struct TaskLog {
    task: String,
    path: PathBuf,
    file: Arc<Mutex<Option<File>>>,
}

/// Severity of a log line.
#[derive(Debug, Clone, Copy)]
pub enum Level {
    /// stdout, lifecycle.
    Info,
    /// stderr.
    Warn,
    /// Failures.
    Error,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
        }
    }
}

impl TaskLogs {
    /// Logs under `dir` (created on first write).
    pub fn new(dir: &Path) -> TaskLogs {
        TaskLogs {
            dir: dir.to_path_buf(),
            files: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The log of `task`.
    pub fn task(&self, task: &str) -> TaskLog {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        files
            .entry(task.to_string())
            .or_insert_with(|| TaskLog {
                task: task.to_string(),
                path: self.dir.join(format!("task_{task}.log")),
                file: Arc::new(Mutex::new(None)),
            })
            .clone()
    }
}

impl TaskLog {
    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line.
    pub fn line(&self, run: RunId, attempt: Attempt, level: Level, text: &str) {
        let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ");
        let text = text.trim_end_matches(['\r', '\n']);
        let line = format!(
            "[{now}] task.{} - {} - run={run} attempt={attempt} - {text}\n",
            self.task,
            level.as_str()
        );
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            let opened = self
                .path
                .parent()
                .map(std::fs::create_dir_all)
                .unwrap_or(Ok(()))
                .and_then(|_| {
                    OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&self.path)
                });
            match opened {
                Ok(file) => *guard = Some(file),
                Err(err) => {
                    tracing::warn!(task = %self.task, path = %self.path.display(), "cannot open task log: {err}");
                    return;
                }
            }
        }
        if let Some(file) = guard.as_mut() {
            if let Err(err) = file.write_all(line.as_bytes()) {
                tracing::warn!(task = %self.task, path = %self.path.display(), "cannot write task log: {err}");
                *guard = None;
            }
        }
    }
}
