//! The table, the JSON and the chart of a benchmark run.

use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::broker_ceiling::BrokerCeiling;
use crate::capacity::Bracket;
use crate::cpu::PARTS;
use crate::db_ceiling::DbCeiling;
use crate::wakeup::{WakeupCost, describe};
use crate::workflow::{HOPS, MESSAGES_PER_WORKFLOW, Run, STEPS_PER_WORKFLOW};

pub const TARGET_WORKFLOWS_PER_SECOND: f64 = 1_000.0;
pub const TARGET_P50_MS: f64 = 15.0;
pub const TARGET_P99_MS: f64 = 100.0;
pub const TARGET_BROKER_SHARE: f64 = 0.25;
pub const TARGET_RSS_MIB: f64 = 64.0;

#[derive(Debug, Serialize)]
pub struct Results {
    /// Round trip of two thread wake-ups on this machine (`None` if it could not be measured).
    pub wakeup: Option<WakeupCost>,
    pub broker: BrokerCeiling,
    pub database: DbCeiling,
    pub runs: Vec<Run>,
    /// Workflow messages per second at the maximum rate, divided by the broker's ceiling.
    pub broker_share: f64,
    /// Saga-step transactions per second at the maximum rate, divided by the database's ceiling.
    pub database_share: f64,
    /// The highest offered rate found to meet the latency targets, and the lowest above it found not to
    /// (`None` when the search was skipped).
    pub capacity_at_latency_targets: Option<Bracket>,
}

