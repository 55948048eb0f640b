//! Features per symbol and day, computed from that day's bar and earlier ones only, and
//! the label. Shared by training, predictions, and later backtest and drift.
//!
//! The indicators are small pure functions over a series (each returns one value per
//! input position, `None` while it has too little history), so each can be checked by
//! hand; [`compute`] assembles them. Conventions, so results can be reproduced elsewhere:
//! - `ret_n` = close_t / close_{t−n} − 1; `log_ret_1` = ln(close_t / close_{t−1});
//! - `close_sma_n` = close_t / SMA_n(close)_t; `close_ema_n` = close_t / EMA_n(close)_t with
//!   α = 2/(n+1), seeded with the first close;
//! - `macd` = (EMA_12 − EMA_26)_t / close_t; `macd_signal` = EMA_9 of `macd`;
//! - `rsi_14`: Wilder — the first average gain and loss are the means of the first 14
//!   changes, then avg = (avg·13 + current)/14; RSI = 100 − 100/(1 + gain/loss), 100 when
//!   there was no loss;
//! - `bb_pct_b_20` = (close − lower)/(upper − lower), bands SMA_20 ± 2σ, σ the population
//!   standard deviation of the 20 closes;
//! - `atr_14` = ATR_14 / close, ATR by Wilder over true ranges
//!   max(high − low, |high − close_{t−1}|, |low − close_{t−1}|), the first ATR the mean of
//!   the first 14;
//! - `vol_20` = sample standard deviation of the last 20 daily log returns × √252;
//! - `volume_z_20` = (volume_t − mean)/σ over the last 20 volumes (population σ; 0 when σ = 0);
//! - `day_of_week` = 0 (Monday) … 6;
//! - label: 1 when close_{t+horizon} > close_t, 0 otherwise, none for the last `horizon` days.
//!
//! A row is emitted once every feature is defined (from the 50th bar on).

use chrono::{Datelike, NaiveDate};

/// One bar of one symbol, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    /// `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM:SS`.
    pub ts: String,
    /// Open.
    pub open: f64,
    /// High.
    pub high: f64,
    /// Low.
    pub low: f64,
    /// Close.
    pub close: f64,
    /// Volume.
    pub volume: f64,
}

/// The feature names, in column order.
pub const NAMES: [&str; 18] = [
    "ret_1",
    "ret_5",
    "ret_10",
    "ret_20",
    "log_ret_1",
    "close_sma_5",
    "close_sma_20",
    "close_sma_50",
    "close_ema_12",
    "close_ema_26",
    "macd",
    "macd_signal",
    "rsi_14",
    "bb_pct_b_20",
    "atr_14",
    "vol_20",
    "volume_z_20",
    "day_of_week",
];

/// The features of one symbol on one day.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The bar's time.
    pub ts: String,
    /// Values in [`NAMES`] order.
    pub values: [f64; NAMES.len()],
    /// Whether the close `horizon` bars later is higher; `None` at the end of the series.
    pub label: Option<bool>,
}

