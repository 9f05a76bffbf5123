//! The table, the JSON and the chart of a benchmark run.

use std::path::Path;

use plotters::element::DashedPathElement;
use plotters::prelude::*;
use serde::Serialize;

use crate::broker_ceiling::BrokerCeiling;
use crate::capacity::Bracket;
use crate::cpu::PARTS;
use crate::db_ceiling::DbCeiling;
use crate::sustained::{Search, kept_up};
use crate::wakeup::{WakeupCost, describe};
use crate::workflow::{HOPS, MESSAGES_PER_WORKFLOW, Measured, OFF_PATH, Run, STEPS_PER_WORKFLOW, maximum};

pub const TARGET_WORKFLOWS_PER_SECOND: f64 = 1_000.0;
pub const TARGET_P50_MS: f64 = 15.0;
pub const TARGET_P99_MS: f64 = 100.0;
pub const TARGET_BROKER_SHARE: f64 = 0.25;
pub const TARGET_RSS_MIB: f64 = 64.0;

#[derive(Debug, Serialize)]
pub struct Results {
    /// What a thread wake-up costs on this machine, in time and CPU (`None` if it could not be measured).
    pub wakeup: Option<WakeupCost>,
    pub broker: BrokerCeiling,
    pub database: DbCeiling,
    pub runs: Vec<Run>,
    /// The search for the maximum sustainable rate (`None` when skipped: the fastest burst is the maximum).
    pub maximum_sustainable: Option<Search>,
    /// Workflow messages per second at the maximum rate, divided by the broker's ceiling.
    pub broker_share: f64,
    /// Saga-step transactions per second at the maximum rate, divided by the database's ceiling.
    pub database_share: f64,
    /// The highest offered rate found to meet the latency targets, and the lowest above it found not to
    /// (`None` when the search was skipped).
    pub capacity_at_latency_targets: Option<Bracket>,
}

