//! The highest offered load at which the workflow still meets the latency targets (p50 and p99 end to end):
//! the capacity a deployment can plan with when it has a latency objective, rather than the burst maximum.
//!
//! Found by bisection between the fixed-load runs already made: the bracket is the highest offered rate that
//! met the targets and the lowest one above it that did not (the burst maximum, if none did). Each step is one
//! more fixed-load run at the bracket's middle. One run per step on a noisy machine gives an estimate, not a
//! boundary: the figure is printed with the bracket it was found in.

use serde::Serialize;

use crate::report::{TARGET_P50_MS, TARGET_P99_MS};
use crate::workflow::Run;

/// Whether a fixed-load run met both latency targets.
pub fn meets_targets(run: &Run) -> bool {
    run.latency_p50_ms <= TARGET_P50_MS && run.latency_p99_ms <= TARGET_P99_MS
}

/// A bracket around the highest offered rate that meets the latency targets.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Bracket {
    /// Highest offered rate (workflows/s) whose run met the targets; 0 when none did.
    pub meets: f64,
    /// Lowest offered rate above `meets` whose run did not (the burst maximum when no fixed-load run failed).
    pub fails: f64,
}

impl Bracket {
    /// The bracket that `runs` (offered rate, whether the run met the targets) leave, below `maximum`.
    /// A run that failed below one that met (noise) does not narrow it: the highest success counts.
    pub fn from_runs(runs: &[(f64, bool)], maximum: f64) -> Bracket {
        let meets = runs.iter().filter(|(_, met)| *met).map(|(rate, _)| *rate).fold(0.0, f64::max);
        let fails = runs
            .iter()
            .filter(|(rate, met)| !*met && *rate > meets)
            .map(|(rate, _)| *rate)
            .fold(maximum.max(meets), f64::min);
        Bracket { meets, fails }
    }

    /// The next rate to try, or `None` once the bracket is narrower than `resolution` workflows/s.
    pub fn next(&self, resolution: f64) -> Option<f64> {
        (self.fails - self.meets > resolution).then(|| (self.meets + self.fails) / 2.0)
    }

    /// Narrow the bracket with the outcome of a run at `rate`.
    pub fn record(&mut self, rate: f64, met: bool) {
        if met && rate > self.meets {
            self.meets = rate;
        } else if !met && rate < self.fails && rate > self.meets {
            self.fails = rate;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Bracket;

    #[test]
    fn the_bracket_lies_between_the_highest_success_and_the_next_failure() {
        let b = Bracket::from_runs(&[(216.0, true), (540.0, false), (100.0, true)], 1080.0);
        assert_eq!(b, Bracket { meets: 216.0, fails: 540.0 });
        assert_eq!(b.next(10.0), Some(378.0));
    }

    #[test]
    fn without_a_failure_the_burst_maximum_bounds_it() {
        let b = Bracket::from_runs(&[(216.0, true), (540.0, true)], 1080.0);
        assert_eq!(b, Bracket { meets: 540.0, fails: 1080.0 });
    }

    #[test]
    fn without_a_success_the_search_starts_from_nothing() {
        let b = Bracket::from_runs(&[(216.0, false), (540.0, false), (100.0, false)], 1080.0);
        assert_eq!(b, Bracket { meets: 0.0, fails: 100.0 });
    }

    #[test]
    fn a_failure_below_a_success_is_noise_and_does_not_narrow_it() {
        let b = Bracket::from_runs(&[(216.0, false), (300.0, true), (540.0, false)], 1080.0);
        assert_eq!(b, Bracket { meets: 300.0, fails: 540.0 });
    }

    #[test]
    fn steps_halve_the_bracket_until_the_resolution() {
        let mut b = Bracket { meets: 200.0, fails: 600.0 };
        let mut tried = Vec::new();
        // The targets hold up to 330/s.
        while let Some(rate) = b.next(30.0) {
            tried.push(rate);
            b.record(rate, rate <= 330.0);
        }
        assert_eq!(tried, vec![400.0, 300.0, 350.0, 325.0]);
        assert_eq!(b, Bracket { meets: 325.0, fails: 350.0 });
    }

    #[test]
    fn an_outcome_outside_the_bracket_changes_nothing() {
        let mut b = Bracket { meets: 200.0, fails: 600.0 };
        b.record(100.0, false);
        b.record(700.0, false);
        b.record(150.0, true);
        assert_eq!(b, Bracket { meets: 200.0, fails: 600.0 });
    }
}
