//! `backtest` (task 4): walk-forward over the history. Train on a rolling (or expanding)
//! window of `train_days` dates, predict the next `step_days`, roll on. A prediction made
//! on date t is made by a model whose training labels were all known by t (rows up to
//! t − horizon) from features of bars up to t: nothing dated after t is used — tested by
//! changing later bars.
//!
//! The strategy holds, from one close to the next, +1 when P(up) > `threshold`, else 0
//! (−1 with `allow_short`), paying `cost_bps` per unit of position change. Per symbol and
//! for an equal-weighted portfolio it is scored beside buy-and-hold with the return
//! metrics of the `empyrical` library ([`ReturnMetrics`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::{Datelike, NaiveDate, Utc};
use rusqlite::params;
use serde::Serialize;
use serde_json::{json, Value};

use super::features::{self, Bar, NAMES};
use super::market_db;
use super::model::{self, Gbdt, GbdtParams, Logistic, LogisticParams, Model, Table};
use super::{db, load_bars, nested_params, param_str, write_atomically};
use crate::handlers::{HandlerError, TaskContext};

/// Trading days per year.
pub const PERIODS_PER_YEAR: f64 = 252.0;

/// How the walk-forward runs.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Dates in the training window.
    pub train_days: usize,
    /// `false`: rolling window of `train_days`; `true`: everything from the start.
    pub expanding: bool,
    /// Dates predicted by one model before it is retrained.
    pub step_days: usize,
    /// Label horizon in bars.
    pub horizon: usize,
    /// `gbdt` or `logistic`.
    pub model: String,
    /// Long above this probability.
    pub threshold: f64,
    /// Short (−1) instead of flat below it.
    pub allow_short: bool,
    /// Cost per unit of position change, in basis points.
    pub cost_bps: f64,
    /// Boosting parameters when `model = "gbdt"`.
    pub gbdt: GbdtParams,
    /// Regression parameters when `model = "logistic"`.
    pub logistic: LogisticParams,
}

impl Default for Plan {
    /// The `backtest` task's defaults: a 3-year rolling window, monthly retraining, GBDT,
    /// long above 0.5, 1 bp per unit of position change.
    fn default() -> Self {
        Plan {
            train_days: 756,
            expanding: false,
            step_days: 21,
            horizon: 1,
            model: "gbdt".into(),
            threshold: 0.5,
            allow_short: false,
            cost_bps: 1.0,
            gbdt: GbdtParams::default(),
            logistic: LogisticParams::default(),
        }
    }
}

/// One out-of-sample prediction and what came of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// Symbol.
    pub symbol: String,
    /// The date it was made on (at that close).
    pub ts: String,
    /// P(up over the horizon).
    pub prob_up: f64,
    /// Whether it did go up over the horizon.
    pub up: bool,
    /// close_{t+1} / close_t − 1: what a position taken at t earns.
    pub next_return: f64,
}

/// A row of the walk-forward input: features of (symbol, t) and what followed.
struct Sample {
    symbol: String,
    ts: String,
    values: [f64; NAMES.len()],
    label: bool,
    next_return: f64,
}

/// The out-of-sample predictions of a walk-forward over `bars` (per symbol, oldest first).
/// `on_step` is told the share done.
pub fn walk_forward(
    bars: &BTreeMap<String, Vec<Bar>>,
    plan: &Plan,
    mut on_step: impl FnMut(f64),
) -> Result<Vec<Prediction>, String> {
    let mut samples = Vec::new();
    for (symbol, series) in bars {
        let index: BTreeMap<&str, usize> = series
            .iter()
            .enumerate()
            .map(|(i, b)| (b.ts.as_str(), i))
            .collect();
        for row in features::compute(series, plan.horizon) {
            let Some(label) = row.label else { continue };
            let i = index[row.ts.as_str()];
            samples.push(Sample {
                symbol: symbol.clone(),
                next_return: series[i + 1].close / series[i].close - 1.0,
                ts: row.ts,
                values: row.values,
                label,
            });
        }
    }
    samples.sort_by(|a, b| (&a.ts, &a.symbol).cmp(&(&b.ts, &b.symbol)));
    let mut dates: Vec<&str> = samples.iter().map(|s| s.ts.as_str()).collect();
    dates.dedup();
    let dates: Vec<String> = dates.into_iter().map(str::to_string).collect();
    let first = plan.train_days + plan.horizon;
    if dates.len() <= first {
        return Err(format!(
            "{} dates with features, the walk-forward needs more than train_days + horizon = {first}",
            dates.len()
        ));
    }
    // Row ranges per date (samples are sorted by date).
    let mut start_of = Vec::with_capacity(dates.len() + 1);
    let mut k = 0;
    for date in &dates {
        start_of.push(k);
        while k < samples.len() && samples[k].ts == *date {
            k += 1;
        }
    }
    start_of.push(samples.len());

    let mut out = Vec::new();
    let mut s = first;
    while s < dates.len() {
        // Training rows: dates up to s − horizon, whose labels are known at date s.
        let train_end = s - plan.horizon; // exclusive, in dates
        let train_start = if plan.expanding {
            0
        } else {
            train_end.saturating_sub(plan.train_days)
        };
        let rows = start_of[train_start]..start_of[train_end];
        let mut x = Table::with_columns(NAMES.len());
        let mut y = Vec::with_capacity(rows.len());
        for sample in &samples[rows] {
            x.push(&sample.values);
            y.push(if sample.label { 1.0 } else { 0.0 });
        }
        let mut model: Box<dyn Model> = match plan.model.as_str() {
            "gbdt" => Box::new(Gbdt::new(plan.gbdt.clone())),
            _ => Box::new(Logistic::new(plan.logistic.clone())),
        };
        model.fit(&x, &y)?;
        let end = (s + plan.step_days).min(dates.len());
        let predict = &samples[start_of[s]..start_of[end]];
        let mut px = Table::with_columns(NAMES.len());
        for sample in predict {
            px.push(&sample.values);
        }
        for (sample, raw) in predict.iter().zip(model.raw(&px)) {
            out.push(Prediction {
                symbol: sample.symbol.clone(),
                ts: sample.ts.clone(),
                prob_up: model::sigmoid(raw),
                up: sample.label,
                next_return: sample.next_return,
            });
        }
        on_step(end as f64 / dates.len() as f64);
        s = end;
    }
    Ok(out)
}

