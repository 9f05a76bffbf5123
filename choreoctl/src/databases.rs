//! The three service databases, for commands that read across services.

use anyhow::Context;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

pub const SERVICES: [&str; 3] = ["order", "payment", "inventory"];

#[derive(Debug, Clone, clap::Args)]
pub struct ServiceDbArgs {
    /// PostgreSQL server URL; service `X` uses database `choreo_X` on it unless `CHOREO_X_DATABASE_URL` is set.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://choreo:choreo@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    pub server_database_url: String,
}

impl ServiceDbArgs {
    pub async fn connect(&self, service: &str) -> anyhow::Result<PgPool> {
        let own = std::env::var(format!("CHOREO_{}_DATABASE_URL", service.to_uppercase())).ok();
        connect(service, own.as_deref(), &self.server_database_url).await
    }
}

/// Service `service`'s database: `own_url` if given, else database `choreo_<service>` on `server_url`.
pub async fn connect(service: &str, own_url: Option<&str>, server_url: &str) -> anyhow::Result<PgPool> {
    let options = choreo_outbox::service_database(service, own_url, server_url)
        .with_context(|| format!("{service} database URL"))?;
    PgPoolOptions::new().max_connections(2).connect_with(options).await.with_context(|| {
        format!("connecting to the {service} database (has {service}-worker run once? check DATABASE_URL)")
    })
}
