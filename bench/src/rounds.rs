//! Paired rounds: short saturating windows of each server in turn, many times over, compared
//! round by round. This VM's speed drifts by up to a fifth within a minute (it slows under
//! sustained load), so a ratio of windows tens of seconds apart measures the drift as much as the
//! servers; windows seconds apart in the same round see the same machine, and the median of the
//! rounds' ratios is not moved by the one round a burst of the host's load fell on.

use crate::{
    Bench,
    load::{Load, Target, closed_loop, connections},
};
use oats_testkit::Process;
use std::time::Duration;

/// Windows of a paired comparison: long enough for tens of thousands of requests, short enough
/// that a round's windows see the same machine.
pub(crate) const PAIRED_WINDOW: Duration = Duration::from_secs(2);
/// Rounds of a paired comparison: with two, three or four servers each takes each place in a
/// round equally often.
pub(crate) const PAIRED_ROUNDS: usize = 12;

impl Bench {
    /// [`PAIRED_ROUNDS`] rounds of one [`PAIRED_WINDOW`] saturating window per server; each round
    /// starts one server further along. The loads of each server, in round order.
    pub(crate) async fn paired_rounds<const N: usize>(&self, servers: &[(Target, &Process); N]) -> [Vec<Load>; N] {
        let mut loads = std::array::from_fn(|_| Vec::with_capacity(PAIRED_ROUNDS));
        for round in 0..PAIRED_ROUNDS {
            for turn in 0..N {
                let which = (round + turn) % N;
                let (target, server) = &servers[which];
                let load = closed_loop(
                    connections(target, self.concurrency),
                    PAIRED_WINDOW,
                    server.pid() as i32,
                    self.clk_tck,
                )
                .await;
                loads[which].push(load);
            }
        }
        loads
    }
}

/// `figure` of `a` over `figure` of `b`, round by round.
pub(crate) fn round_ratios(a: &[Load], b: &[Load], figure: fn(&Load) -> f64) -> Vec<f64> {
    a.iter().zip(b).map(|(a, b)| figure(a) / figure(b)).collect()
}

/// The median and quartiles of a sample, and its extremes.
pub(crate) struct Spread {
    pub(crate) median: f64,
    pub(crate) quartiles: (f64, f64),
    pub(crate) range: (f64, f64),
}

impl Spread {
    pub(crate) fn of(sample: &[f64]) -> Self {
        let mut sorted = sample.to_vec();
        sorted.sort_by(f64::total_cmp);
        Self {
            median: quantile(&sorted, 0.5),
            quartiles: (quantile(&sorted, 0.25), quantile(&sorted, 0.75)),
            range: (sorted.first().copied().unwrap_or(f64::NAN), sorted.last().copied().unwrap_or(f64::NAN)),
        }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "median {:.2}, quartiles {:.2}-{:.2}, range {:.2}-{:.2}",
            self.median, self.quartiles.0, self.quartiles.1, self.range.0, self.range.1
        )
    }
}

/// The `q` quantile of a sorted sample, interpolated between its neighbours.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n => {
            let place = q * (n - 1) as f64;
            let (below, above) = (place.floor() as usize, place.ceil() as usize);
            sorted[below] + (sorted[above] - sorted[below]) * (place - below as f64)
        }
    }
}

/// The windows of one server, for the run's details: req/s, server CPU per request and the load
/// generator's share of its core in each round, and the least share of its core the server had.
pub(crate) fn rounds_note(name: &str, loads: &[Load]) -> String {
    let rates: Vec<String> = loads.iter().map(|l| format!("{:.0}", l.rps())).collect();
    let cpu: Vec<String> = loads.iter().map(|l| format!("{:.1}", l.cpu_us())).collect();
    let least_core = loads.iter().map(|l| l.server_cpu / l.secs * 100.0).fold(f64::INFINITY, f64::min);
    let generator: Vec<String> = loads.iter().map(|l| format!("{:.0}", l.client_cpu / l.secs * 100.0)).collect();
    let errors: u64 = loads.iter().map(|l| l.errors).sum();
    format!(
        "{name}, by round: req/s {}; µs CPU/request {}; load generator's share of its core (%) {}; {errors} errors; the server had at least {least_core:.0}% of its core in every window",
        rates.join(", "),
        cpu.join(", "),
        generator.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_and_quartiles_interpolate_between_neighbours() {
        let spread = Spread::of(&[4.0, 1.0, 3.0, 2.0]);
        assert_eq!(spread.median, 2.5);
        assert_eq!(spread.quartiles, (1.75, 3.25));
        assert_eq!(spread.range, (1.0, 4.0));
        assert_eq!(Spread::of(&[0.9, 1.1, 1.0]).median, 1.0);
    }
}
