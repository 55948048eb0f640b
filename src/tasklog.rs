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
//!
//! Reading: [`read_lines`] across archives, rotated files and the current file, and
//! [`LogFollower`], the one follower of a growing log (`turbosched logs --follow` and
//! `GET /scheduler/runs/{id}/log?follow=1`), which loses no line to a rotation.

use std::collections::HashMap;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use file_rotate::compression::Compression;
use file_rotate::suffix::AppendCount;
use file_rotate::{ContentLimit, FileRotate};

use crate::config::LoggingSettings;
use crate::model::{Attempt, RunId};

/// The log folder and its task logs.
///
/// Every spawned child starts with a copy of the service's descriptor table and closes
/// each descriptor again at its `exec`: a thousand log files held open cost every spawn
/// in a burst a thousand descriptors more (≈ 120 µs of the child's CPU and 20 µs of ours,
/// measured). So a task log's descriptor stays open between lines only while fewer than
/// [`OPEN_LOG_BUDGET`] task logs keep theirs (first come, first kept: a log keeps its place
/// until nobody holds it); any other log is opened for its line and closed after it, and
/// none is held once nobody holds its [`TaskLog`]. A reload that moves the logs keeps the
/// one budget ([`TaskLogs::reconfigured`]). One [`RotatingFile`] per task at a time (the map hands out the
/// live one while any holder has it), so rotation stays between whole lines however many
/// runs of a task write at once.
#[derive(Clone)]
pub struct TaskLogs {
    dir: PathBuf,
    max_size: u64,
    backups: usize,
    files: Arc<Mutex<HashMap<String, Known>>>,
    budget: Arc<Budget>,
}

/// Task log descriptors kept open between lines, over all task logs.
pub const OPEN_LOG_BUDGET: usize = 32;

/// The count of log descriptors kept open between lines, and its limit.
struct Budget {
    held: AtomicUsize,
    limit: usize,
}

impl Budget {
    /// A place for one more descriptor kept open, if the budget has one.
    fn take(self: &Arc<Budget>) -> Option<Slot> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < self.limit).then_some(held + 1)
            })
            .ok()
            .map(|_| Slot(self.clone()))
    }
}

/// One descriptor's place in the budget, given back when dropped (with the file).
struct Slot(Arc<Budget>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A task whose log was asked for: its name and path (made once), and its file while
/// anyone holds it.
struct Known {
    task: Arc<str>,
    path: Arc<Path>,
    file: Weak<Shared>,
}

/// One task's log.
#[derive(Clone)]
pub struct TaskLog {
    task: Arc<str>,
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
            budget: Arc::new(Budget {
                held: AtomicUsize::new(0),
                limit: OPEN_LOG_BUDGET,
            }),
        }
    }

    /// Logs under `dir` rotated as `settings` say, sharing this one's budget of kept
    /// descriptors (runs in flight keep writing through this one until they end).
    pub fn reconfigured(&self, dir: &Path, settings: &LoggingSettings) -> TaskLogs {
        TaskLogs {
            budget: self.budget.clone(),
            ..TaskLogs::new(dir, settings)
        }
    }

    /// How many task log descriptors are open between lines now (at most
    /// [`OPEN_LOG_BUDGET`]).
    pub fn held_open(&self) -> usize {
        self.budget.held.load(Ordering::Acquire)
    }

    /// The log of `task`: the file other holders have open, or one opened at its first
    /// line and closed when the last holder lets go.
    pub fn task(&self, task: &str) -> TaskLog {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = files.get_mut(task) {
            let shared = known.file.upgrade().unwrap_or_else(|| {
                let shared = Arc::new(self.shared(known.path.clone()));
                known.file = Arc::downgrade(&shared);
                shared
            });
            return TaskLog {
                task: known.task.clone(),
                file: RotatingFile { shared },
            };
        }
        let path: Arc<Path> = self.dir.join(task_log_name(task)).into();
        let shared = Arc::new(self.shared(path.clone()));
        let known = Known {
            task: task.into(),
            path,
            file: Arc::downgrade(&shared),
        };
        let log = TaskLog {
            task: known.task.clone(),
            file: RotatingFile { shared },
        };
        files.insert(task.to_string(), known);
        log
    }

    fn shared(&self, path: Arc<Path>) -> Shared {
        let mut shared = Shared::new(path, self.max_size, self.backups);
        shared.budget = Some(self.budget.clone());
        shared
    }
}

