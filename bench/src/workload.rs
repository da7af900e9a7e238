//! Synthetic test suites with the shape of real ones: heavy-tailed (log-normal) durations that
//! are correlated within a file, a few giants, noisy history, and some tests with no history.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use shardgate_coordinator::scheduler::History;

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Shape {
    pub tests: usize,
    /// σ of the log-normal durations.
    pub sigma: f64,
    /// Total of the log-normal part, in machine-hours.
    pub machine_hours: f64,
    /// Share of tests that are giants, at 100–300× the mean.
    pub giants: f64,
    /// σ of the multiplicative noise on history estimates (0.3 = 30 %).
    pub noise: f64,
    /// Share of tests with no history.
    pub new: f64,
    /// Tests that share a file prefix.
    pub per_file: usize,
    /// Share of tests that failed recently (for fail-first), and fail again in this run.
    pub recent_failures: f64,
    pub seed: u64,
}

impl Shape {
    /// IMVU's suite: 15,000 tests, 4.4 machine-hours, σ = 1.6, 0.1 % giants, 30 % estimate noise,
    /// 10 % new tests.
    pub fn imvu(seed: u64) -> Self {
        Self {
            tests: 15_000,
            sigma: 1.6,
            machine_hours: 4.4,
            giants: 0.001,
            noise: 0.3,
            new: 0.1,
            per_file: 20,
            recent_failures: 0.0,
            seed,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Workload {
    pub ids: Vec<String>,
    /// True durations in this run, milliseconds.
    pub actual_ms: Vec<f64>,
    /// What history says (absent for new tests).
    pub history: HashMap<String, History>,
    /// Tests that fail in this run.
    pub failing: Vec<bool>,
}

impl Workload {
    pub fn total_ms(&self) -> f64 {
        self.actual_ms.iter().sum()
    }

    pub fn longest_ms(&self) -> f64 {
        self.actual_ms.iter().copied().fold(0.0, f64::max)
    }

    /// `max(total work / slots, longest test)`.
    pub fn lower_bound_ms(&self, slots: usize) -> f64 {
        lower_bound_ms(&self.actual_ms, slots)
    }
}

/// The makespan no schedule of tests taking `durations_ms` on `slots` slots can beat:
/// `max(total work / slots, longest test)`.
pub fn lower_bound_ms(durations_ms: &[f64], slots: usize) -> f64 {
    let longest = durations_ms.iter().copied().fold(0.0, f64::max);
    (durations_ms.iter().sum::<f64>() / slots.max(1) as f64).max(longest)
}

/// A standard normal sample (Box–Muller).
pub(crate) fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

pub fn generate(shape: &Shape) -> Workload {
    let mut rng = StdRng::seed_from_u64(shape.seed);
    // Split σ between a per-file factor and a per-test factor (0.6² + 0.8² = 1), so tests in
    // one file resemble each other as they do in real suites.
    let (sf, st) = (0.6 * shape.sigma, 0.8 * shape.sigma);
    let files = shape.tests.div_ceil(shape.per_file);
    let file_factor: Vec<f64> = (0..files).map(|_| normal(&mut rng) * sf).collect();
    let mut raw: Vec<f64> = (0..shape.tests)
        .map(|i| (file_factor[i / shape.per_file] + normal(&mut rng) * st).exp())
        .collect();
    let scale = shape.machine_hours * 3_600_000.0 / raw.iter().sum::<f64>();
    for d in &mut raw {
        *d *= scale;
    }
    let mean = shape.machine_hours * 3_600_000.0 / shape.tests as f64;
    for d in &mut raw {
        if rng.random_bool(shape.giants) {
            *d = mean * rng.random_range(100.0..300.0);
        }
    }
    let ids: Vec<String> = (0..shape.tests)
        .map(|i| format!("file{:05}/test{:06}.sh", i / shape.per_file, i))
        .collect();
    let mut history = HashMap::new();
    let mut failing = vec![false; shape.tests];
    for (i, id) in ids.iter().enumerate() {
        let recently_failed = rng.random_bool(shape.recent_failures);
        failing[i] = recently_failed;
        if rng.random_bool(shape.new) {
            continue;
        }
        let est = raw[i] * (normal(&mut rng) * shape.noise).exp();
        history.insert(
            id.clone(),
            History {
                estimate_ms: est,
                samples: 5,
                last_failed_ms: if recently_failed { 1 } else { 0 },
            },
        );
    }
    Workload {
        ids,
        actual_ms: raw,
        history,
        failing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_imvu_shape_has_its_totals_and_is_deterministic() {
        let w = generate(&Shape::imvu(1));
        assert_eq!(w.ids.len(), 15_000);
        let hours = w.total_ms() / 3_600_000.0;
        assert!(
            (4.4..6.5).contains(&hours),
            "{hours} machine-hours including giants"
        );
        let new = 15_000 - w.history.len();
        assert!((1300..1700).contains(&new), "{new} new tests");
        let again = generate(&Shape::imvu(1));
        assert_eq!(w.actual_ms, again.actual_ms);
    }
}
