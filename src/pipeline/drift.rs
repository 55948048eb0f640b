//! `drift` (task 5): compares the feature distributions of the last `window_days` with the
//! ones saved when the current model was trained, per feature, by PSI, KL and the
//! two-sample Kolmogorov–Smirnov test, and says whether the model should be retrained.
//!
//! Conventions (so results can be checked against numpy/scipy):
//! - bins: interior edges at the baseline's quantiles 1/k … (k−1)/k, linear interpolation
//!   (numpy's default), duplicate edges removed; bins right-closed, the outer two
//!   open-ended; p = baseline share per bin, q = current share;
//! - PSI = Σ (q − p)·ln(q / p), p and q each floored at 1e-6, not renormalised;
//! - KL(current ‖ baseline) = Σ q'·ln(q'/p') over the floored shares renormalised to sum 1;
//! - KS: D = sup |F_baseline − F_current| and the asymptotic two-sided p-value
//!   Q(√(nm/(n+m))·D), Q(λ) = 2 Σ_{k≥1} (−1)^{k−1} e^{−2k²λ²} (statrs' `TwoSidedAsymptotic`);
//! - a feature has drifted when PSI ≥ `psi_significant`, or when PSI ≥ `psi_moderate` and
//!   the KS p-value < `ks_alpha`; the model needs retraining when the share of drifted
//!   features ≥ `max_drifted_share`.
//!
//! With `on_drift = "trigger_training"` the result asks the engine for one run of
//! `retrain_task` (trigger `drift`); the handler never calls the engine itself.

use std::path::{Path, PathBuf};

use chrono::Utc;
use rayon::prelude::*;
use rusqlite::params;
use serde::Serialize;
use serde_json::{json, Value};

use super::features::{self, NAMES};
use super::market_db;
use super::predict::current_model;
use super::{db, load_bars, param_str, write_atomically};
use crate::handlers::{HandlerError, TaskContext};

/// Floor of a bin share before logarithms.
pub const SHARE_FLOOR: f64 = 1e-6;

/// Verdict thresholds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Thresholds {
    /// PSI at or above this is moderate drift.
    pub psi_moderate: f64,
    /// PSI at or above this is significant drift.
    pub psi_significant: f64,
    /// KS p-values below this reject "same distribution".
    pub ks_alpha: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            psi_moderate: 0.10,
            psi_significant: 0.25,
            ks_alpha: 0.01,
        }
    }
}

/// The comparison of one feature.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FeatureDrift {
    /// Feature name.
    pub feature: String,
    /// Population stability index.
    pub psi: f64,
    /// KL(current ‖ baseline).
    pub kl: f64,
    /// Two-sample KS statistic.
    pub ks_d: f64,
    /// Its asymptotic two-sided p-value.
    pub ks_p: f64,
    /// `stable`, `moderate` or `significant` by PSI.
    pub level: &'static str,
    /// Whether this feature counts as drifted.
    pub drifted: bool,
}

/// numpy's default (linear) quantile of sorted values.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    let h = (sorted.len() - 1) as f64 * q;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}

/// Interior bin edges at the baseline's quantiles 1/k … (k−1)/k, duplicates removed.
pub fn edges(baseline_sorted: &[f64], k: usize) -> Vec<f64> {
    let mut edges: Vec<f64> = (1..k)
        .map(|i| quantile(baseline_sorted, i as f64 / k as f64))
        .collect();
    edges.dedup();
    edges
}

/// Share of sorted `values` in each right-closed bin: (−∞, e₀], (e₀, e₁], …, (e_last, ∞).
pub fn shares(sorted: &[f64], edges: &[f64]) -> Vec<f64> {
    let n = sorted.len() as f64;
    let mut out = Vec::with_capacity(edges.len() + 1);
    let mut below = 0;
    for edge in edges {
        let upto = sorted.partition_point(|v| v <= edge);
        out.push((upto - below) as f64 / n);
        below = upto;
    }
    out.push((sorted.len() - below) as f64 / n);
    out
}

/// PSI over bin shares, each floored at [`SHARE_FLOOR`], not renormalised.
pub fn psi(p: &[f64], q: &[f64]) -> f64 {
    p.iter()
        .zip(q)
        .map(|(p, q)| {
            let (p, q) = (p.max(SHARE_FLOOR), q.max(SHARE_FLOOR));
            (q - p) * (q / p).ln()
        })
        .sum()
}