impl TaskLog {
    /// Appends one line.
    pub fn line(&self, run: RunId, attempt: Attempt, level: Level, text: &str) {
        // The same text as `format("%Y-%m-%dT%H:%M:%S%.6fZ")`, without parsing that format
        // at every line (0.6 % of the service's CPU in a burst, measured).
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let text = text.trim_end_matches(['\r', '\n']);
        let line = format!(
            "[{now}] task.{} - {} - run={run} attempt={attempt} - {text}\n",
            self.task,
            level.as_str()
        );
        self.file.write_line(line.as_bytes());
    }
}

/// A size-rotated file shared by every writer in this process; cheap to clone. The file
/// is opened at the first write and closed when the last clone is dropped (a task log
/// outside the budget of kept descriptors: after each line).
///
/// Until its first rotation a file is a plain append-mode file: `file-rotate` scans the
/// whole log folder (a `stat` per entry) when it takes a file over, and paying that for
/// each of ten thousand task logs at start-up made start-up quadratic in the task count.
/// The scan happens when the file has passed `max_size`, when `file-rotate` takes it over
/// and rotates it (once per rotation), and never for a log that stays small.
#[derive(Clone)]
pub struct RotatingFile {
    shared: Arc<Shared>,
}

/// What the clones of one [`RotatingFile`] share.
struct Shared {
    path: Arc<Path>,
    max_size: u64,
    backups: usize,
    /// Task logs: the budget of descriptors kept open between lines (`None`: always kept).
    budget: Option<Arc<Budget>>,
    open: Mutex<Held>,
}

/// The open file, if any, and its place in the budget while it is kept between lines.
#[derive(Default)]
struct Held {
    file: Option<Open>,
    slot: Option<Slot>,
}

impl Held {
    fn close(&mut self) {
        self.file = None;
        self.slot = None;
    }
}

/// An open log file: plain until it first needs rotating, then `file-rotate`'s.
enum Open {
    Plain { file: std::fs::File, size: u64 },
    Rotating(Box<FileRotate<AppendCount>>),
}

impl RotatingFile {
    /// A file at `path`, rotated past `max_size` bytes, keeping `backups` rotated files.
    /// Nothing is opened until the first write.
    pub fn new(path: PathBuf, max_size: u64, backups: usize) -> RotatingFile {
        RotatingFile {
            shared: Arc::new(Shared::new(path.into(), max_size, backups)),
        }
    }

    /// Opens the file now rather than at the first write.
    pub fn open(&self) {
        let mut guard = self.shared.lock();
        self.shared.ensure_open(&mut guard);
    }

    /// Writes `line` (one whole line, newline included) in one call. If the file was
    /// deleted under us (say with its folder), it is opened anew first: writing on to the
    /// unlinked file would lose every line without an error.
    pub fn write_line(&self, line: &[u8]) {
        self.shared.write_line(line);
    }
}

impl Shared {
    fn new(path: Arc<Path>, max_size: u64, backups: usize) -> Shared {
        Shared {
            path,
            max_size: max_size.max(1),
            backups: backups.max(1),
            budget: None,
            open: Mutex::new(Held::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens the file into `held` unless it is open; `false` if it cannot be opened.
    fn ensure_open(&self, held: &mut Held) -> bool {
        if held.file.is_some() {
            return true;
        }
        let opened = match open_append(&self.path) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                if !self.create_folder() {
                    return false;
                }
                open_append(&self.path)
            }
            opened => opened,
        };
        match opened {
            Ok((file, size)) => {
                held.file = Some(Open::Plain { file, size });
                true
            }
            Err(err) => {
                tracing::warn!(path = %self.path.display(), "cannot open log file: {err}");
                false
            }
        }
    }

    /// Creates the missing log folder; `false` if it cannot be created.
    fn create_folder(&self) -> bool {
        let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) else {
            return true;
        };
        let created = match std::fs::create_dir(parent) {
            Ok(()) => Ok(true),
            // Another writer created it first, and said so.
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(_) => std::fs::create_dir_all(parent).map(|()| true),
        };
        match created {
            Ok(created) => {
                // Said once: only the writer that creates the folder says so.
                if created {
                    tracing::warn!(
                        folder = %parent.display(),
                        "the log folder was missing (deleted?): recreated it; lines written to the deleted files are gone"
                    );
                }
                true
            }
            Err(err) => {
                tracing::warn!(path = %self.path.display(), "cannot create log folder: {err}");
                false
            }
        }
    }