/// The return metrics, with the definitions of `empyrical` (returns are daily, simple,
/// non-compounded per period; risk-free 0; 252 periods a year).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReturnMetrics {
    /// Π(1 + r) − 1.
    pub total_return: f64,
    /// (1 + total)^(252 / n) − 1.
    pub annual_return: f64,
    /// Sample standard deviation (ddof 1) × √252.
    pub annual_volatility: f64,
    /// mean / sample std × √252.
    pub sharpe: f64,
    /// mean × 252 / (√(mean(min(r, 0)²)) × √252).
    pub sortino: f64,
    /// min over t of wealth_t / max_{0 ≤ s ≤ t} wealth_s − 1 (≤ 0), the running peak
    /// including the starting wealth W₀ = 1 as empyrical's does: a series that opens with
    /// a loss draws down from 1.
    pub max_drawdown: f64,
    /// annual_return / |max_drawdown|.
    pub calmar: f64,
    /// Share of days in the market with a positive return.
    pub hit_rate: f64,
    /// Position changes (entering from flat counts).
    pub trades: u64,
    /// Mean |Δ position| per day.
    pub turnover: f64,
    /// Share of days with a position.
    pub exposure: f64,
    /// Days.
    pub days: usize,
}

/// Scores daily `returns` earned with `positions` (the position held over each day).
pub fn return_metrics(returns: &[f64], positions: &[f64]) -> ReturnMetrics {
    let n = returns.len() as f64;
    let total_return = returns.iter().fold(1.0, |w, r| w * (1.0 + r)) - 1.0;
    let annual_return = (1.0 + total_return).powf(PERIODS_PER_YEAR / n) - 1.0;
    let mean = returns.iter().sum::<f64>() / n;
    let std = (returns.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    let downside = (returns.iter().map(|r| r.min(0.0).powi(2)).sum::<f64>() / n).sqrt()
        * PERIODS_PER_YEAR.sqrt();
    // The peak starts at W₀ = 1 (empyrical prepends the starting value before its running
    // maximum), so a loss on the first day is a drawdown.
    let (mut wealth, mut peak, mut max_drawdown) = (1.0f64, 1.0f64, 0.0f64);
    for r in returns {
        wealth *= 1.0 + r;
        peak = peak.max(wealth);
        max_drawdown = max_drawdown.min(wealth / peak - 1.0);
    }
    let in_market: Vec<usize> = (0..positions.len())
        .filter(|&i| positions[i] != 0.0)
        .collect();
    let mut previous = 0.0;
    let (mut trades, mut turnover) = (0u64, 0.0);
    for p in positions {
        if *p != previous {
            trades += 1;
            turnover += (p - previous).abs();
        }
        previous = *p;
    }
    ReturnMetrics {
        total_return,
        annual_return,
        annual_volatility: std * PERIODS_PER_YEAR.sqrt(),
        sharpe: mean / std * PERIODS_PER_YEAR.sqrt(),
        sortino: mean * PERIODS_PER_YEAR / downside,
        max_drawdown,
        calmar: if max_drawdown < 0.0 {
            annual_return / max_drawdown.abs()
        } else {
            f64::NAN
        },
        hit_rate: in_market.iter().filter(|&&i| returns[i] > 0.0).count() as f64
            / in_market.len().max(1) as f64,
        trades,
        turnover: turnover / n,
        exposure: in_market.len() as f64 / n,
        days: returns.len(),
    }
}

/// Predictions against outcomes.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Classification {
    /// Share right.
    pub accuracy: f64,
    /// Of predicted ups, the share that went up.
    pub precision_up: f64,
    /// Of actual ups, the share predicted.
    pub recall_up: f64,
    /// ROC AUC of P(up).
    pub auc: f64,
    /// Predicted up, went up.
    pub true_positive: u64,
    /// Predicted up, did not.
    pub false_positive: u64,
    /// Predicted not up, did not.
    pub true_negative: u64,
    /// Predicted not up, went up.
    pub false_negative: u64,
}

