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
