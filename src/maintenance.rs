//! Housekeeping of the service's own files and database: archive old logs into a
//! verified zip, remove the checkpoint files of runs that are over, prune old run history,
//! back up the database.
//!
//! Run by the built-in `maintenance` handler (in the worker process, like every task) and
//! by `turbosched archive` by hand. It uses the store's own `prune` and `backup_to` (no SQL
//! here) and knows nothing of the engine.
//!
//! The archive promise: a log file is deleted only after the zip that holds it has been
//! written under a temporary name, fsynced, re-opened, and every entry checked against the
//! original (size, CRC-32 and every byte), then renamed into place and the folder fsynced.
//! Interrupted at any instant, no log line is lost and no half-written zip stands under a
//! final name (a crash after the rename but before the deletions leaves the files in both
//! places; the next run archives them again).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipArchive, ZipWriter};

use crate::config::Config;
use crate::model::{Instant, RunId, RunState};
use crate::store::{PruneCounts, Store, StoreError};

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    /// A file operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The zip could not be written or read.
    #[error("zip {}: {source}", path.display())]
    Zip {
        /// The zip.
        path: PathBuf,
        /// Why.
        source: zip::result::ZipError,
    },
    /// The zip does not hold exactly what was put in: nothing was deleted.
    #[error("archive {} failed verification, originals kept: {entry}: {reason}", zip.display())]
    Verify {
        /// The (temporary) zip.
        zip: PathBuf,
        /// The entry.
        entry: String,
        /// What differed.
        reason: String,
    },
    /// Pruning or the backup failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A bad parameter.
    #[error("params.{name}: {reason}")]
    Param {
        /// Which.
        name: &'static str,
        /// Why.
        reason: String,
    },
}

/// Test seam: make the archive fail between writing and verifying, as a torn write or a
/// bad disk would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Flip bytes in the middle of the written zip before it is verified.
    CorruptBeforeVerify,
    /// Cut the written zip short before it is verified.
    TruncateBeforeVerify,
}

/// What to do, and when "now" is.
#[derive(Debug, Clone)]
pub struct Options {
    /// Log files last written longer ago than this are archived.
    pub archive_after_days: u32,
    /// Run history and events older than this are pruned.
    pub retention_days: u32,
    /// Database backups kept in the archive folder.
    pub keep_backups: usize,
    /// Say what would be done, do nothing.
    pub dry_run: bool,
    /// The moment cut-offs are counted from.
    pub now: Instant,
    /// Test seam.
    pub fault: Option<Fault>,
}

impl Options {
    /// Defaults (30, 90, 4), overridden by the maintenance task's params.
    pub fn from_params(
        params: &serde_json::Value,
        now: Instant,
    ) -> Result<Options, MaintenanceError> {
        let number = |name: &'static str, default: u64| -> Result<u64, MaintenanceError> {
            match params.get(name) {
                None => Ok(default),
                Some(value) => {
                    value
                        .as_u64()
                        .filter(|n| *n <= 100_000)
                        .ok_or(MaintenanceError::Param {
                            name,
                            reason: format!("expected a whole number, found {value}"),
                        })
                }
            }
        };
        Ok(Options {
            archive_after_days: number("archive_after_days", 30)? as u32,
            retention_days: number("retention_days", 90)? as u32,
            keep_backups: number("keep_backups", 4)?.max(1) as usize,
            dry_run: false,
            now,
            fault: None,
        })
    }
}

/// One archived (or to-be-archived) file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFile {
    /// Where it is (was).
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
}

/// What the archive step did.
#[derive(Debug, Clone, Default)]
pub struct ArchiveReport {
    /// The zip written, if any.
    pub zip: Option<PathBuf>,
    /// The files put in it (or that would be).
    pub files: Vec<LogFile>,
    /// Their total size.
    pub bytes_before: u64,
    /// The zip's size.
    pub bytes_after: u64,
    /// Originals deleted after verification.
    pub deleted: usize,
}

/// What the checkpoint step removed (or would).
#[derive(Debug, Clone, Default)]
pub struct CheckpointReport {
    /// The files removed (or that would be).
    pub files: Vec<LogFile>,
    /// Their total size.
    pub bytes: u64,
}

/// What a whole maintenance run did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Archive step.
    pub archive: ArchiveReport,
    /// Checkpoint step.
    pub checkpoints: CheckpointReport,
    /// Prune step.
    pub pruned: PruneCounts,
    /// The backup written (or that would be).
    pub backup: Option<PathBuf>,
    /// Why no backup was written (the database is not one this can copy).
    pub backup_skipped: Option<String>,
    /// Older backups removed.
    pub backups_removed: Vec<PathBuf>,
    /// Nothing was changed.
    pub dry_run: bool,
}

