//! The machine's price of a wake-up, measured in the same run: two threads hand a byte back and forth through
//! pipes, pinned to one CPU and then to two; a round trip is two wake-ups. Two figures for each placement:
//! the time of a round trip (what a chain of hand-offs adds to a hop's latency), and the processor time each
//! thread is charged per wake-up (what a hand-off costs in CPU, read from each thread's own
//! `/proc/thread-self/schedstat`, the clock the CPU table's figures come from). Every hop of the workflow is
//! a chain of such hand-offs (runtime and I/O threads, broker, database), so the figures are context for the
//! workflow's, not a prediction of them. On a virtual machine a wake-up across CPUs, which needs an
//! interprocessor interrupt through the hypervisor, can cost ten times one on the same CPU, in time and in
//! CPU (docs/performance.md).

use std::io::{Read, Write};
use std::time::Instant;

use anyhow::Context;
use core_affinity::CoreId;
use serde::Serialize;

/// Round trips per sample; the time figure is the median of [`SAMPLES`] samples.
const ROUND_TRIPS: usize = 2_000;
const SAMPLES: usize = 5;

#[derive(Debug, Clone, Serialize)]
pub struct WakeupCost {
    /// Between two threads pinned to the same CPU.
    pub same_cpu: HandOffCost,
    /// Between threads pinned to two CPUs (`None` on a machine with one CPU).
    pub across_cpus: Option<HandOffCost>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct HandOffCost {
    /// Microseconds per round trip (two wake-ups).
    pub round_trip_us: f64,
    /// Microseconds of CPU each thread is charged per wake-up (`None` where the kernel does not report a
    /// thread's CPU time in `/proc/thread-self/schedstat`).
    pub cpu_per_wakeup_us: Option<f64>,
}

pub fn measure() -> anyhow::Result<WakeupCost> {
    let cores = core_affinity::get_core_ids().context("reading the CPUs this process may run on")?;
    let first = *cores.first().context("no CPU to run on")?;
    let same_cpu = hand_off_cost(first, first, ROUND_TRIPS, SAMPLES)?;
    let across_cpus = match cores.get(1) {
        Some(&second) => Some(hand_off_cost(first, second, ROUND_TRIPS, SAMPLES)?),
        None => None,
    };
    Ok(WakeupCost { same_cpu, across_cpus })
}

/// "round trip 4.3 µs on one CPU, 53.2 µs across CPUs; CPU per wake-up 2.1 µs on one CPU, 16.0 µs across
/// CPUs": what the bench prints.
pub fn describe(cost: &WakeupCost) -> String {
    let us = |v: Option<f64>| v.map(|us| format!("{us:.1} µs")).unwrap_or_else(|| "n/a".into());
    let (across_trip, across_cpu) = match &cost.across_cpus {
        Some(c) => (us(Some(c.round_trip_us)), us(c.cpu_per_wakeup_us)),
        None => ("n/a (one CPU)".into(), "n/a (one CPU)".into()),
    };
    format!(
        "round trip {} on one CPU, {across_trip} across CPUs; CPU per wake-up {} on one CPU, {across_cpu} across CPUs",
        us(Some(cost.same_cpu.round_trip_us)),
        us(cost.same_cpu.cpu_per_wakeup_us),
    )
}

/// Pin the calling thread to `core`, or say why not: a figure from unpinned threads would be mislabelled.
fn pin(core: CoreId) -> std::io::Result<()> {
    if core_affinity::set_for_current(core) {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("cannot pin a thread to CPU {}", core.id)))
    }
}

/// Nanoseconds the calling thread has spent on a CPU: the first field of `/proc/thread-self/schedstat`.
fn thread_cpu_ns() -> std::io::Result<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat")?;
    let first = text.split_whitespace().next().unwrap_or_default();
    first.parse().map_err(|_| std::io::Error::other(format!("/proc/thread-self/schedstat starts with {first:?}")))
}

