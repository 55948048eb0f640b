//! `train` (task 2): fits the gradient-boosted classifier and the logistic baseline on the
//! features of every symbol, scores both on a later validation period, registers both,
//! moves "current" when the candidate meets `min_auc`, explains both with exact SHAP and
//! saves the training-time distribution of every feature (the drift baseline).
//!
//! The split is by date, never shuffled: train on the first dates, skip `horizon` dates
//! (their labels would look into the validation period), validate on the rest.

use std::collections::BTreeMap;
use std::path::PathBuf;

use chrono::Utc;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rusqlite::{params, OptionalExtension};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::features::{self, Bar, NAMES};
use super::market_db;
use super::model::{self, Gbdt, GbdtParams, Logistic, LogisticParams, Model, Table};
use super::predict::current_model;
use super::{db, hex, load_bars, nested_params, param_str, write_atomically};
use crate::handlers::{HandlerError, TaskContext};

/// Labelled feature rows of every symbol, ordered by date then symbol.
pub struct Dataset {
    /// The date (bar time) of each row.
    pub ts: Vec<String>,
    /// The symbol of each row.
    pub symbol: Vec<String>,
    /// Features, column-major, in [`NAMES`] order.
    pub x: Table,
    /// 1 when the close `horizon` bars ahead was higher.
    pub y: Vec<f64>,
}

impl Dataset {
    /// The labelled rows of every symbol.
    pub fn from_bars(bars: &BTreeMap<String, Vec<Bar>>, horizon: usize) -> Dataset {
        let mut rows = Vec::new();
        for (symbol, series) in bars {
            for row in features::compute(series, horizon) {
                if let Some(label) = row.label {
                    rows.push((row.ts, symbol.clone(), row.values, label));
                }
            }
        }
        rows.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        let mut data = Dataset {
            ts: Vec::with_capacity(rows.len()),
            symbol: Vec::with_capacity(rows.len()),
            x: Table::with_columns(NAMES.len()),
            y: Vec::with_capacity(rows.len()),
        };
        for (ts, symbol, values, label) in rows {
            data.ts.push(ts);
            data.symbol.push(symbol);
            data.x.push(&values);
            data.y.push(if label { 1.0 } else { 0.0 });
        }
        data
    }

    /// Row indices of the training and validation periods: the distinct dates split at
    /// `1 − valid_fraction`, with `gap` dates left out between them.
    pub fn split(&self, valid_fraction: f64, gap: usize) -> (Vec<usize>, Vec<usize>) {
        let mut dates: Vec<&str> = self.ts.iter().map(String::as_str).collect();
        dates.dedup();
        let cut = ((dates.len() as f64) * (1.0 - valid_fraction)).floor() as usize;
        let (Some(last_train), Some(first_valid)) = (
            cut.checked_sub(1).and_then(|i| dates.get(i)),
            dates.get(cut + gap),
        ) else {
            return (Vec::new(), Vec::new());
        };
        let (last_train, first_valid) = (last_train.to_string(), first_valid.to_string());
        let train = (0..self.ts.len())
            .filter(|&i| self.ts[i] <= last_train)
            .collect();
        let valid = (0..self.ts.len())
            .filter(|&i| self.ts[i] >= first_valid)
            .collect();
        (train, valid)
    }
}

/// What one fitted model scored.
struct Fitted {
    model: Box<dyn Model>,
    metrics: model::Metrics,
}

/// Where the SHAP logs (`shap_run_<id>.json`) go when the task's params name no folder.
pub const DEFAULT_SHAP_DIR: &str = "shap_logs";