/// Feature rows of one symbol's bars (oldest first), with labels `horizon` bars ahead.
pub fn compute(bars: &[Bar], horizon: usize) -> Vec<Row> {
    let close: Vec<f64> = bars.iter().map(|b| b.close).collect();
    let high: Vec<f64> = bars.iter().map(|b| b.high).collect();
    let low: Vec<f64> = bars.iter().map(|b| b.low).collect();
    let volume: Vec<f64> = bars.iter().map(|b| b.volume).collect();
    let log_returns: Vec<Option<f64>> = (0..close.len())
        .map(|t| (t >= 1).then(|| (close[t] / close[t - 1]).ln()))
        .collect();
    let ema12 = ema(&close, 12);
    let ema26 = ema(&close, 26);
    let macd: Vec<f64> = (0..close.len())
        .map(|t| (ema12[t] - ema26[t]) / close[t])
        .collect();
    let signal = ema(&macd, 9);
    let columns: Vec<Vec<Option<f64>>> = vec![
        returns(&close, 1),
        returns(&close, 5),
        returns(&close, 10),
        returns(&close, 20),
        log_returns.clone(),
        ratio(&close, &sma(&close, 5)),
        ratio(&close, &sma(&close, 20)),
        ratio(&close, &sma(&close, 50)),
        close.iter().zip(&ema12).map(|(c, e)| Some(c / e)).collect(),
        close.iter().zip(&ema26).map(|(c, e)| Some(c / e)).collect(),
        macd.iter().map(|m| Some(*m)).collect(),
        signal.iter().map(|s| Some(*s)).collect(),
        rsi_wilder(&close, 14),
        percent_b(&close, 20, 2.0),
        atr_wilder(&high, &low, &close, 14)
            .iter()
            .zip(&close)
            .map(|(atr, c)| atr.map(|atr| atr / c))
            .collect(),
        realised_volatility(&log_returns, 20),
        zscore(&volume, 20),
        bars.iter().map(|b| day_of_week(&b.ts)).collect(),
    ];
    let mut rows = Vec::new();
    for t in 0..bars.len() {
        let mut values = [0.0; NAMES.len()];
        let mut complete = true;
        for (slot, column) in values.iter_mut().zip(&columns) {
            match column[t] {
                Some(value) if value.is_finite() => *slot = value,
                _ => complete = false,
            }
        }
        if complete {
            let label = close.get(t + horizon.max(1)).map(|later| *later > close[t]);
            rows.push(Row {
                ts: bars[t].ts.clone(),
                values,
                label,
            });
        }
    }
    rows
}

/// close_t / close_{t−n} − 1.
pub fn returns(close: &[f64], n: usize) -> Vec<Option<f64>> {
    (0..close.len())
        .map(|t| (t >= n).then(|| close[t] / close[t - n] - 1.0))
        .collect()
}

/// Simple moving average over the last `n` values, the current one included.
pub fn sma(values: &[f64], n: usize) -> Vec<Option<f64>> {
    let mut out = Vec::with_capacity(values.len());
    let mut sum = 0.0;
    for t in 0..values.len() {
        sum += values[t];
        if t >= n {
            sum -= values[t - n];
        }
        out.push((t + 1 >= n).then(|| sum / n as f64));
    }
    out
}

/// Exponential moving average, α = 2/(n+1), seeded with the first value.
pub fn ema(values: &[f64], n: usize) -> Vec<f64> {
    let alpha = 2.0 / (n as f64 + 1.0);
    let mut out = Vec::with_capacity(values.len());
    let mut current = values.first().copied().unwrap_or(0.0);
    for value in values {
        current = alpha * value + (1.0 - alpha) * current;
        out.push(current);
    }
    out
}

/// Wilder's RSI over `n` changes.
pub fn rsi_wilder(close: &[f64], n: usize) -> Vec<Option<f64>> {
    let mut out = vec![None; close.len()];
    if close.len() <= n {
        return out;
    }
    let change = |t: usize| close[t] - close[t - 1];
    let (mut gain, mut loss) = (0.0, 0.0);
    for t in 1..=n {
        gain += change(t).max(0.0);
        loss += (-change(t)).max(0.0);
    }
    gain /= n as f64;
    loss /= n as f64;
    let rsi = |gain: f64, loss: f64| {
        if loss == 0.0 {
            100.0
        } else {
            100.0 - 100.0 / (1.0 + gain / loss)
        }
    };
    out[n] = Some(rsi(gain, loss));
    for (t, slot) in out.iter_mut().enumerate().skip(n + 1) {
        gain = (gain * (n as f64 - 1.0) + change(t).max(0.0)) / n as f64;
        loss = (loss * (n as f64 - 1.0) + (-change(t)).max(0.0)) / n as f64;
        *slot = Some(rsi(gain, loss));
    }
    out
}

/// Wilder's average true range over `n` true ranges.
pub fn atr_wilder(high: &[f64], low: &[f64], close: &[f64], n: usize) -> Vec<Option<f64>> {
    let mut out = vec![None; close.len()];
    if close.len() <= n {
        return out;
    }
    let true_range = |t: usize| {
        (high[t] - low[t])
            .max((high[t] - close[t - 1]).abs())
            .max((low[t] - close[t - 1]).abs())
    };
    let mut atr = (1..=n).map(true_range).sum::<f64>() / n as f64;
    out[n] = Some(atr);
    for (t, slot) in out.iter_mut().enumerate().skip(n + 1) {
        atr = (atr * (n as f64 - 1.0) + true_range(t)) / n as f64;
        *slot = Some(atr);
    }
    out
}

