//! `payment-worker`: charges and refunds through the payment gateway (see `choreo_workers::payment`).

use anyhow::Context;
use clap::Parser;
use choreo_workers::config::CommonArgs;
use choreo_workers::gateway::SimulatedGateway;
use choreo_workers::payment::{MIGRATIONS, PaymentService};
use choreo_workers::runtime::{prepare_database, run_worker, shutdown_on_signals};
use choreo_workers::telemetry::init_logs;

#[derive(Debug, Parser)]
#[command(version, about = "choreo payment worker")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// This worker's database (default: `choreo_payment` on DATABASE_URL's server).
    #[arg(long, env = "CHOREO_PAYMENT_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Simulated gateway: charges above this many minor units are declined with `amount_over_limit`.
    #[arg(long, env = "CHOREO_GATEWAY_LIMIT_CENTS", default_value_t = 1_000_000)]
    gateway_limit_cents: i64,
    /// Simulated gateway: share of charges (0 to 1) that fail transiently at random.
    #[arg(long, env = "CHOREO_GATEWAY_TRANSIENT_FAILURE_RATE", default_value_t = 0.0)]
    gateway_transient_failure_rate: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logs(args.common.log_format);
    let options = args.common.database_options("payment", args.database_url.as_deref()).context("database URL")?;
    let db = prepare_database(&options, args.common.db_pool_size, &MIGRATIONS).await?;
    let service = PaymentService::new(SimulatedGateway::new(args.gateway_limit_cents, args.gateway_transient_failure_rate));
    run_worker(service, db, &args.common, shutdown_on_signals(), |_| {}).await
}