/// KL(q ‖ p) over the floored shares renormalised to sum to 1.
pub fn kl(p: &[f64], q: &[f64]) -> f64 {
    let floor = |v: &[f64]| -> Vec<f64> {
        let f: Vec<f64> = v.iter().map(|x| x.max(SHARE_FLOOR)).collect();
        let total: f64 = f.iter().sum();
        f.into_iter().map(|x| x / total).collect()
    };
    let (p, q) = (floor(p), floor(q));
    p.iter().zip(&q).map(|(p, q)| q * (q / p).ln()).sum()
}

/// The two-sample KS statistic of two sorted samples.
pub fn ks_statistic(a: &[f64], b: &[f64]) -> f64 {
    let (n, m) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j, mut d) = (0, 0, 0.0f64);
    while i < a.len() && j < b.len() {
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / n - j as f64 / m).abs());
    }
    d
}

/// Kolmogorov's asymptotic two-sided p-value of `d` for samples of sizes `n` and `m`.
pub fn ks_p_value(d: f64, n: usize, m: usize) -> f64 {
    let en = (n as f64 * m as f64) / (n as f64 + m as f64);
    let lambda = en.sqrt() * d;
    if lambda < 0.2 {
        return 1.0; // the series converges too slowly there; Q(λ) > 0.999999
    }
    let mut sum = 0.0;
    for k in 1..=100 {
        let k = k as f64;
        let term = (-2.0 * k * k * lambda * lambda).exp();
        sum += if k as u64 % 2 == 1 { term } else { -term };
        if term < 1e-16 {
            break;
        }
    }
    (2.0 * sum).clamp(0.0, 1.0)
}

/// Compares one feature's sorted baseline and sorted current values.
pub fn compare(
    feature: &str,
    baseline_sorted: &[f64],
    current_sorted: &[f64],
    bins: usize,
    thresholds: Thresholds,
) -> FeatureDrift {
    let e = edges(baseline_sorted, bins);
    let (p, q) = (shares(baseline_sorted, &e), shares(current_sorted, &e));
    let psi = psi(&p, &q);
    let ks_d = ks_statistic(baseline_sorted, current_sorted);
    let ks_p = ks_p_value(ks_d, baseline_sorted.len(), current_sorted.len());
    let level = if psi >= thresholds.psi_significant {
        "significant"
    } else if psi >= thresholds.psi_moderate {
        "moderate"
    } else {
        "stable"
    };
    FeatureDrift {
        feature: feature.to_string(),
        psi,
        kl: kl(&p, &q),
        ks_d,
        ks_p,
        level,
        drifted: level == "significant" || (level == "moderate" && ks_p < thresholds.ks_alpha),
    }
}

/// Compares every feature (columns of equal index), sorting the current values; the
/// baselines must be sorted already (training stores them so).
pub fn compare_all(
    names: &[&str],
    baselines_sorted: &[Vec<f64>],
    mut current: Vec<Vec<f64>>,
    bins: usize,
    thresholds: Thresholds,
) -> Vec<FeatureDrift> {
    current
        .par_iter_mut()
        .for_each(|c| c.sort_unstable_by(f64::total_cmp));
    names
        .par_iter()
        .zip(baselines_sorted.par_iter())
        .zip(current.par_iter())
        .map(|((name, b), c)| compare(name, b, c, bins, thresholds))
        .collect()
}

