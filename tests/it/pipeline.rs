//! The market pipeline's tasks, run by the real binary on real files.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;
use serde_json::Value;
use turbosched::model::RunState;

use crate::support::*;

fn samples() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("samples/market")
        .display()
        .to_string()
}

fn ingestion(source_dir: &str, extra: &str) -> String {
    format!("[tasks.ingestion]\nhandler = \"ingest\"\nretries = 1\nretry_backoff = {{ initial = \"10ms\", jitter = false }}\nparams = {{ source_dir = \"{source_dir}\", market_db = \"data/market.db\"{extra} }}\n")
}

fn run_ingestion(sandbox: &Sandbox) -> Value {
    let (code, value) = sandbox.cli_json(&["run", "ingestion", "--json"]);
    assert_eq!(code, 0, "{value}");
    value["runs"][0]["result"].clone()
}

fn market(sandbox: &Sandbox) -> Connection {
    Connection::open(sandbox.path().join("data/market.db")).unwrap()
}

fn count(db: &Connection, sql: &str) -> i64 {
    db.query_row(sql, [], |r| r.get(0)).unwrap()
}

#[test]
fn the_shipped_real_files_load_completely_and_a_second_run_changes_nothing() {
    let sandbox = Sandbox::new(&ingestion(&samples(), ""));
    let result = run_ingestion(&sandbox);
    assert_eq!(result["files_ingested"], 2, "{result}");
    assert_eq!(result["rows_read"], 10_062);
    assert_eq!(result["inserted"], 10_062);
    assert_eq!(result["rejected"], 0);
    let db = market(&sandbox);
    for symbol in ["SPX", "IXIC"] {
        assert_eq!(
            count(
                &db,
                &format!("SELECT COUNT(*) FROM bars WHERE symbol = '{symbol}'")
            ),
            5031,
            "{symbol}"
        );
    }
    let (first, last): (String, String) = db
        .query_row(
            "SELECT MIN(ts), MAX(ts) FROM bars WHERE symbol = 'SPX'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (first.as_str(), last.as_str()),
        ("1999-01-04", "2018-12-31")
    );
    let close: f64 = db
        .query_row(
            "SELECT close FROM bars WHERE symbol = 'SPX' AND ts = '1999-01-04'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(close, 1228.099976);

    let again = run_ingestion(&sandbox);
    assert_eq!(
        (
            again["files_already_ingested"].as_u64(),
            again["rows_read"].as_u64()
        ),
        (Some(2), Some(0)),
        "{again}"
    );
    std::fs::write(
        sandbox.path().join("config/scheduler.toml"),
        format!(
            "{FAST_SCHEDULER}\n{}",
            ingestion(&samples(), ", force_reload = true")
        ),
    )
    .unwrap();
    let forced = run_ingestion(&sandbox);
    assert_eq!(
        (forced["unchanged"].as_u64(), forced["inserted"].as_u64()),
        (Some(10_062), Some(0)),
        "{forced}"
    );
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM bars"),
        10_062,
        "idempotent"
    );
}

const BAD_FILE: &str = "\
Date,Open,High,Low,Close,Adj Close,Volume
1/4/1999,10,12,9,11,11,1000
1/5/1999,11,13,10,12,12,1000
13/45/1999,11,13,10,12,12,1000
1/7/1999,abc,13,10,12,12,1000
1/8/1999,-11,13,10,12,12,1000
1/11/1999,11,13,10,0,0,1000
1/12/1999,11,13,10,12,12,-5
1/13/1999,11,11.5,10,12,12,1000
1/14/1999,11,13,11.5,12,12,1000
1/5/1999,11,13,10,12,12,1000
1/15/1999,11,13
1/19/1999,NaN,13,10,12,12,1000
,11,13,10,12,12,1000
1/20/1999,12,14,11,13,13,2000
";

