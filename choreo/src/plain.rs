//! [`PlainHandler`]: the plain way to write a handler, with the same guarantees as [`Service`].
//!
//! The runtime opens a transaction on the worker's database and records the message id in the inbox first;
//! the handler does any sqlx work in that transaction and returns the events its message causes; the
//! runtime writes them to the outbox in the same transaction, commits, hands them to the relay, and only
//! then is the delivery acked. A copy of a message processed before finds its inbox row and is acked with
//! no effect; a copy being handled at the same moment waits for the first copy's transaction and then finds
//! it. Any error rolls everything back.
//!
//! It costs a few more round trips per message than a [`Service`], which writes its change, the inbox and
//! the outbox in one statement and batches waiting deliveries: choose [`Service`] for hot paths.
//!
//! ```no_run
//! use choreo::sqlx::PgConnection;
//! use choreo::{Envelope, Payload, PlainHandler, ServiceError, contract};
//! # #[derive(Debug, Clone, PartialEq, choreo::serde::Serialize, choreo::serde::Deserialize, choreo::schemars::JsonSchema)]
//! # #[serde(crate = "choreo::serde")]
//! # #[schemars(crate = "choreo::schemars")]
//! # struct OrderConfirmed { order_id: choreo::uuid::Uuid }
//! # impl Payload for OrderConfirmed { const TYPE: &'static str = "order.confirmed"; }
//! # contract! { enum Message { OrderConfirmed(OrderConfirmed) } }
//!
//! struct Audit;
//!
//! impl PlainHandler for Audit {
//!     type Message = Message;
//!     const NAME: &'static str = "audit";
//!     const CONSUMES: &'static [&'static str] = &["order.confirmed"];
//!
//!     async fn handle(&self, tx: &mut PgConnection, message: &Envelope<Message>) -> Result<Vec<Message>, ServiceError> {
//!         choreo::sqlx::query("INSERT INTO audit (order_id) VALUES ($1)")
//!             .bind(message.meta.correlation_id)
//!             .execute(&mut *tx)
//!             .await?;
//!         Ok(Vec::new())
//!     }
//! }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use choreo_messages::{Contract, EncodedEnvelope, Envelope, ErrorKind};
use choreo_outbox::{InboxGuard, OutboxHandoff, OutboxStore};
use choreo_rabbitmq::Outcome;
use sqlx::{PgConnection, PgPool};
use tracing::{Instrument, info};

#[cfg(doc)]
use crate::service::Service;
use crate::service::{HandlerCounters, ServiceError};

/// A worker's business logic, written plainly: sqlx work in the transaction it is handed, events returned.
pub trait PlainHandler: Send + Sync + Sized + 'static {
    /// The messages this handler reads and writes.
    type Message: Contract;
    /// Worker name: queue, producer and inbox consumer name.
    const NAME: &'static str;
    /// Wire names of the message types this worker's queue is bound to.
    const CONSUMES: &'static [&'static str];
    /// Wire names of the types this worker emits that end a workflow: no participant consumes them, so they
    /// are routed to the namespace's bounded outcomes feed (`{ns}.outcomes`) for downstream systems.
    const OUTCOMES: &'static [&'static str] = &[];

    /// Register this handler's own metrics at zero, so that rates and increases see their first events.
    fn register_metrics(&self) {}

    /// Apply `message` in `tx`, a transaction on the worker's database, and return the events it causes. An
    /// error rolls the transaction back: [`ServiceError::Transient`] and [`ServiceError::Conflict`] are
    /// retried, [`ServiceError::Permanent`] dead-letters the message. Must not commit or roll back `tx`, and
    /// must not call out to anything that is not idempotent on a key derived from the message.
    fn handle(
        &self,
        tx: &mut PgConnection,
        message: &Envelope<Self::Message>,
    ) -> impl Future<Output = Result<Vec<Self::Message>, ServiceError>> + Send;
}

/// Runs a [`PlainHandler`] for the consumer: one transaction per message, inbox first, outbox last.
pub struct PlainRunner<H> {
    handler: H,
    db: PgPool,
    inbox: InboxGuard,
    handoff: OutboxHandoff,
    counters: Arc<HandlerCounters>,
}

impl<H: PlainHandler> PlainRunner<H> {
    /// `handoff`: the relay of this process (`OutboxHandoff::default()` when none runs: a sweep then
    /// publishes what the handler writes).
    pub fn new(handler: H, db: PgPool, handoff: OutboxHandoff) -> Self {
        PlainRunner { handler, db, inbox: InboxGuard::new(H::NAME), handoff, counters: Arc::default() }
    }

    /// Counters a test or `/metrics` can read.
    pub fn counters(&self) -> Arc<HandlerCounters> {
        Arc::clone(&self.counters)
    }

    /// The handler this runner runs.
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// `Ok(Some(events))` once committed, `Ok(None)` for a message processed before.
    async fn apply(&self, envelope: &Envelope<H::Message>) -> Result<Option<Vec<EncodedEnvelope>>, ServiceError> {
        let mut tx = self.db.begin().await?;
        if !self.inbox.record(&mut tx, &envelope.meta).await? {
            tx.rollback().await?;
            return Ok(None);
        }
        let events = self.handler.handle(&mut tx, envelope).await?;
        let traceparent =
            crate::telemetry::traceparent_of(&tracing::Span::current()).or_else(|| envelope.meta.traceparent.clone());
        let encoded: Vec<EncodedEnvelope> = events
            .into_iter()
            .map(|event| {
                let mut e = Envelope::caused_by(&envelope.meta, event, H::NAME);
                e.meta.traceparent = traceparent.clone();
                e.encode()
            })
            .collect();
        OutboxStore::enqueue_held(&mut tx, &encoded, self.handoff.hold()).await?;
        tx.commit().await?;
        Ok(Some(encoded))
    }
}

impl<H: PlainHandler> choreo_rabbitmq::Handler for PlainRunner<H> {
    type Message = H::Message;

    async fn handle(&self, envelope: &Envelope<H::Message>) -> Outcome {
        if !H::CONSUMES.contains(&envelope.meta.message_type.as_str()) {
            return Outcome::Reject {
                kind: ErrorKind::UnknownType,
                reason: format!("worker `{}` does not handle `{}`", H::NAME, envelope.meta.message_type),
            };
        }
        let span = crate::telemetry::handle_span(H::NAME, &envelope.meta);
        match self.apply(envelope).instrument(span).await {
            Ok(Some(events)) => {
                self.handoff.committed(events).await;
                self.counters.processed.fetch_add(1, Ordering::Relaxed);
                Outcome::Done
            }
            Ok(None) => {
                self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("choreo_duplicates_skipped_total", "worker" => H::NAME, "type" => envelope.message.type_name())
                    .increment(1);
                info!("duplicate delivery acknowledged with no effect");
                Outcome::Duplicate
            }
            Err(ServiceError::Transient(reason) | ServiceError::Conflict(reason)) => Outcome::Retry { reason },
            Err(ServiceError::Permanent(reason)) => Outcome::Reject { kind: ErrorKind::Permanent, reason },
        }
    }

    async fn record_restart(&self, envelope: &Envelope<H::Message>) -> Result<u32, String> {
        self.inbox.record_restart(&self.db, &envelope.meta).await.map_err(|e| e.to_string())
    }
}
