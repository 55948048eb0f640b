//! What a run produced: the files and folders a finished run's result JSON names (report
//! folders, charts, metrics JSON, SHAP logs, model files, a market database), and the
//! output folders its task's params configure — the only folders whose files may be
//! served.
//!
//! One reading of results for every edge: `turbosched run` lists a cascade's outputs when
//! it ends, `views::run_detail` carries them (`outputs`) for the API and the dashboard.
//! The reading goes by the keys a result uses, never by handler name (the built-ins are
//! listed in `builtins.rs` only): a task of any handler whose result says `report_dir` or
//! `chart` gets its outputs listed. Paths are as the handler wrote them, relative to the
//! service's working folder unless absolute.
//!
//! Invariant: reads JSON values only, but for [`within`], which resolves paths on disk to
//! refuse anything outside the configured folders (`..`, symbolic links).

use std::path::{Path, PathBuf};

use serde_json::Value;

/// What kind of thing an output is, for a label, an icon or a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// A folder holding a run's report (charts, metrics, CSV).
    Folder,
    /// A chart (SVG).
    Chart,
    /// A JSON file of metrics or a report.
    Metrics,
    /// A SHAP log (JSON).
    Shap,
    /// A model artifact.
    Model,
    /// A database the run wrote.
    Database,
}

impl OutputKind {
    /// The word used in JSON (`"folder"`, `"chart"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            OutputKind::Folder => "folder",
            OutputKind::Chart => "chart",
            OutputKind::Metrics => "metrics",
            OutputKind::Shap => "shap",
            OutputKind::Model => "model",
            OutputKind::Database => "database",
        }
    }
}

/// One thing a run produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// For people: "report folder", "chart", "SHAP log", …
    pub label: &'static str,
    /// Its kind.
    pub kind: OutputKind,
    /// Where it is, as the run's result names it.
    pub path: PathBuf,
}

/// The result keys that name an output: a JSON pointer (`*` for every element of an
/// array), its label and kind. The one list: a handler that writes a new kind of file
/// names it in its result under one of these keys, or adds a row here.
const RESULT_KEYS: &[(&str, &str, OutputKind)] = &[
    ("/report_dir", "report folder", OutputKind::Folder),
    ("/chart", "chart", OutputKind::Chart),
    ("/metrics_file", "metrics JSON", OutputKind::Metrics),
    ("/shap_log", "SHAP log", OutputKind::Shap),
    ("/models/*/artifact", "model file", OutputKind::Model),
    ("/market_db", "market database", OutputKind::Database),
];

/// The params keys that configure a folder a task writes its outputs into.
/// The params that name an output folder, whatever the handler.
pub const FOLDER_PARAMS: &[&str] = &["report_dir", "shap_dir", "model_dir"];

/// What a run produced, in the order of [`RESULT_KEYS`], from its result JSON (a run
/// without a result, or one that names nothing, produced nothing to list).
pub fn outputs_of(result: Option<&Value>) -> Vec<Output> {
    let Some(result) = result else {
        return Vec::new();
    };
    let mut outputs = Vec::new();
    for &(pointer, label, kind) in RESULT_KEYS {
        for value in select(result, pointer) {
            if let Some(path) = value.as_str().filter(|p| !p.trim().is_empty()) {
                outputs.push(Output {
                    label,
                    kind,
                    path: PathBuf::from(path),
                });
            }
        }
    }
    outputs
}

/// [`outputs_of`] a run's stored result text (not JSON: nothing).
pub fn outputs_of_text(result: Option<&str>) -> Vec<Output> {
    let value = result.and_then(|text| serde_json::from_str::<Value>(text).ok());
    outputs_of(value.as_ref())
}

/// One output folder a task configures: the param naming it, and the path as written
/// (relative to the service's working directory unless absolute).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFolder {
    /// `report_dir`, `shap_dir` or `model_dir`.
    pub param: &'static str,
    /// As written (possibly empty: see [`refusal`]).
    pub path: PathBuf,
}

/// The one reading of which params are output folders: for each of [`FOLDER_PARAMS`],
/// the folder a task's `params` name, else the default its handler writes into
/// (`defaults`: (param, folder), from `builtins::output_defaults`). What may be served of
/// its runs' outputs, and nothing else — once [`refusal`] has nothing against it.
pub fn output_folders(params: &Value, defaults: &[(&str, &str)]) -> Vec<OutputFolder> {
    FOLDER_PARAMS
        .iter()
        .filter_map(|key| {
            let written = params.get(*key).and_then(Value::as_str).or_else(|| {
                defaults
                    .iter()
                    .find(|(param, _)| param == key)
                    .map(|(_, folder)| *folder)
            })?;
            Some(OutputFolder {
                param: key,
                path: PathBuf::from(written),
            })
        })
        .collect()
}

/// Why `folder` must not be an output folder, if it must not: empty, `.`, `/` or any
/// folder holding the service's working directory `base` (its database, config and
/// logs), or one holding a `guarded` path ((what, path): the database, the state and log
/// folders). Read from the paths as written, relative ones taken from `base`.
pub fn refusal(folder: &Path, base: &Path, guarded: &[(&str, &Path)]) -> Option<String> {
    let absolute = |path: &Path| lexical(&base.join(path));
    let written = folder.display().to_string();
    let resolved = absolute(folder);
    if written.trim().is_empty() || absolute(base).starts_with(&resolved) {
        return Some(format!(
            "{written:?} would serve the service's working directory (its database, config and logs)"
        ));
    }
    guarded
        .iter()
        .find(|(_, path)| absolute(path).starts_with(&resolved))
        .map(|(what, path)| format!("{written:?} holds the {what} {}", path.display()))
}

