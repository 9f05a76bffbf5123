//! Where the CPU goes: the processor time of the workers, of PostgreSQL, of RabbitMQ and of the benchmark
//! itself over a run, read from `/proc`, per workflow. On a 2-core machine with everything on it, this is
//! what bounds throughput and, near saturation, latency.
//!
//! PostgreSQL and RabbitMQ are counted only when they run on this machine (processes named `postgres` and
//! `beam.smp`); a server elsewhere shows as 0. Processes that end during a run (a closed connection's
//! backend) take their time with them: the workers' and the benchmark's connections live for the whole run.

use std::collections::HashMap;
use std::time::Instant;

use serde::Serialize;

/// The parts whose CPU time a run reports, in table order.
pub const PARTS: [&str; 4] = ["workers", "postgres", "rabbitmq", "bench"];

/// CPU seconds used so far by each part, and the context switches of each of its threads (by thread id), at
/// one instant. Switches are kept per thread because a thread that ends between two snapshots takes its
/// count with it (a PostgreSQL backend that closes, a blocking-pool thread that idles out, another test's
/// thread): summed by part, its whole past would come off the difference.
pub struct Snapshot {
    at: Instant,
    seconds: HashMap<&'static str, f64>,
    switches: HashMap<i32, (&'static str, u64)>,
}

/// CPU time of a run, per workflow.
#[derive(Debug, Clone, Serialize)]
pub struct CpuUse {
    /// Milliseconds of CPU per workflow, by part (see [`PARTS`]).
    pub ms_per_workflow: Vec<(String, f64)>,
    /// Average number of cores busy over the run, all parts together.
    pub cores_busy: f64,
    /// Context switches of all threads per workflow, by part (see [`PARTS`]): each is a thread that went to
    /// sleep or was put aside, and on a machine where waking a thread costs more than the work it does,
    /// the figure to bring down.
    pub switches_per_workflow: Vec<(String, f64)>,
}

impl CpuUse {
    pub fn total_ms_per_workflow(&self) -> f64 {
        self.ms_per_workflow.iter().map(|(_, ms)| ms).sum()
    }
}

fn part_of(pid: i32, comm: &str, workers: &[u32], own: i32) -> Option<&'static str> {
    if workers.iter().any(|w| i64::from(*w) == i64::from(pid)) {
        Some("workers")
    } else if pid == own {
        Some("bench")
    } else if comm == "postgres" {
        Some("postgres")
    } else if comm == "beam.smp" {
        Some("rabbitmq")
    } else {
        None
    }
}

impl Snapshot {
    /// Read the CPU time of every process of interest. Processes that vanish while being read are skipped.
    pub fn take(workers: &[u32]) -> Snapshot {
        let ticks = procfs::ticks_per_second() as f64;
        let own = std::process::id() as i32;
        let mut seconds: HashMap<&'static str, f64> = PARTS.iter().map(|p| (*p, 0.0)).collect();
        let mut switches: HashMap<i32, (&'static str, u64)> = HashMap::new();
        if let Ok(all) = procfs::process::all_processes() {
            for process in all.flatten() {
                let Ok(stat) = process.stat() else { continue };
                let Some(part) = part_of(stat.pid, &stat.comm, workers, own) else { continue };
                *seconds.entry(part).or_default() += (stat.utime + stat.stime) as f64 / ticks;
                let threads = process.tasks().into_iter().flatten().flatten().filter_map(|t| t.status().ok());
                for t in threads {
                    let n = t.voluntary_ctxt_switches.unwrap_or(0) + t.nonvoluntary_ctxt_switches.unwrap_or(0);
                    switches.insert(t.pid, (part, n));
                }
            }
        }
        Snapshot { at: Instant::now(), seconds, switches }
    }

    /// CPU used between `self` and `later`, for `workflows` workflows.
    pub fn until(&self, later: &Snapshot, workflows: usize) -> CpuUse {
        let wall = later.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let used: Vec<(String, f64)> = PARTS
            .iter()
            .map(|p| {
                let s = later.seconds.get(p).copied().unwrap_or(0.0) - self.seconds.get(p).copied().unwrap_or(0.0);
                (p.to_string(), s.max(0.0))
            })
            .collect();
        let total: f64 = used.iter().map(|(_, s)| s).sum();
        let n = workflows.max(1) as f64;
        CpuUse {
            ms_per_workflow: used.into_iter().map(|(p, s)| (p, s * 1000.0 / n)).collect(),
            cores_busy: total / wall,
            switches_per_workflow: PARTS
                .iter()
                .map(|p| {
                    // Threads seen at the end: what they did since the start, or all they did if they are new.
                    let switched: u64 = later
                        .switches
                        .iter()
                        .filter(|(_, (part, _))| part == p)
                        .map(|(tid, (_, after))| after.saturating_sub(self.switches.get(tid).map_or(0, |(_, b)| *b)))
                        .sum();
                    (p.to_string(), switched as f64 / n)
                })
                .collect(),
        }
    }
}

/// Peak resident memory (VmHWM) of a process, in MiB; 0 if it cannot be read.
pub fn peak_rss_mib(pid: u32) -> f64 {
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.status())
        .ok()
        .and_then(|s| s.vmhwm)
        .map(|kib| kib as f64 / 1024.0)
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_are_counted_by_part() {
        assert_eq!(part_of(10, "order-worker", &[10, 11], 99), Some("workers"));
        assert_eq!(part_of(99, "choreo-bench", &[10], 99), Some("bench"));
        assert_eq!(part_of(5, "postgres", &[10], 99), Some("postgres"));
        assert_eq!(part_of(6, "beam.smp", &[10], 99), Some("rabbitmq"));
        assert_eq!(part_of(7, "bash", &[10], 99), None);
    }

    #[test]
    fn a_thread_that_ends_between_snapshots_takes_nothing_off_and_a_new_one_counts_in_full() {
        let snapshot = |threads: &[(i32, u64)]| Snapshot {
            at: Instant::now(),
            seconds: HashMap::new(),
            switches: threads.iter().map(|(tid, n)| (*tid, ("bench", *n))).collect(),
        };
        // Thread 2 ended with 50 switches; thread 3 started and made 4; thread 1 made 3 more.
        let used = snapshot(&[(1, 100), (2, 50)]).until(&snapshot(&[(1, 103), (3, 4)]), 1);
        let bench = used.switches_per_workflow.iter().find(|(p, _)| p == "bench").map(|(_, n)| *n);
        assert_eq!(bench, Some(7.0));
    }

    #[test]
    fn this_process_uses_cpu_and_memory() {
        let before = Snapshot::take(&[]);
        let mut x = 0u64;
        let start = Instant::now();
        while start.elapsed().as_millis() < 50 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let after = Snapshot::take(&[]);
        let used = before.until(&after, 1);
        let bench = used.ms_per_workflow.iter().find(|(p, _)| p == "bench").map(|(_, ms)| *ms).unwrap_or(0.0);
        assert!(bench > 0.0, "a busy loop of 50 ms shows as CPU time of the benchmark: {used:?}");
        let before = Snapshot::take(&[]);
        std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_millis(5))).join().expect("thread");
        std::thread::sleep(std::time::Duration::from_millis(5));
        let slept = before.until(&Snapshot::take(&[]), 1);
        let switches = slept.switches_per_workflow.iter().find(|(p, _)| p == "bench").map(|(_, n)| *n).unwrap_or(0.0);
        assert!(switches >= 1.0, "a thread that sleeps is switched out: {slept:?}");
        assert!(peak_rss_mib(std::process::id()) > 0.0);
    }
}
