//! `choreo-bench`: how fast the whole workflow runs, measured against the physical ceilings of the same
//! machine in the same run (see docs/performance.md). It prints figures; it asserts nothing.
//!
//! 1. the broker's ceiling: persistent messages through a quorum queue with publisher confirms and consumer
//!    acks, with the same client library;
//! 2. the database's ceiling for one saga step: inbox insert + state update + outbox insert in one
//!    transaction, at the workers' concurrency;
//! 3. the workflow in a few bursts, then at its maximum sustainable rate (the highest load offered steadily
//!    that it keeps up with, searched for from the fastest burst's rate down), then at 20% and 50% of that,
//!    with end-to-end latency and each worker's peak memory;
//! 4. the capacity at the latency targets: the highest offered rate whose p50 and p99 meet them, found by
//!    bisection between the fixed loads.
//!
//! Beside the ceilings it measures what a thread wake-up costs on this machine, in time and in CPU, on one CPU
//! and across two: a workflow is a chain of such hand-offs.

mod broker_ceiling;
mod capacity;
mod cpu;
mod db_ceiling;
mod probe;
mod report;
mod sustained;
mod wakeup;
mod workflow;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Workflow throughput and latency against the broker's and database's ceilings")]
pub struct Args {
    /// AMQP URL of the broker.
    #[arg(long, env = "AMQP_URL", hide_env_values = true)]
    amqp_url: String,
    /// PostgreSQL server URL (databases are created and dropped by the run).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Messages for the broker ceiling.
    #[arg(long, default_value_t = 40_000)]
    broker_messages: usize,
    /// Duration of the database ceiling.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    db_duration: Duration,
    /// Concurrent saga-step transactions (the workers' database pools together: 3 x 16).
    #[arg(long, default_value_t = 48)]
    db_concurrency: usize,
    /// Orders in each burst.
    #[arg(long, default_value_t = 10_000)]
    max_rate_orders: usize,
    /// Bursts of `max-rate-orders` placed at once; the fastest (noise on a shared machine only slows a burst
    /// down) is where the search for the maximum sustainable rate starts, the others are printed as slower
    /// bursts.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    max_rate_bursts: u32,
    /// Offered rate of a last, light run (workflows/s): the service time of a workflow without queueing, to
    /// set beside the loaded runs (0 skips it).
    #[arg(long, default_value_t = 100.0)]
    light_rate: f64,
    /// Further fixed offered rates to run after the others (workflows/s, comma-separated), e.g. to compare
    /// two builds at the same load.
    #[arg(long, value_delimiter = ',')]
    rates: Vec<f64>,
    /// Steady-load runs that search for the maximum sustainable rate, from the fastest burst's rate down
    /// (0 skips the search, and the fastest burst stands for the maximum).
    #[arg(long, default_value_t = 4)]
    sustain_steps: usize,
    /// Fixed-load runs that bisect for the highest offered rate meeting the latency targets (p50 and p99),
    /// after the others (0 skips the search).
    #[arg(long, default_value_t = 3)]
    capacity_steps: usize,
    /// Duration of each fixed-load run.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    load_duration: Duration,
    /// Where the JSON results and the SVG chart go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Directory of the worker binaries (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?.parent().context("binary directory")?.to_path_buf(),
    };
    // Context for the latency figures, not one of them: without it the bench still runs.
    let wakeup = match wakeup::measure() {
        Ok(cost) => {
            eprintln!("[bench] thread wake-ups: {}", wakeup::describe(&cost));
            Some(cost)
        }
        Err(e) => {
            eprintln!("[bench] thread wake-ups not measured: {e:#}");
            None
        }
    };
    eprintln!(
        "[bench] 1/3 broker ceiling: {} persistent messages, quorum queue, confirms and acks",
        args.broker_messages
    );
    let broker = broker_ceiling::measure(&args.amqp_url, args.broker_messages).await?;
    eprintln!("[bench]     {:.0} messages/s", broker.messages_per_second);
    eprintln!(
        "[bench] 2/3 database ceiling: saga-step transactions, {} at once, {:?}",
        args.db_concurrency, args.db_duration
    );
    let db = db_ceiling::measure(&args.database_url, args.db_concurrency, args.db_duration).await?;
    eprintln!("[bench]     {:.0} transactions/s", db.transactions_per_second);
    let search = match args.capacity_steps {
        0 => String::new(),
        n => format!(", then up to {n} runs bisecting for the capacity at the latency targets"),
    };
    let maximum = match args.sustain_steps {
        0 => "the fastest burst as the maximum".to_owned(),
        n => format!("up to {n} steady loads searching for the maximum sustainable rate"),
    };
    eprintln!(
        "[bench] 3/3 workflow: {} bursts, {maximum}, then 20% and 50% of it, then {} workflows/s{search}",
        args.max_rate_bursts, args.light_rate
    );
    let measured = workflow::measure(&args, &bin_dir).await?;
    let results = report::Results::new(wakeup, broker, db, measured);
    report::print(&results);
    std::fs::create_dir_all(&args.out)?;
    let json = args.out.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(&results)?)?;
    let svg = args.out.join("workflow.svg");
    report::chart(&results, &svg)?;
    eprintln!("[bench] wrote {} and {}", json.display(), svg.display());
    Ok(())
}
