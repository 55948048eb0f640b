//! Log files: `logs/task_<name>.log` per task and `logs/scheduler.log` for the service,
//! rotated by size.
//!
//! Every task line is
//!
//! ```text
//! [2026-11-22T16:30:00.001234Z] task.ingestion - INFO - run=12 attempt=1 - loaded SPX.csv
//! ```
//!
//! Rotation (`file-rotate`, `ContentLimit::BytesSurpassed`): once a file has grown past
//! `[logging] max_size`, the next write first moves it to `.1` (`.1` → `.2` …, the oldest
//! past `task_backups` is deleted). Each line is one `write` call under the log's lock, and
//! rotation happens only between writes, so a rotation never splits or loses a line, however
//! many runs of a task write at once. A write failure is reported in the service log and the
//! run goes on: a full disk must not fail a run.

use std::collections::HashMap;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use file_rotate::compression::Compression;
use file_rotate::suffix::AppendCount;
use file_rotate::{ContentLimit, FileRotate};

use crate::config::LoggingSettings;
use crate::model::{Attempt, RunId};

/// The log folder and its open files.
#[derive(Clone)]
pub struct TaskLogs {
    dir: PathBuf,
    max_size: u64,
    backups: usize,
    files: Arc<Mutex<HashMap<String, TaskLog>>>,
}

/// One task's log.
#[derive(Clone)]
pub struct TaskLog {
    task: String,
    file: RotatingFile,
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
    /// Logs under `dir` (created on first write), rotated as `settings` say.
    pub fn new(dir: &Path, settings: &LoggingSettings) -> TaskLogs {
        TaskLogs {
            dir: dir.to_path_buf(),
            max_size: settings.max_size,
            backups: settings.task_backups,
            files: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Opens the logs of `tasks` now. `file-rotate` scans the log folder when it opens a
    /// file (one `stat` per entry), so opening a thousand task logs costs a million
    /// `stat`s: the engine pays that once at start-up, before it fires anything, instead
    /// of in the first burst of runs.
    pub fn open_all<'a>(&self, tasks: impl IntoIterator<Item = &'a str>) {
        for task in tasks {
            self.task(task).file.open();
        }
    }

    /// The log of `task`.
    pub fn task(&self, task: &str) -> TaskLog {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        files
            .entry(task.to_string())
            .or_insert_with(|| TaskLog {
                task: task.to_string(),
                file: RotatingFile::new(
                    self.dir.join(task_log_name(task)),
                    self.max_size,
                    self.backups,
                ),
            })
            .clone()
    }
}

impl TaskLog {
    /// Appends one line.
    pub fn line(&self, run: RunId, attempt: Attempt, level: Level, text: &str) {
        let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ");
        let text = text.trim_end_matches(['\r', '\n']);
        let line = format!(
            "[{now}] task.{} - {} - run={run} attempt={attempt} - {text}\n",
            self.task,
            level.as_str()
        );
        self.file.write_line(line.as_bytes());
    }
}

/// A size-rotated file shared by every writer in this process; cheap to clone.
#[derive(Clone)]
pub struct RotatingFile {
    path: PathBuf,
    max_size: u64,
    backups: usize,
    inner: Arc<Mutex<Option<FileRotate<AppendCount>>>>,
}

impl RotatingFile {
    /// A file at `path`, rotated past `max_size` bytes, keeping `backups` rotated files.
    /// Nothing is opened until the first write.
    pub fn new(path: PathBuf, max_size: u64, backups: usize) -> RotatingFile {
        RotatingFile {
            path,
            max_size: max_size.max(1),
            backups: backups.max(1),
            inner: Arc::new(Mutex::new(None)),
        }
    }

    /// Opens the file now rather than at the first write (see [`TaskLogs::open_all`]).
    pub fn open(&self) {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        self.ensure_open(&mut guard);
    }

