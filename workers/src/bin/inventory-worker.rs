//! `inventory-worker`: reserves stock, all or nothing (see `choreo_workers::inventory`).

use anyhow::{Context, anyhow};
use choreo::Settings;
use choreo::{check_settings, prepare_database, run_worker, shutdown_on_signals};
use choreo_workers::inventory::{DEFAULT_CATALOGUE, InventoryService, MIGRATIONS, parse_catalogue, seed_catalogue};
use clap::Parser;
use tracing::info;

#[derive(Debug, Parser)]
#[command(version, about = "choreo inventory worker")]
struct Args {
    #[command(flatten)]
    common: Settings,
    /// This worker's database (default: `choreo_inventory` on DATABASE_URL's server).
    #[arg(long, env = "CHOREO_INVENTORY_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Stock seeded at start for skus not yet known, as `sku=units,...`; existing stock is never changed.
    #[arg(long, env = "CHOREO_INVENTORY_CATALOGUE", default_value = DEFAULT_CATALOGUE)]
    catalogue: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    args.common.metrics_addr.get_or_insert(std::net::SocketAddr::from(([127, 0, 0, 1], 9466)));
    check_settings(&args.common)?;
    let _telemetry = choreo::init_telemetry(args.common.log_format, "inventory-worker");
    let catalogue = parse_catalogue(&args.catalogue).map_err(|e| anyhow!("CHOREO_INVENTORY_CATALOGUE: {e}"))?;
    let options = args.common.database_options("inventory", args.database_url.as_deref()).context("database URL")?;
    let db = prepare_database(&options, args.common.db_pool_size, &MIGRATIONS).await?;
    let seeded = seed_catalogue(&db, &catalogue).await.context("seeding the catalogue")?;
    info!(new_skus = seeded, "catalogue seeded");
    run_worker(InventoryService, db, &args.common, shutdown_on_signals(), |_| {}).await
}