#[test]
fn every_kind_of_bad_row_is_rejected_with_its_line_and_the_good_rows_load() {
    let inbox = tempfile::tempdir().unwrap();
    std::fs::write(inbox.path().join("BAD.csv"), BAD_FILE).unwrap();
    let sandbox = Sandbox::new(&ingestion(&inbox.path().display().to_string(), ""));
    let result = run_ingestion(&sandbox);
    assert_eq!(result["rows_read"], 14, "{result}");
    assert_eq!(result["inserted"], 3);
    assert_eq!(result["rejected"], 11);
    let sum: u64 = ["inserted", "updated", "unchanged", "rejected"]
        .iter()
        .map(|k| result[k].as_u64().unwrap())
        .sum();
    assert_eq!(
        sum,
        result["rows_read"].as_u64().unwrap(),
        "nothing silently dropped"
    );

    let db = market(&sandbox);
    let mut statement = db
        .prepare("SELECT line, raw, reason FROM rejects WHERE file = 'BAD.csv' ORDER BY line")
        .unwrap();
    let rejects: Vec<(i64, String, String)> = statement
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let expected: &[(i64, &str)] = &[
        (4, "date: cannot read \"13/45/1999\""),
        (5, "open: expected a number, found \"abc\""),
        (6, "open: a price must be above 0, found -11"),
        (7, "close: a price must be above 0, found 0"),
        (8, "volume: must not be negative, found -5"),
        (9, "high 11.5 is below max(open 11, close 12)"),
        (10, "low 11.5 is above min(open 11, close 12)"),
        (
            11,
            "duplicate of line 3: same symbol BAD and time 1999-01-05",
        ),
        (12, "missing"),
        (13, "open: expected a finite number, found \"NaN\""),
        (14, "date: missing"),
    ];
    assert_eq!(rejects.len(), expected.len(), "{rejects:#?}");
    for ((line, raw, reason), (want_line, want_reason)) in rejects.iter().zip(expected) {
        assert_eq!(line, want_line, "{reason}");
        assert!(
            reason.contains(want_reason),
            "line {line}: {reason:?} should say {want_reason:?}"
        );
        assert_eq!(
            raw,
            BAD_FILE.lines().nth(*line as usize - 1).unwrap(),
            "raw text of line {line}"
        );
    }
    let dates: Vec<String> = db
        .prepare("SELECT ts FROM bars ORDER BY ts")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(dates, vec!["1999-01-04", "1999-01-05", "1999-01-20"]);
}

#[test]
fn a_corrected_row_updates_its_bar_and_leaves_the_others_alone() {
    let inbox = tempfile::tempdir().unwrap();
    let good = "Date,Open,High,Low,Close,Adj Close,Volume\n1/4/1999,10,12,9,11,11,1000\n1/5/1999,11,13,10,12,12,1000\n1/6/1999,12,14,11,13,13,1000\n";
    std::fs::write(inbox.path().join("ABC.csv"), good).unwrap();
    let sandbox = Sandbox::new(&ingestion(&inbox.path().display().to_string(), ""));
    assert_eq!(run_ingestion(&sandbox)["inserted"], 3);
    std::fs::write(
        inbox.path().join("ABC.csv"),
        good.replace(
            "1/5/1999,11,13,10,12,12,1000",
            "1/5/1999,11,13.5,10,12.5,12.5,1100",
        ),
    )
    .unwrap();
    let result = run_ingestion(&sandbox);
    assert_eq!(
        (
            result["updated"].as_u64(),
            result["unchanged"].as_u64(),
            result["inserted"].as_u64()
        ),
        (Some(1), Some(2), Some(0)),
        "{result}"
    );
    let close: f64 = market(&sandbox)
        .query_row("SELECT close FROM bars WHERE ts = '1999-01-05'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(close, 12.5);
}

#[test]
fn other_layouts_load_through_a_column_map_a_symbol_column_and_a_date_format() {
    let inbox = tempfile::tempdir().unwrap();
    std::fs::write(
        inbox.path().join("minutes.csv"),
        "ticker,time,o,h,l,c,vol\nAAA,2024-03-01 09:30:00,10,11,9,10.5,100\nBBB,2024-03-01 09:30:00,20,21,19,20.5,200\nAAA,2024-03-01 09:31:00,10.5,11,10,10.8,150\n",
    )
    .unwrap();
    std::fs::write(
        inbox.path().join("pandas.csv"),
        ",Open,High,Low,Close,Volume\n01.02.2024,5,6,4,5.5,10\n02.02.2024,5.5,6,5,5.8,12\n",
    )
    .unwrap();
    let minutes = Sandbox::new(&ingestion(
        &inbox.path().display().to_string(),
        ", symbol_column = \"ticker\", columns = { date = \"time\", open = \"o\", high = \"h\", low = \"l\", close = \"c\", volume = \"vol\" }",
    ));
    std::fs::rename(
        inbox.path().join("pandas.csv"),
        inbox.path().join("pandas.csv.later"),
    )
    .unwrap();
    let result = run_ingestion(&minutes);
    assert_eq!(
        (result["inserted"].as_u64(), result["rejected"].as_u64()),
        (Some(3), Some(0)),
        "{result}"
    );
    let db = market(&minutes);
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM bars WHERE symbol = 'AAA' AND ts = '2024-03-01T09:31:00'"
        ),
        1
    );
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM bars WHERE symbol = 'BBB'"),
        1
    );

    let other = tempfile::tempdir().unwrap();
    std::fs::rename(
        inbox.path().join("pandas.csv.later"),
        other.path().join("XYZ.csv"),
    )
    .unwrap();
    let pandas = Sandbox::new(&ingestion(
        &other.path().display().to_string(),
        ", date_format = \"%d.%m.%Y\"",
    ));
    let result = run_ingestion(&pandas);
    assert_eq!(
        (result["inserted"].as_u64(), result["rejected"].as_u64()),
        (Some(2), Some(0)),
        "{result}"
    );
    assert_eq!(count(&market(&pandas), "SELECT COUNT(*) FROM bars WHERE symbol = 'XYZ' AND ts = '2024-02-02' AND adj_close IS NULL"), 1);
}

