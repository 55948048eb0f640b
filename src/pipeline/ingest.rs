//! `ingest` (task 1): load daily or intraday bars from CSV files into the market database.
//!
//! Params: `source_dir` (default `data/inbox`), `market_db` (default `data/market.db`),
//! `symbol_column` (else the symbol is the file name without `.csv`), `columns` (a map
//! from `date`, `open`, `high`, `low`, `close`, `adj_close`, `volume` to header names;
//! default: the Yahoo layout `Date,Open,High,Low,Close,Adj Close,Volume`), `date_format`
//! (a chrono format; default: `M/D/YYYY`, ISO dates and date-times are all recognised),
//! `force_reload` (re-read files already ingested unchanged).
//!
//! Promises:
//! - every row is validated (parseable date and numbers, prices > 0, volume ≥ 0,
//!   high ≥ max(open, close), low ≤ min(open, close), no duplicate symbol and time in a
//!   file); a bad row goes to `rejects` with file, line, raw text and reason, the rest of the
//!   file still loads, and `inserted + updated + unchanged + rejected = rows read`;
//! - idempotent: a file already ingested with the same content is skipped; a corrected row
//!   updates its bar; an unchanged row is left alone;
//! - a file is one transaction: a run killed mid-file leaves nothing of that file, and the
//!   per-file checkpoint (name, size, sha256) lets a retry skip the files already done.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use chrono::{NaiveDate, NaiveDateTime};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{db, market_db, param_str};
use crate::handlers::{HandlerError, TaskContext};

/// What one file gave.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileReport {
    /// File name.
    pub name: String,
    /// Data rows read (the header excluded).
    pub rows_read: u64,
    /// New bars.
    pub inserted: u64,
    /// Bars whose values changed.
    pub updated: u64,
    /// Bars already stored with the same values.
    pub unchanged: u64,
    /// Rows refused (see `rejects`).
    pub rejected: u64,
}

/// How to read a file's columns.
#[derive(Debug, Clone)]
pub struct Layout {
    columns: HashMap<&'static str, String>,
    symbol_column: Option<String>,
    date_format: Option<String>,
}

const FIELDS: [&str; 7] = [
    "date",
    "open",
    "high",
    "low",
    "close",
    "adj_close",
    "volume",
];

impl Default for Layout {
    fn default() -> Layout {
        let yahoo = [
            "Date",
            "Open",
            "High",
            "Low",
            "Close",
            "Adj Close",
            "Volume",
        ];
        Layout {
            columns: FIELDS
                .iter()
                .zip(yahoo)
                .map(|(field, name)| (*field, name.to_string()))
                .collect(),
            symbol_column: None,
            date_format: None,
        }
    }
}

impl Layout {
    fn from_params(ctx: &TaskContext) -> Result<Layout, HandlerError> {
        let mut layout = Layout::default();
        if let Some(map) = ctx.params().get("columns") {
            let map = map.as_object().ok_or_else(|| {
                HandlerError::Fatal(format!("params.columns: expected a table, found {map}"))
            })?;
            for (key, value) in map {
                let field = FIELDS.iter().find(|f| **f == key.as_str()).ok_or_else(|| {
                    HandlerError::Fatal(format!(
                        "params.columns.{key}: unknown field (known: {})",
                        FIELDS.join(", ")
                    ))
                })?;
                let name = value.as_str().ok_or_else(|| {
                    HandlerError::Fatal(format!(
                        "params.columns.{key}: expected a header name, found {value}"
                    ))
                })?;
                layout.columns.insert(field, name.to_string());
            }
        }
        if ctx.params().get("symbol_column").is_some() {
            layout.symbol_column = Some(param_str(ctx, "symbol_column", "")?.to_string());
        }
        if ctx.params().get("date_format").is_some() {
            layout.date_format = Some(param_str(ctx, "date_format", "")?.to_string());
        }
        Ok(layout)
    }
}

