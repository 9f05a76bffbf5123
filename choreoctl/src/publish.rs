//! `choreoctl publish`: place orders, one or many, and optionally wait for their outcome.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use choreo_messages::headers::TRACEPARENT;
use choreo_messages::payloads::{OrderLine, PlaceOrder};
use choreo_messages::{EncodedEnvelope, Envelope, Message, MessageType};
use choreo_rabbitmq::publisher::Outgoing;
use choreo_rabbitmq::{ConfirmingPublisher, Topology, connect_pool};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, TraceContextExt, TraceFlags, TraceState};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::orders::DbArgs;
use crate::progress::bar;
use crate::table;

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// AMQP URL of the broker.
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f", hide_env_values = true)]
    amqp_url: String,
    /// Prefix of exchange and queue names.
    #[arg(long, env = "CHOREO_NAMESPACE", default_value = "choreo")]
    namespace: String,
    /// Place this many generated orders (a mix of good ones, declined cards and sold-out lines).
    #[arg(long, conflicts_with_all = ["file", "customer"])]
    count: Option<u64>,
    /// Orders per second for --count (default: as fast as the broker confirms).
    #[arg(long, requires = "count")]
    rate: Option<f64>,
    /// Share of generated orders whose card is declined (customer `decline-...`).
    #[arg(long, default_value_t = 0.1)]
    decline_ratio: f64,
    /// Share of generated orders with a sold-out line (sku `sku-soldout`), refunded by compensation.
    #[arg(long, default_value_t = 0.1)]
    soldout_ratio: f64,
    /// Seed of the generator, for reproducible workloads.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Place the order in this JSON file (an `order.place` body; see docs/contract.md).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Customer of a single order.
    #[arg(long)]
    customer: Option<String>,
    /// A line of a single order as `SKU:QUANTITY:UNIT_PRICE_CENTS`; repeat for more lines.
    #[arg(long = "line", requires = "customer")]
    lines: Vec<String>,
    /// Currency of a single order.
    #[arg(long, default_value = "EUR")]
    currency: String,
    /// Order id of a single order (default: a new UUIDv7).
    #[arg(long)]
    order_id: Option<Uuid>,
    /// Wait until every placed order is CONFIRMED or CANCELLED, then print a summary.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this long (exit code 3).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    db: DbArgs,
}

/// What `--wait` reports.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub placed: usize,
    pub confirmed: i64,
    pub cancelled: i64,
    pub pending: i64,
    pub cancelled_by_reason: Vec<(String, i64)>,
    pub wall_seconds: f64,
    pub workflows_per_second: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
}

