//! The order service: creates orders and moves them to their terminal state.
//!
//! | consumes | effect | emits |
//! |---|---|---|
//! | `order.place` | order PENDING (placing an existing order id again changes nothing) | `order.created` |
//! | `inventory.reserved` | CONFIRMED | `order.confirmed` |
//! | `payment.failed` | CANCELLED (compensation) | `order.cancelled` |
//! | `payment.refunded` | CANCELLED (compensation) | `order.cancelled` |

use std::collections::{HashMap, HashSet};

use choreo_messages::payloads::{CancelReason, OrderCancelled, OrderConfirmed, OrderCreated, PlaceOrder, order_total};
use choreo_messages::{Envelope, Message, MessageType};
use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::{PgConnection, Row};
use tracing::info;
use uuid::Uuid;

use crate::service::{Effects, Service, ServiceError, apply_one_by_one};

pub static MIGRATIONS: Migrator = sqlx::migrate!("./migrations/order");

#[derive(Debug, Clone, Default)]
pub struct OrderService;

impl Service for OrderService {
    const NAME: &'static str = "order";
    const CONSUMES: &'static [MessageType] = &[
        MessageType::OrderPlace,
        MessageType::InventoryReserved,
        MessageType::PaymentFailed,
        MessageType::PaymentRefunded,
    ];

    fn register_metrics(&self) {
        metrics::counter!("choreo_saga_outcomes_total", "outcome" => "confirmed", "reason" => "none").increment(0);
        for reason in [CancelReason::CardDeclined, CancelReason::AmountOverLimit, CancelReason::OutOfStock, CancelReason::UnknownSku] {
            metrics::counter!("choreo_saga_outcomes_total", "outcome" => "cancelled", "reason" => reason.as_str()).increment(0);
        }
    }

    async fn apply(&self, tx: &mut PgConnection, envelope: &Envelope) -> Result<Effects, ServiceError> {
        let mut effects = settle(tx, &[(envelope, tracing::Span::current())]).await?;
        effects.pop().ok_or_else(|| ServiceError::Permanent("no result for the message".into()))
    }

    /// A batch is one or two statements whatever its size: one insert of the new orders, one update of the
    /// settled ones, each writing its history rows too. Two messages about one order in a batch are applied
    /// one after the other instead, so that the second sees the first.
    async fn apply_batch(
        &self,
        tx: &mut PgConnection,
        batch: &[(&Envelope, tracing::Span)],
    ) -> Result<Vec<Effects>, ServiceError> {
        let mut seen = HashSet::with_capacity(batch.len());
        if batch.iter().all(|(e, _)| order_id_of(&e.message).is_none_or(|id| seen.insert(id))) {
            return settle(tx, batch).await;
        }
        apply_one_by_one(self, tx, batch).await
    }
}

fn order_id_of(message: &Message) -> Option<Uuid> {
    match message {
        Message::OrderPlace(m) => Some(m.order_id),
        Message::InventoryReserved(m) => Some(m.order_id),
        Message::PaymentFailed(m) => Some(m.order_id),
        Message::PaymentRefunded(m) => Some(m.order_id),
        _ => None,
    }
}

