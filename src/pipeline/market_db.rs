//! The market database: a SQLite file of its own (`market_db` param, default
//! `data/market.db`), its schema versioned by `PRAGMA user_version` and brought up to date
//! by [`open`] with the migrations below, in order, each in one transaction.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::Connection;

use super::features::Bar;

/// Schema migrations; entry `n` takes the database from version `n` to `n + 1`. Never
/// edit one that has shipped: add the next.
const MIGRATIONS: &[&str] = &[
    // 1: bars, ingested files, rejects.
    "CREATE TABLE bars (
        symbol    TEXT NOT NULL,
        ts        TEXT NOT NULL,          -- YYYY-MM-DD, or YYYY-MM-DDTHH:MM:SS for intraday bars
        open      REAL NOT NULL,
        high      REAL NOT NULL,
        low       REAL NOT NULL,
        close     REAL NOT NULL,
        adj_close REAL,
        volume    REAL NOT NULL,
        source    TEXT NOT NULL,          -- the file it came from
        PRIMARY KEY (symbol, ts)
    ) WITHOUT ROWID;
    CREATE TABLE ingested_files (
        name        TEXT NOT NULL,
        size        INTEGER NOT NULL,
        sha256      TEXT NOT NULL,
        rows_read   INTEGER NOT NULL,
        inserted    INTEGER NOT NULL,
        updated     INTEGER NOT NULL,
        unchanged   INTEGER NOT NULL,
        rejected    INTEGER NOT NULL,
        ingested_at TEXT NOT NULL,
        run_id      INTEGER,
        PRIMARY KEY (name, sha256)
    );
    CREATE TABLE rejects (
        id          INTEGER PRIMARY KEY,
        file        TEXT NOT NULL,
        line        INTEGER NOT NULL,
        raw         TEXT NOT NULL,
        reason      TEXT NOT NULL,
        run_id      INTEGER,
        rejected_at TEXT NOT NULL
    );
    CREATE INDEX rejects_file ON rejects(file, line);",
    // 2: features, the model registry, SHAP logs, training baselines, predictions.
    "CREATE TABLE features (
        symbol  TEXT NOT NULL,
        ts      TEXT NOT NULL,
        horizon INTEGER NOT NULL,
        vals    TEXT NOT NULL,            -- JSON array, in the order of `features`' names
        label   INTEGER,                  -- 1 up, 0 not, NULL while the horizon is ahead
        run_id  INTEGER,
        PRIMARY KEY (symbol, ts, horizon)
    ) WITHOUT ROWID;
    CREATE TABLE models (
        id          INTEGER PRIMARY KEY,
        run_id      INTEGER,
        kind        TEXT NOT NULL,        -- gbdt | logistic
        created_at  TEXT NOT NULL,
        artifact    TEXT NOT NULL,        -- file path
        sha256      TEXT NOT NULL,        -- of the artifact's bytes
        features    TEXT NOT NULL,        -- JSON array of names, in column order
        horizon     INTEGER NOT NULL,
        train_from  TEXT NOT NULL,
        train_to    TEXT NOT NULL,
        valid_from  TEXT NOT NULL,
        valid_to    TEXT NOT NULL,
        params      TEXT NOT NULL,        -- JSON
        metrics     TEXT NOT NULL,        -- JSON: auc, accuracy, log_loss, brier, rows
        is_current  INTEGER NOT NULL DEFAULT 0
    );
    CREATE UNIQUE INDEX models_one_current ON models(is_current) WHERE is_current = 1;
    CREATE TABLE shap_logs (
        id             INTEGER PRIMARY KEY,
        model_id       INTEGER NOT NULL REFERENCES models(id),
        run_id         INTEGER,
        created_at     TEXT NOT NULL,
        rows_explained INTEGER NOT NULL,
        expected_value REAL NOT NULL,
        top_features   TEXT NOT NULL,     -- JSON array of the 10 names with the largest mean |SHAP|
        importances    TEXT NOT NULL,     -- JSON array of {feature, mean_abs_shap}, the top 20
        path           TEXT NOT NULL
    );
    CREATE TABLE baselines (
        run_id  INTEGER NOT NULL,         -- the training run; models(run_id) points here
        feature TEXT NOT NULL,
        n       INTEGER NOT NULL,
        mean    REAL NOT NULL,
        std     REAL NOT NULL,
        sample  BLOB NOT NULL,            -- every training value, little-endian f64, sorted
        PRIMARY KEY (run_id, feature)
    );
    CREATE TABLE predictions (
        id         INTEGER PRIMARY KEY,
        run_id     INTEGER,
        model_id   INTEGER NOT NULL REFERENCES models(id),
        symbol     TEXT NOT NULL,
        ts         TEXT NOT NULL,         -- the bar the prediction is made on
        prob_up    REAL NOT NULL,
        signal     TEXT NOT NULL,         -- long | flat
        threshold  REAL NOT NULL,
        created_at TEXT NOT NULL,
        UNIQUE (model_id, symbol, ts)
    );
    CREATE TABLE backtests (
        id         INTEGER PRIMARY KEY,
        run_id     INTEGER,
        created_at TEXT NOT NULL,
        plan       TEXT NOT NULL,         -- JSON: window, train/step days, model, threshold, costs
        date_from  TEXT,
        date_to    TEXT,
        metrics    TEXT NOT NULL,         -- JSON: portfolio and per symbol, strategy and benchmark
        report     TEXT NOT NULL          -- the report folder
    );
    CREATE TABLE drift_log (
        id               INTEGER PRIMARY KEY,
        run_id           INTEGER,
        model_id         INTEGER NOT NULL,
        created_at       TEXT NOT NULL,
        window_from      TEXT NOT NULL,
        window_to        TEXT NOT NULL,
        features         TEXT NOT NULL,   -- JSON: per feature PSI, KL, KS D and p, level, drifted
        drifted_share    REAL NOT NULL,
        retrain_required INTEGER NOT NULL,
        verdict          TEXT NOT NULL,
        report           TEXT NOT NULL
    );",
    // 3: what each model learned from, and the comparison that decided its promotion.
    "ALTER TABLE models ADD COLUMN data TEXT;        -- JSON: per symbol {last_bar, rows}
    ALTER TABLE models ADD COLUMN data_fingerprint TEXT; -- sha256 of `data`
    ALTER TABLE models ADD COLUMN comparison TEXT;  -- JSON: the promotion decision
    CREATE INDEX models_data_fingerprint ON models(data_fingerprint);",
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// Opens (creating, with its folder) the market database and migrates it.
pub fn open(path: &Path) -> Result<Connection, String> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|err| format!("cannot create {}: {err}", parent.display()))?;
    }
    let mut connection = Connection::open(path)
        .map_err(|err| format!("cannot open market database {}: {err}", path.display()))?;
    let fail = |err: rusqlite::Error| format!("market database {}: {err}", path.display());
    connection
        .busy_timeout(std::time::Duration::from_secs(30))
        .map_err(fail)?;
    connection
        .execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
        .map_err(fail)?;
    let version: usize = connection
        .query_row("PRAGMA user_version", [], |row| row.get::<_, i64>(0))
        .map_err(fail)? as usize;
    if version > SCHEMA_VERSION {
        return Err(format!(
            "market database {} has schema version {version}, newer than this turbosched ({SCHEMA_VERSION})",
            path.display()
        ));
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = connection.transaction().map_err(fail)?;
        tx.execute_batch(migration).map_err(fail)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", index + 1))
            .map_err(fail)?;
        tx.commit().map_err(fail)?;
    }
    Ok(connection)
}