/// The `ingest` handler.
pub fn run(ctx: &TaskContext) -> Result<Value, HandlerError> {
    let source_dir = PathBuf::from(param_str(ctx, "source_dir", "data/inbox")?);
    let market_db = PathBuf::from(param_str(ctx, "market_db", "data/market.db")?);
    let force_reload = ctx.param_bool("force_reload", false)?;
    let layout = Layout::from_params(ctx)?;
    let files = csv_files(&source_dir)?;
    let mut connection = market_db::open(&market_db).map_err(HandlerError::Retryable)?;

    let mut done: Vec<Value> = ctx
        .checkpoint()
        .and_then(|c| c.get("files_done"))
        .and_then(|d| d.as_array())
        .cloned()
        .unwrap_or_default();
    let mut reports = Vec::new();
    let (mut resumed, mut already) = (0u64, 0u64);
    for (index, path) in files.iter().enumerate() {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = std::fs::read(path).map_err(|err| {
            HandlerError::Retryable(format!("cannot read {}: {err}", path.display()))
        })?;
        let sha256 = super::hex(&Sha256::digest(&bytes));
        let fingerprint = json!({ "name": name, "size": bytes.len(), "sha256": sha256 });
        if done.contains(&fingerprint) {
            resumed += 1;
            continue;
        }
        let seen: Option<i64> = connection
            .query_row(
                "SELECT 1 FROM ingested_files WHERE name = ?1 AND sha256 = ?2",
                params![name, sha256],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?;
        if seen.is_some() && !force_reload {
            already += 1;
        } else {
            let report = ingest_file(
                &mut connection,
                &name,
                &bytes,
                &sha256,
                &layout,
                ctx.run_id(),
            )?;
            println!(
                "{name}: {} rows read, {} inserted, {} updated, {} unchanged, {} rejected",
                report.rows_read,
                report.inserted,
                report.updated,
                report.unchanged,
                report.rejected
            );
            reports.push(report);
        }
        done.push(fingerprint);
        ctx.save_checkpoint(json!({ "files_done": done }));
        ctx.progress(
            (index + 1) as f64 * 100.0 / files.len() as f64,
            &format!("ingested {name}"),
        );
    }
    let sum = |field: fn(&FileReport) -> u64| reports.iter().map(field).sum::<u64>();
    Ok(json!({
        "market_db": market_db.display().to_string(),
        "files_found": files.len(),
        "files_ingested": reports.len(),
        "files_already_ingested": already,
        "files_resumed_from_checkpoint": resumed,
        "rows_read": sum(|r| r.rows_read),
        "inserted": sum(|r| r.inserted),
        "updated": sum(|r| r.updated),
        "unchanged": sum(|r| r.unchanged),
        "rejected": sum(|r| r.rejected),
        "files": reports.iter().map(|r| json!({
            "name": r.name, "rows_read": r.rows_read, "inserted": r.inserted,
            "updated": r.updated, "unchanged": r.unchanged, "rejected": r.rejected,
        })).collect::<Vec<_>>(),
    }))
}

fn csv_files(dir: &Path) -> Result<Vec<PathBuf>, HandlerError> {
    let entries = std::fs::read_dir(dir).map_err(|err| {
        HandlerError::Fatal(format!(
            "params.source_dir: cannot read {}: {err}",
            dir.display()
        ))
    })?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")))
        .collect();
    files.sort();
    Ok(files)
}

/// A validated bar.
#[derive(Debug, Clone, PartialEq)]
struct Bar {
    symbol: String,
    ts: String,
    open: f64,
    high: f64,
    low: f64,
    close: f64,
    adj_close: Option<f64>,
    volume: f64,
}

/// Loads one file in one transaction.
pub fn ingest_file(
    connection: &mut Connection,
    name: &str,
    bytes: &[u8],
    sha256: &str,
    layout: &Layout,
    run_id: i64,
) -> Result<FileReport, HandlerError> {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(bytes);
    let header = reader
        .headers()
        .map_err(|err| HandlerError::Fatal(format!("{name}: cannot read the header: {err}")))?
        .clone();
    let index = resolve_columns(name, &header, layout)?;
    let default_symbol = Path::new(name)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let now = chrono::Utc::now().to_rfc3339();

    let tx = connection.transaction().map_err(db)?;
    let mut report = FileReport {
        name: name.to_string(),
        ..FileReport::default()
    };
    {
        let mut select = tx
            .prepare_cached("SELECT open, high, low, close, adj_close, volume FROM bars WHERE symbol = ?1 AND ts = ?2")
            .map_err(db)?;
        let mut insert = tx
            .prepare_cached("INSERT INTO bars(symbol, ts, open, high, low, close, adj_close, volume, source) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)")
            .map_err(db)?;
        let mut update = tx
            .prepare_cached("UPDATE bars SET open = ?3, high = ?4, low = ?5, close = ?6, adj_close = ?7, volume = ?8, source = ?9 WHERE symbol = ?1 AND ts = ?2")
            .map_err(db)?;
        let mut reject = tx
            .prepare_cached("INSERT INTO rejects(file, line, raw, reason, run_id, rejected_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
            .map_err(db)?;
        let mut first_line: HashMap<(String, String), u64> = HashMap::new();
        for record in reader.records() {
            report.rows_read += 1;
            let (line, parsed) = match record {
                Ok(record) => {
                    let line = record.position().map(|p| p.line()).unwrap_or(0);
                    (line, parse_row(&record, &index, layout, &default_symbol))
                }
                Err(err) => (
                    err.position().map(|p| p.line()).unwrap_or(0),
                    Err(format!("unreadable CSV row: {err}")),
                ),
            };
            let checked = parsed.and_then(|bar| {
                match first_line.get(&(bar.symbol.clone(), bar.ts.clone())) {
                    Some(first) => Err(format!(
                        "duplicate of line {first}: same symbol {} and time {}",
                        bar.symbol, bar.ts
                    )),
                    None => {
                        first_line.insert((bar.symbol.clone(), bar.ts.clone()), line);
                        Ok(bar)
                    }
                }
            });
            match checked {
                Err(reason) => {
                    let raw = lines
                        .get(line.saturating_sub(1) as usize)
                        .copied()
                        .unwrap_or("");
                    reject
                        .execute(params![name, line as i64, raw, reason, run_id, now])
                        .map_err(db)?;
                    report.rejected += 1;
                }
                Ok(bar) => {
                    let stored: Option<(f64, f64, f64, f64, Option<f64>, f64)> = select
                        .query_row(params![bar.symbol, bar.ts], |r| {
                            <(f64, f64, f64, f64, Option<f64>, f64)>::try_from(r)
                        })
                        .optional()
                        .map_err(db)?;
                    let values = params![
                        bar.symbol,
                        bar.ts,
                        bar.open,
                        bar.high,
                        bar.low,
                        bar.close,
                        bar.adj_close,
                        bar.volume,
                        name
                    ];
                    match stored {
                        None => {
                            insert.execute(values).map_err(db)?;
                            report.inserted += 1;
                        }
                        Some(old)
                            if old
                                == (
                                    bar.open,
                                    bar.high,
                                    bar.low,
                                    bar.close,
                                    bar.adj_close,
                                    bar.volume,
                                ) =>
                        {
                            report.unchanged += 1;
                        }
                        Some(_) => {
                            update.execute(values).map_err(db)?;
                            report.updated += 1;
                        }
                    }
                }
            }
        }
    }
    tx.execute(
        "INSERT OR REPLACE INTO ingested_files(name, size, sha256, rows_read, inserted, updated, unchanged, rejected, ingested_at, run_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            name, bytes.len() as i64, sha256, report.rows_read as i64, report.inserted as i64, report.updated as i64,
            report.unchanged as i64, report.rejected as i64, now, run_id
        ],
    )
    .map_err(db)?;
    tx.commit().map_err(db)?;
    Ok(report)
}

/// Column positions: field → index; the symbol column too when configured.
struct Columns {
    fields: HashMap<&'static str, usize>,
    symbol: Option<usize>,
}

fn resolve_columns(
    name: &str,
    header: &csv::StringRecord,
    layout: &Layout,
) -> Result<Columns, HandlerError> {
    let find = |wanted: &str| {
        header
            .iter()
            .position(|h| h.trim().eq_ignore_ascii_case(wanted.trim()))
    };
    let mut fields = HashMap::new();
    for field in FIELDS {
        let wanted = &layout.columns[field];
        match find(wanted) {
            Some(index) => {
                fields.insert(field, index);
            }
            // An unnamed first column is the date (a pandas index written to CSV).
            None if field == "date" && header.get(0).is_some_and(|h| h.trim().is_empty()) => {
                fields.insert(field, 0);
            }
            None if field == "adj_close" => {}
            None => {
                return Err(HandlerError::Fatal(format!(
                    "{name}: no column {wanted:?} for {field} (header: {}); map it with params.columns.{field}",
                    header.iter().collect::<Vec<_>>().join(",")
                )))
            }
        }
    }
    let symbol = match &layout.symbol_column {
        Some(column) => Some(find(column).ok_or_else(|| {
            HandlerError::Fatal(format!(
                "{name}: no symbol column {column:?} (params.symbol_column)"
            ))
        })?),
        None => None,
    };
    Ok(Columns { fields, symbol })
}

fn parse_row(
    record: &csv::StringRecord,
    columns: &Columns,
    layout: &Layout,
    default_symbol: &str,
) -> Result<Bar, String> {
    let get =
        |field: &str| -> Option<&str> { columns.fields.get(field).and_then(|i| record.get(*i)) };
    let number = |field: &str| -> Result<f64, String> {
        let text = get(field)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| format!("{field}: missing"))?;
        let value: f64 = text
            .parse()
            .map_err(|_| format!("{field}: expected a number, found {text:?}"))?;
        if value.is_finite() {
            Ok(value)
        } else {
            Err(format!("{field}: expected a finite number, found {text:?}"))
        }
    };
    let symbol = match columns.symbol {
        Some(index) => record
            .get(index)
            .filter(|s| !s.is_empty())
            .ok_or("symbol: missing")?
            .to_string(),
        None => default_symbol.to_string(),
    };
    let date_text = get("date")
        .filter(|t| !t.is_empty())
        .ok_or("date: missing")?;
    let ts = parse_time(date_text, layout.date_format.as_deref())?;
    let (open, high, low, close, volume) = (
        number("open")?,
        number("high")?,
        number("low")?,
        number("close")?,
        number("volume")?,
    );
    let adj_close = match get("adj_close").filter(|t| !t.is_empty()) {
        Some(_) => Some(number("adj_close")?),
        None => None,
    };
    for (field, value) in [
        ("open", open),
        ("high", high),
        ("low", low),
        ("close", close),
    ] {
        if value <= 0.0 {
            return Err(format!("{field}: a price must be above 0, found {value}"));
        }
    }
    if volume < 0.0 {
        return Err(format!("volume: must not be negative, found {volume}"));
    }
    if high < open.max(close) {
        return Err(format!(
            "high {high} is below max(open {open}, close {close})"
        ));
    }
    if low > open.min(close) {
        return Err(format!(
            "low {low} is above min(open {open}, close {close})"
        ));
    }
    Ok(Bar {
        symbol,
        ts,
        open,
        high,
        low,
        close,
        adj_close,
        volume,
    })
}