impl Report {
    /// The run result: counts and bytes.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "dry_run": self.dry_run,
            "archive": {
                "zip": self.archive.zip.as_ref().map(|p| p.display().to_string()),
                "files_archived": self.archive.files.len(),
                "files": self.archive.files.iter().map(|f| f.path.display().to_string()).collect::<Vec<_>>(),
                "bytes_before": self.archive.bytes_before,
                "bytes_after": self.archive.bytes_after,
                "originals_deleted": self.archive.deleted,
            },
            "checkpoints": {
                "files_removed": self.checkpoints.files.len(),
                "files": self.checkpoints.files.iter().map(|f| f.path.display().to_string()).collect::<Vec<_>>(),
                "bytes": self.checkpoints.bytes,
            },
            "pruned": {
                "runs": self.pruned.runs,
                "attempts": self.pruned.attempts,
                "events": self.pruned.events,
            },
            "backup": self.backup.as_ref().map(|p| p.display().to_string()),
            "backup_skipped": self.backup_skipped,
            "backups_removed": self.backups_removed.len(),
        })
    }

    /// Human lines, for the task log and `turbosched archive`.
    pub fn lines(&self) -> Vec<String> {
        let verb = if self.dry_run {
            "would archive"
        } else {
            "archived"
        };
        let mut lines = Vec::new();
        match &self.archive.zip {
            Some(zip) => lines.push(format!(
                "{verb} {} log file(s), {} bytes → {} ({} bytes), {} original(s) deleted",
                self.archive.files.len(),
                self.archive.bytes_before,
                zip.display(),
                self.archive.bytes_after,
                self.archive.deleted
            )),
            None => lines.push("no log file old enough to archive".to_string()),
        }
        for file in &self.archive.files {
            lines.push(format!("  {} ({} bytes)", file.path.display(), file.bytes));
        }
        if self.checkpoints.files.is_empty() {
            lines.push("no checkpoint file left over".to_string());
        } else {
            lines.push(format!(
                "{} {} checkpoint file(s) of runs that are over, {} bytes",
                if self.dry_run {
                    "would remove"
                } else {
                    "removed"
                },
                self.checkpoints.files.len(),
                self.checkpoints.bytes
            ));
        }
        for file in &self.checkpoints.files {
            lines.push(format!("  {} ({} bytes)", file.path.display(), file.bytes));
        }
        lines.push(format!(
            "{} {} run(s), {} attempt(s), {} event(s)",
            if self.dry_run {
                "would prune"
            } else {
                "pruned"
            },
            self.pruned.runs,
            self.pruned.attempts,
            self.pruned.events
        ));
        if let Some(backup) = &self.backup {
            lines.push(format!(
                "{} {}",
                if self.dry_run {
                    "would back up the database to"
                } else {
                    "backed up the database to"
                },
                backup.display()
            ));
        }
        if let Some(skipped) = &self.backup_skipped {
            lines.push(skipped.clone());
        }
        for removed in &self.backups_removed {
            lines.push(format!("removed old backup {}", removed.display()));
        }
        lines
    }
}

/// Archive, prune, back up — everything `maintenance` does.
pub fn run(config: &Config, store: &Store, options: &Options) -> Result<Report, MaintenanceError> {
    let configured: BTreeSet<String> = config.tasks.keys().map(|t| t.0.clone()).collect();
    let archive = archive_logs(
        &config.scheduler.log_dir,
        &config.logging.archive_dir,
        &configured,
        options,
    )?;
    let checkpoints = remove_checkpoints(
        &config.scheduler.state_dir.join("checkpoints"),
        store,
        options,
    )?;
    let cutoff = options.now - chrono::Duration::days(i64::from(options.retention_days));
    let pruned = store.prune(cutoff, options.dry_run)?;
    let stamp = options.now.format("%Y%m%dT%H%M%SZ");
    let backup = config
        .logging
        .archive_dir
        .join(format!("scheduler_backup_{stamp}.db"));
    let mut backups_removed = Vec::new();
    if !store.can_back_up() {
        // PostgreSQL: the server's own backups (pg_dump, base backups) are the way; the
        // report says so instead of failing the whole maintenance run.
        return Ok(Report {
            archive,
            checkpoints,
            pruned,
            backup: None,
            backup_skipped: Some(
                "database backup skipped: on PostgreSQL, back up with pg_dump (or the server's own backups)"
                    .into(),
            ),
            backups_removed,
            dry_run: options.dry_run,
        });
    }
    if !options.dry_run {
        create_dir(&config.logging.archive_dir)?;
        store.backup_to(&backup)?;
        let mut backups =
            files_with_prefix(&config.logging.archive_dir, "scheduler_backup_", ".db");
        backups.sort();
        while backups.len() > options.keep_backups {
            let oldest = backups.remove(0);
            std::fs::remove_file(&oldest)
                .map_err(|source| io("cannot remove old backup", &oldest, source))?;
            backups_removed.push(oldest);
        }
    }
    Ok(Report {
        archive,
        checkpoints,
        pruned,
        backup: Some(backup),
        backup_skipped: None,
        backups_removed,
        dry_run: options.dry_run,
    })
}

