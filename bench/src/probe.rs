//! Two probes that run beside the workflow and tell a stall of the machine from one of the workflow.
//!
//! A run's p99 sometimes jumps by half a second while its neighbours do not, and the slowest workflow of such
//! a run lost its time in every hop at once: something stopped all of them. The probes say what:
//! - **the timer**: a thread sleeps 10 ms at a time and notes how late it wakes. The virtual machine paused,
//!   or the CPUs were taken for that long, when it wakes late by as much as the stall;
//! - **the disk**: a thread writes 4 KiB and flushes it (`fdatasync`) every 20 ms, in the bench's output
//!   directory, and notes how long the flush took. Every hop commits to PostgreSQL and every message to
//!   RabbitMQ's log, so a disk that stops flushing stops the workflow.
//!
//! Each keeps the largest figure since the last [`Probe::take`]. 50 flushes a second are a few percent of the
//! workflow's own (1,200-1,900 a second at 800 workflows/s).

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

const TIMER_PERIOD: Duration = Duration::from_millis(10);
const DISK_PERIOD: Duration = Duration::from_millis(20);

/// The largest figures the probes saw over one run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Stalls {
    /// Longest a 10 ms sleep overran, in ms.
    pub timer_late_max_ms: f64,
    /// Longest flush of 4 KiB, in ms (`None` when the disk probe is not running).
    pub flush_max_ms: Option<f64>,
}

/// The largest value stored so far, in microseconds, taken and reset at once.
#[derive(Default)]
struct Max(AtomicU64);

impl Max {
    fn note(&self, d: Duration) {
        self.0.fetch_max(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn take_ms(&self) -> f64 {
        self.0.swap(0, Ordering::Relaxed) as f64 / 1000.0
    }
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// Whether the disk probe has stopped on an error: its figure is then unknown, not 0.
    flush_failed: AtomicBool,
    timer_late: Max,
    flush: Max,
}

pub struct Probe {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    disk_file: Option<PathBuf>,
}

impl Probe {
    /// Start the timer, and the disk probe with its file in `dir` (without it when the file cannot be made:
    /// the bench still runs, and says so).
    pub fn start(dir: &Path) -> Probe {
        let shared = Arc::new(Shared::default());
        let mut threads = Vec::new();
        let timer = Arc::clone(&shared);
        threads.push(std::thread::spawn(move || {
            while !timer.stop.load(Ordering::Relaxed) {
                let asleep = Instant::now();
                std::thread::sleep(TIMER_PERIOD);
                timer.timer_late.note(asleep.elapsed().saturating_sub(TIMER_PERIOD));
            }
        }));
        let path = dir.join(format!("flush-probe-{}", std::process::id()));
        let disk_file = match std::fs::create_dir_all(dir).and_then(|()| File::create(&path)) {
            Ok(file) => {
                let disk = Arc::clone(&shared);
                threads.push(std::thread::spawn(move || flush_loop(file, &disk)));
                Some(path)
            }
            Err(e) => {
                eprintln!("[bench] the disk probe is off: cannot create {}: {e}", path.display());
                None
            }
        };
        Probe { shared, threads, disk_file }
    }

    /// The largest figures since the last call (or the start).
    pub fn take(&self) -> Stalls {
        let flush = self.shared.flush.take_ms();
        Stalls {
            timer_late_max_ms: self.shared.timer_late.take_ms(),
            flush_max_ms: (self.disk_file.is_some() && !self.shared.flush_failed.load(Ordering::Relaxed))
                .then_some(flush),
        }
    }
}

fn flush_loop(mut file: File, shared: &Shared) {
    let block = [0u8; 4096];
    while !shared.stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let flushed = file
            .seek(SeekFrom::Start(0))
            .and_then(|_| file.write_all(&block))
            .and_then(|()| file.sync_data())
            .context("flush probe");
        match flushed {
            Ok(()) => shared.flush.note(started.elapsed()),
            Err(e) => {
                eprintln!("[bench] the disk probe stopped: {e:#}");
                shared.flush_failed.store(true, Ordering::Relaxed);
                return;
            }
        }
        std::thread::sleep(DISK_PERIOD.saturating_sub(started.elapsed()));
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        if let Some(path) = &self.disk_file {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_value_is_kept_until_taken() {
        let max = Max::default();
        max.note(Duration::from_micros(1500));
        max.note(Duration::from_micros(700));
        assert_eq!(max.take_ms(), 1.5);
        assert_eq!(max.take_ms(), 0.0);
    }

    /// The probes measure: a flush takes some time, and the figures are reset when taken. Waits on the
    /// condition with a deadline.
    #[test]
    fn the_probes_see_their_flushes_and_leave_no_file_behind() {
        let dir = std::env::temp_dir().join(format!("choreo-probe-{}", std::process::id()));
        let probe = Probe::start(&dir);
        let file = probe.disk_file.clone().expect("the disk probe runs in a temporary directory");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Stalls::default();
        while seen.flush_max_ms.unwrap_or(0.0) == 0.0 {
            assert!(Instant::now() < deadline, "no flush measured in 10 s");
            std::thread::sleep(Duration::from_millis(30));
            seen = probe.take();
        }
        assert!(file.exists());
        drop(probe);
        assert!(!file.exists(), "the probe's file is removed when it stops");
        std::fs::remove_dir_all(&dir).ok();
    }
}