/// Runs the `drift` task.
pub fn run(ctx: &TaskContext) -> Result<Value, HandlerError> {
    let market_db_path = PathBuf::from(param_str(ctx, "market_db", "data/market.db")?);
    let report_dir = PathBuf::from(param_str(ctx, "report_dir", "reports/drift")?);
    let window_days = ctx.param_u64("window_days", 60)?.max(2) as usize;
    let bins = ctx.param_u64("bins", 10)?.max(2) as usize;
    let defaults = Thresholds::default();
    let thresholds = Thresholds {
        psi_moderate: ctx.param_f64("psi_moderate", defaults.psi_moderate)?,
        psi_significant: ctx.param_f64("psi_significant", defaults.psi_significant)?,
        ks_alpha: ctx.param_f64("ks_alpha", defaults.ks_alpha)?,
    };
    let max_drifted_share = ctx.param_f64("max_drifted_share", 0.3)?;
    let on_drift = param_str(ctx, "on_drift", "none")?.to_string();
    if !["none", "trigger_training"].contains(&on_drift.as_str()) {
        return Err(HandlerError::Fatal(format!(
            "params.on_drift: expected \"none\" or \"trigger_training\", found \"{on_drift}\""
        )));
    }
    let retrain_task = param_str(ctx, "retrain_task", "training")?.to_string();

    let connection = market_db::open(&market_db_path).map_err(HandlerError::Retryable)?;
    let model = current_model(&connection)
        .map_err(HandlerError::Fatal)?
        .ok_or_else(|| {
            HandlerError::Fatal("no current model, so no baseline: run training first".into())
        })?;
    let baseline_run = model
        .run_id
        .ok_or_else(|| HandlerError::Fatal(format!("model {} has no training run id", model.id)))?;
    let mut baselines = Vec::new();
    for name in NAMES {
        let blob: Vec<u8> = connection
            .query_row(
                "SELECT sample FROM baselines WHERE run_id = ?1 AND feature = ?2",
                params![baseline_run, name],
                |r| r.get(0),
            )
            .map_err(|e| {
                HandlerError::Fatal(format!(
                    "no training baseline of {name} for model {} (run {baseline_run}): {e}",
                    model.id
                ))
            })?;
        let sample = market_db::from_blob(&blob);
        if sample.is_empty() {
            return Err(HandlerError::Fatal(format!(
                "the training baseline of {name} for model {} (run {baseline_run}) is empty",
                model.id
            )));
        }
        baselines.push(sample);
    }

    // Current: the features of every symbol over the last `window_days` dates.
    ctx.progress(20.0, "features");
    let mut rows: Vec<(String, [f64; NAMES.len()])> = Vec::new();
    for series in load_bars(&connection)?.values() {
        rows.extend(
            features::compute(series, model.horizon)
                .into_iter()
                .map(|r| (r.ts, r.values)),
        );
    }
    let mut dates: Vec<&str> = rows.iter().map(|(ts, _)| ts.as_str()).collect();
    dates.sort_unstable();
    dates.dedup();
    let Some(first) = dates
        .len()
        .checked_sub(window_days)
        .map(|i| dates[i].to_string())
    else {
        return Err(HandlerError::Fatal(format!(
            "only {} days of features, window_days is {window_days}",
            dates.len()
        )));
    };
    let last = dates.last().map(|d| d.to_string()).unwrap_or_default();
    let mut current = vec![Vec::new(); NAMES.len()];
    for (_, values) in rows.iter().filter(|(ts, _)| *ts >= first) {
        for (column, v) in current.iter_mut().zip(values) {
            column.push(*v);
        }
    }
    ctx.progress(50.0, "compare");
    let results = compare_all(&NAMES, &baselines, current, bins, thresholds);
    let drifted: Vec<&str> = results
        .iter()
        .filter(|r| r.drifted)
        .map(|r| r.feature.as_str())
        .collect();
    let share = drifted.len() as f64 / results.len() as f64;
    let retrain_required = share >= max_drifted_share;
    for r in &results {
        println!(
            "{:<14} PSI {:>8.4}  KL {:>8.4}  KS D {:.4} p {:.3e}  {}{}",
            r.feature,
            r.psi,
            r.kl,
            r.ks_d,
            r.ks_p,
            r.level,
            if r.drifted { "  DRIFTED" } else { "" }
        );
    }
    let verdict = format!(
        "{} of {} features drifted ({:.0}%, threshold {:.0}%) between the training baseline of model {} and {first} → {last}: {}",
        drifted.len(),
        results.len(),
        share * 100.0,
        max_drifted_share * 100.0,
        model.id,
        if retrain_required { "retraining required" } else { "no retraining needed" }
    );
    println!("{verdict}");

    ctx.progress(80.0, "report");
    let folder = report_dir.join(format!("run_{}", ctx.run_id()));
    let chart = folder.join("psi.svg");
    psi_chart(&chart, &results, thresholds).map_err(HandlerError::Retryable)?;
    let report = json!({
        "run_id": ctx.run_id(), "model_id": model.id, "baseline_run": baseline_run,
        "window": { "from": first, "to": last, "days": window_days },
        "bins": bins, "thresholds": thresholds, "max_drifted_share": max_drifted_share,
        "features": results, "drifted": drifted, "drifted_share": share,
        "retrain_required": retrain_required, "verdict": verdict,
    });
    write_atomically(
        &folder.join("drift.json"),
        serde_json::to_string_pretty(&report)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    connection
        .execute(
            "INSERT INTO drift_log(run_id, model_id, created_at, window_from, window_to, features, drifted_share, retrain_required, verdict, report)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                ctx.run_id(),
                model.id,
                Utc::now().to_rfc3339(),
                first,
                last,
                json!(results).to_string(),
                share,
                retrain_required,
                verdict,
                folder.to_string_lossy()
            ],
        )
        .map_err(db)?;
    let mut result = report;
    result["event"] = json!({
        "kind": if retrain_required { "drift_detected" } else { "drift_checked" },
        "message": verdict,
    });
    result["report_dir"] = json!(folder);
    result["chart"] = json!(chart);
    if retrain_required && on_drift == "trigger_training" {
        result["request_runs"] =
            json!([{ "task": retrain_task, "trigger": "drift", "reason": verdict }]);
    }
    Ok(result)
}