impl Results {
    pub fn new(
        wakeup: Option<WakeupCost>,
        broker: BrokerCeiling,
        database: DbCeiling,
        runs: Vec<Run>,
        capacity_at_latency_targets: Option<Bracket>,
    ) -> Results {
        let max = runs.first().map(|r| r.workflows_per_second).unwrap_or(0.0);
        Results {
            broker_share: max * MESSAGES_PER_WORKFLOW / broker.messages_per_second.max(1e-9),
            database_share: max * STEPS_PER_WORKFLOW / database.transactions_per_second.max(1e-9),
            wakeup,
            broker,
            database,
            runs,
            capacity_at_latency_targets,
        }
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

pub fn print(r: &Results) {
    println!();
    println!("ceilings (same machine, same run)");
    println!("  broker   {:>10.0} persistent messages/s through a quorum queue, confirms + acks", r.broker.messages_per_second);
    println!("  database {:>10.0} saga-step transactions/s at {} at once", r.database.transactions_per_second, r.database.concurrency);
    match &r.wakeup {
        Some(cost) => println!("  wake-up  round trip (two wake-ups) between two pinned threads: {}", describe(cost)),
        None => println!("  wake-up  not measured (see the log above)"),
    }
    println!();
    println!("{:<16} {:>10} {:>10} {:>9} {:>9} {:>9} {:>26}", "run", "offered/s", "workflows/s", "p50 ms", "p99 ms", "max ms", "peak RSS MiB (o/p/i)");
    for run in &r.runs {
        let rss: Vec<String> = run.peak_rss_mib.iter().map(|(_, m)| format!("{m:.0}")).collect();
        println!(
            "{:<16} {:>10} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>26}",
            run.label,
            run.offered_per_second.map(|o| format!("{o:.0}")).unwrap_or_else(|| "max".into()),
            run.workflows_per_second,
            run.latency_p50_ms,
            run.latency_p99_ms,
            run.latency_max_ms,
            rss.join(" / ")
        );
    }
    println!();
    println!("where the time goes: p50 of each hop of a confirmed order, ms (from each handler's transaction start)");
    print!("{:<16}", "run");
    for hop in HOPS {
        print!(" {hop:>22}");
    }
    println!();
    for run in &r.runs {
        print!("{:<16}", run.label);
        for (_, ms) in &run.hops_p50_ms {
            print!(" {ms:>22.1}");
        }
        println!();
    }
    println!();
    println!("where the CPU goes: ms of processor time per workflow (postgres and rabbitmq: 0 if not on this machine)");
    print!("{:<16}", "run");
    for part in PARTS {
        print!(" {part:>9}");
    }
    println!(" {:>9} {:>12}", "total", "cores busy");
    for run in &r.runs {
        print!("{:<16}", run.label);
        for (_, ms) in &run.cpu.ms_per_workflow {
            print!(" {ms:>9.2}");
        }
        println!(" {:>9.2} {:>12.2}", run.cpu.total_ms_per_workflow(), run.cpu.cores_busy);
    }
    println!();
    println!("wake-ups: context switches per workflow, all threads (a wake-up costs more than the work here)");
    print!("{:<16}", "run");
    for part in PARTS {
        print!(" {part:>9}");
    }
    println!(" {:>9}", "total");
    for run in &r.runs {
        print!("{:<16}", run.label);
        for (_, n) in &run.cpu.switches_per_workflow {
            print!(" {n:>9.1}");
        }
        println!(" {:>9.1}", run.cpu.switches_per_workflow.iter().map(|(_, n)| n).sum::<f64>());
    }
    let max = r.runs.first();
    let half = r.runs.iter().find(|run| run.label.starts_with("50%"));
    println!();
    println!("targets");
    if let Some(max) = max {
        println!("  workflows/s at maximum      {:>8.0}  (target >= {TARGET_WORKFLOWS_PER_SECOND:.0})  {}", max.workflows_per_second, verdict(max.workflows_per_second >= TARGET_WORKFLOWS_PER_SECOND));
        let rss = max.peak_rss_mib.iter().map(|(_, m)| *m).fold(0.0, f64::max);
        println!("  peak RSS per worker         {:>8.1}  (target < {TARGET_RSS_MIB:.0} MiB)  {}", rss, verdict(rss < TARGET_RSS_MIB));
    }
    if let Some(half) = half {
        println!("  p50 at 50% of maximum       {:>8.1}  (target <= {TARGET_P50_MS:.0} ms)  {}", half.latency_p50_ms, verdict(half.latency_p50_ms <= TARGET_P50_MS));
        println!("  p99 at 50% of maximum       {:>8.1}  (target <= {TARGET_P99_MS:.0} ms)  {}", half.latency_p99_ms, verdict(half.latency_p99_ms <= TARGET_P99_MS));
    }
    println!("  workflow msgs/s / broker    {:>8.3}  (target >= {TARGET_BROKER_SHARE})  {}", r.broker_share, verdict(r.broker_share >= TARGET_BROKER_SHARE));
    println!("  saga steps/s / database     {:>8.3}  (for reference)", r.database_share);
    if let (Some(b), Some(max)) = (&r.capacity_at_latency_targets, max) {
        println!();
        println!("capacity at the latency targets (p50 <= {TARGET_P50_MS:.0} ms and p99 <= {TARGET_P99_MS:.0} ms; one run per rate, an estimate)");
        if b.meets > 0.0 {
            println!(
                "  met up to {:.0} workflows/s ({:.0}% of the maximum), not met at {:.0} workflows/s ({:.0}%)",
                b.meets,
                100.0 * b.meets / max.workflows_per_second,
                b.fails,
                100.0 * b.fails / max.workflows_per_second
            );
        } else {
            println!("  not met at any rate tried, down to {:.0} workflows/s", b.fails);
        }
    }
}

/// Latency against offered load, one point per run.
pub fn chart(r: &Results, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let points: Vec<(f64, f64, f64)> = r.runs.iter().map(|run| (run.workflows_per_second, run.latency_p50_ms, run.latency_p99_ms)).collect();
    let x_max = points.iter().map(|p| p.0).fold(1.0, f64::max) * 1.1;
    let y_max = points.iter().map(|p| p.2).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption("choreo: end-to-end latency against throughput", ("sans-serif", 20))
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("workflows per second")
        .y_desc("latency (ms)")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut sorted = points.clone();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    chart
        .draw_series(LineSeries::new(sorted.iter().map(|p| (p.0, p.1)), &BLUE))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .label("p50")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(sorted.iter().map(|p| (p.0, p.2)), &RED))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .label("p99")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .draw_series(sorted.iter().map(|p| Circle::new((p.0, p.2), 4, RED.filled())))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
