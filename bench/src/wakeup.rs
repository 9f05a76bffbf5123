//! The machine's price of a wake-up, measured in the same run: two threads hand a byte back and forth through
//! pipes, pinned to one CPU and then to two; a round trip is two wake-ups. Every hop of the workflow is a
//! chain of such hand-offs (runtime and I/O threads, broker, database), so the figure is context for its
//! latency, not a prediction of it. On a virtual machine a wake-up across CPUs, which needs an
//! interprocessor interrupt, can cost ten times one on the same CPU (docs/performance.md).

use std::io::{Read, Write};
use std::time::Instant;

use anyhow::Context;
use core_affinity::CoreId;
use serde::Serialize;

/// Round trips per sample; the figure is the median of [`SAMPLES`] samples.
const ROUND_TRIPS: usize = 2_000;
const SAMPLES: usize = 5;

#[derive(Debug, Clone, Serialize)]
pub struct WakeupCost {
    /// Microseconds per round trip (two wake-ups) between two threads pinned to the same CPU.
    pub same_cpu_us: f64,
    /// Microseconds per round trip between threads pinned to two CPUs (`None` on a machine with one CPU).
    pub across_cpus_us: Option<f64>,
}

pub fn measure() -> anyhow::Result<WakeupCost> {
    let cores = core_affinity::get_core_ids().context("reading the CPUs this process may run on")?;
    let first = *cores.first().context("no CPU to run on")?;
    let same_cpu_us = median_round_trip_us(first, first, ROUND_TRIPS, SAMPLES)?;
    let across_cpus_us = match cores.get(1) {
        Some(&second) => Some(median_round_trip_us(first, second, ROUND_TRIPS, SAMPLES)?),
        None => None,
    };
    Ok(WakeupCost { same_cpu_us, across_cpus_us })
}

/// "4.3 µs on one CPU, 53.2 µs across CPUs": what the bench prints.
pub fn describe(cost: &WakeupCost) -> String {
    let across = cost.across_cpus_us.map(|us| format!("{us:.1} µs")).unwrap_or_else(|| "n/a (one CPU)".into());
    format!("{:.1} µs on one CPU, {across} across CPUs", cost.same_cpu_us)
}

/// Pin the calling thread to `core`, or say why not: a figure from unpinned threads would be mislabelled.
fn pin(core: CoreId) -> std::io::Result<()> {
    if core_affinity::set_for_current(core) {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("cannot pin a thread to CPU {}", core.id)))
    }
}

/// Median over `samples` of the mean round trip of `round_trips` hand-offs between a thread on `a` and
/// one on `b`, in microseconds.
fn median_round_trip_us(a: CoreId, b: CoreId, round_trips: usize, samples: usize) -> anyhow::Result<f64> {
    let (mut to_echo_r, mut to_echo_w) = std::io::pipe()?;
    let (mut back_r, mut back_w) = std::io::pipe()?;
    let total = round_trips * samples;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        pin(b)?;
        let mut byte = [0u8; 1];
        for _ in 0..total {
            to_echo_r.read_exact(&mut byte)?;
            back_w.write_all(&byte)?;
        }
        Ok(())
    });
    let timed = std::thread::spawn(move || -> std::io::Result<Vec<f64>> {
        pin(a)?;
        let mut byte = [1u8; 1];
        let mut per_sample = Vec::with_capacity(samples);
        for _ in 0..samples {
            let started = Instant::now();
            for _ in 0..round_trips {
                to_echo_w.write_all(&byte)?;
                back_r.read_exact(&mut byte)?;
            }
            per_sample.push(started.elapsed().as_secs_f64() * 1e6 / round_trips as f64);
        }
        Ok(per_sample)
    });
    // Either thread failing closes its pipe ends, which ends the other one; the echo side's error is the
    // cause when both failed.
    let timed = timed.join().map_err(|_| anyhow::anyhow!("the timing thread panicked"))?;
    echo.join().map_err(|_| anyhow::anyhow!("the echo thread panicked"))?.context("echo thread")?;
    let mut per_sample = timed.context("timing thread")?;
    Ok(median(&mut per_sample))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_is_the_middle_value_or_the_mean_of_the_two_middle_ones() {
        assert_eq!(median(&mut [5.0, 1.0, 3.0]), 3.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn the_description_names_both_figures_or_says_there_is_one_cpu() {
        let two = WakeupCost { same_cpu_us: 4.25, across_cpus_us: Some(53.21) };
        assert_eq!(describe(&two), "4.2 µs on one CPU, 53.2 µs across CPUs");
        let one = WakeupCost { same_cpu_us: 4.0, across_cpus_us: None };
        assert_eq!(describe(&one), "4.0 µs on one CPU, n/a (one CPU) across CPUs");
    }

    #[test]
    fn a_round_trip_between_two_threads_takes_a_positive_time_and_completes() {
        let cores = core_affinity::get_core_ids().expect("cores");
        let us = median_round_trip_us(cores[0], cores[cores.len() - 1], 50, 3).expect("ping-pong");
        assert!(us.is_finite() && us > 0.0, "{us}");
    }
}