/// Scores predictions: "up" is P(up) > `threshold`.
pub fn classification(predictions: &[Prediction], threshold: f64) -> Classification {
    let (mut tp, mut fp, mut tn, mut fneg) = (0u64, 0u64, 0u64, 0u64);
    for p in predictions {
        match (p.prob_up > threshold, p.up) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, false) => tn += 1,
            (false, true) => fneg += 1,
        }
    }
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let score: Vec<f64> = predictions.iter().map(|p| p.prob_up).collect();
    let y: Vec<f64> = predictions
        .iter()
        .map(|p| if p.up { 1.0 } else { 0.0 })
        .collect();
    Classification {
        accuracy: ratio(tp + tn, tp + tn + fp + fneg),
        precision_up: ratio(tp, tp + fp),
        recall_up: ratio(tp, tp + fneg),
        auc: model::auc(&score, &y),
        true_positive: tp,
        false_positive: fp,
        true_negative: tn,
        false_negative: fneg,
    }
}

/// One day of the portfolio.
#[derive(Debug, Clone, Serialize)]
pub struct Day {
    /// The day the positions were taken (returns run to the next close).
    pub ts: String,
    /// Equal-weighted strategy return, after costs.
    pub strategy: f64,
    /// Equal-weighted buy-and-hold return.
    pub benchmark: f64,
    /// Mean position.
    pub position: f64,
    /// Growth of 1 in the strategy up to and including this day.
    pub strategy_equity: f64,
    /// Growth of 1 in buy-and-hold.
    pub benchmark_equity: f64,
    /// The strategy's drawdown from its peak so far, the starting wealth 1 included (≤ 0).
    pub drawdown: f64,
}

/// Per-symbol and portfolio series from predictions.
pub struct Evaluation {
    /// Portfolio days, oldest first.
    pub days: Vec<Day>,
    /// Metrics: "portfolio" and each symbol, strategy and benchmark.
    pub metrics: Value,
}

/// Turns predictions into positions, returns and metrics.
pub fn evaluate(predictions: &[Prediction], plan: &Plan) -> Evaluation {
    let mut by_symbol: BTreeMap<&str, Vec<&Prediction>> = BTreeMap::new();
    for p in predictions {
        by_symbol.entry(p.symbol.as_str()).or_default().push(p);
    }
    let mut per_date: BTreeMap<&str, (f64, f64, f64, usize)> = BTreeMap::new();
    let mut metrics = serde_json::Map::new();
    for (symbol, rows) in &by_symbol {
        let mut previous: f64 = 0.0;
        let (mut strategy, mut benchmark, mut positions) = (vec![], vec![], vec![]);
        for p in rows {
            let position = if p.prob_up > plan.threshold {
                1.0
            } else if plan.allow_short {
                -1.0
            } else {
                0.0
            };
            let cost = (position - previous).abs() * plan.cost_bps / 10_000.0;
            let r = position * p.next_return - cost;
            previous = position;
            strategy.push(r);
            benchmark.push(p.next_return);
            positions.push(position);
            let entry = per_date.entry(p.ts.as_str()).or_default();
            entry.0 += r;
            entry.1 += p.next_return;
            entry.2 += position;
            entry.3 += 1;
        }
        let owned: Vec<Prediction> = rows.iter().map(|p| (*p).clone()).collect();
        metrics.insert(
            symbol.to_string(),
            json!({
                "strategy": return_metrics(&strategy, &positions),
                "benchmark": return_metrics(&benchmark, &vec![1.0; benchmark.len()]),
                "predictions": classification(&owned, plan.threshold),
            }),
        );
    }
    // The peak starts at the starting wealth 1, as in `return_metrics`.
    let (mut strategy_equity, mut benchmark_equity, mut peak) = (1.0, 1.0, 1.0);
    let days: Vec<Day> = per_date
        .into_iter()
        .map(|(ts, (s, b, p, n))| {
            let (strategy, benchmark) = (s / n as f64, b / n as f64);
            strategy_equity *= 1.0 + strategy;
            benchmark_equity *= 1.0 + benchmark;
            peak = f64::max(peak, strategy_equity);
            Day {
                ts: ts.to_string(),
                strategy,
                benchmark,
                position: p / n as f64,
                strategy_equity,
                benchmark_equity,
                drawdown: strategy_equity / peak - 1.0,
            }
        })
        .collect();
    let strategy: Vec<f64> = days.iter().map(|d| d.strategy).collect();
    let benchmark: Vec<f64> = days.iter().map(|d| d.benchmark).collect();
    let positions: Vec<f64> = days.iter().map(|d| d.position).collect();
    metrics.insert(
        "portfolio".into(),
        json!({
            "strategy": return_metrics(&strategy, &positions),
            "benchmark": return_metrics(&benchmark, &vec![1.0; benchmark.len()]),
            "predictions": classification(predictions, plan.threshold),
        }),
    );
    Evaluation {
        days,
        metrics: Value::Object(metrics),
    }
}