    /// `file-rotate` takes the file over (it scans the folder for rotated files once, and
    /// rotates before the next write since the file has passed its limit).
    fn take_over(&self) -> Option<Open> {
        // file-rotate panics when it cannot create the folder or open the file: keep any
        // panic of the crate from reaching a runner or the engine.
        let taken = catch_unwind(|| {
            FileRotate::new(
                &self.path,
                AppendCount::new(self.backups),
                ContentLimit::BytesSurpassed(self.max_size as usize),
                Compression::None,
                None,
            )
        });
        match taken {
            Ok(file) => Some(Open::Rotating(Box::new(file))),
            Err(_) => {
                tracing::warn!(path = %self.path.display(), "cannot open log file for rotation");
                None
            }
        }
    }

    /// Whether the open file was deleted since it was opened: a plain file is asked
    /// through its descriptor (link count 0; no path lookup per line: a log closed between
    /// lines opens its path anew for each line anyway), `file-rotate`'s,
    /// whose descriptor is its own, by its path. A plain file renamed away by another
    /// program (logrotate without `create`) is not noticed while it is held; it is closed
    /// when its last holder lets go, so the task's next run opens the path anew.
    fn gone(&self, open: &Open) -> bool {
        use std::os::unix::fs::MetadataExt;
        match open {
            Open::Plain { file, .. } => file.metadata().map_or(true, |m| m.nlink() == 0),
            Open::Rotating(_) => !self.path.exists(),
        }
    }

    fn write_line(&self, line: &[u8]) {
        let mut guard = self.lock();
        let held = &mut *guard;
        if held.file.as_ref().is_some_and(|open| self.gone(open)) {
            held.close();
        }
        if !self.ensure_open(held) {
            return;
        }
        if let Some(Open::Plain { size, .. }) = &held.file {
            if *size > self.max_size {
                match self.take_over() {
                    Some(taken) => held.file = Some(taken),
                    None => {
                        held.close();
                        return;
                    }
                }
            }
        }
        let written = match held.file.as_mut() {
            None => return,
            Some(Open::Plain { file, size }) => {
                let written = file.write_all(line);
                *size += line.len() as u64;
                Ok(written)
            }
            Some(Open::Rotating(file)) => catch_unwind(AssertUnwindSafe(|| {
                file.write_all(line).and_then(|_| file.flush())
            })),
        };
        match written {
            Ok(Ok(())) => {
                // Kept open for the next line only within the budget.
                if let Some(budget) = &self.budget {
                    if held.slot.is_none() {
                        held.slot = budget.take();
                        if held.slot.is_none() {
                            held.close();
                        }
                    }
                }
            }
            Ok(Err(err)) => {
                tracing::warn!(path = %self.path.display(), "cannot write log file: {err}");
                held.close();
            }
            Err(_) => {
                tracing::warn!(path = %self.path.display(), "log rotation failed");
                held.close();
            }
        }
    }
}

