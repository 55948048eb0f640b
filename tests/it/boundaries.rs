//! Each module states what it must not know; this scans `use` lines (and, for paths into
//! the crate, every line of code) and fails on a forbidden import, so a boundary cannot
//! decay quietly. The modules also import each other without a circle, the built-ins are
//! listed once and the JSON the service prints is built in one module. See ARCHITECTURE.md.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// (files under src/, forbidden path prefixes in their `use` lines, why)
const RULES: &[(&str, &[&str], &str)] = &[
    (
        "engine",
        &["serde", "serde_json", "rusqlite", "actix"],
        "the engine sees typed reports and the store's interface: no JSON, no SQL, no HTTP",
    ),
    (
        "handlers",
        &[
            "crate::engine",
            "crate::store",
            "crate::runner",
            "crate::config",
            "crate::worker",
            "crate::builtins",
            "crate::pipeline",
            "crate::maintenance",
            "rusqlite",
            "tokio",
        ],
        "handlers see only TaskContext, and know none of the code that uses it",
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
        "spawn",
        &["crate::"],
        "starting and reaping a child knows nothing of runs, tasks or the store",
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
            "crate::worker",
            "crate::builtins",
            "tokio",
        ],
        "the market tasks see only their TaskContext, not the worker that runs them",
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
        "views.rs",
        &[
            "crate::api",
            "crate::runner",
            "actix",
            "rusqlite",
            "tokio",
            "std::fs",
        ],
        "the JSON shapes are built from values: no HTTP, no I/O, no processes",
    ),
    (
        "tasklog.rs",
        &["crate::store", "crate::engine", "crate::runner"],
        "log files know nothing of runs beyond their ids",
    ),
    (
        "outputs.rs",
        &[
            "crate::engine",
            "crate::store",
            "crate::runner",
            "crate::config",
            "crate::builtins",
            "crate::pipeline",
            "crate::api",
            "tokio",
        ],
        "what a run produced is read from its result JSON and params, never by handler name",
    ),
    (
        "times.rs",
        &[
            "crate::engine",
            "crate::store",
            "crate::config",
            "crate::api",
            "crate::views",
        ],
        "the one convention for printed times formats values and reads nothing",
    ),
];

/// (file under src/, forbidden prefixes of its module it may name anyway, why): narrow
/// exceptions to [`RULES`], one file each. The rest of its module's rule still holds.
const EXCEPTIONS: &[(&str, &[&str], &str)] = &[
    (
        "store/postgres.rs",
        &["tokio"],
        "the PostgreSQL client is async: the backend owns a small tokio runtime and blocks on \
         it (tokio, tokio_postgres; deadpool_postgres is not forbidden), behind the store's \
         synchronous interface; engine, runner, config and serde_json stay out",
    ),
    (
        "store/migrate.rs",
        &["tokio"],
        "the copy to PostgreSQL streams a binary COPY with tokio_postgres, on the PostgreSQL \
         backend's own runtime; engine, runner, config and serde_json stay out",
    ),
];

/// The prefixes `file` may name although its module's rule forbids them.
fn excepted(src: &Path, file: &Path) -> &'static [&'static str] {
    EXCEPTIONS
        .iter()
        .find(|(path, _, _)| file == src.join(path))
        .map_or(&[], |(_, allowed, _)| allowed)
}

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

/// The code of a line: `None` for a comment line, else the line without a trailing
/// comment.
fn code(line: &str) -> Option<&str> {
    let line = line.trim();
    if line.starts_with("//") {
        return None;
    }
    Some(line.split(" //").next().unwrap_or(line))
}

