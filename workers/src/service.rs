//! [`Service`]: the business side of a worker, and [`TransactionalHandler`], which gives every message
//! exactly one effect.
//!
//! For each delivery: begin; record the message id in the inbox (a duplicate stops here, acked with no
//! effect); apply the service's change; write the events it returns to the outbox; commit; wake the relay.
//! Only then is the delivery acked (by the consumer runner).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use choreo_messages::{EncodedEnvelope, Envelope, ErrorKind, Message, MessageType};
use choreo_outbox::{InboxGuard, OutboxError, OutboxStore, OutboxWaker};
use choreo_rabbitmq::Outcome;
use sqlx::{PgConnection, PgPool};
use tracing::{Instrument, debug, info};

/// Why a service could not apply a message.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A dependency failed (database, gateway): retrying may succeed.
    #[error("{0}")]
    Transient(String),
    /// Retrying cannot help (a message this service does not handle, an order it never heard of).
    #[error("{0}")]
    Permanent(String),
}

impl From<sqlx::Error> for ServiceError {
    fn from(e: sqlx::Error) -> Self {
        ServiceError::Transient(format!("database: {e}"))
    }
}

impl From<OutboxError> for ServiceError {
    fn from(e: OutboxError) -> Self {
        ServiceError::Transient(e.to_string())
    }
}

/// What applying a message produced: events for the outbox, and observations to make once it committed
/// (metrics of business outcomes must count only what really happened).
#[derive(Default)]
pub struct Effects {
    pub events: Vec<Message>,
    pub on_commit: Vec<Box<dyn FnOnce() + Send>>,
}

impl Effects {
    pub fn events(events: Vec<Message>) -> Self {
        Effects { events, on_commit: Vec::new() }
    }

    pub fn none() -> Self {
        Effects::default()
    }

    pub fn after_commit(mut self, observe: impl FnOnce() + Send + 'static) -> Self {
        self.on_commit.push(Box::new(observe));
        self
    }
}

/// A worker's business logic.
pub trait Service: Send + Sync + 'static {
    /// Worker name: queue, producer and inbox consumer name.
    const NAME: &'static str;
    /// Message types this worker's queue is bound to.
    const CONSUMES: &'static [MessageType];

    /// Register this service's own metrics at zero, so that rates and increases see their first events.
    fn register_metrics(&self) {}

    /// Apply `envelope` inside `tx` and return the events it causes. Must not commit, publish or call out
    /// to anything that is not idempotent on a key derived from the message.
    fn apply(
        &self,
        tx: &mut PgConnection,
        envelope: &Envelope,
    ) -> impl Future<Output = Result<Effects, ServiceError>> + Send;
}

/// Counters a test or `/metrics` can read.
#[derive(Debug, Default)]
pub struct HandlerCounters {
    pub processed: AtomicU64,
    pub duplicates: AtomicU64,
}

pub struct TransactionalHandler<S> {
    service: S,
    db: PgPool,
    inbox: InboxGuard,
    waker: OutboxWaker,
    counters: Arc<HandlerCounters>,
}

impl<S: Service> TransactionalHandler<S> {
    pub fn new(service: S, db: PgPool, waker: OutboxWaker) -> Self {
        TransactionalHandler {
            service,
            db,
            inbox: InboxGuard::new(S::NAME),
            waker,
            counters: Arc::default(),
        }
    }

    pub fn counters(&self) -> Arc<HandlerCounters> {
        Arc::clone(&self.counters)
    }

    async fn apply_once(&self, envelope: &Envelope) -> Result<bool, ServiceError> {
        let span = tracing::info_span!("handle", otel.name = %envelope.meta.message_type, worker = S::NAME);
        crate::telemetry::continue_trace(&span, envelope.meta.traceparent.as_deref());
        self.apply_in_span(envelope, &span).instrument(span.clone()).await
    }

    async fn apply_in_span(&self, envelope: &Envelope, span: &tracing::Span) -> Result<bool, ServiceError> {
        let mut tx = self.db.begin().await?;
        if !self.inbox.first_delivery(&mut tx, &envelope.meta).await? {
            tx.rollback().await?;
            return Ok(false);
        }
        let effects = self.service.apply(&mut tx, envelope).await?;
        // Events carry this handler's span as their parent: one workflow, one trace.
        let traceparent = crate::telemetry::traceparent_of(span).or_else(|| envelope.meta.traceparent.clone());
        let encoded: Vec<EncodedEnvelope> = effects
            .events
            .into_iter()
            .map(|m| {
                let mut e = Envelope::caused_by(&envelope.meta, m, S::NAME);
                e.meta.traceparent = traceparent.clone();
                e.encode()
            })
            .collect();
        OutboxStore::enqueue(&mut tx, &encoded).await?;
        tx.commit().await?;
        for observe in effects.on_commit {
            observe();
        }
        if !encoded.is_empty() {
            self.waker.wake();
        }
        for e in &encoded {
            debug!(emitted = %e.meta.message_type, emitted_id = %e.meta.message_id, "event written to the outbox");
        }
        Ok(true)
    }
}

impl<S: Service> choreo_rabbitmq::Handler for TransactionalHandler<S> {
    async fn handle(&self, envelope: &Envelope) -> Outcome {
        if !S::CONSUMES.iter().any(|t| t.as_str() == envelope.meta.message_type) {
            return Outcome::Reject {
                kind: ErrorKind::UnknownType,
                reason: format!("worker `{}` does not handle `{}`", S::NAME, envelope.meta.message_type),
            };
        }
        match self.apply_once(envelope).await {
            Ok(true) => {
                self.counters.processed.fetch_add(1, Ordering::Relaxed);
                Outcome::Done
            }
            Ok(false) => {
                self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("choreo_duplicates_skipped_total", "worker" => S::NAME, "type" => envelope.message.message_type().as_str())
                    .increment(1);
                info!("duplicate delivery acknowledged with no effect");
                Outcome::Duplicate
            }
            Err(ServiceError::Transient(reason)) => Outcome::Retry { reason },
            Err(ServiceError::Permanent(reason)) => Outcome::Reject { kind: ErrorKind::Permanent, reason },
        }
    }
}