/// `path` opened to append (created if missing; its folder is not), and its size.
fn open_append(path: &Path) -> std::io::Result<(std::fs::File, u64)> {
    use std::io::{Seek, SeekFrom};
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let size = file.seek(SeekFrom::End(0))?;
    Ok((file, size))
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

/// Follows one log (`name` in `dir`) as it grows and rotates: each
/// [`next_lines`](LogFollower::next_lines) call returns the whole lines written since the
/// last one, oldest first, each once. `turbosched logs --follow` and `GET /scheduler/runs/{id}/log?follow=1`
/// both read through it.
///
/// It keeps the file it reads open, so a rotation (the file renamed to `name.1`, a new
/// `name` begun) loses nothing: the rest of the renamed file is read through the open
/// handle, then every file written after it, found by the identity (device, inode) of the
/// one it had; a file rotated several times between two calls is read from its rotated
/// copies while they are kept. A line still being written (no newline yet) is held back
/// until it is whole. A file truncated in place is read again from its start.
pub struct LogFollower {
    dir: PathBuf,
    name: String,
    /// The file being read, its identity and how far it has been read.
    open: Option<(std::fs::File, (u64, u64), u64)>,
    /// Bytes read after the last newline.
    partial: Vec<u8>,
    /// Only lines containing this.
    only: Option<String>,
    /// Lines already shown, which the first call may repeat (see [`LogFollower::skipping`]).
    shown: Vec<String>,
}

impl LogFollower {
    /// Follows the log from its current end: nothing written so far comes out.
    pub fn at_end(dir: &Path, name: &str) -> LogFollower {
        let mut follower = LogFollower {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            open: None,
            partial: Vec::new(),
            only: None,
            shown: Vec::new(),
        };
        if let Ok((file, id, length)) = open_with_id(&dir.join(name)) {
            follower.open = Some((file, id, length));
        }
        follower
    }

    /// Only lines that contain `text` (such as ` run=12 `).
    pub fn only(mut self, text: impl Into<String>) -> LogFollower {
        self.only = Some(text.into());
        self
    }

    /// Lines the caller has already shown (read after this follower started, say): the
    /// first call leaves them out. A task line carries a µs timestamp, so equal text is the
    /// same line.
    pub fn skipping(mut self, shown: Vec<String>) -> LogFollower {
        self.shown = shown;
        self
    }

    /// The whole lines written since the last call, oldest first.
    pub fn next_lines(&mut self) -> std::io::Result<Vec<String>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut bytes = std::mem::take(&mut self.partial);
        if let Some((file, _, position)) = &mut self.open {
            if file.metadata()?.len() < *position {
                // Truncated in place: what is there now is new.
                file.seek(SeekFrom::Start(0))?;
                *position = 0;
            }
            *position += file.read_to_end(&mut bytes)? as u64;
        }
        let current = std::fs::metadata(self.dir.join(&self.name))
            .ok()
            .map(|m| file_id(&m));
        let reading = self.open.as_ref().map(|(_, id, _)| *id);
        if current.is_some() && current != reading {
            // The file we read was rotated (or there was none): read every file written
            // after it, oldest first, to its end; the last one is the current file.
            let files = log_files(&self.dir, &self.name);
            let ours = reading.and_then(|id| {
                files
                    .iter()
                    .position(|path| std::fs::metadata(path).is_ok_and(|m| file_id(&m) == id))
            });
            let newer = match ours {
                Some(index) => &files[index + 1..],
                None => &files[files.len().saturating_sub(1)..],
            };
            for path in newer {
                if !bytes.is_empty() && !bytes.ends_with(b"\n") {
                    bytes.push(b'\n');
                }
                let Ok((mut file, id, _)) = open_with_id(path) else {
                    continue;
                };
                file.seek(SeekFrom::Start(0))?;
                let read = file.read_to_end(&mut bytes)? as u64;
                self.open = Some((file, id, read));
            }
        }
        let complete = bytes
            .iter()
            .rposition(|b| *b == b'\n')
            .map(|i| i + 1)
            .unwrap_or(0);
        self.partial = bytes.split_off(complete);
        let shown = std::mem::take(&mut self.shown);
        Ok(String::from_utf8_lossy(&bytes)
            .lines()
            .filter(|line| {
                self.only
                    .as_ref()
                    .is_none_or(|only| line.contains(only.as_str()))
            })
            .filter(|line| !shown.iter().any(|seen| seen == line))
            .map(str::to_string)
            .collect())
    }
}

