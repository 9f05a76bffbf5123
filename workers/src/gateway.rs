//! The payment gateway port, and the simulated adapter used by default.
//!
//! Calls carry an idempotency key (the order id for a charge, the payment id for a refund): a gateway must
//! return the same result for the same key, because a worker that crashes after the call and before its
//! commit will call again on redelivery.
//!
//! # Rules of the simulated gateway (deterministic, so tests and demos can choose outcomes)
//! - a customer id starting with `decline` is refused with `card_declined`;
//! - an amount above the limit (`CHOREO_GATEWAY_LIMIT_CENTS`, default 1 000 000 = 10 000.00) is refused with
//!   `amount_over_limit`;
//! - anything else is charged; the payment id is a UUIDv5 of the order id, so a repeated charge for one order
//!   yields the same payment;
//! - a customer id starting with `flaky-N-` (N a digit) fails the first N charge attempts of each order
//!   with "gateway unavailable" (a transient failure), then succeeds;
//! - a customer id starting with `unavailable` always fails with "gateway unavailable";
//! - a customer id starting with `crash` aborts the worker process, when the rule is turned on
//!   (`CHOREO_GATEWAY_CRASHES`, off by default: any client could trigger it): a client library that takes the
//!   process down, so that tests see poison-message protection stop the loop;
//! - otherwise, with probability `CHOREO_GATEWAY_TRANSIENT_FAILURE_RATE` (default 0), a charge fails with
//!   "gateway unavailable";
//! - refunds always succeed.

use std::future::Future;

use choreo_messages::payloads::PaymentFailureReason;
use uuid::Uuid;

/// A charge request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge<'a> {
    /// Idempotency key: one order is charged at most once.
    pub order_id: Uuid,
    pub customer_id: &'a str,
    pub amount_cents: i64,
    pub currency: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeResult {
    Charged { payment_id: Uuid },
    Declined { reason: PaymentFailureReason },
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("payment gateway unavailable: {0}")]
    Unavailable(String),
    #[error("payment gateway refused the request: {0}")]
    Rejected(String),
}

/// What the payment worker needs from a payment provider.
pub trait PaymentGateway: Send + Sync + 'static {
    fn charge(&self, charge: Charge<'_>) -> impl Future<Output = Result<ChargeResult, GatewayError>> + Send;
    fn refund(&self, payment_id: Uuid, amount_cents: i64) -> impl Future<Output = Result<(), GatewayError>> + Send;
}

/// Stand-in for a payment provider; see the module documentation for its rules.
#[derive(Debug, Default)]
pub struct SimulatedGateway {
    pub limit_cents: i64,
    /// Share of charges that fail transiently at random, 0 to 1.
    pub transient_failure_rate: f64,
    /// Whether a customer id starting with `crash` aborts the process (off unless turned on: a rule for
    /// testing crash handling, which any client could otherwise trigger).
    pub crashes: bool,
    /// Failed attempts per order so far, for the `flaky-N-` rule.
    flaky_attempts: std::sync::Mutex<std::collections::HashMap<Uuid, u32>>,
}

impl SimulatedGateway {
    pub fn new(limit_cents: i64, transient_failure_rate: f64) -> Self {
        SimulatedGateway { limit_cents, transient_failure_rate, crashes: false, flaky_attempts: Default::default() }
    }

    /// Turn the `crash` rule on or off.
    pub fn with_crashes(mut self, crashes: bool) -> Self {
        self.crashes = crashes;
        self
    }

    /// Transient failures the rules call for, before any decision.
    fn outage(&self, charge: &Charge<'_>) -> Option<GatewayError> {
        let unavailable = || GatewayError::Unavailable("simulated outage".into());
        if self.crashes && charge.customer_id.starts_with("crash") {
            tracing::error!(order_id = %charge.order_id, "simulated gateway crash: aborting the process");
            std::process::abort();
        }
        if charge.customer_id.starts_with("unavailable") {
            return Some(unavailable());
        }
        if let Some(n) =
            charge.customer_id.strip_prefix("flaky-").and_then(|r| r.chars().next()).and_then(|c| c.to_digit(10))
        {
            let mut attempts = self.flaky_attempts.lock().unwrap_or_else(|p| p.into_inner());
            let failed = attempts.entry(charge.order_id).or_default();
            if *failed < n {
                *failed += 1;
                return Some(unavailable());
            }
        }
        if self.transient_failure_rate > 0.0 && rand::random::<f64>() < self.transient_failure_rate {
            return Some(unavailable());
        }
        None
    }
}

