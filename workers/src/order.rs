//! The order service: creates orders and moves them to their terminal state.
//!
//! | consumes | effect | emits |
//! |---|---|---|
//! | `order.place` | order PENDING (placing an existing order id again changes nothing) | `order.created` |
//! | `inventory.reserved` | CONFIRMED | `order.confirmed` |
//! | `payment.failed` | CANCELLED (compensation) | `order.cancelled` |
//! | `payment.refunded` | CANCELLED (compensation) | `order.cancelled` |

use std::collections::{HashMap, HashSet};

use choreo::Change;
use choreo_messages::payloads::{CancelReason, OrderCancelled, OrderConfirmed, OrderCreated, PlaceOrder, order_total};
use choreo_messages::{Envelope, Message, MessageType, Metadata};
use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::{PgConnection, Row};
use tracing::info;
use uuid::Uuid;

use choreo::{Effects, Service, ServiceError};

pub static MIGRATIONS: Migrator = sqlx::migrate!("./migrations/order");

#[derive(Debug, Clone, Default)]
pub struct OrderService;

impl Service for OrderService {
    const NAME: &'static str = "order";
    type Message = Message;
    const CONSUMES: &'static [&'static str] = &[
        MessageType::OrderPlace.as_str(),
        MessageType::InventoryReserved.as_str(),
        MessageType::PaymentFailed.as_str(),
        MessageType::PaymentRefunded.as_str(),
    ];
    const OUTCOMES: &'static [&'static str] =
        &[MessageType::OrderConfirmed.as_str(), MessageType::OrderCancelled.as_str()];

    fn register_metrics(&self) {
        metrics::counter!("choreo_saga_outcomes_total", "outcome" => "confirmed", "reason" => "none").increment(0);
        for reason in [
            CancelReason::CardDeclined,
            CancelReason::AmountOverLimit,
            CancelReason::OutOfStock,
            CancelReason::UnknownSku,
        ] {
            metrics::counter!("choreo_saga_outcomes_total", "outcome" => "cancelled", "reason" => reason.as_str())
                .increment(0);
        }
    }

    /// New orders need no read: one insert that skips an order placed before. Settling reads the orders
    /// first (their totals go into `order.confirmed`), then moves those still PENDING when written. One
    /// statement for the batch either way.
    async fn decide(
        &self,
        db: &mut PgConnection,
        batch: &[(&Envelope, tracing::Span)],
        change: &mut Change,
    ) -> Result<Vec<Effects>, ServiceError> {
        if !distinct_orders(batch.iter().map(|(e, _)| *e)) {
            return Err(ServiceError::Transient("two messages about one order are decided one at a time".into()));
        }
        decide(db, batch, change).await
    }
}

fn distinct_orders<'a>(mut batch: impl Iterator<Item = &'a Envelope>) -> bool {
    let mut seen = HashSet::new();
    batch.all(|e| seen.insert(e.message.order_id()))
}