pub async fn run(args: PublishArgs) -> anyhow::Result<ExitCode> {
    let orders = build_orders(&args)?;
    let db = if args.wait { Some(args.db.connect().await?) } else { None };
    let topology = Topology::new(args.namespace.clone());
    let pool = connect_pool(&args.amqp_url, "choreoctl", 1).context("broker connection")?;
    let publisher = Arc::new(ConfirmingPublisher::new(pool, Duration::from_secs(15)));
    let exchange = topology.events_exchange();

    let progress = bar(orders.len() as u64, "placing", args.json);
    let started = Instant::now();
    let chunk = match args.rate {
        Some(rate) if rate > 0.0 => ((rate / 50.0).ceil() as usize).max(1),
        _ => 200,
    };
    let ids: Vec<Uuid> = orders.iter().map(|o| o.order_id).collect();
    let mut sent = 0usize;
    for chunk_orders in orders.chunks(chunk) {
        if let Some(rate) = args.rate.filter(|r| *r > 0.0) {
            let due = started + Duration::from_secs_f64(sent as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        // Encoded when sent: an order's `occurred-at`, where its end-to-end latency starts, is when it is placed.
        let batch: Vec<EncodedEnvelope> = chunk_orders
            .iter()
            .map(|o| {
                let mut envelope = Envelope::new_command(Message::OrderPlace(o.clone()), "choreoctl", Some(o.order_id));
                envelope.meta.traceparent = new_traceparent();
                envelope.encode()
            })
            .collect();
        let batch = batch.as_slice();
        let outgoing: Vec<Outgoing<'_>> = batch.iter().map(|e| Outgoing::envelope(&exchange, e)).collect();
        for (result, envelope) in publisher.publish_batch(&outgoing).await.into_iter().zip(batch) {
            result.with_context(|| {
                format!(
                    "placing order {} failed after {sent} were placed; are the workers' queues declared \
                     (start order-worker once) and is the namespace `{}` right?",
                    envelope.meta.message_id, args.namespace
                )
            })?;
        }
        sent += batch.len();
        progress.set_position(sent as u64);
    }
    progress.finish_and_clear();
    if !args.json && !args.wait {
        if ids.len() == 1 {
            println!("{}", ids[0]);
        } else {
            eprintln!("placed {} orders in {:.2} s", ids.len(), started.elapsed().as_secs_f64());
        }
    }
    let Some(db) = db else {
        if args.json {
            println!("{}", serde_json::json!({ "placed": ids.len(), "order_ids": ids }));
        }
        return Ok(ExitCode::SUCCESS);
    };
    let done = wait_terminal(&db, &ids, args.timeout, args.json).await?;
    let summary = summarise(&db, &ids).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(if done { ExitCode::SUCCESS } else { ExitCode::from(3) })
}

/// The W3C `traceparent` of a new trace, one per order: fresh random trace and span ids, sampled, so that
/// the workers record the workflow's spans whatever their own sampler would decide for a root. Written by
/// OpenTelemetry's own propagator, the one the workers read it with.
pub fn new_traceparent() -> Option<String> {
    let ids = RandomIdGenerator::default();
    // Not remote: this context is choreoctl's own, the parent of the first handler's span.
    let span =
        SpanContext::new(ids.new_trace_id(), ids.new_span_id(), TraceFlags::SAMPLED, false, TraceState::default());
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new()
        .inject_context(&opentelemetry::Context::new().with_remote_span_context(span), &mut carrier);
    carrier.remove(TRACEPARENT)
}

fn build_orders(args: &PublishArgs) -> anyhow::Result<Vec<PlaceOrder>> {
    if let Some(count) = args.count {
        return Ok(generate(count, args.seed, args.decline_ratio, args.soldout_ratio));
    }
    let order = if let Some(path) = &args.file {
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        match Message::decode(MessageType::OrderPlace, MessageType::OrderPlace.schema_version(), &text) {
            Ok(Message::OrderPlace(order)) => order,
            Ok(_) => bail!("{} is not an order.place body", path.display()),
            Err(e) => bail!("{} is not a valid order.place body: {e} (see docs/contract.md)", path.display()),
        }
    } else if let Some(customer) = &args.customer {
        let lines = args.lines.iter().map(|l| parse_line(l)).collect::<anyhow::Result<Vec<_>>>()?;
        let order = PlaceOrder {
            order_id: args.order_id.unwrap_or_else(Uuid::now_v7),
            customer_id: customer.clone(),
            currency: args.currency.clone(),
            lines,
        };
        // Validate here so that a typo gets an answer now, not a dead letter later.
        let body = Message::OrderPlace(order.clone()).to_json();
        Message::decode(MessageType::OrderPlace, MessageType::OrderPlace.schema_version(), &body)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        order
    } else {
        bail!("say what to place: --count N, --file ORDER.json, or --customer C --line SKU:QTY:PRICE_CENTS");
    };
    Ok(vec![order])
}

fn parse_line(text: &str) -> anyhow::Result<OrderLine> {
    let parts: Vec<&str> = text.split(':').collect();
    let [sku, quantity, price] = parts.as_slice() else {
        bail!("--line `{text}` must be SKU:QUANTITY:UNIT_PRICE_CENTS, e.g. sku-001:2:1250");
    };
    Ok(OrderLine {
        sku: (*sku).to_owned(),
        quantity: quantity.parse().with_context(|| format!("--line `{text}`: quantity is not a whole number"))?,
        unit_price_cents: price.parse().with_context(|| format!("--line `{text}`: price is not a whole number"))?,
    })
}

/// A reproducible mix of orders over the default catalogue.
pub fn generate(count: u64, seed: u64, decline_ratio: f64, soldout_ratio: f64) -> Vec<PlaceOrder> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|i| {
            let roll: f64 = rng.random();
            let declined = roll < decline_ratio;
            let soldout = !declined && roll < decline_ratio + soldout_ratio;
            let mut lines: Vec<OrderLine> = (0..rng.random_range(1..=3))
                .map(|_| OrderLine {
                    sku: format!("sku-{:03}", rng.random_range(1..=10)),
                    quantity: rng.random_range(1..=3),
                    unit_price_cents: rng.random_range(100..=5_000),
                })
                .collect();
            if soldout {
                lines.push(OrderLine { sku: "sku-soldout".into(), quantity: 1, unit_price_cents: 999 });
            }
            PlaceOrder {
                order_id: Uuid::now_v7(),
                customer_id: if declined {
                    format!("decline-{i}")
                } else {
                    format!("cust-{}", rng.random_range(1..=500))
                },
                currency: "EUR".into(),
                lines,
            }
        })
        .collect()
}

