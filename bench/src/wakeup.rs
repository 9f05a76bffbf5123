//! The machine's price of a wake-up, measured in the same run: two threads hand a byte back and forth through
//! pipes, pinned to one CPU and then to two; a round trip is two wake-ups. Every hop of the workflow is a
//! chain of such hand-offs (runtime and I/O threads, broker, database), so the figure is context for its
//! latency, not a prediction of it. On a virtual machine a wake-up across CPUs, which needs an
//! interprocessor interrupt, can cost ten times one on the same CPU (docs/performance.md).
//!
//! Beside that latency, the CPU a wake-up costs: a thread that only sleeps 50 µs and wakes, again and again,
//! is charged this much processor time per cycle (scheduler, timer and, on a virtual machine, the
//! hypervisor's share). It is the floor of every hop's CPU, and where it is high, a steady load that wakes
//! the processes often costs far more per workflow than a burst that keeps them busy.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use anyhow::Context;
use core_affinity::CoreId;
use serde::Serialize;

/// Round trips per sample; the figure is the median of [`SAMPLES`] samples.
const ROUND_TRIPS: usize = 2_000;
const SAMPLES: usize = 5;
/// Sleep-and-wake cycles for the CPU figure.
const SLEEP_WAKE_CYCLES: usize = 5_000;

#[derive(Debug, Clone, Serialize)]
pub struct WakeupCost {
    /// Microseconds per round trip (two wake-ups) between two threads pinned to the same CPU.
    pub same_cpu_us: f64,
    /// Microseconds per round trip between threads pinned to two CPUs (`None` on a machine with one CPU).
    pub across_cpus_us: Option<f64>,
    /// Microseconds of CPU a thread is charged per cycle of sleeping 50 µs and waking (`None` where the
    /// kernel does not report a thread's CPU time in `/proc/thread-self/schedstat`).
    pub sleep_wake_cpu_us: Option<f64>,
}

pub fn measure() -> anyhow::Result<WakeupCost> {
    let cores = core_affinity::get_core_ids().context("reading the CPUs this process may run on")?;
    let first = *cores.first().context("no CPU to run on")?;
    let same_cpu_us = median_round_trip_us(first, first, ROUND_TRIPS, SAMPLES)?;
    let across_cpus_us = match cores.get(1) {
        Some(&second) => Some(median_round_trip_us(first, second, ROUND_TRIPS, SAMPLES)?),
        None => None,
    };
    let sleep_wake_cpu_us = match sleep_wake_cpu_us(SLEEP_WAKE_CYCLES) {
        Ok(us) => Some(us),
        Err(e) => {
            eprintln!("[bench] the CPU of a sleep and wake-up was not measured: {e:#}");
            None
        }
    };
    Ok(WakeupCost { same_cpu_us, across_cpus_us, sleep_wake_cpu_us })
}

/// "4.3 µs on one CPU, 53.2 µs across CPUs; a sleep and wake-up costs a thread 14.8 µs of CPU": what the
/// bench prints.
pub fn describe(cost: &WakeupCost) -> String {
    let across = cost.across_cpus_us.map(|us| format!("{us:.1} µs")).unwrap_or_else(|| "n/a (one CPU)".into());
    let cpu = cost.sleep_wake_cpu_us.map(|us| format!("{us:.1} µs")).unwrap_or_else(|| "n/a".into());
    format!("{:.1} µs on one CPU, {across} across CPUs; a sleep and wake-up costs a thread {cpu} of CPU", cost.same_cpu_us)
}

/// Processor time, in microseconds, a thread of its own is charged per cycle of sleeping 50 µs and waking.
fn sleep_wake_cpu_us(cycles: usize) -> anyhow::Result<f64> {
    let sleeper = std::thread::spawn(move || -> anyhow::Result<f64> {
        let before = thread_cpu_ns()?;
        for _ in 0..cycles {
            std::thread::sleep(Duration::from_micros(50));
        }
        let after = thread_cpu_ns()?;
        Ok(after.saturating_sub(before) as f64 / 1e3 / cycles.max(1) as f64)
    });
    sleeper.join().map_err(|_| anyhow::anyhow!("the sleeping thread panicked"))?
}

/// Nanoseconds the calling thread has spent on a CPU: the first field of `/proc/thread-self/schedstat`, the
/// clock the CPU table's figures (from `/proc/<pid>/stat`) are derived from.
fn thread_cpu_ns() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").context("reading /proc/thread-self/schedstat")?;
    let first = text.split_whitespace().next().context("/proc/thread-self/schedstat is empty")?;
    first.parse().with_context(|| format!("/proc/thread-self/schedstat starts with {first:?}, not a number"))
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
        let two = WakeupCost { same_cpu_us: 4.25, across_cpus_us: Some(53.21), sleep_wake_cpu_us: Some(14.84) };
        assert_eq!(describe(&two), "4.2 µs on one CPU, 53.2 µs across CPUs; a sleep and wake-up costs a thread 14.8 µs of CPU");
        let one = WakeupCost { same_cpu_us: 4.0, across_cpus_us: None, sleep_wake_cpu_us: None };
        assert_eq!(describe(&one), "4.0 µs on one CPU, n/a (one CPU) across CPUs; a sleep and wake-up costs a thread n/a of CPU");
    }

    #[test]
    fn a_round_trip_between_two_threads_takes_a_positive_time_and_completes() {
        let cores = core_affinity::get_core_ids().expect("cores");
        let us = median_round_trip_us(cores[0], cores[cores.len() - 1], 50, 3).expect("ping-pong");
        assert!(us.is_finite() && us > 0.0, "{us}");
    }

    #[test]
    fn a_thread_that_sleeps_and_wakes_is_charged_some_cpu_for_each_cycle() {
        let us = sleep_wake_cpu_us(200).expect("sleep and wake");
        // Not zero (the clock is read at all), and nowhere near a millisecond per cycle (as nanoseconds read as
        // microseconds would be).
        assert!(us.is_finite() && us > 0.0 && us < 1_000.0, "{us}");
    }
}