/// Namespace of simulated payment ids.
const PAYMENT_NAMESPACE: Uuid = Uuid::from_u128(0x6a1f_0c3e_8d4b_4f6e_9a2c_5b7d_1e3f_0a9c);

impl SimulatedGateway {
    pub fn decide(&self, charge: &Charge<'_>) -> ChargeResult {
        if charge.customer_id.starts_with("decline") {
            ChargeResult::Declined { reason: PaymentFailureReason::CardDeclined }
        } else if charge.amount_cents > self.limit_cents {
            ChargeResult::Declined { reason: PaymentFailureReason::AmountOverLimit }
        } else {
            ChargeResult::Charged { payment_id: Uuid::new_v5(&PAYMENT_NAMESPACE, charge.order_id.as_bytes()) }
        }
    }
}

impl PaymentGateway for SimulatedGateway {
    async fn charge(&self, charge: Charge<'_>) -> Result<ChargeResult, GatewayError> {
        match self.outage(&charge) {
            Some(e) => Err(e),
            None => Ok(self.decide(&charge)),
        }
    }

    async fn refund(&self, _payment_id: Uuid, _amount_cents: i64) -> Result<(), GatewayError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(customer: &str, amount: i64, order_id: Uuid) -> Charge<'_> {
        Charge { order_id, customer_id: customer, amount_cents: amount, currency: "EUR" }
    }

    #[test]
    fn rules_are_deterministic() {
        let g = SimulatedGateway::new(100, 0.0);
        let order = Uuid::now_v7();
        assert_eq!(
            g.decide(&charge("decline-7", 10, order)),
            ChargeResult::Declined { reason: PaymentFailureReason::CardDeclined }
        );
        assert_eq!(
            g.decide(&charge("c", 101, order)),
            ChargeResult::Declined { reason: PaymentFailureReason::AmountOverLimit }
        );
        let first = g.decide(&charge("c", 100, order));
        assert!(matches!(first, ChargeResult::Charged { .. }));
        assert_eq!(g.decide(&charge("c", 100, order)), first, "same order, same payment");
        assert_ne!(g.decide(&charge("c", 100, Uuid::now_v7())), first);
    }

    #[tokio::test]
    async fn flaky_customers_fail_n_times_per_order_then_succeed() {
        let g = SimulatedGateway::new(1_000, 0.0);
        let order = Uuid::now_v7();
        for _ in 0..2 {
            assert!(matches!(g.charge(charge("flaky-2-x", 10, order)).await, Err(GatewayError::Unavailable(_))));
        }
        assert!(matches!(g.charge(charge("flaky-2-x", 10, order)).await, Ok(ChargeResult::Charged { .. })));
        assert!(matches!(g.charge(charge("unavailable-x", 10, order)).await, Err(GatewayError::Unavailable(_))));
        let always = SimulatedGateway::new(1_000, 1.0);
        assert!(matches!(always.charge(charge("c", 10, order)).await, Err(GatewayError::Unavailable(_))));
    }

    #[tokio::test]
    async fn the_crash_rule_is_off_unless_turned_on() {
        // With the rule on, this charge would abort the test process.
        let g = SimulatedGateway::new(1_000, 0.0);
        assert!(!g.crashes);
        assert!(matches!(g.charge(charge("crash-x", 10, Uuid::now_v7())).await, Ok(ChargeResult::Charged { .. })));
        assert!(SimulatedGateway::new(1_000, 0.0).with_crashes(true).crashes);
    }
}