    /// Opens the file into `guard` unless it is open; `false` if it cannot be opened.
    fn ensure_open(&self, guard: &mut Option<FileRotate<AppendCount>>) -> bool {
        if guard.is_none() {
            // file-rotate panics when it cannot create the folder: create it first, and
            // keep any panic of the crate from reaching a runner or the engine.
            if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
                let missing = !parent.exists();
                if let Err(err) = std::fs::create_dir_all(parent) {
                    tracing::warn!(path = %self.path.display(), "cannot create log folder: {err}");
                    return false;
                }
                // Said once: only the writer that finds the folder gone creates it.
                if missing {
                    tracing::warn!(
                        folder = %parent.display(),
                        "the log folder was missing (deleted?): recreated it; lines written to the deleted files are gone"
                    );
                }
            }
            let opened = catch_unwind(|| {
                FileRotate::new(
                    &self.path,
                    AppendCount::new(self.backups),
                    ContentLimit::BytesSurpassed(self.max_size as usize),
                    Compression::None,
                    None,
                )
            });
            match opened {
                Ok(file) => *guard = Some(file),
                Err(_) => {
                    tracing::warn!(path = %self.path.display(), "cannot open log file");
                    return false;
                }
            }
        }
        true
    }

    /// Writes `line` (one whole line, newline included) in one call. If the file was
    /// deleted under us (say with its folder), it is opened anew first: writing on to the
    /// unlinked file would lose every line without an error.
    pub fn write_line(&self, line: &[u8]) {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_some() && !self.path.exists() {
            *guard = None;
        }
        if !self.ensure_open(&mut guard) {
            return;
        }
        let Some(file) = guard.as_mut() else { return };
        let written = catch_unwind(AssertUnwindSafe(|| {
            file.write_all(line).and_then(|_| file.flush())
        }));
        match written {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(path = %self.path.display(), "cannot write log file: {err}");
                *guard = None;
            }
            Err(_) => {
                tracing::warn!(path = %self.path.display(), "log rotation failed");
                *guard = None;
            }
        }
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_line(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `task_<name>.log`.
pub fn task_log_name(task: &str) -> String {
    format!("task_{task}.log")
}

/// The files of the log `name` in `dir`, oldest first: `name.N` … `name.1`, then `name`.
pub fn log_files(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut rotated: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let file_name = entry.file_name().into_string().ok()?;
            let number = file_name
                .strip_prefix(name)?
                .strip_prefix('.')?
                .parse()
                .ok()?;
            Some((number, entry.path()))
        })
        .collect();
    rotated.sort_by_key(|(number, _)| std::cmp::Reverse(*number));
    let mut files: Vec<PathBuf> = rotated.into_iter().map(|(_, path)| path).collect();
    let current = dir.join(name);
    if current.exists() {
        files.push(current);
    }
    files
}

