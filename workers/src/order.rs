//! The order service: creates orders and moves them to their terminal state.
//!
//! | consumes | effect | emits |
//! |---|---|---|
//! | `order.place` | order PENDING (placing an existing order id again changes nothing) | `order.created` |
//! | `inventory.reserved` | CONFIRMED | `order.confirmed` |
//! | `payment.failed` | CANCELLED (compensation) | `order.cancelled` |
//! | `payment.refunded` | CANCELLED (compensation) | `order.cancelled` |

use choreo_messages::payloads::{CancelReason, OrderCancelled, OrderConfirmed, OrderCreated, order_total};
use choreo_messages::{Envelope, Message, MessageType};
use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::{PgConnection, Row};
use tracing::{info, warn};
use uuid::Uuid;

use crate::service::{Effects, Service, ServiceError};

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
        let meta = &envelope.meta;
        match &envelope.message {
            Message::OrderPlace(place) => {
                let total = order_total(&place.lines).map_err(ServiceError::Permanent)?;
                let lines = serde_json::to_value(&place.lines)
                    .map_err(|e| ServiceError::Permanent(format!("lines: {e}")))?;
                let inserted = sqlx::query(
                    "INSERT INTO orders (order_id, correlation_id, customer_id, currency, total_cents, lines, \
                                         status, placed_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, 'PENDING', $7) ON CONFLICT (order_id) DO NOTHING",
                )
                .bind(place.order_id)
                .bind(meta.correlation_id)
                .bind(&place.customer_id)
                .bind(&place.currency)
                .bind(total)
                .bind(lines)
                .bind(meta.occurred_at)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if inserted == 0 {
                    info!(order_id = %place.order_id, "order already placed; nothing to do");
                    return Ok(Effects::none());
                }
                history(tx, place.order_id, "PENDING", None, envelope).await?;
                Ok(Effects::events(vec![Message::OrderCreated(OrderCreated {
                    order_id: place.order_id,
                    customer_id: place.customer_id.clone(),
                    currency: place.currency.clone(),
                    lines: place.lines.clone(),
                    total_cents: total,
                })]))
            }
            Message::InventoryReserved(reserved) => {
                let Some(settled) = transition(tx, reserved.order_id, "CONFIRMED", None).await? else {
                    return Ok(Effects::none());
                };
                history(tx, reserved.order_id, "CONFIRMED", None, envelope).await?;
                let confirmed = OrderConfirmed {
                    order_id: reserved.order_id,
                    total_cents: settled.total_cents,
                    currency: settled.currency,
                };
                Ok(Effects::events(vec![Message::OrderConfirmed(confirmed)])
                    .after_commit(move || observe_outcome("confirmed", "none", settled.placed_at)))
            }
            Message::PaymentFailed(failed) => cancel(tx, failed.order_id, failed.reason.into(), envelope).await,
            Message::PaymentRefunded(refunded) => cancel(tx, refunded.order_id, refunded.reason.into(), envelope).await,
            other => Err(ServiceError::Permanent(format!("order does not handle {}", other.message_type()))),
        }
    }
}

async fn cancel(
    tx: &mut PgConnection,
    order_id: Uuid,
    reason: CancelReason,
    envelope: &Envelope,
) -> Result<Effects, ServiceError> {
    let Some(settled) = transition(tx, order_id, "CANCELLED", Some(reason.as_str())).await? else {
        return Ok(Effects::none());
    };
    history(tx, order_id, "CANCELLED", Some(reason.as_str()), envelope).await?;
    Ok(Effects::events(vec![Message::OrderCancelled(OrderCancelled { order_id, reason })])
        .after_commit(move || observe_outcome("cancelled", reason.as_str(), settled.placed_at)))
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

/// Move a PENDING order to a terminal status. `None` when the order is not PENDING (already terminal: a
/// late or repeated event, logged and ignored). An order we never created is a permanent error.
async fn transition(
    tx: &mut PgConnection,
    order_id: Uuid,
    status: &str,
    reason: Option<&str>,
) -> Result<Option<Settled>, ServiceError> {
    let row = sqlx::query(
        "UPDATE orders SET status = $2, cancel_reason = $3, completed_at = now() \
         WHERE order_id = $1 AND status = 'PENDING' RETURNING total_cents, currency, placed_at",
    )
    .bind(order_id)
    .bind(status)
    .bind(reason)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(row) = row {
        return Ok(Some(Settled {
            total_cents: row.try_get("total_cents")?,
            currency: row.try_get("currency")?,
            placed_at: row.try_get("placed_at")?,
        }));
    }
    let current: Option<String> = sqlx::query_scalar("SELECT status FROM orders WHERE order_id = $1")
        .bind(order_id)
        .fetch_optional(&mut *tx)
        .await?;
    match current {
        Some(current) => {
            warn!(%order_id, %current, wanted = status, "order is no longer PENDING; event ignored");
            Ok(None)
        }
        None => Err(ServiceError::Permanent(format!("order {order_id} is unknown to the order service"))),
    }
}

async fn history(
    tx: &mut PgConnection,
    order_id: Uuid,
    status: &str,
    detail: Option<&str>,
    envelope: &Envelope,
) -> Result<(), ServiceError> {
    sqlx::query(
        "INSERT INTO order_history (order_id, status, detail, message_id, message_type) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(order_id)
    .bind(status)
    .bind(detail)
    .bind(envelope.meta.message_id)
    .bind(&envelope.meta.message_type)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