/// Whether `line` names the external crate or module `prefix` as a path (`serde::`,
/// `serde_json::json!`), not as part of a longer name (`my_serde::`).
fn written_inline(line: &str, prefix: &str) -> bool {
    if prefix.starts_with("crate::") || prefix.contains("::") {
        return false;
    }
    let needle = format!("{prefix}::");
    line.match_indices(&needle).any(|(at, _)| {
        line[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
    })
}

/// An exception names a file that exists and only prefixes its module's rule forbids.
#[test]
fn every_boundary_exception_is_one_existing_file_and_narrower_than_its_rule() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for (path, allowed, _) in EXCEPTIONS {
        assert!(
            src.join(path).is_file(),
            "exception for missing file {path}"
        );
        let (_, forbidden, _) = RULES
            .iter()
            .find(|(module, _, _)| path.starts_with(module))
            .unwrap_or_else(|| panic!("exception {path} is under no rule"));
        for prefix in *allowed {
            assert!(
                forbidden.contains(prefix),
                "{path}: {prefix} is not forbidden anyway"
            );
        }
    }
}

#[test]
fn no_module_imports_what_its_boundary_forbids() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut violations = Vec::new();
    for (module, forbidden, why) in RULES {
        let files = rust_files(&src.join(module));
        assert!(!files.is_empty(), "rule for {module} matches no file");
        for file in files {
            let allowed = excepted(&src, &file);
            let text = std::fs::read_to_string(&file).unwrap();
            for (number, line) in text.lines().enumerate() {
                let Some(line) = code(line) else { continue };
                let path = line
                    .strip_prefix("use ")
                    .or_else(|| line.strip_prefix("pub use "));
                // A path counts wherever it is written: `crate::worker::Reporter` in a
                // signature, or `serde_json::json!` in an expression, imports as much as a
                // `use`. `use super::*` inside a tests module of store may see the whole
                // module, but never reaches beyond it.
                let named = |prefix: &&&str| {
                    !allowed.contains(*prefix)
                        && (path.is_some_and(|path| path.starts_with(**prefix))
                            || (prefix.starts_with("crate::") && line.contains(**prefix))
                            || written_inline(line, prefix))
                };
                if let Some(bad) = forbidden.iter().find(named) {
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

/// The module of the crate a file under `src/` belongs to: its first path component.
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative.components().next().unwrap().as_os_str();
    first.to_string_lossy().trim_end_matches(".rs").to_string()
}

/// Who imports whom among the crate's modules, from every `crate::<module>` written in
/// code (comments aside).
fn module_imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut imports: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in rust_files(&src) {
        let module = module_of(&src, &file);
        let text = std::fs::read_to_string(&file).unwrap();
        for (number, line) in text.lines().enumerate() {
            let Some(line) = code(line) else { continue };
            assert!(
                !line.contains("crate::{"),
                "{}:{}: write one `use` per module, so this test can read it",
                file.display(),
                number + 1
            );
            for rest in line.split("crate::").skip(1) {
                let target: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !target.is_empty() && target != module {
                    imports.entry(module.clone()).or_default().insert(target);
                }
            }
        }
        imports.entry(module).or_default();
    }
    imports
}

/// A circle of imports, if any, as `a → b → … → a`.
fn find_circle(imports: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        module: &str,
        imports: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|m| m == module) {
            let mut circle = path[start..].to_vec();
            circle.push(module.to_string());
            return Some(circle);
        }
        if done.contains(module) {
            return None;
        }
        path.push(module.to_string());
        for next in imports.get(module).into_iter().flatten() {
            if let Some(circle) = visit(next, imports, path, done) {
                return Some(circle);
            }
        }
        path.pop();
        done.insert(module.to_string());
        None
    }
    let mut done = BTreeSet::new();
    imports
        .keys()
        .find_map(|module| visit(module, imports, &mut Vec::new(), &mut done))
}

/// Issue "One room per job": `handlers` → `worker` → `pipeline` → `handlers` was a
/// circle; the vocabulary of handlers now sits below everything that uses it.
#[test]
fn modules_import_each_other_without_a_circle() {
    let imports = module_imports();
    assert!(
        imports["worker"].contains("builtins") && imports["pipeline"].contains("handlers"),
        "the scan reads no imports: {imports:?}"
    );
    if let Some(circle) = find_circle(&imports) {
        panic!("import circle: {}", circle.join(" → "));
    }
}