/// The CPU the calling thread used while running `work`, in nanoseconds (`None` if it cannot be read).
fn with_cpu<T>(work: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<(T, Option<u64>)> {
    let before = thread_cpu_ns().ok();
    let result = work()?;
    let used = match (before, thread_cpu_ns().ok()) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b)),
        _ => None,
    };
    Ok((result, used))
}

/// Round trips between a thread on `a` and one on `b`: the median over `samples` of the mean time of
/// `round_trips` of them, and the CPU per wake-up over all of them (each thread wakes once per round trip).
fn hand_off_cost(a: CoreId, b: CoreId, round_trips: usize, samples: usize) -> anyhow::Result<HandOffCost> {
    let (mut to_echo_r, mut to_echo_w) = std::io::pipe()?;
    let (mut back_r, mut back_w) = std::io::pipe()?;
    let total = round_trips * samples;
    let echo = std::thread::spawn(move || -> std::io::Result<Option<u64>> {
        pin(b)?;
        let mut byte = [0u8; 1];
        let ((), cpu) = with_cpu(|| {
            for _ in 0..total {
                to_echo_r.read_exact(&mut byte)?;
                back_w.write_all(&byte)?;
            }
            Ok(())
        })?;
        Ok(cpu)
    });
    let timed = std::thread::spawn(move || -> std::io::Result<(Vec<f64>, Option<u64>)> {
        pin(a)?;
        let mut byte = [1u8; 1];
        with_cpu(|| {
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
        })
    });
    // Either thread failing closes its pipe ends, which ends the other one; the echo side's error is the
    // cause when both failed.
    let timed = timed.join().map_err(|_| anyhow::anyhow!("the timing thread panicked"))?;
    let echo_cpu = echo.join().map_err(|_| anyhow::anyhow!("the echo thread panicked"))?.context("echo thread")?;
    let (mut per_sample, timed_cpu) = timed.context("timing thread")?;
    let cpu_per_wakeup_us = match (timed_cpu, echo_cpu) {
        (Some(t), Some(e)) => Some((t + e) as f64 / 1e3 / (2 * total.max(1)) as f64),
        _ => None,
    };
    Ok(HandOffCost { round_trip_us: median(&mut per_sample), cpu_per_wakeup_us })
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
    fn the_description_names_both_placements_or_says_there_is_one_cpu() {
        let two = WakeupCost {
            same_cpu: HandOffCost { round_trip_us: 4.25, cpu_per_wakeup_us: Some(2.14) },
            across_cpus: Some(HandOffCost { round_trip_us: 53.21, cpu_per_wakeup_us: Some(16.04) }),
        };
        assert_eq!(
            describe(&two),
            "round trip 4.2 µs on one CPU, 53.2 µs across CPUs; CPU per wake-up 2.1 µs on one CPU, 16.0 µs across CPUs"
        );
        let one =
            WakeupCost { same_cpu: HandOffCost { round_trip_us: 4.0, cpu_per_wakeup_us: None }, across_cpus: None };
        assert_eq!(
            describe(&one),
            "round trip 4.0 µs on one CPU, n/a (one CPU) across CPUs; CPU per wake-up n/a on one CPU, n/a (one CPU) across CPUs"
        );
    }

    #[test]
    fn a_round_trip_between_two_threads_takes_time_and_charges_each_wake_up_some_cpu() {
        let cores = core_affinity::get_core_ids().expect("cores");
        let cost = hand_off_cost(cores[0], cores[cores.len() - 1], 200, 3).expect("ping-pong");
        assert!(cost.round_trip_us.is_finite() && cost.round_trip_us > 0.0, "{cost:?}");
        // Where the kernel reports a thread's CPU: at least a system call's worth (the run time, not another
        // field of schedstat such as the count of runs), and less than the round trip's own time (microseconds,
        // not nanoseconds).
        if let Some(cpu) = cost.cpu_per_wakeup_us {
            assert!(cpu > 0.1 && cpu < cost.round_trip_us * 2.0, "{cost:?}");
        }
    }
}
