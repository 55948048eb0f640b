//! `predict` (task 3): the current model scores the latest bar of every symbol.
//!
//! The artifact is checked against the sha256 the registry recorded before it is trusted;
//! no current model, a model older than `max_model_age`, or a symbol whose latest bar has
//! no features (too little history) is a clear failure, never a silent partial result.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::features::{self, NAMES};
use super::market_db;
use super::model::{self, Model, Table};
use super::{db, hex, load_bars, param_str};
use crate::handlers::{HandlerError, TaskContext};

/// A registered model, as the registry row describes it.
pub struct Registered {
    /// Registry id.
    pub id: i64,
    /// `gbdt` or `logistic`.
    pub kind: String,
    /// The training run (its baselines are keyed by it).
    pub run_id: Option<i64>,
    /// When it was registered.
    pub created_at: DateTime<Utc>,
    /// Its label horizon.
    pub horizon: usize,
    /// The loaded model.
    pub model: Box<dyn Model>,
}

/// id, kind, run_id, created_at, artifact, sha256, horizon, features.
type RegistryRow = (
    i64,
    String,
    Option<i64>,
    String,
    String,
    String,
    i64,
    String,
);

/// Loads the current model, verifying its artifact; `Ok(None)` when there is none.
pub fn current_model(connection: &Connection) -> Result<Option<Registered>, String> {
    let row: Option<RegistryRow> = connection
        .query_row(
            "SELECT id, kind, run_id, created_at, artifact, sha256, horizon, features
             FROM models WHERE is_current = 1",
            [],
            |r| RegistryRow::try_from(r),
        )
        .optional()
        .map_err(|e| format!("market database: {e}"))?;
    let Some((id, kind, run_id, created_at, artifact, sha256, horizon, names)) = row else {
        return Ok(None);
    };
    if serde_json::from_str::<Value>(&names).ok() != Some(json!(NAMES)) {
        return Err(format!(
            "model {id} was trained on other features ({names}); retrain it with this turbosched"
        ));
    }
    let bytes = std::fs::read(&artifact)
        .map_err(|err| format!("model {id}: cannot read its artifact {artifact}: {err}"))?;
    let found = hex(&Sha256::digest(&bytes));
    if found != sha256 {
        return Err(format!(
            "model {id}: artifact {artifact} has sha256 {found}, the registry recorded {sha256}: it was changed after training"
        ));
    }
    let text =
        String::from_utf8(bytes).map_err(|_| format!("model {id}: artifact is not UTF-8"))?;
    let model = model::load(&kind, &text).map_err(|err| format!("model {id}: {err}"))?;
    let created_at = DateTime::parse_from_rfc3339(&created_at)
        .map_err(|err| format!("model {id}: bad created_at {created_at}: {err}"))?
        .with_timezone(&Utc);
    Ok(Some(Registered {
        id,
        kind,
        run_id,
        created_at,
        horizon: horizon.max(1) as usize,
        model,
    }))
}

/// Runs the `predict` task.
pub fn run(ctx: &TaskContext) -> Result<Value, HandlerError> {
    let market_db_path = PathBuf::from(param_str(ctx, "market_db", "data/market.db")?);
    let threshold = ctx.param_f64("threshold", 0.5)?;
    let max_age_text = param_str(ctx, "max_model_age", "7d")?;
    let max_age = humantime::parse_duration(max_age_text).map_err(|err| {
        HandlerError::Fatal(format!(
            "params.max_model_age: expected a duration like \"7d\", found \"{max_age_text}\": {err}"
        ))
    })?;
    let mut connection = market_db::open(&market_db_path).map_err(HandlerError::Retryable)?;
    let registered = current_model(&connection)
        .map_err(HandlerError::Fatal)?
        .ok_or_else(|| {
            HandlerError::Fatal(
                "no current model: run training first (or lower its min_auc if no model has met it)"
                    .into(),
            )
        })?;
    let age = Utc::now() - registered.created_at;
    if age.to_std().unwrap_or_default() > max_age {
        return Err(HandlerError::Fatal(format!(
            "model {} was trained {} ago, older than max_model_age {max_age_text}: retrain before predicting",
            registered.id,
            humantime::format_duration(std::time::Duration::from_secs(
                age.num_seconds().max(0) as u64
            ))
        )));
    }

    let mut latest = Vec::new();
    let mut x = Table::with_columns(NAMES.len());
    for (symbol, bars) in &load_bars(&connection)? {
        let last_bar = bars.last().map(|b| b.ts.clone()).unwrap_or_default();
        let rows = features::compute(bars, registered.horizon);
        match rows.last() {
            Some(row) if row.ts == last_bar => {
                x.push(&row.values);
                latest.push((symbol.clone(), row.ts.clone()));
            }
            _ => {
                return Err(HandlerError::Fatal(format!(
                "{symbol}: no features for its latest bar {last_bar} ({} bars; features need 50)",
                bars.len()
            )))
            }
        }
    }
    let probabilities: Vec<f64> = registered
        .model
        .raw(&x)
        .into_iter()
        .map(model::sigmoid)
        .collect();
    let now = Utc::now().to_rfc3339();
    let tx = connection.transaction().map_err(db)?;
    let mut out = Vec::new();
    for ((symbol, ts), p) in latest.iter().zip(&probabilities) {
        let signal = if *p > threshold { "long" } else { "flat" };
        tx.execute(
            "INSERT INTO predictions(run_id, model_id, symbol, ts, prob_up, signal, threshold, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT(model_id, symbol, ts) DO UPDATE SET run_id = excluded.run_id,
                prob_up = excluded.prob_up, signal = excluded.signal,
                threshold = excluded.threshold, created_at = excluded.created_at",
            params![ctx.run_id(), registered.id, symbol, ts, p, signal, threshold, now],
        )
        .map_err(db)?;
        println!(
            "{symbol} {ts}: P(up) {p:.4} → {signal} (model {})",
            registered.id
        );
        out.push(json!({ "symbol": symbol, "ts": ts, "prob_up": p, "signal": signal }));
    }
    tx.commit().map_err(db)?;
    Ok(json!({
        "model_id": registered.id,
        "model_kind": registered.kind,
        "threshold": threshold,
        "predictions": out,
    }))
}