/// Shortest pause between two looks at the orders.
const POLL: Duration = Duration::from_millis(250);
/// Each pause is at least this many times as long as the last look took, so that watching a large workload
/// takes at most a fifth of one connection's time from the database being watched.
const POLL_COST_FACTOR: u32 = 4;

/// Poll until every placed order is terminal or the deadline passes.
///
/// Only the placed ids count: an order id from a file or `--order-id` may be older than orders others placed,
/// and others may place orders at the same time, so no range of ids is exactly ours. Each look asks only for
/// the orders not yet seen terminal, so it gets cheaper as the workload completes.
async fn wait_terminal(db: &PgPool, ids: &[Uuid], timeout: Duration, quiet: bool) -> anyhow::Result<bool> {
    let mut waiting: Vec<Uuid> = ids.to_vec();
    waiting.sort_unstable();
    waiting.dedup();
    let total = waiting.len();
    let progress = bar(total as u64, "completed", quiet);
    let deadline = Instant::now() + timeout;
    let mut pause = POLL;
    loop {
        tokio::time::sleep_until(deadline.min(Instant::now() + pause).into()).await;
        let asked = Instant::now();
        let terminal: Vec<Uuid> =
            sqlx::query_scalar("SELECT order_id FROM orders WHERE order_id = ANY($1) AND status <> 'PENDING'")
                .bind(&waiting)
                .fetch_all(db)
                .await
                .context("looking up which placed orders are terminal")?;
        pause = POLL.max(asked.elapsed() * POLL_COST_FACTOR);
        if !terminal.is_empty() {
            let terminal: std::collections::HashSet<Uuid> = terminal.into_iter().collect();
            waiting.retain(|id| !terminal.contains(id));
        }
        progress.set_position((total - waiting.len()) as u64);
        if waiting.is_empty() {
            progress.finish_and_clear();
            return Ok(true);
        }
        if Instant::now() >= deadline {
            progress.abandon();
            eprintln!(
                "timed out: {} of {total} orders are not terminal yet (first: {}). Check the workers' logs, \
                 `choreoctl orders`, and the dead-letter queues (runbooks/dead-letters.md).",
                waiting.len(),
                waiting[0]
            );
            return Ok(false);
        }
    }
}

pub async fn summarise(db: &PgPool, ids: &[Uuid]) -> anyhow::Result<Summary> {
    let row = sqlx::query(
        "SELECT count(*) FILTER (WHERE status = 'CONFIRMED') AS confirmed, \
                count(*) FILTER (WHERE status = 'CANCELLED') AS cancelled, \
                count(*) FILTER (WHERE status = 'PENDING') AS pending, \
                EXTRACT(EPOCH FROM max(completed_at) - min(placed_at))::float8 AS wall, \
                percentile_cont(0.5) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM completed_at - placed_at))::float8 AS p50, \
                percentile_cont(0.99) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM completed_at - placed_at))::float8 AS p99, \
                max(EXTRACT(EPOCH FROM completed_at - placed_at))::float8 AS max \
         FROM orders WHERE order_id = ANY($1)",
    )
    .bind(ids)
    .fetch_one(db)
    .await
    .context("summarising orders")?;
    let reasons = sqlx::query(
        "SELECT cancel_reason, count(*) AS n FROM orders WHERE order_id = ANY($1) AND status = 'CANCELLED' \
         GROUP BY 1 ORDER BY 2 DESC",
    )
    .bind(ids)
    .fetch_all(db)
    .await?
    .iter()
    .map(|r| Ok((r.try_get::<Option<String>, _>("cancel_reason")?.unwrap_or_default(), r.try_get("n")?)))
    .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let wall: f64 = row.try_get::<Option<f64>, _>("wall")?.unwrap_or(0.0);
    let confirmed: i64 = row.try_get("confirmed")?;
    let cancelled: i64 = row.try_get("cancelled")?;
    Ok(Summary {
        placed: ids.len(),
        confirmed,
        cancelled,
        pending: row.try_get("pending")?,
        cancelled_by_reason: reasons,
        wall_seconds: wall,
        workflows_per_second: if wall > 0.0 { (confirmed + cancelled) as f64 / wall } else { 0.0 },
        latency_p50_ms: row.try_get::<Option<f64>, _>("p50")?.unwrap_or(0.0) * 1000.0,
        latency_p99_ms: row.try_get::<Option<f64>, _>("p99")?.unwrap_or(0.0) * 1000.0,
        latency_max_ms: row.try_get::<Option<f64>, _>("max")?.unwrap_or(0.0) * 1000.0,
    })
}