#[test]
fn a_circle_of_imports_is_found() {
    let imports: BTreeMap<String, BTreeSet<String>> = [
        ("handlers", &["worker"][..]),
        ("worker", &["pipeline"]),
        ("pipeline", &["handlers"]),
        ("config", &[]),
    ]
    .into_iter()
    .map(|(module, targets)| {
        let targets = targets.iter().map(|t| t.to_string()).collect();
        (module.to_string(), targets)
    })
    .collect();
    assert_eq!(
        find_circle(&imports).map(|circle| circle.join(" → ")),
        Some("handlers → worker → pipeline → handlers".to_string())
    );
}

/// Issue "One room per job": the names of the built-in handlers were written four times
/// (config twice, handlers, worker). A list of them or a dispatch on them outside
/// `builtins.rs` is a second list, bound to drift.
#[test]
fn built_in_handlers_are_listed_in_builtins_only() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let names: Vec<&str> = turbosched::builtins::BUILTINS
        .iter()
        .map(|builtin| builtin.name)
        .collect();
    assert!(names.contains(&"ping"), "{names:?}");
    let mut lists = Vec::new();
    for file in rust_files(&src) {
        if file.ends_with("builtins.rs") || file.ends_with("tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        // Tests may name handlers as often as they like.
        let text = text.split("#[cfg(test)]").next().unwrap_or(&text);
        for (number, line) in text.lines().enumerate() {
            let Some(line) = code(line) else { continue };
            let line = line.trim_start_matches('(');
            // A row of a list (`"ping",`, `("ping", &[…])`) or an arm of a match on the
            // name (`"ping" => …`).
            let row = names.iter().find(|name| {
                let quoted = format!("\"{name}\"");
                line.strip_prefix(&quoted).is_some_and(|rest| {
                    rest.starts_with(',') || rest.trim_start().starts_with("=>")
                })
            });
            if let Some(name) = row {
                lists.push(format!("{}:{}: {name}", file.display(), number + 1));
            }
        }
    }
    assert!(
        lists.is_empty(),
        "built-in handlers listed outside src/builtins.rs:\n{}",
        lists.join("\n")
    );
}

/// The edges that print JSON (the HTTP API and the command line) and the one file among
/// them that may build some: the API's error envelope.
const JSON_EDGES: &[&str] = &["api", "cli.rs", "main.rs", "bench.rs"];
const JSON_ENVELOPE: &str = "api/errors.rs";

/// Issue "One room per job", item 4: one JSON edge. `show --json` built a run of its own
/// that lacked what the API's had; now every shape the API and the command line print is
/// built in `src/views.rs`, and the edges only pass it on.
#[test]
fn json_is_built_in_views_only() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut built = Vec::new();
    for edge in JSON_EDGES {
        let files = rust_files(&src.join(edge));
        assert!(!files.is_empty(), "{edge} matches no file");
        for file in files {
            if file.ends_with(JSON_ENVELOPE) {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            for (number, line) in text.lines().enumerate() {
                let Some(line) = code(line) else { continue };
                if line.contains("json!") || line.contains("Serialize") {
                    built.push(format!("{}:{}: {line}", file.display(), number + 1));
                }
            }
        }
    }
    assert!(
        built.is_empty(),
        "JSON built outside src/views.rs (add a function there):\n{}",
        built.join("\n")
    );
}

/// A run has one shape: the keys only a run's JSON carries are written in `src/views.rs`
/// and nowhere else in `src/`.
#[test]
fn the_run_shape_is_written_once() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let keys = [
        "\"scheduled_for\"",
        "\"attempts_history\"",
        "\"next_attempt_at\"",
    ];
    let views = std::fs::read_to_string(src.join("views.rs")).unwrap();
    for key in keys {
        assert_eq!(views.matches(key).count(), 1, "{key} once in views.rs");
    }
    let mut copies = Vec::new();
    for file in rust_files(&src) {
        if file.ends_with("views.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for (number, line) in text.lines().enumerate() {
            let Some(line) = code(line) else { continue };
            if let Some(key) = keys.iter().find(|key| line.contains(**key)) {
                copies.push(format!("{}:{}: {key}", file.display(), number + 1));
            }
        }
    }
    assert!(
        copies.is_empty(),
        "a run's keys written outside src/views.rs:\n{}",
        copies.join("\n")
    );
}