/// Every symbol's bars, oldest first, in one query.
pub fn all_bars(connection: &Connection) -> rusqlite::Result<BTreeMap<String, Vec<Bar>>> {
    let mut statement = connection.prepare_cached(
        "SELECT symbol, ts, open, high, low, close, volume FROM bars ORDER BY symbol, ts",
    )?;
    let mut rows = statement.query([])?;
    let mut out: BTreeMap<String, Vec<Bar>> = BTreeMap::new();
    while let Some(row) = rows.next()? {
        let bar = Bar {
            ts: row.get(1)?,
            open: row.get(2)?,
            high: row.get(3)?,
            low: row.get(4)?,
            close: row.get(5)?,
            volume: row.get(6)?,
        };
        let symbol: String = row.get(0)?;
        match out.get_mut(&symbol) {
            Some(series) => series.push(bar),
            None => {
                out.insert(symbol, vec![bar]);
            }
        }
    }
    Ok(out)
}

/// What a training learns from, per symbol: its last bar's date and its number of bars.
/// A new bar changes it; a file ingested again (or a bar revised in place) does not.
pub type DataSummary = BTreeMap<String, SymbolData>;

/// One symbol's part of a [`DataSummary`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SymbolData {
    /// The date of its latest bar.
    pub last_bar: String,
    /// How many bars it has.
    pub rows: i64,
}

