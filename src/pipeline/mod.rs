//! The first users' own tasks, built in: the TurboMode market pipeline.
//!
//! Each handler runs in a worker process and sees only its [`TaskContext`]: params,
//! checkpoint, progress. The pipeline keeps its own SQLite file, the market database
//! ([`market_db`]), separate from the scheduler's run history.
//!
//! Tasks: [`ingest`] (1), [`train`] (2), [`predict`] (3), [`backtest`] (4), [`drift`] (5);
//! [`features`] and [`model`] are shared by them.
//!
//! Invariant: nothing here knows the engine, the store, the runner or the config; a
//! handler fails as `Retryable` or `Fatal` and the runner decides what happens next.

pub mod backtest;
pub mod drift;
pub mod features;
pub mod ingest;
pub mod market_db;
pub mod model;
pub mod predict;
pub mod train;

use crate::handlers::{HandlerError, TaskContext};

/// A string param, or `default`.
pub(crate) fn param_str<'a>(
    ctx: &'a TaskContext,
    name: &str,
    default: &'a str,
) -> Result<&'a str, HandlerError> {
    match ctx.params().get(name) {
        None => Ok(default),
        Some(value) => value.as_str().ok_or_else(|| {
            HandlerError::Fatal(format!("params.{name}: expected a string, found {value}"))
        }),
    }
}

/// A nested params table (`gbdt = {…}`) decoded strictly: an unknown key is an error;
/// absent, the defaults.
pub(crate) fn nested_params<T: serde::de::DeserializeOwned + Default>(
    ctx: &TaskContext,
    name: &str,
) -> Result<T, HandlerError> {
    match ctx.params().get(name) {
        None => Ok(T::default()),
        Some(value) => serde_json::from_value(value.clone())
            .map_err(|err| HandlerError::Fatal(format!("params.{name}: {err}"))),
    }
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it into place.
pub(crate) fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> Result<(), HandlerError> {
    use std::io::Write;
    let fail = |err: std::io::Error| {
        HandlerError::Retryable(format!("cannot write {}: {err}", path.display()))
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(fail)?;
    }
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(fail)?;
    file.write_all(bytes).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every symbol's bars from the market database; none at all is a fatal error.
pub(crate) fn load_bars(
    connection: &rusqlite::Connection,
) -> Result<std::collections::BTreeMap<String, Vec<features::Bar>>, HandlerError> {
    let bars = market_db::all_bars(connection).map_err(db)?;
    if bars.is_empty() {
        return Err(HandlerError::Fatal(
            "the market database has no bars: run ingestion first".into(),
        ));
    }
    Ok(bars)
}

/// A market database error: retryable (a locked or busy file clears up).
pub(crate) fn db(err: rusqlite::Error) -> HandlerError {
    HandlerError::Retryable(format!("market database: {err}"))
}
