//! The classifiers behind one [`Model`] trait: a gradient-boosted tree ensemble
//! ([`Gbdt`], `forust-ml`, log loss, exact TreeSHAP) and a logistic-regression baseline
//! ([`Logistic`], SHAP = coef × (x − mean)). Both speak the model's raw output, the log-odds
//! of "up"; a probability is `sigmoid(raw)`.
//!
//! Invariant (local accuracy, tested): for every row, Σ SHAP + expected value = raw output.

use forust_ml::gradientbooster::ContributionsMethod;
use forust_ml::objective::ObjectiveType;
use forust_ml::{GradientBooster, Matrix};
use serde::{Deserialize, Serialize};

/// A feature table, column-major: `columns[j][i]` is feature `j` of row `i`.
#[derive(Debug, Clone, Default)]
pub struct Table {
    /// One vector per feature, all of the same length.
    pub columns: Vec<Vec<f64>>,
}

impl Table {
    /// An empty table with `cols` features.
    pub fn with_columns(cols: usize) -> Table {
        Table {
            columns: vec![Vec::new(); cols],
        }
    }

    /// Appends one row.
    pub fn push(&mut self, row: &[f64]) {
        for (column, value) in self.columns.iter_mut().zip(row) {
            column.push(*value);
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.columns.first().map_or(0, Vec::len)
    }

    /// Number of features.
    pub fn cols(&self) -> usize {
        self.columns.len()
    }

    /// Row `i` as a vector.
    pub fn row(&self, i: usize) -> Vec<f64> {
        self.columns.iter().map(|c| c[i]).collect()
    }

    /// The rows at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Table {
        Table {
            columns: self
                .columns
                .iter()
                .map(|c| indices.iter().map(|&i| c[i]).collect())
                .collect(),
        }
    }

    fn flat(&self) -> Vec<f64> {
        self.columns.concat()
    }
}

/// SHAP values for a set of rows.
#[derive(Debug, Clone)]
pub struct Explanation {
    /// The model's expected raw output (the SHAP base value).
    pub expected_value: f64,
    /// `values[i][j]`: the contribution of feature `j` to row `i`'s raw output.
    pub values: Vec<Vec<f64>>,
}

/// A binary classifier of "up".
pub trait Model {
    /// `gbdt` or `logistic`.
    fn kind(&self) -> &'static str;
    /// Fits on `x` with labels 0/1.
    fn fit(&mut self, x: &Table, y: &[f64]) -> Result<(), String>;
    /// Raw outputs (log-odds), one per row.
    fn raw(&self, x: &Table) -> Vec<f64>;
    /// Exact SHAP values of the raw output.
    fn explain(&self, x: &Table) -> Explanation;
    /// The artifact: everything needed to predict again.
    fn to_json(&self) -> Result<String, String>;
    /// The parameters it was built with.
    fn params(&self) -> serde_json::Value;
}

/// P(up) from a raw output.
pub fn sigmoid(raw: f64) -> f64 {
    1.0 / (1.0 + (-raw).exp())
}

/// Loads an artifact written by [`Model::to_json`].
pub fn load(kind: &str, json: &str) -> Result<Box<dyn Model>, String> {
    match kind {
        "gbdt" => {
            let booster =
                GradientBooster::from_json(json).map_err(|err| format!("gbdt artifact: {err}"))?;
            let params = booster
                .get_metadata(&PARAMS_KEY.to_string())
                .and_then(|p| serde_json::from_str(&p).ok())
                .unwrap_or_default();
            Ok(Box::new(Gbdt { params, booster }))
        }
        "logistic" => {
            let model: Logistic =
                serde_json::from_str(json).map_err(|err| format!("logistic artifact: {err}"))?;
            Ok(Box::new(model))
        }
        other => Err(format!(
            "unknown model kind \"{other}\" (expected gbdt or logistic)"
        )),
    }
}

/// The booster metadata key that carries [`GbdtParams`] inside the artifact.
const PARAMS_KEY: &str = "turbosched_params";

/// Gradient-boosting parameters (the `train` task's `gbdt` params).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GbdtParams {
    /// Number of trees.
    pub iterations: usize,
    /// Shrinkage.
    pub learning_rate: f32,
    /// Maximum tree depth.
    pub max_depth: usize,
    /// L2 regularisation on leaf weights.
    pub l2: f32,
    /// Minimum hessian sum in a leaf.
    pub min_leaf_weight: f32,
    /// Histogram bins per feature.
    pub nbins: u16,
    /// Seed of the booster's sampling.
    pub seed: u64,
}

impl Default for GbdtParams {
    fn default() -> Self {
        GbdtParams {
            iterations: 100,
            learning_rate: 0.05,
            max_depth: 3,
            l2: 1.0,
            min_leaf_weight: 20.0,
            nbins: 256,
            seed: 42,
        }
    }
}

