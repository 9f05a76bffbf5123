//! [`HttpGateway`]: a payment provider over HTTP, with a timeout per call, retries with backoff and jitter,
//! and a circuit breaker (failsafe) so that a provider that is down is not hammered.
//!
//! The provider's API, as this adapter speaks it:
//! - `POST {base}/charges` with `Idempotency-Key: <order id>` and `{"order_id", "customer_id",
//!   "amount_cents", "currency"}` answers `200 {"status":"charged","payment_id":"<uuid>"}` or
//!   `200 {"status":"declined","reason":"card_declined"|"amount_over_limit"}`;
//! - `POST {base}/refunds` with `Idempotency-Key: <payment id>` and `{"payment_id", "amount_cents"}` answers 200.
//!
//! A timeout, a connection error, a 5xx, or a 408, 409 (same idempotency key still in progress), 425 or 429
//! is transient ([`GatewayError::Unavailable`]); the message waits in the worker's delay queues while the
//! circuit is open. Any other 4xx is permanent ([`GatewayError::Rejected`]): the request itself is wrong, and
//! the message is dead-lettered with the provider's answer for an operator.

use std::time::Duration;

use choreo_messages::payloads::PaymentFailureReason;
use failsafe::StateMachine;
use failsafe::backoff::Constant;
use failsafe::failure_policy::ConsecutiveFailures;
use serde::{Deserialize, Serialize};
use tokio_retry2::strategy::{ExponentialFactorBackoff, jitter};
use tokio_retry2::{Retry, RetryError};
use tracing::warn;
use uuid::Uuid;

use crate::gateway::{Charge, ChargeResult, GatewayError, PaymentGateway};

#[derive(Debug, Clone)]
pub struct HttpGatewayConfig {
    pub base_url: String,
    /// Deadline of one HTTP call.
    pub timeout: Duration,
    /// Retries of a transient failure inside one gateway call.
    pub retries: usize,
    /// Consecutive failed calls that open the circuit.
    pub breaker_failures: u32,
    /// How long the circuit stays open before a trial call.
    pub breaker_open_for: Duration,
}

pub struct HttpGateway {
    client: reqwest::Client,
    config: HttpGatewayConfig,
    breaker: StateMachine<ConsecutiveFailures<Constant>, ()>,
}

#[derive(Serialize)]
struct ChargeBody<'a> {
    order_id: Uuid,
    customer_id: &'a str,
    amount_cents: i64,
    currency: &'a str,
}

#[derive(Serialize)]
struct RefundBody {
    payment_id: Uuid,
    amount_cents: i64,
}

#[derive(Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
enum ChargeReply {
    Charged { payment_id: Uuid },
    Declined { reason: PaymentFailureReason },
}

impl HttpGateway {
    pub fn new(config: HttpGatewayConfig) -> Result<Self, GatewayError> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| GatewayError::Rejected(format!("building the HTTP client: {e}")))?;
        let policy = failsafe::failure_policy::consecutive_failures(
            config.breaker_failures.max(1),
            failsafe::backoff::constant(config.breaker_open_for),
        );
        let breaker = failsafe::Config::new().failure_policy(policy).build();
        Ok(HttpGateway { client, config, breaker })
    }

    /// Whether calls go through now (the circuit is closed or half-open).
    pub fn circuit_closed(&self) -> bool {
        self.breaker.is_call_permitted()
    }

    async fn post<T: Serialize>(&self, path: &str, key: Uuid, body: &T) -> Result<reqwest::Response, GatewayError> {
        if !self.breaker.is_call_permitted() {
            return Err(GatewayError::Unavailable("circuit open: the gateway failed repeatedly".into()));
        }
        let url = format!("{}/{path}", self.config.base_url.trim_end_matches('/'));
        let strategy = ExponentialFactorBackoff::from_millis(50, 2.0)
            .max_delay_millis(1_000)
            .map(jitter)
            .take(self.config.retries);
        // Whether any attempt failed for the provider's sake (no answer, a 5xx, a 429), not only because this
        // one request must wait ("try again": 408, 409, 425).
        let provider_failed = std::sync::atomic::AtomicBool::new(false);
        let result = Retry::spawn(strategy, || async {
            let response =
                self.client.post(&url).header("Idempotency-Key", key.to_string()).json(body).send().await.map_err(
                    |e| {
                        provider_failed.store(true, std::sync::atomic::Ordering::Relaxed);
                        RetryError::transient(GatewayError::Unavailable(format!("{path}: {e}")))
                    },
                )?;
            let status = response.status();
            if is_provider_failure(status) {
                provider_failed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            if is_provider_failure(status) || is_request_level(status) {
                return Err(RetryError::transient(GatewayError::Unavailable(format!("{path}: HTTP {status}"))));
            }
            if !status.is_success() {
                return Err(RetryError::permanent(GatewayError::Rejected(format!("{path}: HTTP {status}"))));
            }
            Ok(response)
        })
        .await;
        match &result {
            Ok(_) | Err(GatewayError::Rejected(_)) => self.breaker.on_success(),
            // The provider answered: it is up, this request must wait. Not a failure for the circuit.
            Err(GatewayError::Unavailable(_)) if !provider_failed.load(std::sync::atomic::Ordering::Relaxed) => {}
            Err(GatewayError::Unavailable(e)) => {
                self.breaker.on_error();
                if !self.breaker.is_call_permitted() {
                    warn!(error = %e, "payment gateway circuit opened");
                }
            }
        }
        result
    }
}

/// The statuses that say the provider is failing (a server error) or overloaded (429): a later call can
/// succeed, and they count towards opening the circuit.
fn is_provider_failure(status: reqwest::StatusCode) -> bool {
    status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS
}

/// The "not now" statuses that concern one request, not the provider's health: 408 (the provider timed out
/// reading), 409 (a call with the same idempotency key, say one of ours that timed out, is still in
/// progress) and 425. Retried, but they do not count towards opening the circuit.
fn is_request_level(status: reqwest::StatusCode) -> bool {
    use reqwest::StatusCode;
    matches!(status, StatusCode::REQUEST_TIMEOUT | StatusCode::CONFLICT | StatusCode::TOO_EARLY)
}

impl PaymentGateway for HttpGateway {
    async fn charge(&self, charge: Charge<'_>) -> Result<ChargeResult, GatewayError> {
        let body = ChargeBody {
            order_id: charge.order_id,
            customer_id: charge.customer_id,
            amount_cents: charge.amount_cents,
            currency: charge.currency,
        };
        let reply: ChargeReply = self
            .post("charges", charge.order_id, &body)
            .await?
            .json()
            .await
            .map_err(|e| GatewayError::Unavailable(format!("charges: unreadable reply: {e}")))?;
        Ok(match reply {
            ChargeReply::Charged { payment_id } => ChargeResult::Charged { payment_id },
            ChargeReply::Declined { reason } => ChargeResult::Declined { reason },
        })
    }

    async fn refund(&self, payment_id: Uuid, amount_cents: i64) -> Result<(), GatewayError> {
        self.post("refunds", payment_id, &RefundBody { payment_id, amount_cents }).await.map(|_| ())
    }
}
