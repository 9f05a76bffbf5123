//! `choreoctl trace ID`: the whole story of one workflow across the services, in time order: every message
//! each service received (its inbox) and sent (its outbox), and the order's status changes.

use std::process::ExitCode;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;
use uuid::Uuid;

use crate::databases::{SERVICES, ServiceDbArgs};
use crate::table;

#[derive(Debug, clap::Args)]
pub struct TraceArgs {
    /// An order id or a correlation id (for orders placed by choreoctl they are the same).
    id: Uuid,
    #[command(flatten)]
    db: ServiceDbArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize, Clone)]
pub struct Step {
    pub at: DateTime<Utc>,
    pub service: &'static str,
    /// `received`, `sent` or `status`.
    pub what: &'static str,
    pub message_type: String,
    pub message_id: Option<Uuid>,
    pub causation_id: Option<Uuid>,
    /// For `sent`: when the relay published it (none while still in the outbox).
    pub published_at: Option<DateTime<Utc>>,
    pub detail: Option<String>,
}

pub async fn run(args: TraceArgs) -> anyhow::Result<ExitCode> {
    let order_db = args.db.connect("order").await?;
    // An order id leads to its correlation id; otherwise the id is one.
    let correlation: Uuid = sqlx::query_scalar("SELECT correlation_id FROM orders WHERE order_id = $1")
        .bind(args.id)
        .fetch_optional(&order_db)
        .await?
        .unwrap_or(args.id);
    let mut steps = Vec::new();
    for service in SERVICES {
        let db = if service == "order" { order_db.clone() } else { args.db.connect(service).await? };
        for r in sqlx::query(
            "SELECT received_at, message_type, message_id, causation_id FROM inbox WHERE correlation_id = $1",
        )
        .bind(correlation)
        .fetch_all(&db)
        .await?
        {
            steps.push(Step {
                at: r.try_get("received_at")?,
                service,
                what: "received",
                message_type: r.try_get("message_type")?,
                message_id: r.try_get("message_id")?,
                causation_id: r.try_get("causation_id")?,
                published_at: None,
                detail: None,
            });
        }
        for r in sqlx::query(
            "SELECT created_at, message_type, message_id, causation_id, published_at, publish_attempts, last_error \
             FROM outbox WHERE correlation_id = $1",
        )
        .bind(correlation)
        .fetch_all(&db)
        .await?
        {
            let attempts: i32 = r.try_get("publish_attempts")?;
            let last_error: Option<String> = r.try_get("last_error")?;
            steps.push(Step {
                at: r.try_get("created_at")?,
                service,
                what: "sent",
                message_type: r.try_get("message_type")?,
                message_id: r.try_get("message_id")?,
                causation_id: r.try_get("causation_id")?,
                published_at: r.try_get("published_at")?,
                detail: last_error.map(|e| format!("{attempts} failed publishes, last: {e}")),
            });
        }
    }
    for r in sqlx::query(
        "SELECT h.at, h.status, h.detail, h.message_type FROM order_history h JOIN orders o USING (order_id) \
         WHERE o.correlation_id = $1",
    )
    .bind(correlation)
    .fetch_all(&order_db)
    .await?
    {
        steps.push(Step {
            at: r.try_get("at")?,
            service: "order",
            what: "status",
            message_type: r.try_get::<String, _>("status")?,
            message_id: None,
            causation_id: None,
            published_at: None,
            detail: r.try_get("detail")?,
        });
    }
    // Time order; at equal times a receipt comes before what it caused.
    steps.sort_by(|a, b| a.at.cmp(&b.at).then(rank(a.what).cmp(&rank(b.what))));
    if steps.is_empty() {
        eprintln!("nothing is known about {} in any service (wrong id, or older than the retention windows)", args.id);
        return Ok(ExitCode::from(1));
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "correlation_id": correlation, "steps": steps }))?
        );
    } else {
        println!("workflow {correlation}");
        let start = steps[0].at;
        let mut t = table::new(&["AT", "+MS", "SERVICE", "WHAT", "TYPE", "MESSAGE ID", "NOTE"]);
        for s in &steps {
            let offset = (s.at - start).num_microseconds().unwrap_or(0) as f64 / 1000.0;
            let note = match (s.what, s.published_at, &s.detail) {
                ("sent", None, _) => "not published yet".to_owned(),
                ("sent", Some(p), _) => {
                    format!("published +{:.1} ms", (p - s.at).num_microseconds().unwrap_or(0) as f64 / 1000.0)
                }
                (_, _, Some(d)) => d.clone(),
                _ => String::new(),
            };
            t.add_row(table::row([
                s.at.format("%H:%M:%S%.3f").to_string(),
                format!("+{offset:.1}"),
                s.service.to_owned(),
                s.what.to_owned(),
                s.message_type.clone(),
                s.message_id.map(|m| m.to_string()).unwrap_or_else(|| "-".into()),
                note,
            ]));
        }
        println!("{}", table::render(&mut t, &[1]));
    }
    Ok(ExitCode::SUCCESS)
}

fn rank(what: &str) -> u8 {
    match what {
        "received" => 0,
        "status" => 1,
        _ => 2,
    }
}