/// The gradient-boosted tree classifier.
pub struct Gbdt {
    params: GbdtParams,
    booster: GradientBooster,
}

impl Gbdt {
    /// An unfitted model.
    pub fn new(params: GbdtParams) -> Gbdt {
        Gbdt {
            params,
            booster: GradientBooster::default(),
        }
    }
}

impl Model for Gbdt {
    fn kind(&self) -> &'static str {
        "gbdt"
    }

    fn fit(&mut self, x: &Table, y: &[f64]) -> Result<(), String> {
        let p = &self.params;
        let mut booster = GradientBooster::default()
            .set_objective_type(ObjectiveType::LogLoss)
            .set_iterations(p.iterations)
            .set_learning_rate(p.learning_rate)
            .set_max_depth(p.max_depth)
            .set_l2(p.l2)
            .set_min_leaf_weight(p.min_leaf_weight)
            .set_nbins(p.nbins)
            .set_seed(p.seed)
            .set_parallel(true);
        let flat = x.flat();
        let matrix = Matrix::new(&flat, x.rows(), x.cols());
        booster
            .fit_unweighted(&matrix, y, None)
            .map_err(|err| format!("gbdt fit: {err}"))?;
        booster.insert_metadata(
            PARAMS_KEY.into(),
            serde_json::to_string(p).unwrap_or_default(),
        );
        self.booster = booster;
        Ok(())
    }

    fn raw(&self, x: &Table) -> Vec<f64> {
        let flat = x.flat();
        self.booster
            .predict(&Matrix::new(&flat, x.rows(), x.cols()), true)
    }

    fn explain(&self, x: &Table) -> Explanation {
        let flat = x.flat();
        let contributions = self.booster.predict_contributions(
            &Matrix::new(&flat, x.rows(), x.cols()),
            ContributionsMethod::Shapley,
            true,
        );
        // Row-major, `cols + 1` per row, the last being the bias: the expected value.
        let width = x.cols() + 1;
        let expected_value = contributions.get(x.cols()).copied().unwrap_or(0.0);
        let values = contributions
            .chunks(width)
            .map(|row| row[..x.cols()].to_vec())
            .collect();
        Explanation {
            expected_value,
            values,
        }
    }

    fn to_json(&self) -> Result<String, String> {
        self.booster
            .json_dump()
            .map_err(|err| format!("gbdt artifact: {err}"))
    }

    fn params(&self) -> serde_json::Value {
        serde_json::to_value(&self.params).unwrap_or_default()
    }
}

/// Logistic-regression parameters (the `train` task's `logistic` params).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogisticParams {
    /// L2 penalty on the standardised coefficients.
    pub l2: f64,
    /// Newton steps (each solves the exact penalised system).
    pub iterations: usize,
}

impl Default for LogisticParams {
    fn default() -> Self {
        LogisticParams {
            l2: 1.0,
            iterations: 25,
        }
    }
}

/// L2-penalised logistic regression on standardised features, fitted by Newton's method.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Logistic {
    params: LogisticParams,
    /// Training means, per feature.
    mean: Vec<f64>,
    /// Training standard deviations (1 where a feature is constant).
    scale: Vec<f64>,
    /// Coefficients on the standardised features.
    weights: Vec<f64>,
    /// Intercept.
    bias: f64,
}

impl Logistic {
    /// An unfitted model.
    pub fn new(params: LogisticParams) -> Logistic {
        Logistic {
            params,
            mean: Vec::new(),
            scale: Vec::new(),
            weights: Vec::new(),
            bias: 0.0,
        }
    }

    /// The coefficient of feature `j` in original units.
    fn coef(&self, j: usize) -> f64 {
        self.weights[j] / self.scale[j]
    }
}

