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

/// What the chart tests share: a chart is looked at as a PNG, not only written.
#[cfg(test)]
pub(crate) mod chart_check {
    use std::path::Path;
    use std::process::Command;

    /// Converts the SVG at `svg` to PNG with `rsvg-convert` (Debian's `librsvg2-bin`), as a
    /// reader's viewer would draw it, and checks that it succeeds without a warning and gives
    /// a PNG of the SVG's `width` × `height` of more than `min_bytes` (a chart, not a blank
    /// page). Returns the PNG's path, or `None` with a printed note when rsvg-convert is
    /// not on PATH.
    pub(crate) fn check_renders_as_png(
        svg: &Path,
        (width, height): (u32, u32),
        min_bytes: usize,
    ) -> Option<std::path::PathBuf> {
        let png = svg.with_extension("png");
        let output = match Command::new("rsvg-convert")
            .arg("--format=png")
            .arg("--output")
            .arg(&png)
            .arg(svg)
            .output()
        {
            Ok(output) => output,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                println!(
                    "note: rsvg-convert is not on PATH (apt-get install librsvg2-bin): {} not rendered to PNG",
                    svg.display()
                );
                return None;
            }
            Err(err) => panic!("rsvg-convert {}: {err}", svg.display()),
        };
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && stderr.trim().is_empty(),
            "rsvg-convert {}: {}: {stderr}",
            svg.display(),
            output.status
        );
        let bytes = std::fs::read(&png).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n") && &bytes[12..16] == b"IHDR",
            "{}: not a PNG",
            png.display()
        );
        let dimension = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
        assert_eq!(
            (dimension(16), dimension(20)),
            (width, height),
            "{}",
            png.display()
        );
        assert!(
            bytes.len() > min_bytes,
            "{}: {} bytes, a blank page?",
            png.display(),
            bytes.len()
        );
        Some(png)
    }

    /// The text of every `<text>` element of an SVG, in order.
    pub(crate) fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|element| {
                let body = &element[element.find('>')? + 1..];
                Some(body[..body.find("</text>")?].trim().to_string())
            })
            .collect()
    }
}
