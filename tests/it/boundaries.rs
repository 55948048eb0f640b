//! Each module states what it must not know; this scans `use` lines and fails on a
//! forbidden import, so a boundary cannot decay quietly. See ARCHITECTURE.md.

use std::path::{Path, PathBuf};

/// (files under src/, forbidden path prefixes in their `use` lines, why)
const RULES: &[(&str, &[&str], &str)] = &[
    (
        "handlers",
        &[
            "crate::engine",
            "crate::store",
            "crate::runner",
            "crate::config",
            "rusqlite",
            "tokio",
        ],
        "handlers see only TaskContext",
    ),
    (
        "schedule.rs",
        &["crate::store", "crate::engine", "crate::runner", "rusqlite"],
        "cron knows nothing of the store",
    ),
    (
        "store",
        &[
            "crate::engine",
            "crate::runner",
            "crate::config",
            "serde_json",
            "actix",
            "tokio",
        ],
        "the store knows nothing of HTTP, JSON bodies or processes",
    ),
    (
        "runner.rs",
        &["crate::store", "crate::engine", "rusqlite"],
        "the runner reports outcomes; the engine writes state",
    ),
    (
        "config",
        &["crate::store", "crate::engine", "crate::runner", "rusqlite"],
        "config is parsed and checked, never acted on",
    ),
    (
        "model.rs",
        &["crate::", "serde"],
        "the shared vocabulary depends on nothing and serializes nothing",
    ),
    (
        "maintenance.rs",
        &["crate::engine", "crate::runner", "rusqlite"],
        "housekeeping uses the store's prune and backup, never SQL or the engine",
    ),
    (
        "pipeline",
        &[
            "crate::engine",
            "crate::store",
            "crate::runner",
            "crate::config",
            "crate::api",
            "tokio",
        ],
        "the market tasks see only their TaskContext",
    ),
    (
        "api",
        &["rusqlite", "crate::runner"],
        "the HTTP layer is a skin: no database crate, no processes",
    ),
    (
        "audit.rs",
        &[
            "crate::engine",
            "crate::runner",
            "crate::api",
            "rusqlite",
            "tokio",
        ],
        "the tick accounting reads the store and the config, and acts on nothing",
    ),
    (
        "tasklog.rs",
        &["crate::store", "crate::engine", "crate::runner"],
        "log files know nothing of runs beyond their ids",
    ),
];

fn rust_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())) {
        let entry = entry.unwrap().path();
        if entry.is_dir() {
            files.extend(rust_files(&entry));
        } else if entry.extension().is_some_and(|e| e == "rs") {
            files.push(entry);
        }
    }
    files
}

#[test]
fn no_module_imports_what_its_boundary_forbids() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut violations = Vec::new();
    for (module, forbidden, why) in RULES {
        let files = rust_files(&src.join(module));
        assert!(!files.is_empty(), "rule for {module} matches no file");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for (number, line) in text.lines().enumerate() {
                let line = line.trim();
                let Some(path) = line
                    .strip_prefix("use ")
                    .or_else(|| line.strip_prefix("pub use "))
                else {
                    continue;
                };
                // `use super::*` inside a tests module of store may see the whole module,
                // but never reaches beyond it.
                if let Some(bad) = forbidden.iter().find(|prefix| path.starts_with(*prefix)) {
                    violations.push(format!(
                        "{}:{}: imports {bad}: {why}",
                        file.display(),
                        number + 1
                    ));
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "boundary violations:\n{}",
        violations.join("\n")
    );
}