/// Archives the log files of `log_dir` last written before the cut-off: rotated backups
/// (`*.log.N`) and the logs of tasks not in `configured`. See the module docs for the
/// promise.
pub fn archive_logs(
    log_dir: &Path,
    archive_dir: &Path,
    configured: &BTreeSet<String>,
    options: &Options,
) -> Result<ArchiveReport, MaintenanceError> {
    let cutoff = SystemTime::from(
        options.now - chrono::Duration::days(i64::from(options.archive_after_days)),
    );
    let files = candidates(log_dir, configured, cutoff)?;
    let bytes_before = files.iter().map(|f| f.bytes).sum();
    if files.is_empty() {
        return Ok(ArchiveReport::default());
    }
    let stamp = options.now.format("%Y%m%dT%H%M%SZ");
    let final_path = archive_dir.join(format!("logs_archive_{stamp}.zip"));
    if options.dry_run {
        return Ok(ArchiveReport {
            zip: Some(final_path),
            files,
            bytes_before,
            bytes_after: 0,
            deleted: 0,
        });
    }
    create_dir(archive_dir)?;
    let temporary = archive_dir.join(format!(".logs_archive_{stamp}.zip.partial"));
    let outcome = write_zip(&temporary, &files).and_then(|entries| {
        inject(options.fault, &temporary)?;
        verify_zip(&temporary, &files, &entries)
    });
    if let Err(err) = outcome {
        let _ = std::fs::remove_file(&temporary);
        return Err(err);
    }
    std::fs::rename(&temporary, &final_path)
        .map_err(|source| io("cannot move the verified zip to", &final_path, source))?;
    File::open(archive_dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|source| io("cannot sync the archive folder", archive_dir, source))?;
    let bytes_after = std::fs::metadata(&final_path).map(|m| m.len()).unwrap_or(0);
    let mut deleted = 0;
    for file in &files {
        std::fs::remove_file(&file.path)
            .map_err(|source| io("cannot delete archived log", &file.path, source))?;
        deleted += 1;
    }
    Ok(ArchiveReport {
        zip: Some(final_path),
        files,
        bytes_before,
        bytes_after,
        deleted,
    })
}

/// A `.tmp` checkpoint file last written longer ago than this is stale, whatever its run:
/// the write that left it was cut short (a rename takes microseconds).
const STALE_TEMPORARY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes the checkpoint files (`run_<id>.json`, and the `run_<id>.json.tmp` of a write
/// cut short) of runs that are over: terminal in the store, or unknown to it (pruned, or
/// from another database). The files of runs still queued, running, waiting for a retry or
/// orphaned are kept: their next attempt resumes from one. A `.tmp` is removed whatever its
/// run once it is an hour old. Other files are left alone.
///
/// The folder is listed before the store is asked, so a file seen belongs to a run the
/// store already holds; a run terminal then stays terminal (a retry is a new run, with a
/// file of its own).
pub fn remove_checkpoints(
    dir: &Path,
    store: &Store,
    options: &Options,
) -> Result<CheckpointReport, MaintenanceError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Ok(CheckpointReport::default())
        }
        Err(source) => return Err(io("cannot list", dir, source)),
    };
    let mut seen = Vec::new();
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let Some((run, temporary)) = checkpoint_run(&name) else {
            continue;
        };
        let Ok(metadata) = entry.metadata() else {
            continue; // gone meanwhile
        };
        if !metadata.is_file() {
            continue;
        }
        let stale = temporary
            && metadata
                .modified()
                .ok()
                .and_then(|written| SystemTime::now().duration_since(written).ok())
                .is_some_and(|age| age > STALE_TEMPORARY);
        seen.push((run, stale, entry.path(), metadata.len()));
    }
    if seen.is_empty() {
        return Ok(CheckpointReport::default());
    }
    let open: std::collections::HashSet<RunId> = store
        .ids_in_states(&[
            RunState::Queued,
            RunState::Running,
            RunState::RetryWait,
            RunState::Orphaned,
        ])?
        .into_iter()
        .collect();
    let mut files: Vec<LogFile> = seen
        .into_iter()
        .filter(|(run, stale, _, _)| match run {
            Some(run) => *stale || !open.contains(run),
            None => *stale,
        })
        .map(|(_, _, path, bytes)| LogFile { path, bytes })
        .collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    if !options.dry_run {
        let mut removed = Vec::with_capacity(files.len());
        for file in files {
            match std::fs::remove_file(&file.path) {
                Ok(()) => removed.push(file),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {} // the engine was first
                Err(source) => {
                    return Err(io("cannot remove checkpoint", &file.path, source));
                }
            }
        }
        files = removed;
    }
    let bytes = files.iter().map(|f| f.bytes).sum();
    Ok(CheckpointReport { files, bytes })
}

