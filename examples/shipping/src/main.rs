//! `shipping-worker`: schedules a shipment for every confirmed order (see `choreo_shipping`).

use choreo_shipping::{METRICS_PORT, MIGRATIONS, ShippingHandler};

#[choreo::tokio::main(crate = "choreo::tokio", flavor = "current_thread")]
async fn main() -> choreo::anyhow::Result<()> {
    let (mut settings, database_url) = choreo::Settings::parse_for("shipping");
    settings.metrics_addr.get_or_insert(([127, 0, 0, 1], METRICS_PORT).into());
    choreo::serve_plain(ShippingHandler, &MIGRATIONS, settings, database_url).await
}
