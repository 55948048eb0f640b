//! The one list of built-in handlers: each one's name, the params it reads and its entry
//! point. Config validation reads names and params from [`BUILTINS`] (a handler or a
//! param not listed here is refused); the worker looks the entry point up in it. A new
//! built-in is one row here and nowhere else.
//!
//! Direction: this module sits above the handlers it lists ([`crate::handlers`],
//! [`crate::pipeline`]) and below its readers (`config`, `worker`), so none of them
//! imports another in a circle (`tests/it/boundaries.rs` checks that no module does).

use crate::handlers::{ping, HandlerError, TaskContext};
use crate::pipeline::{backtest, drift, ingest, predict, train};

/// A handler that sees only its [`TaskContext`].
pub type HandlerFn = fn(&TaskContext) -> Result<serde_json::Value, HandlerError>;

/// How the worker runs a built-in.
#[derive(Clone, Copy)]
pub enum Entry {
    /// Called with the attempt's [`TaskContext`], and nothing else.
    Task(HandlerFn),
    /// `maintenance`: housekeeping of the service itself, which reads the service's own
    /// config and store; the worker calls `maintenance::handler`. It is not named here
    /// because `maintenance` imports `config`, and `config` reads this list.
    Maintenance,
}

/// One built-in handler.
pub struct Builtin {
    /// The config spelling, `handler = "<name>"`.
    pub name: &'static str,
    /// The params it reads, sorted. Any other key in a task's `params` is a config error:
    /// a misspelt key would otherwise leave its default in force without a word.
    pub params: &'static [&'static str],
    /// Its entry point.
    pub entry: Entry,
}

/// Every built-in handler, by name.
pub const BUILTINS: &[Builtin] = &[
    Builtin {
        name: "backtest",
        params: &[
            "allow_short",
            "cost_bps",
            "gbdt",
            "horizon",
            "logistic",
            "market_db",
            "model",
            "report_dir",
            "step_days",
            "threshold",
            "train_days",
            "window",
        ],
        entry: Entry::Task(backtest::run),
    },
    Builtin {
        name: "drift",
        params: &[
            "bins",
            "ks_alpha",
            "market_db",
            "max_drifted_share",
            "on_drift",
            "psi_moderate",
            "psi_significant",
            "report_dir",
            "retrain_task",
            "window_days",
        ],
        entry: Entry::Task(drift::run),
    },
    Builtin {
        name: "ingest",
        params: &[
            "columns",
            "date_format",
            "force_reload",
            "market_db",
            "source_dir",
            "symbol_column",
        ],
        entry: Entry::Task(ingest::run),
    },
    Builtin {
        name: "maintenance",
        params: &["archive_after_days", "keep_backups", "retention_days"],
        entry: Entry::Maintenance,
    },
    Builtin {
        name: "ping",
        params: &["fail_times", "fatal", "progress", "sleep_sec"],
        entry: Entry::Task(ping::run),
    },
    Builtin {
        name: "predict",
        params: &["market_db", "max_model_age", "threshold"],
        entry: Entry::Task(predict::run),
    },
    Builtin {
        name: "train",
        params: &[
            "gbdt",
            "horizon",
            "logistic",
            "market_db",
            "min_auc",
            "model",
            "model_dir",
            "predict_task",
            "seed",
            "shap_dir",
            "shap_rows",
            "valid_fraction",
        ],
        entry: Entry::Task(train::run),
    },
];

/// The folders built-ins write what they produce into: (handler, the param naming the
/// folder, its default). The API serves files from these folders only
/// (`GET /scheduler/files`), so a run's charts and logs can be linked from the dashboard.
pub const OUTPUT_FOLDERS: &[(&str, &str, &str)] = &[
    ("backtest", "report_dir", backtest::DEFAULT_REPORT_DIR),
    ("drift", "report_dir", drift::DEFAULT_REPORT_DIR),
    ("train", "shap_dir", train::DEFAULT_SHAP_DIR),
];

/// The folders the built-in `handler` writes into when its params name none: (param,
/// folder), for `outputs::output_folders`.
pub fn output_defaults(handler: &str) -> Vec<(&'static str, &'static str)> {
    OUTPUT_FOLDERS
        .iter()
        .filter(|(name, _, _)| *name == handler)
        .map(|(_, param, default)| (*param, *default))
        .collect()
}

/// The built-in handler called `name`.
pub fn find(name: &str) -> Option<&'static Builtin> {
    BUILTINS.iter().find(|builtin| builtin.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_output_folder_is_named_by_a_folder_param_its_handler_reads() {
        for (handler, param, _) in OUTPUT_FOLDERS {
            assert!(crate::outputs::FOLDER_PARAMS.contains(param), "{param}");
            assert!(
                find(handler).is_some_and(|b| b.params.contains(param)),
                "{handler}.{param}"
            );
        }
    }

    #[test]
    fn names_and_params_are_sorted_and_unique() {
        let sorted_unique = |list: &[&str]| list.windows(2).all(|pair| pair[0] < pair[1]);
        let names: Vec<&str> = BUILTINS.iter().map(|builtin| builtin.name).collect();
        assert!(sorted_unique(&names), "{names:?}");
        for builtin in BUILTINS {
            assert!(sorted_unique(builtin.params), "{}", builtin.name);
        }
    }
}
