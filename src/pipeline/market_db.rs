//! The market database: a SQLite file of its own (`market_db` param, default
//! `data/market.db`), its schema versioned by `PRAGMA user_version` and brought up to date
//! by [`open`] with the migrations below, in order, each in one transaction.

use std::path::Path;

use rusqlite::Connection;

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
