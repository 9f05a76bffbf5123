//! The highest offered load at which the workflow still meets the latency targets (p50 and p99 end to end):
//! the capacity a deployment can plan with when it has a latency objective, rather than the burst maximum.
//!
//! Found by bisection between the fixed-load runs already made: the bracket is the highest offered rate that
//! met the targets and the lowest one above it that did not (the burst maximum bounds the search when no
//! fixed load failed, but it is not a fixed load and is never reported as one). Each step is one more
//! fixed-load run at the bracket's middle. One run per step on a noisy machine gives an estimate, not a
//! boundary: the figure is printed with its bracket, and with any run that contradicts it.

use serde::Serialize;

use crate::report::{TARGET_P50_MS, TARGET_P99_MS};
use crate::workflow::Run;

/// Whether a fixed-load run met both latency targets.
pub fn meets_targets(run: &Run) -> bool {
    run.latency_p50_ms <= TARGET_P50_MS && run.latency_p99_ms <= TARGET_P99_MS
}

/// What the fixed-load runs say about the highest offered rate that meets the latency targets.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bracket {
    /// Highest offered rate (workflows/s) whose run met the targets; 0 when none did.
    pub highest_met_per_second: f64,
    /// Lowest offered rate above that one whose run did not; `None` when no fixed load above it failed.
    pub lowest_failed_per_second: Option<f64>,
    /// The burst maximum (workflows/s): the search never goes beyond it.
    pub maximum_per_second: f64,
    /// Offered rates whose run failed below one that met (noise): they do not narrow the bracket.
    pub failed_below_a_success: Vec<f64>,
}

impl Bracket {
    /// The bracket that `runs` (offered rate, whether the run met the targets) leave below `maximum`.
    pub fn from_runs(runs: &[(f64, bool)], maximum: f64) -> Bracket {
        let highest_met = runs.iter().filter(|(_, met)| *met).map(|(rate, _)| *rate).fold(0.0, f64::max);
        let failed = || runs.iter().filter(|(_, met)| !*met).map(|(rate, _)| *rate);
        let mut failed_below_a_success: Vec<f64> = failed().filter(|rate| *rate <= highest_met).collect();
        failed_below_a_success.sort_by(f64::total_cmp);
        Bracket {
            highest_met_per_second: highest_met,
            lowest_failed_per_second: failed().filter(|rate| *rate > highest_met).reduce(f64::min),
            maximum_per_second: maximum,
            failed_below_a_success,
        }
    }

    /// The upper end of the search: the lowest failure, or the burst maximum when there is none.
    fn upper(&self) -> f64 {
        self.lowest_failed_per_second.unwrap_or(self.maximum_per_second)
    }

    /// The next rate to try, or `None` once the bracket is narrower than `resolution` workflows/s.
    pub fn next(&self, resolution: f64) -> Option<f64> {
        let upper = self.upper();
        (upper - self.highest_met_per_second > resolution).then(|| (self.highest_met_per_second + upper) / 2.0)
    }

    /// Narrow the bracket with the outcome of a run at `rate` (one [`Bracket::next`] proposed).
    pub fn record(&mut self, rate: f64, met: bool) {
        if rate <= self.highest_met_per_second || rate >= self.upper() {
            // Outside the bracket: only a failure below a success says anything, and what it says is noise.
            if !met && rate <= self.highest_met_per_second {
                self.failed_below_a_success.push(rate);
                self.failed_below_a_success.sort_by(f64::total_cmp);
            }
        } else if met {
            self.highest_met_per_second = rate;
        } else {
            self.lowest_failed_per_second = Some(rate);
        }
    }