/// Every line of the log `name` that `keep` accepts, oldest first: from the log archives
/// in `archives` (when given: `logs_archive_*.zip`, oldest first), then the rotated files,
/// then the current one.
pub fn read_lines(
    dir: &Path,
    archives: Option<&Path>,
    name: &str,
    keep: &dyn Fn(&str) -> bool,
) -> std::io::Result<Vec<String>> {
    use std::io::{BufRead, Read};
    let mut lines = Vec::new();
    if let Some(archive_dir) = archives {
        let mut zips: Vec<PathBuf> = std::fs::read_dir(archive_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| {
                path.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("logs_archive_") && n.ends_with(".zip"))
            })
            .collect();
        zips.sort();
        for zip in zips {
            let bad = |err: zip::result::ZipError| {
                std::io::Error::other(format!("{}: {err}", zip.display()))
            };
            let mut archive = zip::ZipArchive::new(std::fs::File::open(&zip)?).map_err(bad)?;
            let mut entries: Vec<(usize, String)> = archive
                .file_names()
                .filter_map(|entry| entry.ok())
                .filter_map(|entry| {
                    let rest = entry.strip_prefix(name)?;
                    let order = if rest.is_empty() {
                        0
                    } else {
                        rest.strip_prefix('.')?.parse().ok()?
                    };
                    Some((order, entry.to_string()))
                })
                .collect();
            // Oldest first: the highest rotation number.
            entries.sort_by_key(|(order, _)| std::cmp::Reverse(*order));
            for (_, entry) in entries {
                let mut text = String::new();
                archive
                    .by_name(&entry)
                    .map_err(bad)?
                    .read_to_string(&mut text)?;
                lines.extend(text.lines().filter(|l| keep(l)).map(str::to_string));
            }
        }
    }
    for file in log_files(dir, name) {
        let reader = std::io::BufReader::new(std::fs::File::open(&file)?);
        for line in reader.lines() {
            let line = line?;
            if keep(&line) {
                lines.push(line);
            }
        }
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn settings(max_size: u64, backups: usize) -> LoggingSettings {
        LoggingSettings {
            max_size,
            task_backups: backups,
            scheduler_backups: backups,
            archive_dir: PathBuf::from("archive"),
        }
    }

    #[test]
    fn rotation_at_the_size_limit_keeps_every_line_across_concurrent_writers() {
        let dir = tempfile::tempdir().unwrap();
        let logs = TaskLogs::new(dir.path(), &settings(4096, 10_000));
        let writers = 8;
        let lines_each = 500;
        std::thread::scope(|scope| {
            for writer in 0..writers {
                let log = logs.task("ingestion");
                scope.spawn(move || {
                    for n in 0..lines_each {
                        log.line(
                            RunId(writer),
                            Attempt(1),
                            Level::Info,
                            &format!("line {n} of writer {writer} {}", "x".repeat(n % 97)),
                        );
                    }
                });
            }
        });
        let files = log_files(dir.path(), "task_ingestion.log");
        assert!(
            files.len() > 50,
            "the limit was reached many times: {} files",
            files.len()
        );
        let mut seen = HashSet::new();
        for file in &files {
            let text = std::fs::read_to_string(file).unwrap();
            assert!(
                text.ends_with('\n'),
                "{} ends inside a line",
                file.display()
            );
            for line in text.lines() {
                let (_, rest) = line
                    .split_once("] task.ingestion - INFO - run=")
                    .expect("whole line");
                let writer: i64 = rest.split_once(' ').unwrap().0.parse().unwrap();
                let n: usize = rest
                    .split("line ")
                    .nth(1)
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                let padding = rest.rsplit(' ').next().unwrap();
                assert_eq!(padding.len(), n % 97, "line intact: {line}");
                assert!(seen.insert((writer, n)), "line written once: {line}");
            }
            let size = std::fs::metadata(file).unwrap().len();
            assert!(
                size <= 4096 + 200,
                "{} is {size} bytes: rotated right after the limit",
                file.display()
            );
        }
        assert_eq!(
            seen.len(),
            writers as usize * lines_each,
            "every line is somewhere"
        );
    }

    #[test]
    fn only_the_configured_number_of_backups_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let logs = TaskLogs::new(dir.path(), &settings(1024, 3));
        let log = logs.task("t");
        for n in 0..200 {
            log.line(
                RunId(1),
                Attempt(1),
                Level::Info,
                &format!("{n} {}", "y".repeat(50)),
            );
        }
        let names: Vec<String> = log_files(dir.path(), "task_t.log")
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            vec!["task_t.log.3", "task_t.log.2", "task_t.log.1", "task_t.log"]
        );
    }

    #[test]
    fn an_unwritable_log_folder_loses_the_line_but_never_panics() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("not-a-folder");
        std::fs::write(&blocker, "a file where the log folder should be").unwrap();
        let logs = TaskLogs::new(&blocker.join("logs"), &settings(4096, 2));
        logs.task("t")
            .line(RunId(1), Attempt(1), Level::Error, "goes nowhere");
        assert!(!blocker.join("logs").exists());
    }
}