/// Where the reports (one `run_<id>` folder each: `metrics.json`, `daily.csv`, `equity.svg`) go when the task's params name no folder.
pub const DEFAULT_REPORT_DIR: &str = "reports/backtest";

/// Runs the `backtest` task.
pub fn run(ctx: &TaskContext) -> Result<Value, HandlerError> {
    let market_db_path = PathBuf::from(param_str(ctx, "market_db", "data/market.db")?);
    let report_dir = PathBuf::from(param_str(ctx, "report_dir", DEFAULT_REPORT_DIR)?);
    let window = param_str(ctx, "window", "rolling")?;
    let model_kind = param_str(ctx, "model", "gbdt")?;
    if !["rolling", "expanding"].contains(&window) || !["gbdt", "logistic"].contains(&model_kind) {
        return Err(HandlerError::Fatal(format!(
            "params: window must be \"rolling\" or \"expanding\" (found \"{window}\"), model \"gbdt\" or \"logistic\" (found \"{model_kind}\")"
        )));
    }
    let d = Plan::default();
    let plan = Plan {
        train_days: ctx.param_u64("train_days", d.train_days as u64)?.max(50) as usize,
        expanding: window == "expanding",
        step_days: ctx.param_u64("step_days", d.step_days as u64)?.max(1) as usize,
        horizon: ctx.param_u64("horizon", d.horizon as u64)?.max(1) as usize,
        model: model_kind.to_string(),
        threshold: ctx.param_f64("threshold", d.threshold)?,
        allow_short: ctx.param_bool("allow_short", d.allow_short)?,
        cost_bps: ctx.param_f64("cost_bps", d.cost_bps)?,
        gbdt: nested_params(ctx, "gbdt")?,
        logistic: nested_params(ctx, "logistic")?,
    };
    let connection = market_db::open(&market_db_path).map_err(HandlerError::Retryable)?;
    let bars = load_bars(&connection)?;
    let predictions = walk_forward(&bars, &plan, |share| {
        ctx.progress(5.0 + 80.0 * share, "walk-forward")
    })
    .map_err(HandlerError::Fatal)?;
    let evaluation = evaluate(&predictions, &plan);
    let portfolio = &evaluation.metrics["portfolio"];
    let summary = format!(
        "{} → {}: strategy total {:+.2}% (Sharpe {:.2}, max drawdown {:.2}%), buy-and-hold {:+.2}% (Sharpe {:.2}, max drawdown {:.2}%); prediction accuracy {:.3}, AUC {:.3}",
        evaluation.days.first().map(|d| d.ts.as_str()).unwrap_or("-"),
        evaluation.days.last().map(|d| d.ts.as_str()).unwrap_or("-"),
        portfolio["strategy"]["total_return"].as_f64().unwrap_or(f64::NAN) * 100.0,
        portfolio["strategy"]["sharpe"].as_f64().unwrap_or(f64::NAN),
        portfolio["strategy"]["max_drawdown"].as_f64().unwrap_or(f64::NAN) * 100.0,
        portfolio["benchmark"]["total_return"].as_f64().unwrap_or(f64::NAN) * 100.0,
        portfolio["benchmark"]["sharpe"].as_f64().unwrap_or(f64::NAN),
        portfolio["benchmark"]["max_drawdown"].as_f64().unwrap_or(f64::NAN) * 100.0,
        portfolio["predictions"]["accuracy"].as_f64().unwrap_or(f64::NAN),
        portfolio["predictions"]["auc"].as_f64().unwrap_or(f64::NAN),
    );
    println!("{summary}");

    ctx.progress(90.0, "report");
    let folder = report_dir.join(format!("run_{}", ctx.run_id()));
    let report = json!({
        "run_id": ctx.run_id(), "plan": plan, "predictions": predictions.len(),
        "from": evaluation.days.first().map(|d| d.ts.clone()),
        "to": evaluation.days.last().map(|d| d.ts.clone()),
        "metrics": evaluation.metrics, "summary": summary,
    });
    write_atomically(
        &folder.join("metrics.json"),
        serde_json::to_string_pretty(&report)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    let mut csv = String::from(
        "date,strategy_return,benchmark_return,position,strategy_equity,benchmark_equity,strategy_drawdown\n",
    );
    for d in &evaluation.days {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{}\n",
            d.ts,
            d.strategy,
            d.benchmark,
            d.position,
            d.strategy_equity,
            d.benchmark_equity,
            d.drawdown
        ));
    }
    write_atomically(&folder.join("daily.csv"), csv.as_bytes())?;
    let chart = folder.join("equity.svg");
    let symbols: Vec<String> = bars.keys().cloned().collect();
    equity_chart(&chart, &evaluation.days, &symbols, portfolio).map_err(HandlerError::Retryable)?;

    connection
        .execute(
            "INSERT INTO backtests(run_id, created_at, plan, date_from, date_to, metrics, report)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                ctx.run_id(),
                Utc::now().to_rfc3339(),
                json!(plan).to_string(),
                report["from"].as_str(),
                report["to"].as_str(),
                evaluation.metrics.to_string(),
                folder.to_string_lossy()
            ],
        )
        .map_err(db)?;
    Ok(json!({
        "report_dir": folder, "chart": chart, "metrics_file": folder.join("metrics.json"),
        "predictions": predictions.len(),
        "from": report["from"], "to": report["to"], "summary": summary,
        "portfolio": evaluation.metrics["portfolio"],
    }))
}

