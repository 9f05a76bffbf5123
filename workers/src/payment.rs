//! The payment service: charges orders through a [`PaymentGateway`] and refunds them when inventory fails.
//!
//! | consumes | effect | emits |
//! |---|---|---|
//! | `order.created` | charge the customer | `payment.succeeded` or `payment.failed` |
//! | `inventory.failed` | refund the charge (compensation) | `payment.refunded` |
//!
//! The gateway is called inside the handler's transaction with the order id as idempotency key; if the
//! worker dies after the call and before the commit, the redelivered message calls again and gets the same
//! payment. The `payments` primary key on the order id makes a second recorded charge impossible. A batch of
//! charges calls the gateway for all of them at once, inside the batch's transaction, under the same rule.

use std::collections::{HashMap, HashSet};

use choreo_messages::payloads::{CancelReason, OrderCreated, PaymentFailed, PaymentRefunded, PaymentSucceeded};
use choreo_messages::{Envelope, Message, MessageType};
use sqlx::migrate::Migrator;
use sqlx::{PgConnection, Row};
use tracing::{Instrument, info, warn};
use uuid::Uuid;

use crate::gateway::{Charge, ChargeResult, GatewayError, PaymentGateway};
use crate::service::{Effects, Service, ServiceError, apply_one_by_one};

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
    /// one by one: one statement finds (and locks) the orders already paid, the gateway is called for the
    /// others at once, one statement records the payments.
    async fn charge_all(
        &self,
        tx: &mut PgConnection,
        batch: &[(&Envelope, tracing::Span)],
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
            sqlx::query_as::<_, (Uuid, String)>("SELECT order_id, status FROM payments WHERE order_id = ANY($1) ORDER BY order_id FOR UPDATE")
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
        let charges = batch.iter().zip(&orders).filter(|(_, o)| !existing.contains_key(&o.order_id)).map(|((_, span), order)| {
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
            rows.push(order, payment_id, envelope.meta.correlation_id, status, decline.map(|r| CancelReason::from(r).as_str()));
            effects.push(Effects::events(vec![match decline {
                None => Message::PaymentSucceeded(PaymentSucceeded {
                    order_id: order.order_id,
                    payment_id,
                    amount_cents: order.total_cents,
                    currency: order.currency.clone(),
                    lines: order.lines.clone(),
                }),
                Some(reason) => Message::PaymentFailed(PaymentFailed { order_id: order.order_id, reason }),
            }]));
        }
        rows.insert(tx).await?;
        Ok(effects)
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

    async fn insert(self, tx: &mut PgConnection) -> Result<(), ServiceError> {
        if self.order_ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO payments (order_id, payment_id, correlation_id, customer_id, amount_cents, currency, \
                                   status, decline_reason) \
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::bigint[], $6::text[], \
                                  $7::text[], $8::text[]) \
             ORDER BY 1",
        )
        .bind(&self.order_ids)
        .bind(&self.payment_ids)
        .bind(&self.correlation_ids)
        .bind(&self.customer_ids)
        .bind(&self.amounts)
        .bind(&self.currencies)
        .bind(&self.statuses)
        .bind(&self.decline_reasons)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

impl<G: PaymentGateway> Service for PaymentService<G> {
    const NAME: &'static str = "payment";
    const CONSUMES: &'static [MessageType] = &[MessageType::OrderCreated, MessageType::InventoryFailed];

    async fn apply(&self, tx: &mut PgConnection, envelope: &Envelope) -> Result<Effects, ServiceError> {
        match &envelope.message {
            Message::OrderCreated(_) => {
                let mut effects = self.charge_all(tx, &[(envelope, tracing::Span::current())]).await?;
                effects.pop().ok_or_else(|| ServiceError::Permanent("no result for the message".into()))
            }
            Message::InventoryFailed(failed) => {
                let row = sqlx::query(
                    "SELECT payment_id, amount_cents, currency, status FROM payments WHERE order_id = $1 FOR UPDATE",
                )
                .bind(failed.order_id)
                .fetch_optional(&mut *tx)
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
                let payment_id: uuid::Uuid = row.try_get("payment_id")?;
                let amount_cents: i64 = row.try_get("amount_cents")?;
                self.gateway.refund(payment_id, amount_cents).await?;
                sqlx::query("UPDATE payments SET status = 'REFUNDED', refunded_at = now() WHERE order_id = $1")
                    .bind(failed.order_id)
                    .execute(&mut *tx)
                    .await?;
                Ok(Effects::events(vec![Message::PaymentRefunded(PaymentRefunded {
                    order_id: failed.order_id,
                    payment_id,
                    amount_cents,
                    currency: row.try_get("currency")?,
                    reason: failed.reason,
                })]))
            }
            other => Err(ServiceError::Permanent(format!("payment does not handle {}", other.message_type()))),
        }
    }

    /// Charges of distinct orders are made together (see [`PaymentService::charge_all`]); a batch holding a
    /// refund, or two messages about one order, is applied one message after the other.
    async fn apply_batch(
        &self,
        tx: &mut PgConnection,
        batch: &[(&Envelope, tracing::Span)],
    ) -> Result<Vec<Effects>, ServiceError> {
        let mut seen = HashSet::with_capacity(batch.len());
        let charges_only = batch
            .iter()
            .all(|(e, _)| matches!(&e.message, Message::OrderCreated(o) if seen.insert(o.order_id)));
        if charges_only {
            return self.charge_all(tx, batch).await;
        }
        apply_one_by_one(self, tx, batch).await
    }
}
