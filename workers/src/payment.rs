//! The payment service: charges orders through a [`PaymentGateway`] and refunds them when inventory fails.
//!
//! | consumes | effect | emits |
//! |---|---|---|
//! | `order.created` | charge the customer | `payment.succeeded` or `payment.failed` |
//! | `inventory.failed` | refund the charge (compensation) | `payment.refunded` |
//!
//! The gateway is called before the payment is written, with the order id as idempotency key; if the worker
//! dies after the call and before the write, the redelivered message calls again and gets the same payment.
//! The `payments` primary key on the order id makes a second recorded charge impossible: a payment written
//! meanwhile by a copy of the message wins, and the copy writes nothing. A batch of charges calls the
//! gateway for all of them at once, under the same rule.

use std::collections::{HashMap, HashSet};

use choreo::Change;
use choreo_messages::payloads::{
    CancelReason, InventoryFailed, OrderCreated, PaymentFailed, PaymentRefunded, PaymentSucceeded,
};
use choreo_messages::{Envelope, Message, MessageType};
use sqlx::migrate::Migrator;
use sqlx::{PgConnection, Row};
use tracing::{Instrument, info, warn};
use uuid::Uuid;

use crate::gateway::{Charge, ChargeResult, GatewayError, PaymentGateway};
use choreo::{Effects, Service, ServiceError};

pub static MIGRATIONS: Migrator = sqlx::migrate!("./migrations/payment");

pub struct PaymentService<G> {
    gateway: G,
}

impl<G: PaymentGateway> PaymentService<G> {
    pub fn new(gateway: G) -> Self {
        PaymentService { gateway }
    }
}

impl From<GatewayError> for ServiceError {
    fn from(e: GatewayError) -> Self {
        match e {
            GatewayError::Unavailable(_) => ServiceError::Transient(e.to_string()),
            GatewayError::Rejected(_) => ServiceError::Permanent(e.to_string()),
        }
    }
}