/// Equity of strategy and buy-and-hold above, the strategy's drawdown below.
/// The equity and drawdown chart of the equal-weighted portfolio of `symbols`; `portfolio`
/// is its metrics (`strategy` and `benchmark`: `annual_return`, `sharpe`, `max_drawdown`),
/// put in the legend so the chart carries its headline figures.
fn equity_chart(
    path: &Path,
    days: &[Day],
    symbols: &[String],
    portfolio: &Value,
) -> Result<(), String> {
    use plotters::prelude::*;
    let headline = |name: &str, line: &str| {
        let m = &portfolio[line];
        let get = |key: &str| m[key].as_f64().unwrap_or(f64::NAN);
        format!(
            "{name}: CAGR {}, Sharpe {:.2}, max drawdown {}",
            percent(get("annual_return"), 1),
            get("sharpe"),
            percent(get("max_drawdown"), 1)
        )
    };
    let fail = |err: &dyn std::fmt::Display| format!("chart {}: {err}", path.display());
    let parse = |ts: &str| NaiveDate::parse_from_str(&ts[..10.min(ts.len())], "%Y-%m-%d").ok();
    let points: Vec<(NaiveDate, f64, f64, f64)> = days
        .iter()
        .filter_map(|d| {
            parse(&d.ts).map(|t| (t, d.strategy_equity, d.benchmark_equity, d.drawdown))
        })
        .collect();
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        return Err("no days to chart".into());
    };
    let top = points.iter().map(|p| p.1.max(p.2)).fold(1.0, f64::max) * 1.05;
    let bottom = points.iter().map(|p| p.1.min(p.2)).fold(1.0, f64::min) * 0.95;
    let deepest = points.iter().map(|p| p.3).fold(0.0, f64::min).min(-0.01) * 1.05;
    let dates: Vec<NaiveDate> = points.iter().map(|p| p.0).collect();
    let ticks = date_ticks(&dates);
    let tick_dates: Vec<NaiveDate> = ticks.iter().map(|(date, _)| *date).collect();
    let tick_label = |date: &NaiveDate| {
        ticks
            .iter()
            .find(|(tick, _)| tick == date)
            .map(|(_, label)| label.clone())
            .unwrap_or_default()
    };
    let root = SVGBackend::new(path, (1000, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let (upper, lower) = root.split_vertically(420);
    let mut equity = ChartBuilder::on(&upper)
        .caption(
            format!(
                "Equal-weighted portfolio of {}, walk-forward: strategy vs buy-and-hold",
                symbols.join(", ")
            ),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (first.0..last.0).with_key_points(tick_dates.clone()),
            bottom..top,
        )
        .map_err(|e| fail(&e))?;
    equity
        .configure_mesh()
        .x_label_formatter(&tick_label)
        .y_desc("growth of 1")
        .draw()
        .map_err(|e| fail(&e))?;
    equity
        .draw_series(LineSeries::new(
            points.iter().map(|p| (p.0, p.1)),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| fail(&e))?
        .label(headline("strategy", "strategy"))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    equity
        .draw_series(LineSeries::new(
            points.iter().map(|p| (p.0, p.2)),
            RGBColor(120, 120, 120),
        ))
        .map_err(|e| fail(&e))?
        .label(headline("buy-and-hold", "benchmark"))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RGBColor(120, 120, 120)));
    equity
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| fail(&e))?;
    let mut drawdown = ChartBuilder::on(&lower)
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d((first.0..last.0).with_key_points(tick_dates), deepest..0.0)
        .map_err(|e| fail(&e))?;
    drawdown
        .configure_mesh()
        .x_label_formatter(&tick_label)
        .y_desc("strategy drawdown")
        .y_label_formatter(&|v| percent(*v, 0))
        .draw()
        .map_err(|e| fail(&e))?;
    drawdown
        .draw_series(
            AreaSeries::new(points.iter().map(|p| (p.0, p.3)), 0.0, RED.mix(0.35))
                .border_style(RED),
        )
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}