/// What one message asks of the order service.
enum Step<'a> {
    Place { place: &'a PlaceOrder, total: i64, lines: serde_json::Value },
    Settle { order_id: Uuid, status: &'static str, reason: Option<CancelReason> },
}

/// Decide messages about distinct orders, with the effects of applying them one by one in the given order.
async fn decide(
    db: &mut PgConnection,
    batch: &[(&Envelope, tracing::Span)],
    change: &mut Change,
) -> Result<Vec<Effects>, ServiceError> {
    let steps = batch
        .iter()
        .map(|(envelope, _)| match &envelope.message {
            Message::OrderPlace(place) => {
                let total = order_total(&place.lines).map_err(ServiceError::Permanent)?;
                let lines =
                    serde_json::to_value(&place.lines).map_err(|e| ServiceError::Permanent(format!("lines: {e}")))?;
                Ok(Step::Place { place, total, lines })
            }
            Message::InventoryReserved(m) => {
                Ok(Step::Settle { order_id: m.order_id, status: "CONFIRMED", reason: None })
            }
            Message::PaymentFailed(m) => {
                Ok(Step::Settle { order_id: m.order_id, status: "CANCELLED", reason: Some(m.reason.into()) })
            }
            Message::PaymentRefunded(m) => {
                Ok(Step::Settle { order_id: m.order_id, status: "CANCELLED", reason: Some(m.reason.into()) })
            }
            other => Err(ServiceError::Permanent(format!("order does not handle {}", other.message_type()))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    insert_orders(change, batch, &steps);
    let current = read_orders(db, &steps).await?;
    let mut moves = Moves::default();

    let mut effects = Vec::with_capacity(steps.len());
    for ((envelope, span), step) in batch.iter().zip(&steps) {
        let _in_message = span.enter();
        match step {
            Step::Place { place, total, .. } => {
                // Written only if the order is new: placing an existing order id again changes nothing.
                effects.push(
                    Effects::events(vec![Message::OrderCreated(OrderCreated {
                        order_id: place.order_id,
                        customer_id: place.customer_id.clone(),
                        currency: place.currency.clone(),
                        lines: place.lines.clone(),
                        total_cents: *total,
                    })])
                    .applies_if(place.order_id),
                );
            }
            Step::Settle { order_id, status, reason } => {
                let order = current.get(order_id).ok_or_else(|| {
                    ServiceError::Permanent(format!("order {order_id} is unknown to the order service"))
                })?;
                if order.status != "PENDING" {
                    // A late event, or a copy of one handled before (the inbox says so when the change is
                    // written): not a fault.
                    info!(%order_id, current = %order.status, wanted = status, "order is no longer PENDING; event ignored");
                    effects.push(Effects::none());
                    continue;
                }
                moves.push(*order_id, status, reason.map(|r| r.as_str()), &envelope.meta);
                let placed_at = order.placed_at;
                // Written only if the order is still PENDING when the change is.
                effects.push(
                    match *reason {
                        None => Effects::events(vec![Message::OrderConfirmed(OrderConfirmed {
                            order_id: *order_id,
                            total_cents: order.total_cents,
                            currency: order.currency.clone(),
                        })])
                        .after_commit(move || observe_outcome("confirmed", "none", placed_at)),
                        Some(reason) => Effects::events(vec![Message::OrderCancelled(OrderCancelled {
                            order_id: *order_id,
                            reason,
                        })])
                        .after_commit(move || observe_outcome("cancelled", reason.as_str(), placed_at)),
                    }
                    .applies_if(*order_id),
                );
            }
        }
    }
    moves.push_onto(change);
    Ok(effects)
}

/// Create the orders of the `Place` steps that do not exist yet, with their first history row; the ids
/// created are applied keys.
fn insert_orders(change: &mut Change, batch: &[(&Envelope, tracing::Span)], steps: &[Step<'_>]) {
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
        return;
    }
    change
        .cte("created", |q| {
            q.push(
                "INSERT INTO orders (order_id, correlation_id, customer_id, currency, total_cents, lines, placed_at, status) \
                 SELECT *, 'PENDING' FROM UNNEST(",
            )
            .push_bind(&ids)
            .push("::uuid[], ")
            .push_bind(correlations)
            .push("::uuid[], ")
            .push_bind(customers)
            .push("::text[], ")
            .push_bind(currencies)
            .push("::text[], ")
            .push_bind(totals)
            .push("::bigint[], ")
            .push_bind(lines)
            .push("::jsonb[], ")
            .push_bind(placed_at)
            // In id order: statements that insert the same orders take their keys in the same order.
            .push("::timestamptz[]) ORDER BY 1 ON CONFLICT (order_id) DO NOTHING RETURNING order_id");
        })
        .cte("created_history", |q| {
            q.push(
                "INSERT INTO order_history (order_id, status, message_id, message_type) \
                 SELECT c.order_id, 'PENDING', m.message_id, m.message_type \
                 FROM created c JOIN UNNEST(",
            )
            .push_bind(&ids)
            .push("::uuid[], ")
            .push_bind(message_ids)
            .push("::uuid[], ")
            .push_bind(message_types)
            .push("::text[]) AS m(order_id, message_id, message_type) USING (order_id)");
        })
        .applied("SELECT order_id FROM created");
}

/// An order as the settling steps read it.
struct CurrentOrder {
    status: String,
    total_cents: i64,
    currency: String,
    placed_at: DateTime<Utc>,
}

/// The orders the `Settle` steps are about, in one query.
async fn read_orders(db: &mut PgConnection, steps: &[Step<'_>]) -> Result<HashMap<Uuid, CurrentOrder>, ServiceError> {
    let ids: Vec<Uuid> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Settle { order_id, .. } => Some(*order_id),
            Step::Place { .. } => None,
        })
        .collect();
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows =
        sqlx::query("SELECT order_id, status, total_cents, currency, placed_at FROM orders WHERE order_id = ANY($1)")
            .bind(&ids)
            .fetch_all(&mut *db)
            .await?;
    let mut orders = HashMap::with_capacity(rows.len());
    for row in rows {
        orders.insert(
            row.try_get::<Uuid, _>("order_id")?,
            CurrentOrder {
                status: row.try_get("status")?,
                total_cents: row.try_get("total_cents")?,
                currency: row.try_get("currency")?,
                placed_at: row.try_get("placed_at")?,
            },
        );
    }
    Ok(orders)
}

/// Orders to move from PENDING to a terminal status, with a history row for each move: the ids moved are
/// applied keys. The update finds the orders by primary key (one lookup per order of the batch), however
/// many others are PENDING: `workers/tests/plans.rs` checks the plan.
#[derive(Default)]
struct Moves<'a> {
    /// Order id, status, reason, and the id and type of the message that moves it.
    rows: Vec<(Uuid, &'static str, Option<&'static str>, Uuid, &'a str)>,
}

/// The columns of a [`Moves`], each in order id order.
type MoveColumns<'a> = (Vec<Uuid>, Vec<&'static str>, Vec<Option<&'static str>>, Vec<Uuid>, Vec<&'a str>);

impl<'a> Moves<'a> {
    fn push(&mut self, order_id: Uuid, status: &'static str, reason: Option<&'static str>, cause: &'a Metadata) {
        self.rows.push((order_id, status, reason, cause.message_id, cause.message_type.as_str()));
    }

    /// The moves as columns, in order id order: a stable lock order in the usual plan; should two statements
    /// still deadlock, PostgreSQL aborts one, which is decided again (a single message) or goes one by one
    /// (a batch).
    fn columns(mut self) -> MoveColumns<'a> {
        self.rows.sort_by_key(|row| row.0);
        let mut columns = MoveColumns::default();
        for (id, status, reason, message_id, message_type) in self.rows {
            columns.0.push(id);
            columns.1.push(status);
            columns.2.push(reason);
            columns.3.push(message_id);
            columns.4.push(message_type);
        }
        columns
    }

    fn push_onto(self, change: &mut Change) {
        if self.rows.is_empty() {
            return;
        }
        let (ids, statuses, reasons, message_ids, message_types) = self.columns();
        change
            .cte("moved", |q| {
                q.push(
                    "UPDATE orders o SET status = t.status, cancel_reason = t.reason, completed_at = clock_timestamp() \
                     FROM UNNEST(",
                )
                .push_bind(ids)
                .push("::uuid[], ")
                .push_bind(statuses)
                .push("::text[], ")
                .push_bind(reasons)
                .push("::text[], ")
                .push_bind(message_ids)
                .push("::uuid[], ")
                .push_bind(message_types)
                .push(
                    "::text[]) AS t(order_id, status, reason, message_id, message_type) \
                     WHERE o.order_id = t.order_id AND o.status = 'PENDING' \
                     RETURNING o.order_id, t.status, t.reason, t.message_id, t.message_type",
                );
            })
            .cte("moved_history", |q| {
                q.push(
                    "INSERT INTO order_history (order_id, status, detail, message_id, message_type) \
                     SELECT order_id, status, reason, message_id, message_type FROM moved",
                );
            })
            .applied("SELECT order_id FROM moved");
    }
}

/// The settling change as a statement of its own, its parameters in order: order ids, statuses, reasons,
/// message ids, message types. Public for `workers/tests/plans.rs` only.
#[doc(hidden)]
pub fn settle_orders_sql() -> String {
    let mut change = Change::new();
    let moves = Moves { rows: vec![(Uuid::nil(), "CONFIRMED", None, Uuid::nil(), "inventory.reserved")] };
    moves.push_onto(&mut change);
    change.inspection_sql()
}

/// Saga outcome and end-to-end latency, counted once the transition committed.
fn observe_outcome(outcome: &'static str, reason: &'static str, placed_at: DateTime<Utc>) {
    metrics::counter!("choreo_saga_outcomes_total", "outcome" => outcome, "reason" => reason).increment(1);
    let seconds = (Utc::now() - placed_at).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6;
    metrics::histogram!("choreo_workflow_duration_seconds", "outcome" => outcome).record(seconds);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_are_sorted_by_order_id_with_their_columns() {
        let (a, b, c) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        let moves = Moves {
            rows: vec![
                (c, "CANCELLED", Some("card_declined"), Uuid::from_u128(30), "payment.failed"),
                (a, "CONFIRMED", None, Uuid::from_u128(10), "inventory.reserved"),
                (b, "CANCELLED", Some("out_of_stock"), Uuid::from_u128(20), "payment.refunded"),
            ],
        };
        let (ids, statuses, reasons, message_ids, message_types) = moves.columns();
        assert_eq!(ids, [a, b, c]);
        assert_eq!(statuses, ["CONFIRMED", "CANCELLED", "CANCELLED"]);
        assert_eq!(reasons, [None, Some("out_of_stock"), Some("card_declined")]);
        assert_eq!(message_ids, [Uuid::from_u128(10), Uuid::from_u128(20), Uuid::from_u128(30)]);
        assert_eq!(message_types, ["inventory.reserved", "payment.refunded", "payment.failed"]);
    }
}