impl<G: PaymentGateway> PaymentService<G> {
    /// Charge the orders of `order.created` messages about distinct orders, with the effects of charging them
    /// one by one: one query finds the orders already paid, the gateway is called for the others at once,
    /// and the change records the payments that are still new when it is written.
    async fn charge_all(
        &self,
        db: &mut PgConnection,
        batch: &[(&Envelope, tracing::Span)],
        change: &mut Change,
    ) -> Result<Vec<Effects>, ServiceError> {
        let orders = batch
            .iter()
            .map(|(e, _)| match &e.message {
                Message::OrderCreated(order) => Ok(order),
                other => Err(ServiceError::Permanent(format!("not an order to charge: {}", other.message_type()))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let ids: Vec<Uuid> = orders.iter().map(|o| o.order_id).collect();
        let existing: HashMap<Uuid, String> =
            sqlx::query_as::<_, (Uuid, String)>("SELECT order_id, status FROM payments WHERE order_id = ANY($1)")
                .bind(&ids)
                .fetch_all(&mut *db)
                .await?
                .into_iter()
                .collect();
        let charges =
            batch.iter().zip(&orders).filter(|(_, o)| !existing.contains_key(&o.order_id)).map(|((_, span), order)| {
                self.gateway
                    .charge(Charge {
                        order_id: order.order_id,
                        customer_id: &order.customer_id,
                        amount_cents: order.total_cents,
                        currency: &order.currency,
                    })
                    .instrument(span.clone())
            });
        let mut results = futures_util::future::join_all(charges).await.into_iter();
        let mut rows = Payments::default();
        let mut effects = Vec::with_capacity(orders.len());
        for ((envelope, span), order) in batch.iter().zip(&orders) {
            let _in_message = span.enter();
            if let Some(status) = existing.get(&order.order_id) {
                info!(order_id = %order.order_id, %status, "order already has a payment; nothing to do");
                effects.push(Effects::none());
                continue;
            }
            let result = results.next().ok_or_else(|| ServiceError::Permanent("a charge went missing".into()))??;
            let (payment_id, status, decline) = match result {
                ChargeResult::Charged { payment_id } => (payment_id, "CHARGED", None),
                ChargeResult::Declined { reason } => (Uuid::now_v7(), "DECLINED", Some(reason)),
            };
            rows.push(
                order,
                payment_id,
                envelope.meta.correlation_id,
                status,
                decline.map(|r| CancelReason::from(r).as_str()),
            );
            // Written only if no copy of this message recorded the payment meanwhile.
            effects.push(
                Effects::events(vec![match decline {
                    None => Message::PaymentSucceeded(PaymentSucceeded {
                        order_id: order.order_id,
                        payment_id,
                        amount_cents: order.total_cents,
                        currency: order.currency.clone(),
                        lines: order.lines.clone(),
                    }),
                    Some(reason) => Message::PaymentFailed(PaymentFailed { order_id: order.order_id, reason }),
                }])
                .applies_if(order.order_id),
            );
        }
        rows.push_onto(change);
        Ok(effects)
    }

    /// Refund the charge of an order whose stock could not be reserved. The change marks it refunded only if
    /// it is still charged when written; the gateway's refund is idempotent on the payment id.
    async fn refund(
        &self,
        db: &mut PgConnection,
        failed: &InventoryFailed,
        change: &mut Change,
    ) -> Result<Effects, ServiceError> {
        let row = sqlx::query("SELECT payment_id, amount_cents, currency, status FROM payments WHERE order_id = $1")
            .bind(failed.order_id)
            .fetch_optional(&mut *db)
            .await?
            .ok_or_else(|| ServiceError::Permanent(format!("no payment for order {}", failed.order_id)))?;
        let status: String = row.try_get("status")?;
        if status == "REFUNDED" {
            // A repeated request: the refund was made (and its event written) the first time.
            info!(order_id = %failed.order_id, "payment already refunded; nothing to do");
            return Ok(Effects::none());
        }
        if status != "CHARGED" {
            warn!(order_id = %failed.order_id, %status, "refund asked for a payment that is not charged; ignored");
            return Ok(Effects::none());
        }
        let payment_id: Uuid = row.try_get("payment_id")?;
        let amount_cents: i64 = row.try_get("amount_cents")?;
        self.gateway.refund(payment_id, amount_cents).await?;
        change
            .cte("refunded", |q| {
                q.push("UPDATE payments SET status = 'REFUNDED', refunded_at = now() WHERE order_id = ")
                    .push_bind(failed.order_id)
                    .push(" AND status = 'CHARGED' RETURNING order_id");
            })
            .applied("SELECT order_id FROM refunded");
        Ok(Effects::events(vec![Message::PaymentRefunded(PaymentRefunded {
            order_id: failed.order_id,
            payment_id,
            amount_cents,
            currency: row.try_get("currency")?,
            reason: failed.reason,
        })])
        .applies_if(failed.order_id))
    }
}

/// Rows for `payments`, written in one statement, in order id order (two batches holding copies of the same
/// orders take their locks in the same order).
#[derive(Default)]
struct Payments<'a> {
    order_ids: Vec<Uuid>,
    payment_ids: Vec<Uuid>,
    correlation_ids: Vec<Uuid>,
    customer_ids: Vec<&'a str>,
    amounts: Vec<i64>,
    currencies: Vec<&'a str>,
    statuses: Vec<&'static str>,
    decline_reasons: Vec<Option<&'static str>>,
}

impl<'a> Payments<'a> {
    fn push(
        &mut self,
        order: &'a OrderCreated,
        payment_id: Uuid,
        correlation_id: Uuid,
        status: &'static str,
        decline_reason: Option<&'static str>,
    ) {
        self.order_ids.push(order.order_id);
        self.payment_ids.push(payment_id);
        self.correlation_ids.push(correlation_id);
        self.customer_ids.push(&order.customer_id);
        self.amounts.push(order.total_cents);
        self.currencies.push(&order.currency);
        self.statuses.push(status);
        self.decline_reasons.push(decline_reason);
    }

    /// The payments as new rows of the change; an order paid meanwhile keeps its payment, and its key is not
    /// applied.
    fn push_onto(self, change: &mut Change) {
        if self.order_ids.is_empty() {
            return;
        }
        change
            .cte("charged", |q| {
                q.push(
                    "INSERT INTO payments (order_id, payment_id, correlation_id, customer_id, amount_cents, currency, \
                                           status, decline_reason) \
                     SELECT * FROM UNNEST(",
                )
                .push_bind(self.order_ids)
                .push("::uuid[], ")
                .push_bind(self.payment_ids)
                .push("::uuid[], ")
                .push_bind(self.correlation_ids)
                .push("::uuid[], ")
                .push_bind(self.customer_ids)
                .push("::text[], ")
                .push_bind(self.amounts)
                .push("::bigint[], ")
                .push_bind(self.currencies)
                .push("::text[], ")
                .push_bind(self.statuses)
                .push("::text[], ")
                .push_bind(self.decline_reasons)
                .push("::text[]) ORDER BY 1 ON CONFLICT (order_id) DO NOTHING RETURNING order_id");
            })
            .applied("SELECT order_id FROM charged");
    }
}

impl<G: PaymentGateway> Service for PaymentService<G> {
    const NAME: &'static str = "payment";
    type Message = Message;
    const CONSUMES: &'static [&'static str] =
        &[MessageType::OrderCreated.as_str(), MessageType::InventoryFailed.as_str()];

    /// Charges are decided together (see [`PaymentService::charge_all`]); a refund alone.
    fn batchable(&self, envelope: &Envelope) -> bool {
        matches!(envelope.message, Message::OrderCreated(_))
    }

    async fn decide(
        &self,
        db: &mut PgConnection,
        batch: &[(&Envelope, tracing::Span)],
        change: &mut Change,
    ) -> Result<Vec<Effects>, ServiceError> {
        if charges_of_distinct_orders(batch.iter().map(|(e, _)| *e)) {
            return self.charge_all(db, batch, change).await;
        }
        match batch {
            [(envelope, span)] => match &envelope.message {
                Message::InventoryFailed(failed) => {
                    Ok(vec![self.refund(db, failed, change).instrument(span.clone()).await?])
                }
                other => Err(ServiceError::Permanent(format!("payment does not handle {}", other.message_type()))),
            },
            _ => Err(ServiceError::Transient(
                "a refund, or two messages about one order, are decided one at a time".into(),
            )),
        }
    }
}

fn charges_of_distinct_orders<'a>(mut batch: impl Iterator<Item = &'a Envelope>) -> bool {
    let mut seen = HashSet::new();
    batch.all(|e| matches!(&e.message, Message::OrderCreated(o) if seen.insert(o.order_id)))
}