impl Model for Logistic {
    fn kind(&self) -> &'static str {
        "logistic"
    }

    fn fit(&mut self, x: &Table, y: &[f64]) -> Result<(), String> {
        let (n, d) = (x.rows(), x.cols());
        if n == 0 {
            return Err("logistic fit: no rows".into());
        }
        self.mean = x
            .columns
            .iter()
            .map(|c| c.iter().sum::<f64>() / n as f64)
            .collect();
        self.scale = x
            .columns
            .iter()
            .zip(&self.mean)
            .map(|(c, m)| {
                let var = c.iter().map(|v| (v - m).powi(2)).sum::<f64>() / n as f64;
                if var > 0.0 {
                    var.sqrt()
                } else {
                    1.0
                }
            })
            .collect();
        let z: Vec<Vec<f64>> = (0..d)
            .map(|j| {
                x.columns[j]
                    .iter()
                    .map(|v| (v - self.mean[j]) / self.scale[j])
                    .collect()
            })
            .collect();
        // Parameters θ = (w_1 … w_d, b); the intercept is not penalised.
        let mut theta = vec![0.0; d + 1];
        for _ in 0..self.params.iterations {
            let mut gradient = vec![0.0; d + 1];
            let mut hessian = vec![vec![0.0; d + 1]; d + 1];
            let mut feature = vec![0.0; d + 1];
            for i in 0..n {
                for j in 0..d {
                    feature[j] = z[j][i];
                }
                feature[d] = 1.0;
                let raw: f64 = feature.iter().zip(&theta).map(|(a, b)| a * b).sum();
                let p = sigmoid(raw);
                let w = p * (1.0 - p);
                for a in 0..=d {
                    gradient[a] += (p - y[i]) * feature[a];
                    for b in a..=d {
                        hessian[a][b] += w * feature[a] * feature[b];
                    }
                }
            }
            for a in 1..=d {
                let (upper, lower) = hessian.split_at_mut(a);
                for (b, row) in upper.iter().enumerate() {
                    lower[0][b] = row[a];
                }
            }
            for j in 0..d {
                gradient[j] += self.params.l2 * theta[j];
                hessian[j][j] += self.params.l2;
            }
            let step = solve(hessian, gradient).ok_or(
                "logistic fit: the Hessian is singular (a constant or duplicated feature?)",
            )?;
            let mut largest: f64 = 0.0;
            for (t, s) in theta.iter_mut().zip(&step) {
                *t -= s;
                largest = largest.max(s.abs());
            }
            if largest < 1e-10 {
                break;
            }
        }
        self.bias = theta[d];
        theta.truncate(d);
        self.weights = theta;
        Ok(())
    }

    fn raw(&self, x: &Table) -> Vec<f64> {
        (0..x.rows())
            .map(|i| {
                self.bias
                    + (0..x.cols())
                        .map(|j| self.weights[j] * (x.columns[j][i] - self.mean[j]) / self.scale[j])
                        .sum::<f64>()
            })
            .collect()
    }

    fn explain(&self, x: &Table) -> Explanation {
        let values = (0..x.rows())
            .map(|i| {
                (0..x.cols())
                    .map(|j| self.coef(j) * (x.columns[j][i] - self.mean[j]))
                    .collect()
            })
            .collect();
        Explanation {
            expected_value: self.bias,
            values,
        }
    }

    fn to_json(&self) -> Result<String, String> {
        serde_json::to_string(self).map_err(|err| format!("logistic artifact: {err}"))
    }

    fn params(&self) -> serde_json::Value {
        serde_json::to_value(&self.params).unwrap_or_default()
    }
}

/// Solves `a · x = b` by Gaussian elimination with partial pivoting; `None` if singular.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|&r, &s| a[r][col].abs().total_cmp(&a[s][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let (done, rest) = a.split_at_mut(col + 1);
        let pivot_row = &done[col];
        for (offset, row) in rest.iter_mut().enumerate() {
            let factor = row[col] / pivot_row[col];
            for (x, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= factor * p;
            }
            b[col + 1 + offset] -= factor * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let tail: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - tail) / a[row][row];
    }
    Some(x)
}

/// Validation metrics of P(up) against outcomes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Metrics {
    /// Area under the ROC curve (ties count one half).
    pub auc: f64,
    /// Share right at the 0.5 cut.
    pub accuracy: f64,
    /// Mean negative log-likelihood (probabilities clipped to [1e-15, 1 − 1e-15]).
    pub log_loss: f64,
    /// Mean squared error of the probability.
    pub brier: f64,
    /// Rows scored.
    pub rows: usize,
}

/// Scores probabilities `p` against labels `y` (0/1).
pub fn metrics(p: &[f64], y: &[f64]) -> Metrics {
    let n = p.len().max(1) as f64;
    let accuracy = p
        .iter()
        .zip(y)
        .filter(|(p, y)| (**p > 0.5) == (**y > 0.5))
        .count() as f64
        / n;
    let log_loss = -p
        .iter()
        .zip(y)
        .map(|(p, y)| {
            let p = p.clamp(1e-15, 1.0 - 1e-15);
            y * p.ln() + (1.0 - y) * (1.0 - p).ln()
        })
        .sum::<f64>()
        / n;
    let brier = p.iter().zip(y).map(|(p, y)| (p - y).powi(2)).sum::<f64>() / n;
    Metrics {
        auc: auc(p, y),
        accuracy,
        log_loss,
        brier,
        rows: p.len(),
    }
}