impl Results {
    pub fn new(wakeup: Option<WakeupCost>, broker: BrokerCeiling, database: DbCeiling, measured: Measured) -> Results {
        let Measured { runs, sustained, capacity } = measured;
        let max = maximum(&runs).map(|r| r.workflows_per_second).unwrap_or(0.0);
        Results {
            broker_share: max * MESSAGES_PER_WORKFLOW / broker.messages_per_second.max(1e-9),
            database_share: max * STEPS_PER_WORKFLOW / database.transactions_per_second.max(1e-9),
            wakeup,
            broker,
            database,
            runs,
            maximum_sustainable: sustained,
            capacity_at_latency_targets: capacity,
        }
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

pub fn print(r: &Results) {
    println!();
    println!("ceilings (same machine, same run)");
    println!(
        "  broker   {:>10.0} persistent messages/s through a quorum queue, confirms + acks",
        r.broker.messages_per_second
    );
    println!(
        "  database {:>10.0} saga-step transactions/s at {} at once",
        r.database.transactions_per_second, r.database.concurrency
    );
    match &r.wakeup {
        Some(cost) => println!("  wake-up  two pinned threads handing a byte back and forth: {}", describe(cost)),
        None => println!("  wake-up  not measured (see the log above)"),
    }
    println!();
    println!(
        "{:<16} {:>10} {:>10} {:>9} {:>9} {:>9} {:>26}",
        "run", "offered/s", "workflows/s", "p50 ms", "p99 ms", "max ms", "peak RSS MiB (o/p/i)"
    );
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
    hops_table(
        "where the time goes: p50 of each hop of a confirmed order, ms (from each handler's write)",
        &r.runs,
        |run| &run.hops_p50_ms,
    );
    println!();
    hops_table(
        "where a stall was: each hop of the slowest confirmed order of the run, ms (a stall delays every order then in that hop)",
        &r.runs,
        |run| &run.slowest_hops_ms,
    );
    println!();
    println!(
        "the machine during each run, ms: the most a 10 ms sleep overran, the longest flush of 4 KiB (a stall all hops share and these do not is not the machine's)"
    );
    println!("{:<16} {:>16} {:>16}", "run", "timer late", "4 KiB flush");
    for run in &r.runs {
        let flush = run.machine.flush_max_ms.map(|ms| format!("{ms:.1}")).unwrap_or_else(|| "-".into());
        println!("{:<16} {:>16.1} {:>16}", run.label, run.machine.timer_late_max_ms, flush);
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
    println!();
    println!(
        "off the fast path: counts per run, all workers (a stall in a run with none is not the workers' retry or relay path)"
    );
    print!("{:<16}", "run");
    for (_, name) in OFF_PATH {
        print!(" {name:>16}");
    }
    println!();
    for run in &r.runs {
        print!("{:<16}", run.label);
        for (_, n) in &run.off_path {
            print!(" {n:>16.0}");
        }
        println!();
    }
    let max = maximum(&r.runs);
    let half = r.runs.iter().find(|run| run.label.starts_with("50%"));
    println!();
    println!("maximum sustainable rate (steady loads; one run per rate, an estimate)");
    match &r.maximum_sustainable {
        Some(search) => println!("  {}", search.describe()),
        None => println!("  not searched: the fastest burst stands for the maximum"),
    }
    println!();
    println!("targets");
    if let Some(max) = max {
        println!(
            "  workflows/s at maximum      {:>8.0}  (target >= {TARGET_WORKFLOWS_PER_SECOND:.0})  {}",
            max.workflows_per_second,
            verdict(max.workflows_per_second >= TARGET_WORKFLOWS_PER_SECOND)
        );
        let rss = max.peak_rss_mib.iter().map(|(_, m)| *m).fold(0.0, f64::max);
        println!(
            "  peak RSS per worker         {:>8.1}  (target < {TARGET_RSS_MIB:.0} MiB)  {}",
            rss,
            verdict(rss < TARGET_RSS_MIB)
        );
    }
    if let Some(half) = half {
        println!(
            "  p50 at 50% of maximum       {:>8.1}  (target <= {TARGET_P50_MS:.0} ms)  {}",
            half.latency_p50_ms,
            verdict(half.latency_p50_ms <= TARGET_P50_MS)
        );
        println!(
            "  p99 at 50% of maximum       {:>8.1}  (target <= {TARGET_P99_MS:.0} ms)  {}",
            half.latency_p99_ms,
            verdict(half.latency_p99_ms <= TARGET_P99_MS)
        );
    }
    println!(
        "  workflow msgs/s / broker    {:>8.3}  (target >= {TARGET_BROKER_SHARE})  {}",
        r.broker_share,
        verdict(r.broker_share >= TARGET_BROKER_SHARE)
    );
    println!("  saga steps/s / database     {:>8.3}  (for reference)", r.database_share);
    if let Some(b) = &r.capacity_at_latency_targets {
        println!();
        println!(
            "capacity at the latency targets (p50 <= {TARGET_P50_MS:.0} ms and p99 <= {TARGET_P99_MS:.0} ms; one run per rate, an estimate)"
        );
        println!("  {}", b.describe());
    }
}

/// One row of hop times per run, under `title`.
fn hops_table(title: &str, runs: &[Run], hops: fn(&Run) -> &Vec<(String, f64)>) {
    println!("{title}");
    print!("{:<16}", "run");
    for hop in HOPS {
        print!(" {hop:>22}");
    }
    println!();
    for run in runs {
        print!("{:<16}", run.label);
        for (_, ms) in hops(run) {
            print!(" {ms:>22.1}");
        }
        println!();
    }
}

/// A drawing error as an `anyhow` error (plotters' errors borrow from the backend's types).
fn drawing<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the chart: {e}")
}

/// Ticks of a logarithmic axis from `low` to `high`: 1, 2 and 5 times each power of ten.
fn log_ticks(low: f64, high: f64) -> Vec<f64> {
    (-1..=6).flat_map(|e| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(e))).filter(|t| (low..=high).contains(t)).collect()
}

/// End-to-end latency against throughput: p50 and p99 of each fixed-load run that kept up on a logarithmic
/// axis, the latency targets as dashed lines, and the maximum as a vertical line. A burst's latency is left
/// out, and so is that of a run that fell behind: each is the queueing of a backlog, which grows with the
/// run's length, not a service time, and would flatten everything else.
pub fn chart(r: &Results, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(drawing)?;
    let max = maximum(&r.runs).map(|run| run.workflows_per_second).unwrap_or(0.0);
    let mut loads: Vec<&Run> = r.runs.iter().filter(|run| kept_up(run)).collect();
    loads.sort_by(|a, b| a.workflows_per_second.total_cmp(&b.workflows_per_second));
    let x_max = loads.iter().map(|run| run.workflows_per_second).fold(max, f64::max).max(1.0) * 1.08;
    let y_min = (loads.iter().map(|run| run.latency_p50_ms).fold(TARGET_P50_MS, f64::min) / 2.0).max(0.1);
    let y_max = loads.iter().map(|run| run.latency_p99_ms).fold(TARGET_P99_MS, f64::max) * 2.0;
    let mut chart = ChartBuilder::on(&root)
        .caption("choreo: end-to-end latency against throughput", ("sans-serif", 20))
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, (y_min..y_max).log_scale().with_key_points(log_ticks(y_min, y_max)))
        .map_err(drawing)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| if *y < 1.0 { format!("{y}") } else { format!("{y:.0}") })
        .x_desc("workflows per second")
        .y_desc("latency (ms, logarithmic)")
        .draw()
        .map_err(drawing)?;
    let red = RGBColor(200, 30, 30);
    for (name, color, target, latency) in [
        ("p50", BLUE, TARGET_P50_MS, (|run: &Run| run.latency_p50_ms) as fn(&Run) -> f64),
        ("p99", red, TARGET_P99_MS, |run: &Run| run.latency_p99_ms),
    ] {
        // A latency below the axis (0 ms, which a logarithmic axis cannot show) sits on its floor.
        let points: Vec<(f64, f64)> =
            loads.iter().map(|run| (run.workflows_per_second, latency(run).max(y_min))).collect();
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
            .map_err(drawing)?
            .label(format!("{name} of the fixed-load runs"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled()))).map_err(drawing)?;
        chart
            .draw_series(DashedLineSeries::new([(0.0, target), (x_max, target)], 6, 4, color.stroke_width(1)))
            .map_err(drawing)?
            .label(format!("{name} target, {target:.0} ms"))
            .legend(move |(x, y)| DashedPathElement::new(vec![(x, y), (x + 20, y)], 6, 4, color));
    }
    if max > 0.0 {
        chart
            .draw_series(LineSeries::new([(max, y_min), (max, y_max)], BLACK.stroke_width(1)))
            .map_err(drawing)?
            .label(match r.maximum_sustainable.as_ref().and_then(|search| search.kept_up) {
                Some(_) => format!("maximum sustainable, {max:.0}/s"),
                None => format!("maximum, {max:.0}/s"),
            })
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
        let half = max * 0.5;
        chart
            .draw_series(DashedLineSeries::new([(half, y_min), (half, y_max)], 6, 4, BLACK.stroke_width(1)))
            .map_err(drawing)?
            .label(format!("50% of the maximum, {half:.0}/s"))
            .legend(|(x, y)| DashedPathElement::new(vec![(x, y), (x + 20, y)], 6, 4, BLACK));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(drawing)?;
    root.present().map_err(drawing)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuUse;

    fn run(label: &str, offered: Option<f64>, per_second: f64, p50: f64, p99: f64) -> Run {
        Run {
            label: label.into(),
            offered_per_second: offered,
            orders: 1000,
            workflows_per_second: per_second,
            latency_p50_ms: p50,
            latency_p99_ms: p99,
            latency_max_ms: p99 * 1.5,
            latency_p50_halves_ms: None,
            peak_rss_mib: vec![],
            hops_p50_ms: vec![],
            slowest_hops_ms: vec![],
            cpu: CpuUse { ms_per_workflow: vec![], cores_busy: 0.0, switches_per_workflow: vec![] },
            off_path: vec![],
            machine: crate::probe::Stalls::default(),
        }
    }

    /// The loaded runs that kept up, not the queueing of a burst or of a run that fell behind, set the
    /// latency axis: a 9-second burst would flatten a 10 ms point into the axis.
    #[test]
    fn the_chart_shows_the_loaded_runs_against_the_targets_and_leaves_backlogs_out() {
        let runs = vec![
            run("maximum", Some(1010.0), 1000.0, 150.0, 300.0),
            run("steady 1300/s", Some(1300.0), 1050.0, 4000.0, 7000.0),
            run("fastest burst", None, 1300.0, 8000.0, 9000.0),
            run("20% of maximum", Some(200.0), 200.0, 12.0, 40.0),
            run("50% of maximum", Some(500.0), 500.0, 30.0, 80.0),
        ];
        let broker = BrokerCeiling { messages: 1, seconds: 1.0, messages_per_second: 10_000.0 };
        let database = DbCeiling { concurrency: 1, transactions: 1, seconds: 1.0, transactions_per_second: 5_000.0 };
        let mut search = Search::new(1300.0);
        search.record(1300.0, 1050.0);
        search.record(1010.0, 1000.0);
        let results = Results::new(None, broker, database, Measured { runs, sustained: Some(search), capacity: None });
        let dir = std::env::temp_dir().join(format!("choreo-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("workflow.svg");
        chart(&results, &path).expect("chart");
        let svg = std::fs::read_to_string(&path).expect("svg");
        std::fs::remove_dir_all(&dir).ok();
        for label in
            ["p50 target, 15 ms", "p99 target, 100 ms", "maximum sustainable, 1000/s", "50% of the maximum, 500/s"]
        {
            assert!(svg.contains(label), "the chart names {label:?}");
        }
        // Two circles per loaded run that kept up (p50 and p99), none for the burst or the run that fell behind.
        assert_eq!(svg.matches("<circle").count(), 6, "{svg}");
        // The latency axis reaches twice the highest p99 of those runs (or of the target), not the burst's 9 s
        // nor the backlog's 7 s; the throughput axis a little past the maximum. No tick label comes near 9,000.
        let ticks: Vec<f64> = svg
            .split("<text")
            .skip(1)
            .filter_map(|t| t.split_once('>').and_then(|(_, rest)| rest.split('<').next()).map(str::trim))
            .filter_map(|t| t.parse().ok())
            .collect();
        for tick in [10.0, 20.0, 50.0, 100.0] {
            assert!(ticks.contains(&tick), "a latency tick at {tick} ms: {ticks:?}");
        }
        assert!(ticks.iter().all(|t| *t < 2000.0), "no tick near the burst's latency: {ticks:?}");
    }
}