/// The run a checkpoint file name belongs to (if it names one), and whether it is a
/// temporary: the engine writes `run_<id>.json` (`Engine::checkpoint_path`) through
/// `run_<id>.json.tmp`. `None` for a name that is neither a checkpoint nor a `.tmp`.
fn checkpoint_run(name: &str) -> Option<(Option<RunId>, bool)> {
    let run = |id: &str| {
        (!id.is_empty() && id.chars().all(|c| c.is_ascii_digit()))
            .then(|| id.parse().ok().map(RunId))
            .flatten()
    };
    let rest = name.strip_prefix("run_");
    if let Some(id) = rest.and_then(|rest| rest.strip_suffix(".json.tmp")) {
        return Some((run(id), true));
    }
    if name.ends_with(".tmp") {
        return Some((None, true));
    }
    let id = rest?.strip_suffix(".json")?;
    Some((Some(run(id)?), false))
}

fn candidates(
    log_dir: &Path,
    configured: &BTreeSet<String>,
    cutoff: SystemTime,
) -> Result<Vec<LogFile>, MaintenanceError> {
    let entries = match std::fs::read_dir(log_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(io("cannot list", log_dir, source)),
    };
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let rotated = name.rsplit_once(".log.").is_some_and(|(_, number)| {
            !number.is_empty() && number.chars().all(|c| c.is_ascii_digit())
        });
        let unconfigured = name
            .strip_prefix("task_")
            .and_then(|rest| rest.strip_suffix(".log"))
            .is_some_and(|task| !configured.contains(task));
        if !rotated && !unconfigured {
            continue;
        }
        let metadata = entry
            .metadata()
            .map_err(|source| io("cannot read", &entry.path(), source))?;
        let written = metadata
            .modified()
            .map_err(|source| io("cannot read the time of", &entry.path(), source))?;
        if metadata.is_file() && written < cutoff {
            files.push(LogFile {
                path: entry.path(),
                bytes: metadata.len(),
            });
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// (entry name, CRC-32, size) of each file written.
fn write_zip(path: &Path, files: &[LogFile]) -> Result<Vec<(String, u32, u64)>, MaintenanceError> {
    let zip_error = |source| MaintenanceError::Zip {
        path: path.to_path_buf(),
        source,
    };
    let file = File::create(path).map_err(|source| io("cannot create", path, source))?;
    let mut zip = ZipWriter::new(file);
    let mut entries = Vec::new();
    for log in files {
        let name = entry_name(&log.path);
        let options = SimpleFileOptions::default()
            .compression_method(CompressionMethod::Deflated)
            .large_file(log.bytes >= u64::from(u32::MAX));
        zip.start_file(name.as_str(), options).map_err(zip_error)?;
        let mut source = BufReader::new(
            File::open(&log.path).map_err(|source| io("cannot read", &log.path, source))?,
        );
        let mut hasher = crc32fast::Hasher::new();
        let mut size = 0u64;
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let read = source
                .read(&mut buffer)
                .map_err(|source| io("cannot read", &log.path, source))?;
            if read == 0 {
                break;
            }
            hasher.update(&buffer[..read]);
            size += read as u64;
            zip.write_all(&buffer[..read])
                .map_err(|source| io("cannot write", path, source))?;
        }
        entries.push((name, hasher.finalize(), size));
    }
    let file = zip.finish().map_err(zip_error)?;
    file.sync_all()
        .map_err(|source| io("cannot sync", path, source))?;
    Ok(entries)
}

fn verify_zip(
    path: &Path,
    files: &[LogFile],
    entries: &[(String, u32, u64)],
) -> Result<(), MaintenanceError> {
    let fail = |entry: &str, reason: String| MaintenanceError::Verify {
        zip: path.to_path_buf(),
        entry: entry.to_string(),
        reason,
    };
    let file = File::open(path).map_err(|source| io("cannot reopen", path, source))?;
    let mut archive =
        ZipArchive::new(file).map_err(|err| fail("(central directory)", err.to_string()))?;
    if archive.len() != entries.len() {
        return Err(fail(
            "(central directory)",
            format!(
                "expected {} entries, found {}",
                entries.len(),
                archive.len()
            ),
        ));
    }
    for (log, (name, crc, size)) in files.iter().zip(entries) {
        let mut entry = archive
            .by_name(name)
            .map_err(|err| fail(name, err.to_string()))?;
        if entry.size() != *size || entry.crc32() != *crc {
            return Err(fail(
                name,
                format!(
                    "expected {size} bytes with CRC {crc:08x}, found {} bytes with CRC {:08x}",
                    entry.size(),
                    entry.crc32()
                ),
            ));
        }
        // Reading to the end makes the zip crate check the data against its CRC; the
        // comparison checks it against the original, byte for byte.
        let mut original = BufReader::new(
            File::open(&log.path).map_err(|source| io("cannot read", &log.path, source))?,
        );
        let (mut left, mut right) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
        loop {
            let read = entry
                .read(&mut left)
                .map_err(|err| fail(name, format!("cannot read back: {err}")))?;
            if read == 0 {
                let mut rest = [0u8; 1];
                let extra = original
                    .read(&mut rest)
                    .map_err(|source| io("cannot read", &log.path, source))?;
                if extra != 0 {
                    return Err(fail(
                        name,
                        "archived copy is shorter than the original".into(),
                    ));
                }
                break;
            }
            original
                .read_exact(&mut right[..read])
                .map_err(|_| fail(name, "archived copy is longer than the original".into()))?;
            if left[..read] != right[..read] {
                return Err(fail(name, "archived bytes differ from the original".into()));
            }
        }
    }
    Ok(())
}

fn inject(fault: Option<Fault>, path: &Path) -> Result<(), MaintenanceError> {
    let Some(fault) = fault else { return Ok(()) };
    let mut bytes = std::fs::read(path).map_err(|source| io("cannot read", path, source))?;
    match fault {
        Fault::CorruptBeforeVerify => {
            let middle = bytes.len() / 3;
            for byte in bytes.iter_mut().skip(middle).take(16) {
                *byte ^= 0xff;
            }
        }
        Fault::TruncateBeforeVerify => bytes.truncate(bytes.len() / 2),
    }
    std::fs::write(path, bytes).map_err(|source| io("cannot write", path, source))
}

fn entry_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn files_with_prefix(dir: &Path, prefix: &str, suffix: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.starts_with(prefix) && name.ends_with(suffix))
        })
        .map(|entry| entry.path())
        .collect()
}

