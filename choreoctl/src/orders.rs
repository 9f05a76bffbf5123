//! `choreoctl orders`: what the order service knows.

use std::process::ExitCode;

use anyhow::Context;
use serde::Serialize;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::table;

#[derive(Debug, Clone, clap::Args)]
pub struct DbArgs {
    /// The order service's database (default: `choreo_order` on DATABASE_URL's server).
    #[arg(long, env = "CHOREO_ORDER_DATABASE_URL", hide_env_values = true)]
    pub order_database_url: Option<String>,
    /// PostgreSQL server URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://choreo:choreo@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    pub server_database_url: String,
}

impl DbArgs {
    pub async fn connect(&self) -> anyhow::Result<PgPool> {
        crate::databases::connect("order", self.order_database_url.as_deref(), &self.server_database_url).await
    }
}

#[derive(Debug, clap::Args)]
pub struct OrdersArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Show one order: status and history.
    #[arg(long)]
    id: Option<Uuid>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct StatusCount {
    status: String,
    reason: Option<String>,
    orders: i64,
}

#[derive(Debug, Serialize)]
struct HistoryEntry {
    at: chrono::DateTime<chrono::Utc>,
    status: String,
    detail: Option<String>,
    message_type: String,
    message_id: Uuid,
}

pub async fn run(args: OrdersArgs) -> anyhow::Result<ExitCode> {
    let db = args.db.connect().await?;
    match args.id {
        None => {
            let rows =
                sqlx::query("SELECT status, cancel_reason, count(*) AS n FROM orders GROUP BY 1, 2 ORDER BY 1, 2")
                    .fetch_all(&db)
                    .await
                    .context("counting orders")?;
            let counts: Vec<StatusCount> = rows
                .iter()
                .map(|r| {
                    Ok(StatusCount {
                        status: r.try_get("status")?,
                        reason: r.try_get("cancel_reason")?,
                        orders: r.try_get("n")?,
                    })
                })
                .collect::<Result<_, sqlx::Error>>()?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&counts)?);
            } else {
                let mut t = table::new(&["STATUS", "REASON", "ORDERS"]);
                for c in &counts {
                    t.add_row(table::row([
                        c.status.clone(),
                        c.reason.clone().unwrap_or_else(|| "-".into()),
                        c.orders.to_string(),
                    ]));
                }
                let total = counts.iter().map(|c| c.orders).sum::<i64>();
                t.add_row(table::row(["total".to_owned(), String::new(), total.to_string()]));
                println!("{}", table::render(&mut t, &[2]));
            }
        }
        Some(id) => {
            let order = sqlx::query(
                "SELECT status, cancel_reason, customer_id, total_cents, currency, placed_at, completed_at \
                 FROM orders WHERE order_id = $1",
            )
            .bind(id)
            .fetch_optional(&db)
            .await
            .context("reading the order")?;
            let Some(order) = order else {
                eprintln!(
                    "order {id} is unknown to the order service (not placed yet, or its order.place was dead-lettered: see `choreoctl dlq list`)"
                );
                return Ok(ExitCode::from(1));
            };
            let history: Vec<HistoryEntry> = sqlx::query(
                "SELECT at, status, detail, message_type, message_id FROM order_history WHERE order_id = $1 ORDER BY id",
            )
            .bind(id)
            .fetch_all(&db)
            .await?
            .iter()
            .map(|r| {
                Ok(HistoryEntry {
                    at: r.try_get("at")?,
                    status: r.try_get("status")?,
                    detail: r.try_get("detail")?,
                    message_type: r.try_get("message_type")?,
                    message_id: r.try_get("message_id")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?;
            let status: String = order.try_get("status")?;
            let reason: Option<String> = order.try_get("cancel_reason")?;
            if args.json {
                let value = serde_json::json!({
                    "order_id": id,
                    "status": status,
                    "cancel_reason": reason,
                    "customer_id": order.try_get::<String, _>("customer_id")?,
                    "total_cents": order.try_get::<i64, _>("total_cents")?,
                    "currency": order.try_get::<String, _>("currency")?,
                    "history": history,
                });
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                println!("order {id}: {status}{}", reason.map(|r| format!(" ({r})")).unwrap_or_default());
                let mut t = table::new(&["AT", "STATUS", "DETAIL", "BY", "MESSAGE ID"]);
                for h in &history {
                    t.add_row(table::row([
                        h.at.format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
                        h.status.clone(),
                        h.detail.clone().unwrap_or_else(|| "-".into()),
                        h.message_type.clone(),
                        h.message_id.to_string(),
                    ]));
                }
                println!("{}", table::render(&mut t, &[]));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