#[test]
fn a_run_killed_mid_way_is_retried_from_its_checkpoint_without_a_duplicate_row() {
    let inbox = tempfile::tempdir().unwrap();
    let files = 8;
    let rows_per_file = 40_000;
    let start = chrono::NaiveDate::from_ymd_opt(1900, 1, 1).unwrap();
    for file in 0..files {
        let mut text = String::from("Date,Open,High,Low,Close,Adj Close,Volume\n");
        for day in 0..rows_per_file {
            let date = start + chrono::Duration::days(day);
            let base = 100.0 + (day % 50) as f64;
            text.push_str(&format!(
                "{},{base},{},{},{},{},{}\n",
                date.format("%Y-%m-%d"),
                base + 2.0,
                base - 1.0,
                base + 1.0,
                base + 1.0,
                1000 + day
            ));
        }
        std::fs::write(inbox.path().join(format!("S{file:02}.csv")), text).unwrap();
    }
    let sandbox = Sandbox::new(&ingestion(&inbox.path().display().to_string(), ""));
    let service = sandbox.serve();
    let run = run_id(&sandbox.cli_json(&["run", "ingestion", "--json"]).1);
    // Kill the worker once it has finished at least one file and before it has finished all.
    let pid = wait_until("a file checkpointed", Duration::from_secs(60), || {
        let row = sandbox.run(run);
        let done = row
            .checkpoint
            .as_deref()
            .and_then(|c| serde_json::from_str::<Value>(c).ok())?;
        let count = done["files_done"].as_array()?.len();
        (count >= 1 && count < files).then_some(row.pid?)
    });
    signal(pid as u32, nix::sys::signal::Signal::SIGKILL);
    let finished = sandbox.wait_for_state(run, RunState::Succeeded, Duration::from_secs(120));
    drop(service);
    assert_eq!(finished.attempt.0, 2, "retried after the kill");
    let attempts = sandbox.store().attempts(run).unwrap();
    assert!(
        attempts[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("killed by signal 9"),
        "{:?}",
        attempts[0].error
    );
    let result: Value = serde_json::from_str(finished.result.as_deref().unwrap()).unwrap();
    let resumed = result["files_resumed_from_checkpoint"].as_u64().unwrap();
    assert!(
        resumed >= 1,
        "the retry skipped the files done before the kill: {result}"
    );
    assert_eq!(
        resumed
            + result["files_ingested"].as_u64().unwrap()
            + result["files_already_ingested"].as_u64().unwrap(),
        files as u64
    );
    let db = market(&sandbox);
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM bars"),
        (files as i64 * rows_per_file),
        "every row once: no duplicate, none lost"
    );
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM ingested_files"),
        files as i64
    );
}
