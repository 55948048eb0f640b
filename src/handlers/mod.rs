//! Built-in handlers. Each sees only a [`TaskContext`]: its params, its checkpoint and a
//! way to report progress. A handler never knows of the engine, the store or attempts
//! policy: it fails as [`HandlerError::Retryable`] or [`HandlerError::Fatal`] and the
//! runner decides what happens next.
//!
//! This module is the vocabulary of handlers and imports nothing of the crate: the
//! pipeline's handlers, `maintenance`, the list of built-ins (`builtins`) and the worker
//! that runs them all import it, never the other way round. Where progress and checkpoints
//! go is a [`Report`], which the worker implements over its report pipe.

pub(crate) mod ping;

/// Where a handler's progress and checkpoints go: in the worker, the report pipe.
pub trait Report: Send + Sync {
    /// Progress in percent (already clamped to 0–100) and the current phase.
    fn progress(&self, pct: f64, phase: &str);
    /// State a retry of this run will resume from.
    fn checkpoint(&self, data: serde_json::Value);
}

/// How a handler failed.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Another attempt may succeed (a network blip, a locked file).
    #[error("{0}")]
    Retryable(String),
    /// Retrying cannot help (bad params, missing input).
    #[error("{0}")]
    Fatal(String),
}

/// Everything a handler may know about the attempt it runs.
pub struct TaskContext {
    run_id: i64,
    task: String,
    attempt: u32,
    trigger: String,
    params: serde_json::Value,
    checkpoint: Option<serde_json::Value>,
    report: Box<dyn Report>,
}

impl TaskContext {
    /// Builds a context (the worker does this from its environment).
    pub fn new(
        run_id: i64,
        task: String,
        attempt: u32,
        params: serde_json::Value,
        checkpoint: Option<serde_json::Value>,
        report: Box<dyn Report>,
    ) -> TaskContext {
        TaskContext {
            run_id,
            task,
            attempt,
            trigger: String::new(),
            params,
            checkpoint,
            report,
        }
    }

    /// The same context, for a run started by `trigger` (`schedule`, `manual`, `drift`…).
    pub fn with_trigger(mut self, trigger: String) -> TaskContext {
        self.trigger = trigger;
        self
    }

    /// What started this run: `schedule`, `manual`, `catchup`, `downstream`, `retry` or
    /// `drift` (asked for by another run's result); empty when not told.
    pub fn trigger(&self) -> &str {
        &self.trigger
    }

    /// The run id.
    pub fn run_id(&self) -> i64 {
        self.run_id
    }

    /// The task name.
    pub fn task(&self) -> &str {
        &self.task
    }

    /// This attempt's number, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The task's `params` table.
    pub fn params(&self) -> &serde_json::Value {
        &self.params
    }

    /// The last checkpoint of an earlier attempt of this run, if any.
    pub fn checkpoint(&self) -> Option<&serde_json::Value> {
        self.checkpoint.as_ref()
    }

    /// Reports progress (0–100) and the current phase.
    pub fn progress(&self, pct: f64, phase: &str) {
        self.report.progress(pct.clamp(0.0, 100.0), phase);
    }

    /// Saves a checkpoint: a retry of this run will find it in [`Self::checkpoint`].
    pub fn save_checkpoint(&self, data: serde_json::Value) {
        self.report.checkpoint(data);
    }

    /// A float param, or `default`; a present value of the wrong type is a fatal error.
    pub fn param_f64(&self, name: &str, default: f64) -> Result<f64, HandlerError> {
        match self.params.get(name) {
            None => Ok(default),
            Some(value) => value.as_f64().ok_or_else(|| {
                HandlerError::Fatal(format!("params.{name}: expected a number, found {value}"))
            }),
        }
    }

    /// A whole-number param, or `default`.
    pub fn param_u64(&self, name: &str, default: u64) -> Result<u64, HandlerError> {
        match self.params.get(name) {
            None => Ok(default),
            Some(value) => value.as_u64().ok_or_else(|| {
                HandlerError::Fatal(format!(
                    "params.{name}: expected a whole number, found {value}"
                ))
            }),
        }
    }

    /// A boolean param, or `default`.
    pub fn param_bool(&self, name: &str, default: bool) -> Result<bool, HandlerError> {
        match self.params.get(name) {
            None => Ok(default),
            Some(value) => value.as_bool().ok_or_else(|| {
                HandlerError::Fatal(format!(
                    "params.{name}: expected true or false, found {value}"
                ))
            }),
        }
    }
}