/// Bollinger %B: (close − lower)/(upper − lower) with bands SMA ± k·σ (population σ).
pub fn percent_b(close: &[f64], n: usize, k: f64) -> Vec<Option<f64>> {
    (0..close.len())
        .map(|t| {
            if t + 1 < n {
                return None;
            }
            let window = &close[t + 1 - n..=t];
            let mean = window.iter().sum::<f64>() / n as f64;
            let sigma = (window.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
            let (lower, upper) = (mean - k * sigma, mean + k * sigma);
            (upper > lower).then(|| (close[t] - lower) / (upper - lower))
        })
        .collect()
}

/// Sample standard deviation of the last `n` log returns, annualised by √252.
pub fn realised_volatility(log_returns: &[Option<f64>], n: usize) -> Vec<Option<f64>> {
    (0..log_returns.len())
        .map(|t| {
            if t + 1 < n {
                return None;
            }
            let window: Option<Vec<f64>> = log_returns[t + 1 - n..=t].iter().copied().collect();
            let window = window?;
            let mean = window.iter().sum::<f64>() / n as f64;
            let variance =
                window.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n as f64 - 1.0);
            Some(variance.sqrt() * 252f64.sqrt())
        })
        .collect()
}

/// (value − mean)/σ over the last `n` values (population σ; 0 when σ is 0).
pub fn zscore(values: &[f64], n: usize) -> Vec<Option<f64>> {
    (0..values.len())
        .map(|t| {
            if t + 1 < n {
                return None;
            }
            let window = &values[t + 1 - n..=t];
            let mean = window.iter().sum::<f64>() / n as f64;
            let sigma = (window.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
            Some(if sigma > 0.0 {
                (values[t] - mean) / sigma
            } else {
                0.0
            })
        })
        .collect()
}

fn ratio(numerator: &[f64], denominator: &[Option<f64>]) -> Vec<Option<f64>> {
    numerator
        .iter()
        .zip(denominator)
        .map(|(n, d)| d.filter(|d| *d != 0.0).map(|d| n / d))
        .collect()
}

fn day_of_week(ts: &str) -> Option<f64> {
    NaiveDate::parse_from_str(ts.get(..10)?, "%Y-%m-%d")
        .ok()
        .map(|d| f64::from(d.weekday().num_days_from_monday()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close_eq(a: Option<f64>, b: f64) {
        let a = a.unwrap_or(f64::NAN);
        assert!((a - b).abs() < 1e-9, "{a} != {b}");
    }

    fn bars(closes: &[f64]) -> Vec<Bar> {
        let start = NaiveDate::from_ymd_opt(2024, 1, 1).unwrap();
        closes
            .iter()
            .enumerate()
            .map(|(i, c)| Bar {
                ts: (start + chrono::Duration::days(i as i64))
                    .format("%Y-%m-%d")
                    .to_string(),
                open: *c,
                high: c + 1.0,
                low: c - 1.0,
                close: *c,
                volume: 1000.0 + i as f64,
            })
            .collect()
    }

    #[test]
    fn sma_by_hand() {
        let closes: Vec<f64> = (1..=10).map(f64::from).collect();
        let sma5 = sma(&closes, 5);
        assert_eq!(sma5[3], None, "too little history");
        close_eq(sma5[4], 3.0); // (1+2+3+4+5)/5
        close_eq(sma5[9], 8.0); // (6+7+8+9+10)/5
    }

    #[test]
    fn rsi_by_hand() {
        // 14 changes: ten of +1, then four of −1; then a +2.
        let mut closes = vec![100.0];
        for step in [
            1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, 2.0,
        ] {
            closes.push(closes.last().unwrap() + step);
        }
        let rsi = rsi_wilder(&closes, 14);
        assert_eq!(rsi[13], None);
        // avg gain 10/14, avg loss 4/14 → RS 2.5 → RSI 100 − 100/3.5
        close_eq(rsi[14], 100.0 - 100.0 / 3.5);
        // Wilder: gain (10/14·13 + 2)/14, loss (4/14·13 + 0)/14
        let gain = (10.0 / 14.0 * 13.0 + 2.0) / 14.0;
        let loss = (4.0 / 14.0 * 13.0) / 14.0;
        close_eq(rsi[15], 100.0 - 100.0 / (1.0 + gain / loss));
        let only_up: Vec<f64> = (0..20).map(f64::from).collect();
        close_eq(rsi_wilder(&only_up, 14)[19], 100.0);
    }

    #[test]
    fn atr_by_hand() {
        // Closes 10, 11, …; high = close + 1, low = close − 1, except a gap on day 3.
        let close: Vec<f64> = (0..17).map(|i| 10.0 + f64::from(i)).collect();
        let mut high: Vec<f64> = close.iter().map(|c| c + 1.0).collect();
        let mut low: Vec<f64> = close.iter().map(|c| c - 1.0).collect();
        // Day 3 opens far above day 2's close (12): high 20, low 18 → TR = |20 − 12| = 8.
        high[3] = 20.0;
        low[3] = 18.0;
        // Every other true range is max(2, |c+1 − (c−1)|) = 2.
        let atr = atr_wilder(&high, &low, &close, 14);
        assert_eq!(atr[13], None);
        close_eq(atr[14], (13.0 * 2.0 + 8.0) / 14.0);
        // Day 4: high 15, low 13, previous close 13 → TR 2.
        close_eq(atr[15], (atr[14].unwrap() * 13.0 + 2.0) / 14.0);
    }

    #[test]
    fn percent_b_and_zscore_by_hand() {
        let closes = [1.0, 2.0, 3.0, 4.0, 5.0];
        // mean 3, population σ √2; bands 3 ± 2√2; close 5 → (5 − 3 + 2√2)/(4√2)
        let sigma = 2f64.sqrt();
        close_eq(
            percent_b(&closes, 5, 2.0)[4],
            (5.0 - (3.0 - 2.0 * sigma)) / (4.0 * sigma),
        );
        close_eq(zscore(&closes, 5)[4], (5.0 - 3.0) / sigma);
        close_eq(zscore(&[7.0; 5], 5)[4], 0.0);
    }

    #[test]
    fn rows_start_when_every_feature_is_defined_and_labels_look_ahead_by_the_horizon() {
        let closes: Vec<f64> = (0..60)
            .map(|i| 100.0 + f64::from(i % 7) - f64::from(i % 3))
            .collect();
        let rows = compute(&bars(&closes), 1);
        assert_eq!(
            rows.first().unwrap().ts,
            bars(&closes)[49].ts,
            "SMA 50 needs 50 bars"
        );
        assert_eq!(rows.len(), 11);
        assert_eq!(
            rows.last().unwrap().label,
            None,
            "no close after the last bar"
        );
        assert_eq!(rows[0].label, Some(closes[50] > closes[49]));
        let rows3 = compute(&bars(&closes), 3);
        assert_eq!(rows3[0].label, Some(closes[52] > closes[49]));
        assert_eq!(rows3.iter().filter(|r| r.label.is_none()).count(), 3);
        // 2024-02-19 (bar 49) is a Monday.
        assert_eq!(rows[0].values[NAMES.len() - 1], 0.0);
    }

    #[test]
    fn no_feature_at_day_t_changes_when_later_bars_change() {
        let closes: Vec<f64> = (0..120)
            .map(|i| 100.0 + (f64::from(i) * 0.37).sin() * 5.0 + f64::from(i) * 0.1)
            .collect();
        let original = bars(&closes);
        let before = compute(&original, 1);
        for t in [60usize, 85, 110] {
            let mut changed = original.clone();
            for bar in changed.iter_mut().skip(t + 1) {
                bar.close *= 1.5;
                bar.high = bar.close + 3.0;
                bar.low = bar.close - 3.0;
                bar.volume *= 7.0;
            }
            let after = compute(&changed, 1);
            for (old, new) in before.iter().zip(&after) {
                if old.ts <= original[t].ts {
                    assert_eq!(
                        old.values, new.values,
                        "feature at {} changed when bars after {} changed",
                        old.ts, original[t].ts
                    );
                }
            }
        }
    }
}