/// PSI per feature as horizontal bars on a log axis (so 0.1 and 6 both read), coloured by
/// level, the moderate and significant thresholds as vertical lines.
fn psi_chart(path: &Path, results: &[FeatureDrift], t: Thresholds) -> Result<(), String> {
    use plotters::prelude::*;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|err| format!("cannot create {}: {err}", parent.display()))?;
    }
    let fail = |err: &dyn std::fmt::Display| format!("chart {}: {err}", path.display());
    const FLOOR: f64 = 1e-3;
    let top = results
        .iter()
        .map(|r| r.psi)
        .fold(t.psi_significant * 2.0, f64::max)
        * 1.5;
    let n = results.len();
    let root = SVGBackend::new(path, (900, 140 + 26 * n as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "PSI per feature: current window against the training baseline",
            ("sans-serif", 20),
        )
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(120)
        .build_cartesian_2d((FLOOR..top).log_scale(), (0..n).into_segmented())
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => results
                .get(*i)
                .map(|r| format!("{}{}", r.feature, if r.drifted { " *" } else { "" }))
                .unwrap_or_default(),
            _ => String::new(),
        })
        .x_desc("PSI (log scale; * = drifted)")
        .draw()
        .map_err(|e| fail(&e))?;
    chart
        .draw_series(results.iter().enumerate().map(|(i, r)| {
            let colour = match r.level {
                "significant" => RGBColor(200, 40, 40),
                "moderate" => RGBColor(230, 150, 0),
                _ => RGBColor(70, 130, 180),
            };
            let mut bar = Rectangle::new(
                [
                    (FLOOR, SegmentValue::Exact(i)),
                    (r.psi.max(FLOOR), SegmentValue::Exact(i + 1)),
                ],
                colour.filled(),
            );
            bar.set_margin(3, 3, 0, 0);
            bar
        }))
        .map_err(|e| fail(&e))?;
    for (value, label, colour) in [
        (
            t.psi_moderate,
            format!("moderate ({:.2})", t.psi_moderate),
            RGBColor(230, 150, 0),
        ),
        (
            t.psi_significant,
            format!("significant ({:.2})", t.psi_significant),
            RGBColor(200, 40, 40),
        ),
    ] {
        chart
            .draw_series(LineSeries::new(
                [
                    (value, SegmentValue::Exact(0)),
                    (value, SegmentValue::Exact(n)),
                ],
                colour.stroke_width(2),
            ))
            .map_err(|e| fail(&e))?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_edges_follow_numpys_linear_rule_and_drop_duplicates() {
        // numpy.quantile([1, 2, 3, 4], [0.25, 0.5, 0.75]) = [1.75, 2.5, 3.25]
        assert_eq!(edges(&[1.0, 2.0, 3.0, 4.0], 4), vec![1.75, 2.5, 3.25]);
        // Repeated values make repeated edges; they collapse.
        assert_eq!(edges(&[0.0, 0.0, 0.0, 0.0, 1.0], 4), vec![0.0]);
    }

    #[test]
    fn bins_are_right_closed_with_open_outer_bins() {
        let e = [1.0, 2.0];
        // (−∞,1] ← 0, 1 ; (1,2] ← 1.5, 2 ; (2,∞) ← 3
        assert_eq!(shares(&[0.0, 1.0, 1.5, 2.0, 3.0], &e), vec![0.4, 0.4, 0.2]);
    }

    #[test]
    fn psi_and_kl_worked_by_hand() {
        let p = [0.5, 0.5];
        let q = [0.25, 0.75];
        // PSI = (0.25−0.5)ln(0.5) + (0.75−0.5)ln(1.5) = 0.25·ln 2 + 0.25·ln 1.5
        let by_hand = 0.25 * 2f64.ln() + 0.25 * 1.5f64.ln();
        assert!((psi(&p, &q) - by_hand).abs() < 1e-15);
        // KL(q‖p) = 0.25 ln(0.5) + 0.75 ln(1.5)
        let kl_by_hand = 0.25 * 0.5f64.ln() + 0.75 * 1.5f64.ln();
        assert!((kl(&p, &q) - kl_by_hand).abs() < 1e-15);
        // An empty bin is floored at 1e-6 for PSI (not renormalised) …
        let psi_empty = psi(&[0.5, 0.5], &[1.0, 0.0]);
        let by_hand = 0.5 * (1.0f64 / 0.5).ln() + (1e-6 - 0.5) * (1e-6f64 / 0.5).ln();
        assert!((psi_empty - by_hand).abs() < 1e-12);
        // … and renormalised for KL.
        let total: f64 = 1.0 + 1e-6;
        let kl_by_hand = (1.0 / total) * ((1.0 / total) / 0.5).ln()
            + (1e-6 / total) * ((1e-6 / total) / 0.5).ln();
        assert!((kl(&[0.5, 0.5], &[1.0, 0.0]) - kl_by_hand).abs() < 1e-12);
        assert_eq!(psi(&p, &p), 0.0);
    }

    #[test]
    fn ks_statistic_worked_by_hand_with_ties() {
        // F_a steps at 1,2,3,4 (¼ each); F_b at 3,4,5,6. At x = 2: F_a = ½, F_b = 0.
        assert_eq!(
            ks_statistic(&[1.0, 2.0, 3.0, 4.0], &[3.0, 4.0, 5.0, 6.0]),
            0.5
        );
        // Ties across samples count on both sides at once.
        assert_eq!(ks_statistic(&[1.0, 1.0, 2.0], &[1.0, 2.0, 2.0]), 1.0 / 3.0);
        assert_eq!(ks_statistic(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
    }

    #[test]
    fn ks_p_values_match_the_published_kolmogorov_distribution() {
        // Smirnov's table of the limiting distribution: Q(1.22) ≈ 0.10, Q(1.36) ≈ 0.05,
        // Q(1.48) ≈ 0.025, Q(1.63) ≈ 0.01, Q(1.73) ≈ 0.005, Q(1.95) ≈ 0.001.
        // Choose n = m = 200 so that √(nm/(n+m)) = 10 and D = λ/10.
        for (lambda, published, tolerance) in [
            (1.22, 0.1019, 0.0005),
            (1.36, 0.0495, 0.0005),
            (1.48, 0.0250, 0.0005),
            (1.63, 0.0098, 0.0002),
            (1.73, 0.0050, 0.0002),
            (1.95, 0.0010, 0.0001),
        ] {
            let p = ks_p_value(lambda / 10.0, 200, 200);
            assert!(
                (p - published).abs() < tolerance,
                "Q({lambda}) = {p}, published {published}"
            );
        }
    }

    #[test]
    fn ks_agrees_with_statrs_two_sided_asymptotic() {
        use statrs::stats_tests::ks_test::{ks_twosample, KSTwoSampleAlternativeMethod};
        use statrs::stats_tests::NaNPolicy;
        let a: Vec<f64> = (0..300).map(|i| ((i * 37) % 101) as f64 / 10.0).collect();
        let b: Vec<f64> = (0..200)
            .map(|i| ((i * 53) % 97) as f64 / 9.0 + 0.4)
            .collect();
        let (d, p) = ks_twosample(
            a.clone(),
            b.clone(),
            KSTwoSampleAlternativeMethod::TwoSidedAsymptotic,
            NaNPolicy::Error,
        )
        .unwrap();
        let (mut a, mut b) = (a, b);
        a.sort_by(f64::total_cmp);
        b.sort_by(f64::total_cmp);
        let ours = ks_statistic(&a, &b);
        assert!((ours - d).abs() < 1e-12, "D {ours} vs statrs {d}");
        assert!((ks_p_value(ours, 300, 200) - p).abs() < 1e-9);
    }
}
