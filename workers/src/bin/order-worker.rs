//! `order-worker`: creates orders and settles them (see `choreo_workers::order`).

use anyhow::Context;
use choreo::Settings;
use choreo::{check_settings, prepare_database, run_worker, shutdown_on_signals};
use choreo_workers::order::{MIGRATIONS, OrderService};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(version, about = "choreo order worker")]
struct Args {
    #[command(flatten)]
    common: Settings,
    /// This worker's database (default: `choreo_order` on DATABASE_URL's server).
    #[arg(long, env = "CHOREO_ORDER_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    args.common.metrics_addr.get_or_insert(std::net::SocketAddr::from(([127, 0, 0, 1], 9464)));
    check_settings(&args.common)?;
    let _telemetry = choreo::init_telemetry(args.common.log_format, "order-worker");
    let options = args.common.database_options("order", args.database_url.as_deref()).context("database URL")?;
    let db = prepare_database(&options, args.common.db_pool_size, &MIGRATIONS).await?;
    run_worker(OrderService, db, &args.common, shutdown_on_signals(), |_| {}).await
}