/// What one message asks of the order service.
enum Step<'a> {
    Place { place: &'a PlaceOrder, total: i64, lines: serde_json::Value },
    Settle { order_id: Uuid, status: &'static str, reason: Option<CancelReason> },
}

/// Apply messages about distinct orders, in two statements at most, with the effects of applying them one
/// by one in the given order.
async fn settle(tx: &mut PgConnection, batch: &[(&Envelope, tracing::Span)]) -> Result<Vec<Effects>, ServiceError> {
    let steps = batch
        .iter()
        .map(|(envelope, _)| match &envelope.message {
            Message::OrderPlace(place) => {
                let total = order_total(&place.lines).map_err(ServiceError::Permanent)?;
                let lines = serde_json::to_value(&place.lines).map_err(|e| ServiceError::Permanent(format!("lines: {e}")))?;
                Ok(Step::Place { place, total, lines })
            }
            Message::InventoryReserved(m) => Ok(Step::Settle { order_id: m.order_id, status: "CONFIRMED", reason: None }),
            Message::PaymentFailed(m) => {
                Ok(Step::Settle { order_id: m.order_id, status: "CANCELLED", reason: Some(m.reason.into()) })
            }
            Message::PaymentRefunded(m) => {
                Ok(Step::Settle { order_id: m.order_id, status: "CANCELLED", reason: Some(m.reason.into()) })
            }
            other => Err(ServiceError::Permanent(format!("order does not handle {}", other.message_type()))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let placed = insert_orders(tx, batch, &steps).await?;
    let (settled, no_longer_pending) = transition_orders(tx, batch, &steps).await?;

    let mut effects = Vec::with_capacity(steps.len());
    for ((_, span), step) in batch.iter().zip(&steps) {
        let _in_message = span.enter();
        match step {
            Step::Place { place, total, .. } => {
                if !placed.contains(&place.order_id) {
                    info!(order_id = %place.order_id, "order already placed; nothing to do");
                    effects.push(Effects::none());
                    continue;
                }
                effects.push(Effects::events(vec![Message::OrderCreated(OrderCreated {
                    order_id: place.order_id,
                    customer_id: place.customer_id.clone(),
                    currency: place.currency.clone(),
                    lines: place.lines.clone(),
                    total_cents: *total,
                })]));
            }
            Step::Settle { order_id, status, reason } => {
                let Some(done) = settled.get(order_id) else {
                    let current = no_longer_pending.get(order_id).map_or("?", String::as_str);
                    // A late event, or a copy of one handled before (the inbox check comes at the end of the
                    // transaction, and then says so): not a fault.
                    info!(%order_id, %current, wanted = status, "order is no longer PENDING; event ignored");
                    effects.push(Effects::none());
                    continue;
                };
                let placed_at = done.placed_at;
                effects.push(match *reason {
                    None => Effects::events(vec![Message::OrderConfirmed(OrderConfirmed {
                        order_id: *order_id,
                        total_cents: done.total_cents,
                        currency: done.currency.clone(),
                    })])
                    .after_commit(move || observe_outcome("confirmed", "none", placed_at)),
                    Some(reason) => Effects::events(vec![Message::OrderCancelled(OrderCancelled { order_id: *order_id, reason })])
                        .after_commit(move || observe_outcome("cancelled", reason.as_str(), placed_at)),
                });
            }
        }
    }
    Ok(effects)
}

/// Create the orders of the `Place` steps that do not exist yet, with their first history row, in one
/// statement; the ids created.
async fn insert_orders(
    tx: &mut PgConnection,
    batch: &[(&Envelope, tracing::Span)],
    steps: &[Step<'_>],
) -> Result<HashSet<Uuid>, ServiceError> {
    let mut ids = Vec::new();
    let mut correlations = Vec::new();
    let mut customers = Vec::new();
    let mut currencies = Vec::new();
    let mut totals = Vec::new();
    let mut lines = Vec::new();
    let mut placed_at = Vec::new();
    let mut message_ids = Vec::new();
    let mut message_types = Vec::new();
    for ((envelope, _), step) in batch.iter().zip(steps) {
        if let Step::Place { place, total, lines: l } = step {
            message_ids.push(envelope.meta.message_id);
            message_types.push(envelope.meta.message_type.as_str());
            ids.push(place.order_id);
            correlations.push(envelope.meta.correlation_id);
            customers.push(place.customer_id.as_str());
            currencies.push(place.currency.as_str());
            totals.push(*total);
            lines.push(l);
            placed_at.push(envelope.meta.occurred_at);
        }
    }
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    let created: Vec<Uuid> = sqlx::query_scalar(
        "WITH created AS ( \
             INSERT INTO orders (order_id, correlation_id, customer_id, currency, total_cents, lines, placed_at, status) \
             SELECT *, 'PENDING' FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::bigint[], \
                                             $6::jsonb[], $7::timestamptz[]) \
             ON CONFLICT (order_id) DO NOTHING RETURNING order_id), \
         history AS ( \
             INSERT INTO order_history (order_id, status, message_id, message_type) \
             SELECT c.order_id, 'PENDING', m.message_id, m.message_type \
             FROM created c JOIN UNNEST($1::uuid[], $8::uuid[], $9::text[]) AS m(order_id, message_id, message_type) \
                  USING (order_id)) \
         SELECT order_id FROM created",
    )
    .bind(&ids)
    .bind(&correlations)
    .bind(&customers)
    .bind(&currencies)
    .bind(&totals)
    .bind(&lines)
    .bind(&placed_at)
    .bind(&message_ids)
    .bind(&message_types)
    .fetch_all(&mut *tx)
    .await?;
    Ok(created.into_iter().collect())
}

/// Moves a batch of orders from PENDING to their terminal status and writes a history row for each move;
/// returns the moved ones. It finds the orders by primary key (one lookup per order of the batch), however
/// many others are PENDING: `workers/tests/plans.rs` checks the plan. Public for that test only.
#[doc(hidden)]
pub const SETTLE_ORDERS_SQL: &str = "WITH moved AS ( \
         UPDATE orders o SET status = t.status, cancel_reason = t.reason, completed_at = clock_timestamp() \
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::text[]) \
              AS t(order_id, status, reason, message_id, message_type) \
         WHERE o.order_id = t.order_id AND o.status = 'PENDING' \
         RETURNING o.order_id, o.total_cents, o.currency, o.placed_at, t.status, t.reason, t.message_id, \
                   t.message_type), \
     history AS ( \
         INSERT INTO order_history (order_id, status, detail, message_id, message_type) \
         SELECT order_id, status, reason, message_id, message_type FROM moved) \
     SELECT order_id, total_cents, currency, placed_at FROM moved";

/// Move the orders of the `Settle` steps from PENDING to their terminal status, with a history row for each
/// move, in one statement: the ones moved, and the current status of those that are no longer PENDING (a
/// late or repeated event, left alone). An order we never created is a permanent error.
async fn transition_orders<'a>(
    tx: &mut PgConnection,
    batch: &'a [(&Envelope, tracing::Span)],
    steps: &'a [Step<'_>],
) -> Result<(HashMap<Uuid, Settled>, HashMap<Uuid, String>), ServiceError> {
    let mut wanted: Vec<(Uuid, &str, Option<&str>, &'a Envelope)> = batch
        .iter()
        .zip(steps)
        .filter_map(|((envelope, _), s)| match s {
            Step::Settle { order_id, status, reason } => Some((*order_id, *status, reason.map(|r| r.as_str()), *envelope)),
            Step::Place { .. } => None,
        })
        .collect();
    if wanted.is_empty() {
        return Ok((HashMap::new(), HashMap::new()));
    }
    // Sorted for a stable lock order in the usual plan; should two batches still deadlock, PostgreSQL aborts
    // one, which rolls back and goes one by one: nothing is lost.
    wanted.sort_by_key(|w| w.0);
    let ids: Vec<Uuid> = wanted.iter().map(|w| w.0).collect();
    let statuses: Vec<&str> = wanted.iter().map(|w| w.1).collect();
    let reasons: Vec<Option<&str>> = wanted.iter().map(|w| w.2).collect();
    let message_ids: Vec<Uuid> = wanted.iter().map(|w| w.3.meta.message_id).collect();
    let message_types: Vec<&str> = wanted.iter().map(|w| w.3.meta.message_type.as_str()).collect();
    let rows = sqlx::query(SETTLE_ORDERS_SQL)
        .bind(&ids)
        .bind(&statuses)
        .bind(&reasons)
        .bind(&message_ids)
        .bind(&message_types)
        .fetch_all(&mut *tx)
        .await?;
    let mut settled = HashMap::with_capacity(rows.len());
    for row in rows {
        settled.insert(
            row.try_get::<Uuid, _>("order_id")?,
            Settled {
                total_cents: row.try_get("total_cents")?,
                currency: row.try_get("currency")?,
                placed_at: row.try_get("placed_at")?,
            },
        );
    }
    let missing: Vec<Uuid> = ids.iter().copied().filter(|id| !settled.contains_key(id)).collect();
    let mut current = HashMap::new();
    if !missing.is_empty() {
        current = sqlx::query_as::<_, (Uuid, String)>("SELECT order_id, status FROM orders WHERE order_id = ANY($1)")
            .bind(&missing)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
        if let Some(unknown) = missing.iter().find(|id| !current.contains_key(*id)) {
            return Err(ServiceError::Permanent(format!("order {unknown} is unknown to the order service")));
        }
    }
    Ok((settled, current))
}

/// What a terminal transition tells the caller.
struct Settled {
    total_cents: i64,
    currency: String,
    placed_at: DateTime<Utc>,
}

/// Saga outcome and end-to-end latency, counted once the transition committed.
fn observe_outcome(outcome: &'static str, reason: &'static str, placed_at: DateTime<Utc>) {
    metrics::counter!("choreo_saga_outcomes_total", "outcome" => outcome, "reason" => reason).increment(1);
    let seconds = (Utc::now() - placed_at).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6;
    metrics::histogram!("choreo_workflow_duration_seconds", "outcome" => outcome).record(seconds);
}
