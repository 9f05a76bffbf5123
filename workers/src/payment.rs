//! The payment service: charges orders through a [`PaymentGateway`] and refunds them when inventory fails.
//!
//! | consumes | effect | emits |
//! |---|---|---|
//! | `order.created` | charge the customer | `payment.succeeded` or `payment.failed` |
//! | `inventory.failed` | refund the charge (compensation) | `payment.refunded` |
//!
//! The gateway is called inside the handler's transaction with the order id as idempotency key; if the
//! worker dies after the call and before the commit, the redelivered message calls again and gets the same
//! payment. The `payments` primary key on the order id makes a second recorded charge impossible.

use choreo_messages::payloads::{PaymentFailed, PaymentRefunded, PaymentSucceeded};
use choreo_messages::{Envelope, Message, MessageType};
use sqlx::migrate::Migrator;
use sqlx::{PgConnection, Row};
use tracing::{info, warn};

use crate::gateway::{Charge, ChargeResult, GatewayError, PaymentGateway};
use crate::service::{Effects, Service, ServiceError};

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

impl<G: PaymentGateway> Service for PaymentService<G> {
    const NAME: &'static str = "payment";
    const CONSUMES: &'static [MessageType] = &[MessageType::OrderCreated, MessageType::InventoryFailed];

    async fn apply(&self, tx: &mut PgConnection, envelope: &Envelope) -> Result<Effects, ServiceError> {
        match &envelope.message {
            Message::OrderCreated(order) => {
                let existing: Option<String> =
                    sqlx::query_scalar("SELECT status FROM payments WHERE order_id = $1 FOR UPDATE")
                        .bind(order.order_id)
                        .fetch_optional(&mut *tx)
                        .await?;
                if let Some(status) = existing {
                    info!(order_id = %order.order_id, %status, "order already has a payment; nothing to do");
                    return Ok(Effects::none());
                }
                let charge = Charge {
                    order_id: order.order_id,
                    customer_id: &order.customer_id,
                    amount_cents: order.total_cents,
                    currency: &order.currency,
                };
                let (payment_id, status, decline) = match self.gateway.charge(charge).await? {
                    ChargeResult::Charged { payment_id } => (payment_id, "CHARGED", None),
                    ChargeResult::Declined { reason } => (uuid::Uuid::now_v7(), "DECLINED", Some(reason)),
                };
                sqlx::query(
                    "INSERT INTO payments (order_id, payment_id, correlation_id, customer_id, amount_cents, currency, \
                                           status, decline_reason) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(order.order_id)
                .bind(payment_id)
                .bind(envelope.meta.correlation_id)
                .bind(&order.customer_id)
                .bind(order.total_cents)
                .bind(&order.currency)
                .bind(status)
                .bind(decline.map(|r| serde_json::to_value(r).ok().and_then(|v| v.as_str().map(str::to_owned))))
                .execute(&mut *tx)
                .await?;
                Ok(Effects::events(vec![match decline {
                    None => Message::PaymentSucceeded(PaymentSucceeded {
                        order_id: order.order_id,
                        payment_id,
                        amount_cents: order.total_cents,
                        currency: order.currency.clone(),
                        lines: order.lines.clone(),
                    }),
                    Some(reason) => Message::PaymentFailed(PaymentFailed { order_id: order.order_id, reason }),
                }]))
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
}