/// Runs the `train` task.
pub fn run(ctx: &TaskContext) -> Result<Value, HandlerError> {
    let market_db_path = PathBuf::from(param_str(ctx, "market_db", "data/market.db")?);
    let model_dir = PathBuf::from(param_str(ctx, "model_dir", "data/models")?);
    let shap_dir = PathBuf::from(param_str(ctx, "shap_dir", DEFAULT_SHAP_DIR)?);
    let candidate_kind = param_str(ctx, "model", "gbdt")?.to_string();
    if !["gbdt", "logistic"].contains(&candidate_kind.as_str()) {
        return Err(HandlerError::Fatal(format!(
            "params.model: expected \"gbdt\" or \"logistic\", found \"{candidate_kind}\""
        )));
    }
    let horizon = ctx.param_u64("horizon", 1)?.max(1) as usize;
    let valid_fraction = ctx.param_f64("valid_fraction", 0.2)?;
    if !(0.05..=0.5).contains(&valid_fraction) {
        return Err(HandlerError::Fatal(format!(
            "params.valid_fraction: expected a share between 0.05 and 0.5, found {valid_fraction}"
        )));
    }
    let min_auc = ctx.param_f64("min_auc", 0.5)?;
    let shap_rows = ctx.param_u64("shap_rows", 100)? as usize;
    let seed = ctx.param_u64("seed", 42)?;
    let gbdt_params: GbdtParams = nested_params(ctx, "gbdt")?;
    let logistic_params: LogisticParams = nested_params(ctx, "logistic")?;

    let predict_task = param_str(ctx, "predict_task", "")?.to_string();

    let mut connection = market_db::open(&market_db_path).map_err(HandlerError::Retryable)?;
    // What this training learns from. A retraining drift asked for, on bars a model was
    // already trained on, would fit that model again: it is skipped, and says why.
    let data_summary = market_db::data_summary(&connection).map_err(db)?;
    let data_fingerprint = market_db::fingerprint(&data_summary);
    if ctx.trigger() == "drift" {
        if let Some((trained, is_current)) =
            market_db::model_trained_on(&connection, &data_fingerprint).map_err(db)?
        {
            let reason = format!(
                "skipped: no new data since model {trained} ({} bars to {})",
                data_summary.values().map(|s| s.rows).sum::<i64>(),
                data_summary
                    .values()
                    .map(|s| s.last_bar.as_str())
                    .max()
                    .unwrap_or("?")
            );
            println!("{reason}");
            let current: Option<i64> = connection
                .query_row("SELECT id FROM models WHERE is_current = 1", [], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(db)?;
            return Ok(json!({
                "skipped": true,
                "reason": reason,
                "trained_on_same_data": { "model_id": trained, "is_current": is_current },
                "promoted": false,
                "current_model_id": current,
                "data": data_summary,
                "data_fingerprint": data_fingerprint,
            }));
        }
    }
    ctx.progress(5.0, "features");
    let data = Dataset::from_bars(&load_bars(&connection)?, horizon);
    let (train_idx, valid_idx) = data.split(valid_fraction, horizon);
    if train_idx.len() < 200 || valid_idx.len() < 50 {
        return Err(HandlerError::Fatal(format!(
            "not enough history to train: {} labelled rows give {} for training and {} for validation \
             (need 200 and 50); run ingestion first or lower valid_fraction",
            data.y.len(),
            train_idx.len(),
            valid_idx.len()
        )));
    }
    let (train_x, valid_x) = (data.x.select(&train_idx), data.x.select(&valid_idx));
    let train_y: Vec<f64> = train_idx.iter().map(|&i| data.y[i]).collect();
    let valid_y: Vec<f64> = valid_idx.iter().map(|&i| data.y[i]).collect();
    let range = json!({
        "train_from": data.ts[train_idx[0]], "train_to": data.ts[train_idx[train_idx.len() - 1]],
        "valid_from": data.ts[valid_idx[0]], "valid_to": data.ts[valid_idx[valid_idx.len() - 1]],
    });
    println!(
        "training on {} rows ({} → {}), validating on {} rows ({} → {}), horizon {horizon}",
        train_idx.len(),
        data.ts[train_idx[0]],
        data.ts[train_idx[train_idx.len() - 1]],
        valid_idx.len(),
        data.ts[valid_idx[0]],
        data.ts[valid_idx[valid_idx.len() - 1]]
    );

    let mut fitted = Vec::new();
    let candidates: Vec<Box<dyn Model>> = vec![
        Box::new(Gbdt::new(gbdt_params)),
        Box::new(Logistic::new(logistic_params)),
    ];
    for (index, mut model) in candidates.into_iter().enumerate() {
        ctx.progress(10.0 + 35.0 * index as f64, &format!("fit {}", model.kind()));
        model.fit(&train_x, &train_y).map_err(HandlerError::Fatal)?;
        let p: Vec<f64> = model
            .raw(&valid_x)
            .into_iter()
            .map(model::sigmoid)
            .collect();
        let metrics = model::metrics(&p, &valid_y);
        println!(
            "{}: AUC {:.4}, accuracy {:.4}, log loss {:.4}, Brier {:.4} on {} validation rows",
            model.kind(),
            metrics.auc,
            metrics.accuracy,
            metrics.log_loss,
            metrics.brier,
            metrics.rows
        );
        fitted.push(Fitted { model, metrics });
    }

    // The rival of the candidate, scored on the candidate's validation rows: the current
    // model (same label horizon), else — on first training — the logistic baseline.
    let mut rival = None;
    let mut rival_note = None;
    match current_model(&connection) {
        Ok(Some(current)) if current.horizon == horizon => {
            let p: Vec<f64> = current
                .model
                .raw(&valid_x)
                .into_iter()
                .map(model::sigmoid)
                .collect();
            rival = Some(Rival {
                model_id: current.id,
                role: "current",
                kind: current.kind.clone(),
                metrics: model::metrics(&p, &valid_y),
            });
        }
        Ok(Some(current)) => {
            rival_note = Some(format!(
                "current model {} predicts {} bars ahead, not {horizon}: not comparable",
                current.id, current.horizon
            ))
        }
        Ok(None) => {}
        Err(err) => rival_note = Some(format!("the current model cannot be loaded: {err}")),
    }
    if let Some(note) = &rival_note {
        println!("{note}");
    }

    ctx.progress(80.0, "register");
    std::fs::create_dir_all(&model_dir).map_err(|err| {
        HandlerError::Retryable(format!("cannot create {}: {err}", model_dir.display()))
    })?;
    let now = Utc::now().to_rfc3339();
    let tx = connection.transaction().map_err(db)?;
    let mut registered = Vec::new();
    for f in &fitted {
        let artifact = model_dir.join(format!(
            "model_run_{}_{}.json",
            ctx.run_id(),
            f.model.kind()
        ));
        let body = f.model.to_json().map_err(HandlerError::Fatal)?;
        write_atomically(&artifact, body.as_bytes())?;
        let sha256 = hex(&Sha256::digest(body.as_bytes()));
        tx.execute(
            "INSERT INTO models(run_id, kind, created_at, artifact, sha256, features, horizon,
                train_from, train_to, valid_from, valid_to, params, metrics, data, data_fingerprint)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            params![
                ctx.run_id(),
                f.model.kind(),
                now,
                artifact.to_string_lossy(),
                sha256,
                json!(NAMES).to_string(),
                horizon as i64,
                range["train_from"].as_str(),
                range["train_to"].as_str(),
                range["valid_from"].as_str(),
                range["valid_to"].as_str(),
                f.model.params().to_string(),
                json!(f.metrics).to_string(),
                json!(data_summary).to_string(),
                data_fingerprint,
            ],
        )
        .map_err(db)?;
        registered.push(json!({
            "id": tx.last_insert_rowid(), "kind": f.model.kind(), "artifact": artifact,
            "sha256": sha256, "metrics": f.metrics, "params": f.model.params(),
        }));
    }

    // Promotion: the configured kind becomes current only if it clears min_auc and beats
    // its rival on the same validation rows (`decide`); the registry keeps the comparison.
    let (index, candidate) = fitted
        .iter()
        .enumerate()
        .find(|(_, f)| f.model.kind() == candidate_kind)
        .ok_or_else(|| HandlerError::Fatal("no candidate model".into()))?;
    let candidate_id = registered[index]["id"].as_i64().unwrap_or_default();
    if rival.is_none() && candidate_kind == "gbdt" {
        if let Some((j, baseline)) = fitted
            .iter()
            .enumerate()
            .find(|(_, f)| f.model.kind() == "logistic")
        {
            rival = Some(Rival {
                model_id: registered[j]["id"].as_i64().unwrap_or_default(),
                role: "baseline",
                kind: "logistic".into(),
                metrics: baseline.metrics.clone(),
            });
        }
    }
    let decision = decide(
        &candidate_kind,
        candidate_id,
        &candidate.metrics,
        rival.as_ref(),
        min_auc,
    );
    let (promoted, reason) = (decision.promote, decision.reason);
    let comparison = json!({
        "candidate": { "model_id": candidate_id, "kind": candidate_kind, "metrics": candidate.metrics },
        "against": rival.as_ref().map(|r| json!({
            "model_id": r.model_id, "role": r.role, "kind": r.kind, "metrics": r.metrics,
        })),
        "note": rival_note,
        "window": { "from": range["valid_from"], "to": range["valid_to"], "rows": valid_idx.len() },
        "min_auc": min_auc,
        "promoted": promoted,
        "reason": reason,
    });
    tx.execute(
        "UPDATE models SET comparison = ?1 WHERE id = ?2",
        params![comparison.to_string(), candidate_id],
    )
    .map_err(db)?;
    if promoted {
        tx.execute("UPDATE models SET is_current = 0 WHERE is_current = 1", [])
            .map_err(db)?;
        tx.execute(
            "UPDATE models SET is_current = 1 WHERE id = ?1",
            [candidate_id],
        )
        .map_err(db)?;
    }
    println!("{reason}");

    // The drift baseline: every training value of every feature, sorted.
    for (j, name) in NAMES.iter().enumerate() {
        let mut values = train_x.columns[j].clone();
        values.sort_by(f64::total_cmp);
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        tx.execute(
            "INSERT OR REPLACE INTO baselines(run_id, feature, n, mean, std, sample) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![ctx.run_id(), name, values.len() as i64, mean, std, market_db::to_blob(&values)],
        )
        .map_err(db)?;
    }
    // The feature snapshot this run used.
    {
        let mut insert = tx
            .prepare(
                "INSERT OR REPLACE INTO features(symbol, ts, horizon, vals, label, run_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .map_err(db)?;
        for i in 0..data.y.len() {
            insert
                .execute(params![
                    data.symbol[i],
                    data.ts[i],
                    horizon as i64,
                    json!(data.x.row(i)).to_string(),
                    data.y[i] as i64,
                    ctx.run_id()
                ])
                .map_err(db)?;
        }
    }

    // SHAP on a seeded sample of validation rows, for every model.
    ctx.progress(90.0, "shap");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sample: Vec<usize> =
        rand::seq::index::sample(&mut rng, valid_x.rows(), shap_rows.min(valid_x.rows()))
            .into_vec();
    sample.sort_unstable();
    let explained = valid_x.select(&sample);
    let mut shap_models = Vec::new();
    for (f, reg) in fitted.iter().zip(&registered) {
        let explanation = f.model.explain(&explained);
        let importances = mean_abs_shap(&explanation.values);
        let top10: Vec<&str> = importances.iter().take(10).map(|(n, _)| *n).collect();
        let top20: Vec<Value> = importances
            .iter()
            .take(20)
            .map(|(n, v)| json!({ "feature": n, "mean_abs_shap": v }))
            .collect();
        println!(
            "{} SHAP top 3: {}",
            f.model.kind(),
            importances
                .iter()
                .take(3)
                .map(|(n, v)| format!("{n} {v:.5}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        shap_models.push(json!({
            "model_id": reg["id"], "kind": f.model.kind(), "expected_value": explanation.expected_value,
            "top_features": top10, "importances": top20,
        }));
    }
    std::fs::create_dir_all(&shap_dir).map_err(|err| {
        HandlerError::Retryable(format!("cannot create {}: {err}", shap_dir.display()))
    })?;
    let shap_path = shap_dir.join(format!("shap_run_{}.json", ctx.run_id()));
    let shap_log = json!({
        "run_id": ctx.run_id(), "created_at": now, "rows_explained": sample.len(), "seed": seed,
        "rows": sample.iter().map(|&k| json!({"symbol": data.symbol[valid_idx[k]], "ts": data.ts[valid_idx[k]]})).collect::<Vec<_>>(),
        "models": shap_models,
    });
    write_atomically(
        &shap_path,
        serde_json::to_string_pretty(&shap_log)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    for m in &shap_models {
        tx.execute(
            "INSERT INTO shap_logs(model_id, run_id, created_at, rows_explained, expected_value, top_features, importances, path)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                m["model_id"].as_i64(),
                ctx.run_id(),
                now,
                sample.len() as i64,
                m["expected_value"].as_f64(),
                m["top_features"].to_string(),
                m["importances"].to_string(),
                shap_path.to_string_lossy()
            ],
        )
        .map_err(db)?;
    }
    let current: Option<i64> = tx
        .query_row("SELECT id FROM models WHERE is_current = 1", [], |r| {
            r.get(0)
        })
        .optional()
        .map_err(db)?;
    tx.commit().map_err(db)?;
    ctx.progress(100.0, "done");
    let mut result = json!({
        "models": registered,
        "candidate": candidate_kind,
        "promoted": promoted,
        "reason": reason,
        "comparison": comparison,
        "current_model_id": current,
        "data": data_summary,
        "data_fingerprint": data_fingerprint,
        "rows": { "train": train_idx.len(), "validation": valid_idx.len() },
        "range": range,
        "shap_log": shap_path,
        "top_features": shap_models.get(index).map(|m| m["top_features"].clone()),
    });
    // A retraining outside the daily chain (drift asked for it) that moved "current" asks
    // for predictions at once, so they always come from the current model.
    if promoted && ctx.trigger() == "drift" && !predict_task.is_empty() {
        result["request_runs"] = json!([{
            "task": predict_task, "trigger": "drift",
            "reason": format!("model {candidate_id} became current: predictions from it"),
        }]);
    }
    Ok(result)
}

/// What a candidate model is measured against, on the candidate's own validation window.
pub struct Rival {
    /// Its registry id.
    pub model_id: i64,
    /// `current` (the model predictions come from) or `baseline` (the logistic model
    /// fitted beside a GBDT candidate when no model is current yet).
    pub role: &'static str,
    /// `gbdt` or `logistic`.
    pub kind: String,
    /// Its scores on the candidate's validation rows.
    pub metrics: model::Metrics,
}

/// A promotion decision: whether the candidate becomes current, and why.
pub struct Decision {
    /// The candidate becomes current.
    pub promote: bool,
    /// One sentence, for the log and the result.
    pub reason: String,
}

/// Differences this small are ties: a model reloaded from its JSON artifact may score the
/// same rows a rounding away from the fitted one.
const TIE: f64 = 1e-9;

/// The promotion rule: the candidate becomes current when its validation AUC is at least
/// `min_auc` and it beats its rival on the same rows — a higher AUC, or an equal one (within
/// 1e-9) and a lower log loss. Without a rival (a logistic candidate, no model current
/// yet), `min_auc` alone decides.
pub fn decide(
    candidate_kind: &str,
    candidate_id: i64,
    candidate: &model::Metrics,
    rival: Option<&Rival>,
    min_auc: f64,
) -> Decision {
    let name = format!("{candidate_kind} model {candidate_id}");
    let stays = match rival {
        Some(rival) if rival.role == "current" => {
            format!("; model {} stays current", rival.model_id)
        }
        _ => "; there is no current model".to_string(),
    };
    if candidate.auc < min_auc {
        return Decision {
            promote: false,
            reason: format!(
                "{name} not promoted: validation AUC {:.4} < min_auc {min_auc}{stays}",
                candidate.auc
            ),
        };
    }
    let Some(rival) = rival else {
        return Decision {
            promote: true,
            reason: format!(
                "{name} is current: validation AUC {:.4} ≥ min_auc {min_auc}",
                candidate.auc
            ),
        };
    };
    let against = format!(
        "the {} {} model {}: AUC {:.4}, log loss {:.4}",
        rival.role, rival.kind, rival.model_id, rival.metrics.auc, rival.metrics.log_loss
    );
    let auc_gain = candidate.auc - rival.metrics.auc;
    let beats = auc_gain > TIE
        || (auc_gain.abs() <= TIE && rival.metrics.log_loss - candidate.log_loss > TIE);
    let own = format!(
        "AUC {:.4}, log loss {:.4} on the same {} validation rows",
        candidate.auc, candidate.log_loss, candidate.rows
    );
    if beats {
        Decision {
            promote: true,
            reason: format!("{name} is current: {own} beat {against}"),
        }
    } else {
        Decision {
            promote: false,
            reason: format!("{name} not promoted: {own} do not beat {against}{stays}"),
        }
    }
}

/// Mean |SHAP| per feature, largest first.
pub fn mean_abs_shap(values: &[Vec<f64>]) -> Vec<(&'static str, f64)> {
    let n = values.len().max(1) as f64;
    let mut out: Vec<(&'static str, f64)> = NAMES
        .iter()
        .enumerate()
        .map(|(j, name)| (*name, values.iter().map(|r| r[j].abs()).sum::<f64>() / n))
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset(dates: &[&str]) -> Dataset {
        let mut x = Table::with_columns(1);
        for i in 0..dates.len() {
            x.push(&[i as f64]);
        }
        Dataset {
            ts: dates.iter().map(|d| d.to_string()).collect(),
            symbol: vec!["A".into(); dates.len()],
            x,
            y: vec![0.0; dates.len()],
        }
    }

    fn scores(auc: f64, log_loss: f64) -> model::Metrics {
        model::Metrics {
            auc,
            accuracy: 0.5,
            log_loss,
            brier: 0.25,
            rows: 100,
        }
    }

    fn current(auc: f64, log_loss: f64) -> Rival {
        Rival {
            model_id: 1,
            role: "current",
            kind: "gbdt".into(),
            metrics: scores(auc, log_loss),
        }
    }

    fn check_decision(candidate: (f64, f64), rival: Option<Rival>, min_auc: f64) -> (bool, String) {
        let decision = decide(
            "gbdt",
            3,
            &scores(candidate.0, candidate.1),
            rival.as_ref(),
            min_auc,
        );
        (decision.promote, decision.reason)
    }

    #[test]
    fn a_candidate_is_promoted_only_when_it_beats_the_current_model_on_auc() {
        let (promote, reason) = check_decision((0.56, 0.69), Some(current(0.55, 0.68)), 0.52);
        assert!(promote, "{reason}");
        assert!(reason.contains("beat the current gbdt model 1"), "{reason}");
        let (promote, reason) = check_decision((0.54, 0.60), Some(current(0.55, 0.70)), 0.52);
        assert!(!promote, "{reason}");
        assert!(reason.ends_with("model 1 stays current"), "{reason}");
    }

    #[test]
    fn an_equal_auc_is_decided_by_log_loss_and_an_identical_model_is_not_promoted() {
        let (promote, _) = check_decision((0.55, 0.67), Some(current(0.55, 0.68)), 0.52);
        assert!(promote);
        let (promote, _) = check_decision((0.55, 0.69), Some(current(0.55, 0.68)), 0.52);
        assert!(!promote);
        // The same data and seed fit the same model again: a retraining that changes
        // nothing (issue 14: "AUC 0.5029 four times") moves nothing.
        let (promote, reason) =
            check_decision((0.5029, 0.6932), Some(current(0.5029 + 1e-12, 0.6932)), 0.5);
        assert!(!promote, "{reason}");
    }

    #[test]
    fn min_auc_is_a_floor_even_for_a_candidate_that_beats_its_rival() {
        let (promote, reason) = check_decision((0.51, 0.69), Some(current(0.48, 0.70)), 0.52);
        assert!(!promote);
        assert_eq!(
            reason,
            "gbdt model 3 not promoted: validation AUC 0.5100 < min_auc 0.52; model 1 stays current"
        );
        let (promote, _) = check_decision((0.53, 0.69), None, 0.52);
        assert!(promote);
    }

    #[test]
    fn on_first_training_a_gbdt_must_beat_the_logistic_baseline() {
        let baseline = |auc| Rival {
            model_id: 2,
            role: "baseline",
            kind: "logistic".into(),
            metrics: scores(auc, 0.69),
        };
        let (promote, reason) = check_decision((0.5029, 0.6932), Some(baseline(0.4981)), 0.5);
        assert!(promote, "{reason}");
        assert!(
            reason.contains("beat the baseline logistic model 2"),
            "{reason}"
        );
        let (promote, reason) = check_decision((0.5029, 0.6932), Some(baseline(0.51)), 0.5);
        assert!(!promote, "{reason}");
        assert!(reason.ends_with("there is no current model"), "{reason}");
    }

    #[test]
    fn the_split_is_by_date_with_a_horizon_gap_and_never_shuffled() {
        let dates = [
            "d01", "d02", "d03", "d04", "d05", "d06", "d07", "d08", "d09", "d10",
        ];
        let data = dataset(&dates);
        let (train, valid) = data.split(0.3, 2);
        assert_eq!(train, vec![0, 1, 2, 3, 4, 5, 6]);
        // d08 and d09 are the gap: their labels look into the validation period.
        assert_eq!(valid, vec![9]);
        let (train, valid) = data.split(0.3, 0);
        assert_eq!((train.len(), valid), (7, vec![7, 8, 9]));
    }
}