fn create_dir(dir: &Path) -> Result<(), MaintenanceError> {
    std::fs::create_dir_all(dir).map_err(|source| io("cannot create", dir, source))
}

fn io(what: &'static str, path: &Path, source: std::io::Error) -> MaintenanceError {
    MaintenanceError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The `maintenance` built-in handler, in the worker process: reads the service's config
/// (`TURBOSCHED_CONFIG_FILE`), opens its database, runs, reports.
pub fn handler(
    ctx: &crate::handlers::TaskContext,
) -> Result<serde_json::Value, crate::handlers::HandlerError> {
    use crate::handlers::HandlerError;
    let path = std::env::var("TURBOSCHED_CONFIG_FILE").map_err(|_| {
        HandlerError::Fatal(
            "TURBOSCHED_CONFIG_FILE is not set: maintenance runs only under turbosched".into(),
        )
    })?;
    let config = crate::config::load(Path::new(&path))
        .map_err(|err| HandlerError::Fatal(err.to_string()))?;
    let options = Options::from_params(ctx.params(), chrono::Utc::now())
        .map_err(|err| HandlerError::Fatal(err.to_string()))?;
    let store = Store::open(&config.scheduler.database)
        .map_err(|err| HandlerError::Retryable(err.to_string()))?;
    ctx.progress(10.0, "archiving logs");
    let report =
        run(&config, &store, &options).map_err(|err| HandlerError::Retryable(err.to_string()))?;
    for line in report.lines() {
        println!("{line}");
    }
    ctx.progress(100.0, "done");
    Ok(report.to_json())
}