/// `path` with `.` and `..` taken away by reading it, not the disk.
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// True when `path` is, once resolved on disk (symbolic links, `..`), inside one of
/// `folders` (resolved the same way). A path or folder that does not exist is not inside
/// anything: only existing files are served.
pub fn within(folders: &[PathBuf], path: &Path) -> bool {
    let Ok(path) = path.canonicalize() else {
        return false;
    };
    folders
        .iter()
        .filter_map(|folder| folder.canonicalize().ok())
        .any(|folder| path.starts_with(folder))
}

/// The values at `pointer`, a JSON pointer whose `*` segments stand for every element of
/// an array.
fn select<'a>(value: &'a Value, pointer: &str) -> Vec<&'a Value> {
    let mut current = vec![value];
    for segment in pointer.split('/').skip(1) {
        current = current
            .into_iter()
            .flat_map(|v| -> Vec<&Value> {
                match (segment, v) {
                    ("*", Value::Array(items)) => items.iter().collect(),
                    (key, Value::Object(map)) => map.get(key).into_iter().collect(),
                    _ => Vec::new(),
                }
            })
            .collect();
    }
    current
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_backtest_result_lists_its_folder_chart_and_metrics() {
        let result = json!({
            "report_dir": "reports/backtest/run_7",
            "chart": "reports/backtest/run_7/equity.svg",
            "metrics_file": "reports/backtest/run_7/metrics.json",
            "predictions": 120,
        });
        let outputs = outputs_of(Some(&result));
        let listed: Vec<(&str, &str)> = outputs
            .iter()
            .map(|o| (o.label, o.path.to_str().unwrap_or_default()))
            .collect();
        assert_eq!(
            listed,
            [
                ("report folder", "reports/backtest/run_7"),
                ("chart", "reports/backtest/run_7/equity.svg"),
                ("metrics JSON", "reports/backtest/run_7/metrics.json"),
            ]
        );
    }

    #[test]
    fn a_training_result_lists_its_shap_log_and_every_model_file() {
        let result = json!({
            "models": [
                {"id": 1, "kind": "gbdt", "artifact": "data/models/model_1.json"},
                {"id": 2, "kind": "logistic", "artifact": "data/models/model_2.json"},
            ],
            "shap_log": "shap_logs/shap_run_3.json",
        });
        let outputs = outputs_of(Some(&result));
        assert_eq!(
            outputs
                .iter()
                .map(|o| (o.kind, o.path.clone()))
                .collect::<Vec<_>>(),
            [
                (OutputKind::Shap, PathBuf::from("shap_logs/shap_run_3.json")),
                (OutputKind::Model, PathBuf::from("data/models/model_1.json")),
                (OutputKind::Model, PathBuf::from("data/models/model_2.json")),
            ]
        );
    }

    #[test]
    fn a_result_naming_nothing_or_no_result_lists_nothing() {
        assert!(outputs_of(None).is_empty());
        assert!(outputs_of(Some(&json!({"predictions": [], "report_dir": 3}))).is_empty());
        assert!(outputs_of_text(Some("not json")).is_empty());
        assert!(outputs_of(Some(&json!("hello"))).is_empty());
    }

    #[test]
    fn output_folders_are_the_configured_report_shap_and_model_folders() {
        let params = json!({
            "market_db": "data/market.db", "model_dir": "data/models",
            "shap_dir": "shap_logs", "horizon": 1,
        });
        let paths = |folders: Vec<OutputFolder>| {
            folders
                .into_iter()
                .map(|f| (f.param, f.path))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            paths(output_folders(&params, &[("shap_dir", "default_shap")])),
            [
                ("shap_dir", PathBuf::from("shap_logs")),
                ("model_dir", PathBuf::from("data/models"))
            ]
        );
        assert_eq!(
            paths(output_folders(
                &json!({"report_dir": ""}),
                &[("shap_dir", "default_shap"), ("report_dir", "reports")]
            )),
            [
                ("report_dir", PathBuf::from("")),
                ("shap_dir", PathBuf::from("default_shap"))
            ],
            "kept as written, for refusal to judge; a default where the params say nothing"
        );
        assert!(output_folders(&Value::Null, &[]).is_empty());
    }

    #[test]
    fn within_refuses_paths_that_leave_the_folders_by_dotdot_or_link() {
        let dir = std::env::temp_dir().join(format!("ts_outputs_{}", std::process::id()));
        let reports = dir.join("reports");
        std::fs::create_dir_all(reports.join("run_1")).expect("create folders");
        std::fs::write(reports.join("run_1/equity.svg"), "<svg/>").expect("write chart");
        std::fs::write(dir.join("secret.txt"), "no").expect("write secret");
        let folders = [reports.clone()];
        assert!(within(&folders, &reports.join("run_1/equity.svg")));
        assert!(!within(&folders, &reports.join("run_1/../../secret.txt")));
        assert!(!within(&folders, &reports.join("run_1/missing.svg")));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(dir.join("secret.txt"), reports.join("link.txt"))
                .expect("symlink");
            assert!(!within(&folders, &reports.join("link.txt")));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