/// `YYYY-MM-DD` for dates, `YYYY-MM-DDTHH:MM:SS` for date-times (UTC when an offset is given).
fn parse_time(text: &str, format: Option<&str>) -> Result<String, String> {
    let date = |d: NaiveDate| d.format("%Y-%m-%d").to_string();
    let datetime = |d: NaiveDateTime| d.format("%Y-%m-%dT%H:%M:%S").to_string();
    if let Some(format) = format {
        return NaiveDateTime::parse_from_str(text, format)
            .map(datetime)
            .or_else(|_| NaiveDate::parse_from_str(text, format).map(date))
            .map_err(|_| format!("date: {text:?} does not match date_format {format:?}"));
    }
    for format in ["%m/%d/%Y", "%Y-%m-%d", "%Y%m%d"] {
        if let Ok(d) = NaiveDate::parse_from_str(text, format) {
            return Ok(date(d));
        }
    }
    for format in [
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
        "%m/%d/%Y %H:%M:%S",
        "%m/%d/%Y %H:%M",
    ] {
        if let Ok(d) = NaiveDateTime::parse_from_str(text, format) {
            return Ok(datetime(d));
        }
    }
    if let Ok(d) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(datetime(d.naive_utc()));
    }
    Err(format!(
        "date: cannot read {text:?} (expected M/D/YYYY, YYYY-MM-DD or YYYY-MM-DD HH:MM[:SS])"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_in_every_supported_shape_are_read() {
        for (text, expected) in [
            ("1/4/1999", "1999-01-04"),
            ("12/31/2018", "2018-12-31"),
            ("2018-12-31", "2018-12-31"),
            ("20181231", "2018-12-31"),
            ("2018-12-31 15:30:00", "2018-12-31T15:30:00"),
            ("2018-12-31T15:30", "2018-12-31T15:30:00"),
            ("2018-12-31T15:30:00-05:00", "2018-12-31T20:30:00"),
        ] {
            assert_eq!(parse_time(text, None).as_deref(), Ok(expected), "{text}");
        }
        assert_eq!(
            parse_time("31.12.2018", Some("%d.%m.%Y")).as_deref(),
            Ok("2018-12-31")
        );
        assert!(parse_time("13/45/2020", None)
            .unwrap_err()
            .starts_with("date: cannot read"));
        assert!(parse_time("2018-12-31", Some("%d.%m.%Y"))
            .unwrap_err()
            .contains("does not match date_format"));
    }
}