/// The date axis' ticks for `dates` (in order): the first date of each year after the
/// first one's, labelled with the year ("2025"), so a tick falls on a year's first trading
/// day; only every second, fifth, tenth… year when there would be more than
/// [`MAX_DATE_TICKS`]. A series within one year gets its months' first dates instead
/// ("2025-03"; twelve at most).
fn date_ticks(dates: &[NaiveDate]) -> Vec<(NaiveDate, String)> {
    let starts = |key: fn(&NaiveDate) -> (i32, u32)| -> Vec<NaiveDate> {
        dates
            .windows(2)
            .filter(|pair| key(&pair[0]) != key(&pair[1]))
            .map(|pair| pair[1])
            .collect()
    };
    let years = starts(|d| (d.year(), 0));
    if years.is_empty() {
        let months = starts(|d| (d.year(), d.month()));
        return months
            .into_iter()
            .map(|d| (d, d.format("%Y-%m").to_string()))
            .collect();
    }
    let every = |step: i32| -> Vec<NaiveDate> {
        years
            .iter()
            .copied()
            .filter(|d| d.year().rem_euclid(step) == 0)
            .collect()
    };
    let kept = [1, 2, 5, 10, 20, 50, 100, 1000]
        .into_iter()
        .map(every)
        .find(|kept| kept.len() <= MAX_DATE_TICKS)
        .unwrap_or_default();
    kept.into_iter()
        .map(|d| (d, d.year().to_string()))
        .collect()
}

/// At most this many date labels on the equity chart's axis (1000 px wide).
const MAX_DATE_TICKS: usize = 20;