/// The bars in the database, summarised per symbol (one grouped query).
pub fn data_summary(connection: &Connection) -> rusqlite::Result<DataSummary> {
    let mut statement =
        connection.prepare_cached("SELECT symbol, MAX(ts), COUNT(*) FROM bars GROUP BY symbol")?;
    let rows = statement.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            SymbolData {
                last_bar: row.get(1)?,
                rows: row.get(2)?,
            },
        ))
    })?;
    rows.collect()
}

/// The sha256 (hex) of a summary's JSON: symbols in order, so equal data, equal text.
pub fn fingerprint(summary: &DataSummary) -> String {
    use sha2::Digest;
    let text = serde_json::to_string(summary).unwrap_or_default();
    super::hex(&sha2::Sha256::digest(text.as_bytes()))
}

/// The latest model trained on data with this fingerprint: `(id, is_current)`.
pub fn model_trained_on(
    connection: &Connection,
    fingerprint: &str,
) -> rusqlite::Result<Option<(i64, bool)>> {
    use rusqlite::OptionalExtension;
    connection
        .query_row(
            "SELECT id, is_current FROM models WHERE data_fingerprint = ?1
             ORDER BY is_current DESC, id DESC LIMIT 1",
            [fingerprint],
            |row| Ok((row.get(0)?, row.get::<_, i64>(1)? == 1)),
        )
        .optional()
}

/// f64 values as little-endian bytes (a baseline sample).
pub fn to_blob(values: &[f64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The inverse of [`to_blob`].
pub fn from_blob(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_database_is_migrated_to_the_current_version_and_reopening_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/market.db");
        let connection = open(&path).unwrap();
        let version: i64 = connection
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version as usize, SCHEMA_VERSION);
        connection.execute("INSERT INTO rejects(file, line, raw, reason, rejected_at) VALUES ('f', 1, 'x', 'y', 'now')", []).unwrap();
        drop(connection);
        let again = open(&path).unwrap();
        let rows: i64 = again
            .query_row("SELECT COUNT(*) FROM rejects", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 1);
    }

    fn bar(connection: &Connection, symbol: &str, ts: &str, close: f64) {
        connection
            .execute(
                "INSERT INTO bars(symbol, ts, open, high, low, close, volume, source)
                 VALUES (?1, ?2, 1, 1, 1, ?3, 1, 'f')
                 ON CONFLICT(symbol, ts) DO UPDATE SET close = excluded.close",
                rusqlite::params![symbol, ts, close],
            )
            .unwrap();
    }

    #[test]
    fn the_data_fingerprint_changes_with_a_new_bar_and_not_with_a_bar_ingested_again() {
        let dir = tempfile::tempdir().unwrap();
        let connection = open(&dir.path().join("market.db")).unwrap();
        bar(&connection, "SPX", "2018-12-28", 1.0);
        bar(&connection, "SPX", "2018-12-31", 2.0);
        bar(&connection, "IXIC", "2018-12-31", 3.0);
        let summary = data_summary(&connection).unwrap();
        assert_eq!(
            summary["SPX"],
            SymbolData {
                last_bar: "2018-12-31".into(),
                rows: 2
            }
        );
        let before = fingerprint(&summary);
        bar(&connection, "SPX", "2018-12-31", 2.5);
        assert_eq!(fingerprint(&data_summary(&connection).unwrap()), before);
        bar(&connection, "IXIC", "2019-01-02", 4.0);
        assert_ne!(fingerprint(&data_summary(&connection).unwrap()), before);
    }

    #[test]
    fn the_registry_finds_the_model_trained_on_a_fingerprint_current_first() {
        let dir = tempfile::tempdir().unwrap();
        let connection = open(&dir.path().join("market.db")).unwrap();
        for (fingerprint, current) in [("a", 1), ("a", 0), ("b", 0)] {
            connection
                .execute(
                    "INSERT INTO models(kind, created_at, artifact, sha256, features, horizon,
                        train_from, train_to, valid_from, valid_to, params, metrics,
                        is_current, data_fingerprint)
                     VALUES ('gbdt', 'now', 'x', 'y', '[]', 1, 'a', 'b', 'c', 'd', '{}', '{}', ?1, ?2)",
                    rusqlite::params![current, fingerprint],
                )
                .unwrap();
        }
        assert_eq!(model_trained_on(&connection, "a").unwrap(), Some((1, true)));
        assert_eq!(
            model_trained_on(&connection, "b").unwrap(),
            Some((3, false))
        );
        assert_eq!(model_trained_on(&connection, "c").unwrap(), None);
    }

    #[test]
    fn a_database_from_a_newer_build_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("market.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA user_version = 999")
            .unwrap();
        let err = open(&path).unwrap_err();
        assert!(
            err.contains("schema version 999, newer than this turbosched"),
            "{err}"
        );
    }
}