fn print_summary(s: &Summary) {
    println!("{}", summary_table(s));
}

/// The summary for people: a label, a figure and its unit per line, the cancellation reasons indented under
/// `cancelled`.
fn summary_table(s: &Summary) -> String {
    let mut t = table::new(&[]);
    let mut line = |label: &str, figure: String, unit: &str| {
        t.add_row(table::row([label.to_owned(), figure, unit.to_owned()]));
    };
    line("orders placed", s.placed.to_string(), "");
    line("confirmed", s.confirmed.to_string(), "");
    line("cancelled", s.cancelled.to_string(), "");
    for (reason, n) in &s.cancelled_by_reason {
        line(&format!("  {reason}"), n.to_string(), "");
    }
    if s.pending > 0 {
        line("still pending", s.pending.to_string(), "");
    }
    line("wall time", format!("{:.2}", s.wall_seconds), "s");
    line("workflows/s", format!("{:.1}", s.workflows_per_second), "");
    line("end-to-end p50", format!("{:.1}", s.latency_p50_ms), "ms");
    line("end-to-end p99", format!("{:.1}", s.latency_p99_ms), "ms");
    line("end-to-end max", format!("{:.1}", s.latency_max_ms), "ms");
    table::render(&mut t, &[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_workloads_are_reproducible_and_mixed() {
        let a = generate(1000, 7, 0.1, 0.1);
        let b = generate(1000, 7, 0.1, 0.1);
        let shape = |v: &[PlaceOrder]| v.iter().map(|o| (o.customer_id.clone(), o.lines.clone())).collect::<Vec<_>>();
        assert_eq!(shape(&a), shape(&b));
        let declined = a.iter().filter(|o| o.customer_id.starts_with("decline")).count();
        let soldout = a.iter().filter(|o| o.lines.iter().any(|l| l.sku == "sku-soldout")).count();
        assert!((50..150).contains(&declined), "{declined}");
        assert!((50..150).contains(&soldout), "{soldout}");
    }

    #[test]
    fn the_summary_lines_up_figures_and_units() {
        let s = Summary {
            placed: 20,
            confirmed: 16,
            cancelled: 4,
            pending: 0,
            cancelled_by_reason: vec![("card_declined".into(), 2), ("out_of_stock".into(), 2)],
            wall_seconds: 1.5,
            workflows_per_second: 13.33,
            latency_p50_ms: 14.12,
            latency_p99_ms: 120.0,
            latency_max_ms: 131.5,
        };
        assert_eq!(
            summary_table(&s),
            "orders placed       20\n\
             confirmed           16\n\
             cancelled            4\n\
             \x20 card_declined      2\n\
             \x20 out_of_stock       2\n\
             wall time         1.50  s\n\
             workflows/s       13.3\n\
             end-to-end p50    14.1  ms\n\
             end-to-end p99   120.0  ms\n\
             end-to-end max   131.5  ms"
        );
    }

    #[test]
    fn each_order_starts_a_sampled_trace_of_its_own() {
        let propagator = TraceContextPropagator::new();
        let read = |traceparent: &str| {
            let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
            propagator.extract(&carrier).span().span_context().clone()
        };
        let a = new_traceparent().expect("a traceparent");
        let b = new_traceparent().expect("a traceparent");
        let (ca, cb) = (read(&a), read(&b));
        assert!(ca.is_valid() && ca.is_sampled() && ca.is_remote(), "{a}");
        assert_ne!(ca.trace_id(), cb.trace_id(), "a new trace per order");
        // The W3C form the workers and other clients expect: version 00, 32 + 16 hex digits, sampled.
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!((parts[0], parts[1].len(), parts[2].len(), parts[3]), ("00", 32, 16, "01"), "{a}");
    }

    #[test]
    fn lines_parse_or_say_why() {
        assert_eq!(
            parse_line("sku-001:2:1250").expect("line"),
            OrderLine { sku: "sku-001".into(), quantity: 2, unit_price_cents: 1250 }
        );
        assert!(parse_line("sku-001:2").expect_err("short").to_string().contains("SKU:QUANTITY"));
        assert!(parse_line("s:x:1").expect_err("qty").to_string().contains("quantity"));
    }
}