    /// One line for the report.
    pub fn describe(&self) -> String {
        let max = self.maximum_per_second;
        let share =
            |rate: f64| if max > 0.0 { format!(" ({:.0}% of the maximum)", 100.0 * rate / max) } else { String::new() };
        let mut line = match (self.highest_met_per_second > 0.0, self.lowest_failed_per_second) {
            (true, Some(failed)) => format!(
                "met up to {:.0} workflows/s{}, not met at {failed:.0} workflows/s{}",
                self.highest_met_per_second,
                share(self.highest_met_per_second),
                share(failed)
            ),
            (true, None) => format!(
                "met up to {:.0} workflows/s{}; no fixed load above it was missed (the search ends at the maximum)",
                self.highest_met_per_second,
                share(self.highest_met_per_second)
            ),
            (false, Some(failed)) => {
                format!("not met at any rate tried, down to {failed:.0} workflows/s{}", share(failed))
            }
            (false, None) => "no fixed-load run to judge by".to_owned(),
        };
        if !self.failed_below_a_success.is_empty() {
            let rates: Vec<String> = self.failed_below_a_success.iter().map(|r| format!("{r:.0}/s")).collect();
            line.push_str(&format!("; not met at {} below that, in runs the noise outweighs", rates.join(", ")));
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::Bracket;

    fn bracket(met: f64, failed: Option<f64>) -> Bracket {
        Bracket {
            highest_met_per_second: met,
            lowest_failed_per_second: failed,
            maximum_per_second: 1080.0,
            failed_below_a_success: vec![],
        }
    }

    #[test]
    fn the_bracket_lies_between_the_highest_success_and_the_next_failure() {
        let b = Bracket::from_runs(&[(216.0, true), (540.0, false), (100.0, true)], 1080.0);
        assert_eq!(b, bracket(216.0, Some(540.0)));
        assert_eq!(b.next(10.0), Some(378.0));
        assert_eq!(
            b.describe(),
            "met up to 216 workflows/s (20% of the maximum), not met at 540 workflows/s (50% of the maximum)"
        );
    }

    #[test]
    fn without_a_failure_the_burst_maximum_bounds_the_search_but_is_not_reported_as_a_failure() {
        let b = Bracket::from_runs(&[(216.0, true), (540.0, true)], 1080.0);
        assert_eq!(b, bracket(540.0, None));
        assert_eq!(b.next(10.0), Some(810.0));
        assert!(b.describe().contains("no fixed load above it was missed"), "{}", b.describe());
    }

    #[test]
    fn a_success_above_the_burst_maximum_ends_the_search() {
        let b = Bracket::from_runs(&[(1200.0, true)], 1080.0);
        assert_eq!(b.next(10.0), None);
    }

    #[test]
    fn without_a_success_the_search_starts_from_nothing() {
        let b = Bracket::from_runs(&[(216.0, false), (540.0, false), (100.0, false)], 1080.0);
        assert_eq!(b, bracket(0.0, Some(100.0)));
        assert_eq!(b.next(10.0), Some(50.0));
        assert_eq!(b.describe(), "not met at any rate tried, down to 100 workflows/s (9% of the maximum)");
    }

    #[test]
    fn a_failure_below_a_success_is_noise_named_in_the_report_and_does_not_narrow_the_bracket() {
        let b = Bracket::from_runs(&[(216.0, false), (300.0, true), (540.0, false)], 1080.0);
        assert_eq!(b.highest_met_per_second, 300.0);
        assert_eq!(b.lowest_failed_per_second, Some(540.0));
        assert_eq!(b.failed_below_a_success, vec![216.0]);
        assert!(
            b.describe().ends_with("; not met at 216/s below that, in runs the noise outweighs"),
            "{}",
            b.describe()
        );
    }

    #[test]
    fn steps_halve_the_bracket_until_the_resolution() {
        let mut b = bracket(200.0, Some(600.0));
        let mut tried = Vec::new();
        // The targets hold up to 330/s.
        while let Some(rate) = b.next(30.0) {
            tried.push(rate);
            b.record(rate, rate <= 330.0);
        }
        assert_eq!(tried, vec![400.0, 300.0, 350.0, 325.0]);
        assert_eq!(b, bracket(325.0, Some(350.0)));
    }

    #[test]
    fn an_outcome_outside_the_bracket_changes_nothing_but_a_failure_below_is_noted() {
        let mut b = bracket(200.0, Some(600.0));
        b.record(700.0, false);
        b.record(150.0, true);
        assert_eq!(b, bracket(200.0, Some(600.0)));
        b.record(100.0, false);
        assert_eq!(b.failed_below_a_success, vec![100.0]);
    }

    #[test]
    fn a_zero_maximum_prints_no_share() {
        let mut b = bracket(0.0, Some(100.0));
        b.maximum_per_second = 0.0;
        assert_eq!(b.describe(), "not met at any rate tried, down to 100 workflows/s");
    }
}