/// A share as a percentage with `decimals`, never "-0%": a value that rounds to zero is 0.
fn percent(share: f64, decimals: usize) -> String {
    let text = format!("{:.*}%", decimals, share * 100.0);
    match text.strip_prefix('-') {
        Some(rest) if rest.chars().all(|c| matches!(c, '0' | '.' | '%')) => rest.to_string(),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_equity_chart_says_what_it_shows_and_carries_the_headline_metrics_without_minus_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("equity.svg");
        let day = |ts: &str, equity: f64, drawdown: f64| Day {
            ts: ts.into(),
            strategy: 0.0,
            benchmark: 0.0,
            position: 1.0,
            strategy_equity: equity,
            benchmark_equity: 1.0,
            drawdown,
        };
        let days = [
            day("2017-01-03", 1.0, 0.0),
            day("2017-06-30", 0.9995, -0.0005),
            day("2018-12-31", 1.2, 0.0),
        ];
        let metrics = json!({
            "strategy": { "annual_return": 0.0954, "sharpe": 0.81, "max_drawdown": -0.1234 },
            "benchmark": { "annual_return": 0.05, "sharpe": 0.4, "max_drawdown": -0.2 },
        });
        let symbols = ["IXIC".to_string(), "SPX".to_string()];
        equity_chart(&path, &days, &symbols, &metrics).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        for text in [
            "Equal-weighted portfolio of IXIC, SPX, walk-forward: strategy vs buy-and-hold",
            "strategy: CAGR 9.5%, Sharpe 0.81, max drawdown -12.3%",
            "buy-and-hold: CAGR 5.0%, Sharpe 0.40, max drawdown -20.0%",
        ] {
            assert!(svg.contains(text), "{text}: {svg}");
        }
        assert!(!svg.contains(">-0%<"), "{svg}");
    }

    /// Trading days from `from` to `to`: weekdays but New Year's Day.
    fn trading_days(from: &str, to: &str) -> Vec<NaiveDate> {
        let parse = |d: &str| NaiveDate::parse_from_str(d, "%Y-%m-%d").unwrap();
        parse(from)
            .iter_days()
            .take_while(|d| *d <= parse(to))
            .filter(|d| d.weekday().number_from_monday() <= 5)
            .filter(|d| !(d.month() == 1 && d.day() == 1))
            .collect()
    }

    fn check_ticks(from: &str, to: &str, expected: &[(&str, &str)]) {
        let ticks: Vec<(String, String)> = date_ticks(&trading_days(from, to))
            .into_iter()
            .map(|(date, label)| (date.to_string(), label))
            .collect();
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(date, label)| (date.to_string(), label.to_string()))
            .collect();
        assert_eq!(ticks, expected);
    }

    #[test]
    fn date_ticks_fall_on_each_years_first_trading_day_and_say_the_year() {
        // 2024-01-01 (Monday) and 2025-01-01 (Wednesday) are holidays.
        check_ticks(
            "2023-10-02",
            "2025-03-31",
            &[("2024-01-02", "2024"), ("2025-01-02", "2025")],
        );
        // 2022-01-01 is a Saturday: the first trading day is Monday the 3rd.
        check_ticks("2021-07-01", "2022-06-30", &[("2022-01-03", "2022")]);
        // A series that opens on a year's first trading day gets no tick there: it is
        // the axis' start, and a later series start would not be a year boundary at all.
        check_ticks(
            "2024-01-02",
            "2024-12-31",
            &[
                ("2024-02-01", "2024-02"),
                ("2024-03-01", "2024-03"),
                ("2024-04-01", "2024-04"),
                ("2024-05-01", "2024-05"),
                ("2024-06-03", "2024-06"),
                ("2024-07-01", "2024-07"),
                ("2024-08-01", "2024-08"),
                ("2024-09-02", "2024-09"),
                ("2024-10-01", "2024-10"),
                ("2024-11-01", "2024-11"),
                ("2024-12-02", "2024-12"),
            ],
        );
    }

    #[test]
    fn date_ticks_over_decades_keep_every_second_year_at_most_twenty() {
        let ticks = date_ticks(&trading_days("1990-03-01", "2025-03-31"));
        let labels: Vec<&str> = ticks.iter().map(|(_, label)| label.as_str()).collect();
        let even: Vec<String> = (1992..=2024).step_by(2).map(|y| y.to_string()).collect();
        assert_eq!(labels, even);
        assert!(ticks.len() <= MAX_DATE_TICKS);
        assert_eq!(ticks[0].0.to_string(), "1992-01-02");
    }

    /// Days of a flat chart over `dates`.
    fn flat_days(dates: &[NaiveDate]) -> Vec<Day> {
        dates
            .iter()
            .enumerate()
            .map(|(i, date)| Day {
                ts: date.to_string(),
                strategy: 0.0,
                benchmark: 0.0,
                position: 1.0,
                strategy_equity: 1.0 + 0.001 * i as f64,
                benchmark_equity: 1.0 - 0.0005 * i as f64,
                drawdown: -0.02 * (i % 7) as f64 / 7.0,
            })
            .collect()
    }

    fn headline_metrics() -> Value {
        json!({
            "strategy": { "annual_return": 0.0954, "sharpe": 0.81, "max_drawdown": -0.1234 },
            "benchmark": { "annual_return": 0.05, "sharpe": 0.4, "max_drawdown": -0.2 },
        })
    }

    #[test]
    fn the_equity_charts_date_axes_are_labelled_with_the_years_it_crosses_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("equity.svg");
        let days = flat_days(&trading_days("2023-10-02", "2025-03-31"));
        equity_chart(&path, &days, &["SPX".to_string()], &headline_metrics()).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        // Date-like labels: digits and dashes only (the value axes have "." or "%").
        let dates: Vec<String> = super::super::chart_check::texts(&svg)
            .into_iter()
            .filter(|t| t.len() >= 4 && t.chars().all(|c| c.is_ascii_digit() || c == '-'))
            .collect();
        // Once under the equity panel, once under the drawdown panel.
        assert_eq!(dates, ["2024", "2025", "2024", "2025"], "{svg}");
    }

    #[test]
    fn the_equity_chart_renders_as_a_png_of_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("equity.svg");
        let days = flat_days(&trading_days("2016-01-04", "2018-12-31"));
        let symbols = ["IXIC".to_string(), "SPX".to_string()];
        equity_chart(&path, &days, &symbols, &headline_metrics()).unwrap();
        super::super::chart_check::check_renders_as_png(&path, (1000, 620), 20_000);
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn return_metrics_on_a_short_series_worked_by_hand() {
        let r = [0.10, -0.05, 0.02, -0.10, 0.05];
        let m = return_metrics(&r, &[1.0, 1.0, 0.0, 1.0, 1.0]);
        // Wealth: 1.1, 1.045, 1.0659, 0.95931, 1.0072755.
        assert!(close(m.total_return, 0.0072755));
        assert!(close(m.annual_return, 1.0072755f64.powf(252.0 / 5.0) - 1.0));
        // mean 0.004; deviations 0.096, −0.054, 0.016, −0.104, 0.046; Σd² = 0.02532; s² = 0.00633.
        let s = 0.00633f64.sqrt();
        assert!(close(m.annual_volatility, s * 252f64.sqrt()));
        assert!(close(m.sharpe, 0.004 / s * 252f64.sqrt()));
        // Downside: √((0.0025 + 0.01) / 5) · √252.
        let downside = (0.0125f64 / 5.0).sqrt() * 252f64.sqrt();
        assert!(close(m.sortino, 0.004 * 252.0 / downside));
        // Peak 1.1 then trough 0.95931: 0.95931 / 1.1 − 1.
        assert!(close(m.max_drawdown, 0.95931 / 1.1 - 1.0));
        assert!(close(m.calmar, m.annual_return / (1.0 - 0.95931 / 1.1)));
        // In the market on days 0, 1, 3, 4; positive on 0 and 4.
        assert!(close(m.hit_rate, 0.5));
        // 0→1 (entry), 1→0, 0→1: three changes, |Δ| sum 3 over 5 days.
        assert_eq!(m.trades, 3);
        assert!(close(m.turnover, 0.6));
        assert!(close(m.exposure, 0.8));
    }

    fn relative_close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs()
    }

    /// Issue 14, item 1: the running peak starts at the starting wealth W₀ = 1, as
    /// empyrical's `max_drawdown` does (it prepends the starting value to the cumulative
    /// returns before the running maximum).
    #[test]
    fn max_drawdown_counts_from_the_starting_wealth_on_a_three_day_series() {
        let m = return_metrics(&[-0.01, 0.02, 0.01], &[1.0; 3]);
        // Wealth 1 → 0.99 → 1.0098 → 1.019898: the trough 0.99 is 1% below W₀ = 1, and
        // the new highs after it draw nothing down.
        assert!(close(m.max_drawdown, -0.01), "{m:?}");
        // Calmar = annual return / |max drawdown|, annual return = 1.019898^(252/3) − 1
        // = 1.019898^84 − 1 = 4.23318601270346759… (50-digit decimal arithmetic), so
        // Calmar = 423.318601270346759…
        let annual = 1.019898f64.powf(84.0) - 1.0;
        assert!(relative_close(m.annual_return, annual), "{m:?}");
        assert!(relative_close(m.calmar, annual / 0.01), "{m:?}");
        assert!((m.calmar - 423.318_601_270_346_76).abs() < 1e-9, "{m:?}");
    }

    #[test]
    fn a_series_opening_with_a_loss_draws_down_from_one_until_it_regains_it() {
        let r = [-0.10, 0.05, -0.10, 0.20];
        let m = return_metrics(&r, &[1.0; 4]);
        // Wealth 0.9, 0.945, 0.8505, 1.0206: 1 is not regained before the trough 0.8505,
        // so the drawdown is 0.8505 / 1 − 1 = −0.1495 (not 0.8505 / 0.945 − 1 = −0.1).
        assert!(close(m.max_drawdown, -0.1495), "{m:?}");
        // Annual return 1.0206^(252/4) − 1 = 1.0206^63 − 1 = 2.61327096941424404…;
        // Calmar = 2.61327096941424404… / 0.1495 = 17.4800733740083213…
        assert!(relative_close(
            m.calmar,
            (1.0206f64.powi(63) - 1.0) / 0.1495
        ));
        assert!((m.calmar - 17.480_073_374_008_32).abs() < 1e-10, "{m:?}");

        // The per-day drawdown of `evaluate` (daily.csv and the chart) counts from 1 too.
        let predictions: Vec<Prediction> = ["2020-01-01", "2020-01-02", "2020-01-03", "2020-01-06"]
            .iter()
            .zip(r)
            .map(|(ts, next_return)| Prediction {
                symbol: "X".into(),
                ts: ts.to_string(),
                prob_up: 0.9,
                up: next_return > 0.0,
                next_return,
            })
            .collect();
        let plan = Plan {
            cost_bps: 0.0,
            ..Plan::default()
        };
        let e = evaluate(&predictions, &plan);
        let drawdown: Vec<f64> = e.days.iter().map(|d| d.drawdown).collect();
        for (found, expected) in drawdown.iter().zip([-0.1, -0.055, -0.1495, 0.0]) {
            assert!(close(*found, expected), "{drawdown:?}");
        }
        let portfolio = e.metrics["portfolio"]["strategy"]["max_drawdown"].as_f64();
        assert!(
            portfolio.is_some_and(|d| close(d, -0.1495)),
            "{portfolio:?}"
        );
    }

    #[test]
    fn costs_are_charged_per_position_change_and_the_confusion_matrix_counts_outcomes() {
        let p = |ts: &str, prob: f64, up: bool, r: f64| Prediction {
            symbol: "X".into(),
            ts: ts.into(),
            prob_up: prob,
            up,
            next_return: r,
        };
        let predictions = [
            p("2020-01-01", 0.7, true, 0.01),   // long, enter: cost 10 bp
            p("2020-01-02", 0.6, false, -0.02), // long, hold
            p("2020-01-03", 0.4, true, 0.03),   // flat, exit: cost 10 bp
            p("2020-01-06", 0.2, false, -0.01), // flat
        ];
        let plan = Plan {
            cost_bps: 10.0,
            ..Plan::default()
        };
        let e = evaluate(&predictions, &plan);
        let strategy: Vec<f64> = e.days.iter().map(|d| d.strategy).collect();
        assert!(close(strategy[0], 0.01 - 0.001));
        assert!(close(strategy[1], -0.02));
        assert!(close(strategy[2], -0.001));
        assert!(close(strategy[3], 0.0));
        let c = &e.metrics["X"]["predictions"];
        assert_eq!(
            (c["true_positive"].as_u64(), c["false_positive"].as_u64()),
            (Some(1), Some(1))
        );
        assert_eq!(
            (c["true_negative"].as_u64(), c["false_negative"].as_u64()),
            (Some(1), Some(1))
        );
        assert_eq!(c["precision_up"].as_f64(), Some(0.5));
        assert_eq!(c["recall_up"].as_f64(), Some(0.5));
    }
}