/// ROC AUC by the Mann–Whitney rank sum (average ranks for ties); 0.5 when one class is absent.
pub fn auc(score: &[f64], y: &[f64]) -> f64 {
    let mut order: Vec<usize> = (0..score.len()).collect();
    order.sort_by(|&a, &b| score[a].total_cmp(&score[b]));
    let mut ranks = vec![0.0; score.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && score[order[j + 1]] == score[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for k in i..=j {
            ranks[order[k]] = rank;
        }
        i = j + 1;
    }
    let positives = y.iter().filter(|v| **v > 0.5).count() as f64;
    let negatives = y.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return 0.5;
    }
    let rank_sum: f64 = ranks
        .iter()
        .zip(y)
        .filter(|(_, y)| **y > 0.5)
        .map(|(r, _)| r)
        .sum();
    (rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A synthetic problem with signal in the first two of four features.
    fn problem(rows: usize) -> (Table, Vec<f64>) {
        let mut table = Table::with_columns(4);
        let mut y = Vec::new();
        let mut state: u64 = 7;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        for _ in 0..rows {
            let row = [next() * 2.0 - 1.0, next(), next() * 10.0, next()];
            let noise = next() * 0.6 - 0.3;
            y.push(if row[0] + 0.5 * (row[1] - 0.5) + noise > 0.0 {
                1.0
            } else {
                0.0
            });
            table.push(&row);
        }
        (table, y)
    }

    #[test]
    fn auc_is_the_share_of_correctly_ordered_pairs_with_ties_counting_half() {
        // Pairs (positive, negative): (0.8,0.1) ✓ (0.8,0.4) ✓ (0.4,0.1) ✓ (0.4,0.4) tie → 3.5/4.
        assert_eq!(auc(&[0.1, 0.4, 0.4, 0.8], &[0.0, 0.0, 1.0, 1.0]), 0.875);
        assert_eq!(auc(&[0.9, 0.1], &[0.0, 1.0]), 0.0);
        assert_eq!(auc(&[0.3, 0.3], &[1.0, 1.0]), 0.5);
    }

    #[test]
    fn log_loss_brier_and_accuracy_match_their_definitions() {
        let m = metrics(&[0.9, 0.2, 0.6], &[1.0, 0.0, 0.0]);
        let expected_log_loss = -(0.9f64.ln() + 0.8f64.ln() + 0.4f64.ln()) / 3.0;
        assert!((m.log_loss - expected_log_loss).abs() < 1e-12);
        assert!((m.brier - (0.01 + 0.04 + 0.36) / 3.0).abs() < 1e-12);
        assert!((m.accuracy - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn both_models_learn_a_planted_signal_and_their_shap_values_add_up_to_the_raw_output() {
        let (x, y) = problem(3000);
        let (valid_x, valid_y) = problem(500);
        let models: Vec<Box<dyn Model>> = vec![
            Box::new(Gbdt::new(GbdtParams::default())),
            Box::new(Logistic::new(LogisticParams::default())),
        ];
        for mut model in models {
            model.fit(&x, &y).unwrap();
            let raw = model.raw(&valid_x);
            let p: Vec<f64> = raw.iter().copied().map(sigmoid).collect();
            let m = metrics(&p, &valid_y);
            assert!(m.auc > 0.9, "{}: AUC {}", model.kind(), m.auc);

            let explanation = model.explain(&valid_x);
            for (i, row) in explanation.values.iter().enumerate() {
                let total = row.iter().sum::<f64>() + explanation.expected_value;
                assert!(
                    (total - raw[i]).abs() < 1e-6,
                    "{} row {i}: ΣSHAP + E = {total}, raw = {}",
                    model.kind(),
                    raw[i]
                );
            }
            // The planted signal dominates: feature 0 has the largest mean |SHAP|.
            let mean_abs: Vec<f64> = (0..4)
                .map(|j| explanation.values.iter().map(|r| r[j].abs()).sum::<f64>())
                .collect();
            let top = (0..4).max_by(|&a, &b| mean_abs[a].total_cmp(&mean_abs[b]));
            assert_eq!(top, Some(0), "{}: {mean_abs:?}", model.kind());

            // The artifact predicts exactly as the fitted model.
            let again = load(model.kind(), &model.to_json().unwrap()).unwrap();
            assert_eq!(again.raw(&valid_x), raw);
        }
    }

    #[test]
    fn logistic_shap_is_the_coefficient_times_the_distance_from_the_training_mean() {
        let (x, y) = problem(400);
        let mut model = Logistic::new(LogisticParams::default());
        model.fit(&x, &y).unwrap();
        let row = x.select(&[3]);
        let e = model.explain(&row);
        for j in 0..4 {
            let by_hand = model.weights[j] / model.scale[j] * (x.columns[j][3] - model.mean[j]);
            assert!((e.values[0][j] - by_hand).abs() < 1e-12);
        }
        // At the training mean every contribution is zero and the output is the base value.
        let mut at_mean = Table::with_columns(4);
        at_mean.push(&model.mean.clone());
        assert!((model.raw(&at_mean)[0] - e.expected_value).abs() < 1e-12);
    }
}