/// A file opened for reading, its identity and its length.
fn open_with_id(path: &Path) -> std::io::Result<(std::fs::File, (u64, u64), u64)> {
    use std::io::{Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let metadata = file.metadata()?;
    let length = file.seek(SeekFrom::End(0))?;
    Ok((file, file_id(&metadata), length))
}

/// (device, inode): the same file under whatever name it has now.
fn file_id(metadata: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (metadata.dev(), metadata.ino())
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

    /// How many of this process's descriptors have `path` open.
    fn descriptors_on(path: &Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == path))
            .count()
    }

    #[test]
    fn a_task_log_is_open_only_while_held_and_one_file_serves_every_holder() {
        let dir = tempfile::tempdir().unwrap();
        let logs = TaskLogs::new(dir.path(), &settings(1 << 20, 2));
        let path = dir.path().join("task_t.log");
        let first = logs.task("t");
        assert_eq!(descriptors_on(&path), 0, "nothing opened before a line");
        first.line(RunId(1), Attempt(1), Level::Info, "one");
        let second = logs.task("t");
        assert!(Arc::ptr_eq(&first.file.shared, &second.file.shared));
        second.line(RunId(1), Attempt(1), Level::Info, "two");
        assert_eq!(descriptors_on(&path), 1, "one file for both holders");
        drop(first);
        assert_eq!(descriptors_on(&path), 1, "still held");
        drop(second);
        assert_eq!(descriptors_on(&path), 0, "closed with its last holder");
        logs.task("t")
            .line(RunId(2), Attempt(1), Level::Warn, "three");
        assert_eq!(descriptors_on(&path), 0);
        let text = std::fs::read_to_string(&path).unwrap();
        let ends: Vec<&str> = text
            .lines()
            .map(|l| l.rsplit(" - ").next().unwrap())
            .collect();
        assert_eq!(ends, ["one", "two", "three"], "{text}");
    }

    /// How many of this process's descriptors have a file under `dir` open.
    fn descriptors_under(dir: &Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target.starts_with(dir)))
            .count()
    }

    #[test]
    fn a_burst_of_held_task_logs_keeps_at_most_the_budget_of_descriptors_open() {
        let dir = tempfile::tempdir().unwrap();
        let logs = TaskLogs::new(dir.path(), &settings(1 << 20, 2));
        let tasks = 3 * OPEN_LOG_BUDGET;
        // A burst: every task's run holds its log and writes, all at once.
        let held: Vec<TaskLog> = (0..tasks).map(|n| logs.task(&format!("t{n}"))).collect();
        for round in ["started", "ended"] {
            for log in &held {
                log.line(RunId(1), Attempt(1), Level::Info, round);
            }
            assert_eq!(descriptors_under(dir.path()), OPEN_LOG_BUDGET);
            assert_eq!(logs.held_open(), OPEN_LOG_BUDGET);
        }
        for n in 0..tasks {
            let text = std::fs::read_to_string(dir.path().join(format!("task_t{n}.log"))).unwrap();
            let ends: Vec<&str> = text
                .lines()
                .map(|l| l.rsplit(" - ").next().unwrap())
                .collect();
            assert_eq!(ends, ["started", "ended"], "t{n}: {text}");
        }
        drop(held);
        assert_eq!(
            descriptors_under(dir.path()),
            0,
            "none held once nobody holds a log"
        );
        assert_eq!(logs.held_open(), 0, "every place given back");
        // The budget is free again: the next writer keeps its file between lines.
        let again = logs.task("t0");
        again.line(RunId(2), Attempt(1), Level::Info, "again");
        assert_eq!(descriptors_under(dir.path()), 1);
    }

    /// Runs in flight that take the whole budget of kept descriptors: the logs
    /// `<prefix>0`… each written once and held.
    fn spend_the_budget(logs: &TaskLogs, prefix: &str) -> Vec<TaskLog> {
        (0..OPEN_LOG_BUDGET)
            .map(|n| {
                let log = logs.task(&format!("{prefix}{n}"));
                log.line(RunId(1), Attempt(1), Level::Info, "holds a place");
                log
            })
            .collect()
    }

    #[test]
    fn logs_moved_by_a_reload_share_the_one_budget_with_the_runs_still_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let before = TaskLogs::new(&dir.path().join("a"), &settings(1 << 20, 2));
        let in_flight = spend_the_budget(&before, "t");
        let after = before.reconfigured(&dir.path().join("b"), &settings(1 << 20, 2));
        after
            .task("t0")
            .line(RunId(2), Attempt(1), Level::Info, "after");
        let held = after.task("t1");
        held.line(RunId(3), Attempt(1), Level::Info, "after");
        assert_eq!(
            descriptors_under(&dir.path().join("b")),
            0,
            "the budget is spent"
        );
        assert_eq!(after.held_open(), OPEN_LOG_BUDGET);
        drop(in_flight);
        held.line(RunId(3), Attempt(1), Level::Info, "again");
        assert_eq!(
            descriptors_under(&dir.path().join("b")),
            1,
            "freed by the old runs"
        );
    }

    #[test]
    fn a_log_closed_between_lines_still_rotates_between_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let logs = TaskLogs::new(dir.path(), &settings(300, 50));
        // Take the whole budget, so the log under test is opened and closed per line.
        let others = spend_the_budget(&logs, "other");
        let log = logs.task("t");
        for n in 0..40 {
            log.line(RunId(1), Attempt(1), Level::Info, &format!("line {n:02}"));
            assert_eq!(descriptors_on(&dir.path().join("task_t.log")), 0);
        }
        let files = log_files(dir.path(), "task_t.log");
        assert!(files.len() > 3, "rotated: {files:?}");
        let mut numbers = Vec::new();
        for file in &files {
            for line in std::fs::read_to_string(file).unwrap().lines() {
                let text = line.rsplit(" - ").next().unwrap();
                numbers.push(
                    text.strip_prefix("line ")
                        .unwrap()
                        .parse::<usize>()
                        .unwrap(),
                );
            }
        }
        assert_eq!(
            numbers,
            (0..40).collect::<Vec<_>>(),
            "every line once, in order, whole"
        );
        drop(others);
    }

    #[test]
    fn a_held_log_whose_folder_is_deleted_writes_on_into_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("logs");
        let logs = TaskLogs::new(&folder, &settings(1 << 20, 2));
        let log = logs.task("t");
        log.line(RunId(1), Attempt(1), Level::Info, "before");
        std::fs::remove_dir_all(&folder).unwrap();
        log.line(RunId(1), Attempt(1), Level::Info, "after");
        let text = std::fs::read_to_string(folder.join("task_t.log")).unwrap();
        assert!(text.ends_with(" - after\n"), "{text}");
        assert!(!text.contains("before"), "{text}");
    }

    /// The numbered lines `lines`, one write each, through `file`.
    fn write_numbered(file: &RotatingFile, lines: std::ops::Range<usize>) {
        for n in lines {
            file.write_line(format!("line {n:04} {}\n", "z".repeat(n % 13)).as_bytes());
        }
    }

    #[test]
    fn a_follower_yields_every_line_once_in_order_across_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let file = RotatingFile::new(dir.path().join("task_t.log"), 256, 50);
        write_numbered(&file, 0..10);
        let mut follower = LogFollower::at_end(dir.path(), "task_t.log");
        let mut seen = Vec::new();
        // Between two reads: none, one or several rotations (a line is ~20 bytes, a file
        // rotates past 256).
        for batch in [3, 1, 12, 5, 40, 2, 0, 27] {
            let from = 10 + seen.len();
            write_numbered(&file, from..from + batch);
            let lines = follower.next_lines().unwrap();
            assert_eq!(lines.len(), batch, "{lines:?}");
            seen.extend(lines);
        }
        let expected: Vec<String> = (10..10 + seen.len())
            .map(|n| format!("line {n:04} {}", "z".repeat(n % 13)))
            .collect();
        assert_eq!(seen, expected);
        assert!(
            log_files(dir.path(), "task_t.log").len() > 5,
            "the log rotated several times"
        );
    }

    #[test]
    fn a_follower_holds_back_a_half_written_line_and_keeps_to_its_filter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("task_t.log");
        std::fs::write(&path, "old run=1 \n").unwrap();
        let mut follower = LogFollower::at_end(dir.path(), "task_t.log")
            .only(" run=2 ")
            .skipping(vec!["a run=2 x".into()]);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        file.write_all(b"a run=2 x\nb run=1 y\nc run=2 ").unwrap();
        assert_eq!(follower.next_lines().unwrap(), Vec::<String>::new());
        file.write_all(b"z\n").unwrap();
        assert_eq!(
            follower.next_lines().unwrap(),
            vec!["c run=2 z".to_string()]
        );
    }
}
