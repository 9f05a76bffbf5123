//! `payment-worker`: charges and refunds through the payment gateway (see `choreo_workers::payment`).

use anyhow::Context;
use choreo::Settings;
use choreo::{check_settings, prepare_database, run_worker, shutdown_on_signals};
use choreo_workers::gateway::SimulatedGateway;
use choreo_workers::http_gateway::{HttpGateway, HttpGatewayConfig};
use choreo_workers::payment::{MIGRATIONS, PaymentService};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(version, about = "choreo payment worker")]
struct Args {
    #[command(flatten)]
    common: Settings,
    /// This worker's database (default: `choreo_payment` on DATABASE_URL's server).
    #[arg(long, env = "CHOREO_PAYMENT_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Simulated gateway: charges above this many minor units are declined with `amount_over_limit`.
    #[arg(long, env = "CHOREO_GATEWAY_LIMIT_CENTS", default_value_t = 1_000_000)]
    gateway_limit_cents: i64,
    /// Simulated gateway: share of charges (0 to 1) that fail transiently at random.
    #[arg(long, env = "CHOREO_GATEWAY_TRANSIENT_FAILURE_RATE", default_value_t = 0.0)]
    gateway_transient_failure_rate: f64,
    /// Simulated gateway: abort the process when a customer id starts with `crash`, to exercise crash
    /// handling (off by default: any client could trigger it).
    #[arg(long, env = "CHOREO_GATEWAY_CRASHES")]
    gateway_crashes: bool,
    /// Payment gateway adapter: `simulated` (deterministic rules, see docs) or `http`.
    #[arg(long, env = "CHOREO_GATEWAY", default_value = "simulated", value_parser = ["simulated", "http"])]
    gateway: String,
    /// Base URL of the HTTP payment gateway (with `CHOREO_GATEWAY=http`).
    #[arg(long, env = "CHOREO_GATEWAY_URL", default_value = "http://127.0.0.1:8080")]
    gateway_url: String,
    /// Deadline of one HTTP gateway call.
    #[arg(long, env = "CHOREO_GATEWAY_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    gateway_timeout: std::time::Duration,
    /// Retries of a failed HTTP gateway call, with backoff and jitter.
    #[arg(long, env = "CHOREO_GATEWAY_RETRIES", default_value_t = 2)]
    gateway_retries: usize,
    /// Consecutive failed gateway calls that open the circuit breaker.
    #[arg(long, env = "CHOREO_GATEWAY_BREAKER_FAILURES", default_value_t = 5)]
    gateway_breaker_failures: u32,
    /// How long the circuit stays open before a trial call.
    #[arg(long, env = "CHOREO_GATEWAY_BREAKER_OPEN", default_value = "10s", value_parser = humantime::parse_duration)]
    gateway_breaker_open: std::time::Duration,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    args.common.metrics_addr.get_or_insert(std::net::SocketAddr::from(([127, 0, 0, 1], 9465)));
    check_settings(&args.common)?;
    let _telemetry = choreo::init_telemetry(args.common.log_format, "payment-worker");
    let options = args.common.database_options("payment", args.database_url.as_deref()).context("database URL")?;
    let db = prepare_database(&options, args.common.db_pool_size, &MIGRATIONS).await?;
    if args.gateway == "http" {
        let gateway = HttpGateway::new(HttpGatewayConfig {
            base_url: args.gateway_url.clone(),
            timeout: args.gateway_timeout,
            retries: args.gateway_retries,
            breaker_failures: args.gateway_breaker_failures,
            breaker_open_for: args.gateway_breaker_open,
        })?;
        run_worker(PaymentService::new(gateway), db, &args.common, shutdown_on_signals(), |_| {}).await
    } else {
        let gateway = SimulatedGateway::new(args.gateway_limit_cents, args.gateway_transient_failure_rate)
            .with_crashes(args.gateway_crashes);
        run_worker(PaymentService::new(gateway), db, &args.common, shutdown_on_signals(), |_| {}).await
    }
}
