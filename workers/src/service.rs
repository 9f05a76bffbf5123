//! [`Service`]: the business side of a worker, and [`TransactionalHandler`], which gives every message
//! exactly one effect.
//!
//! For each delivery: begin; apply the service's change; in one statement, record the message id in the
//! inbox and write the events the change returned to the outbox; commit; hand the events to the relay. Only
//! then is the delivery acked (by the consumer runner). If the inbox already held the id (a redelivery, a
//! relay re-publish, a replay), the transaction rolls back instead and the delivery is acked with no effect.
//!
//! A batch of deliveries is the same in one transaction: the service's change for each message in delivery
//! order, one inbox-and-outbox statement for all, one commit. If any message fails or was processed
//! before, the transaction rolls back whole and the consumer handles each message alone, so a batch never
//! changes what happens to a message, only how many commits it takes.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use choreo_messages::{EncodedEnvelope, Envelope, ErrorKind, Message, MessageType};
use choreo_outbox::{InboxGuard, OutboxError, OutboxHandoff};
use choreo_rabbitmq::Outcome;
use sqlx::{PgConnection, PgPool};
use tracing::{Instrument, debug, info, warn};

/// Why a service could not apply a message.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A dependency failed (database, gateway): retrying may succeed.
    #[error("{0}")]
    Transient(String),
    /// Retrying cannot help (a message this service does not handle, an order it never heard of).
    #[error("{0}")]
    Permanent(String),
    /// The change collides with a row already in place (a unique key): most likely a copy of a message
    /// processed before, whose effect the service tried to make again. The inbox decides: a duplicate if
    /// it holds the id, otherwise transient (a race that a retry resolves).
    #[error("{0}")]
    Conflict(String),
}

impl From<sqlx::Error> for ServiceError {
    fn from(e: sqlx::Error) -> Self {
        match e.as_database_error() {
            Some(db) if db.is_unique_violation() => ServiceError::Conflict(format!("database: {e}")),
            _ => ServiceError::Transient(format!("database: {e}")),
        }
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
pub trait Service: Send + Sync + Sized + 'static {
    /// Worker name: queue, producer and inbox consumer name.
    const NAME: &'static str;
    /// Message types this worker's queue is bound to.
    const CONSUMES: &'static [MessageType];

    /// Register this service's own metrics at zero, so that rates and increases see their first events.
    fn register_metrics(&self) {}

    /// Apply several messages inside `tx`, in order, as if one by one: one [`Effects`] per message. Each
    /// message comes with its span: whatever is logged about one message must be logged inside it (entered,
    /// or with `instrument`), so that the line carries the message's ids. The default calls
    /// [`Service::apply`] for each; a service whose messages contend on the same rows does better by reading
    /// and writing them once for the whole batch.
    fn apply_batch(
        &self,
        tx: &mut PgConnection,
        batch: &[(&Envelope, tracing::Span)],
    ) -> impl Future<Output = Result<Vec<Effects>, ServiceError>> + Send {
        apply_one_by_one(self, tx, batch)
    }

    /// Apply `envelope` inside `tx` and return the events it causes. Must not commit, publish or call out
    /// to anything that is not idempotent on a key derived from the message.
    fn apply(
        &self,
        tx: &mut PgConnection,
        envelope: &Envelope,
    ) -> impl Future<Output = Result<Effects, ServiceError>> + Send;
}

/// [`Service::apply`] for each message of a batch in turn, each in its own span: the default of
/// [`Service::apply_batch`], and what a batch-aware service falls back to when its messages depend on each
/// other.
pub async fn apply_one_by_one<S: Service>(
    service: &S,
    tx: &mut PgConnection,
    batch: &[(&Envelope, tracing::Span)],
) -> Result<Vec<Effects>, ServiceError> {
    let mut all = Vec::with_capacity(batch.len());
    for (envelope, span) in batch {
        all.push(service.apply(tx, envelope).instrument(span.clone()).await?);
    }
    Ok(all)
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
    handoff: OutboxHandoff,
    counters: Arc<HandlerCounters>,
}

impl<S: Service> TransactionalHandler<S> {
    /// `handoff`: the relay of this process (`OutboxHandoff::default()` when none runs: a sweep then
    /// publishes what the handler writes).
    pub fn new(service: S, db: PgPool, handoff: OutboxHandoff) -> Self {
        TransactionalHandler {
            service,
            db,
            inbox: InboxGuard::new(S::NAME),
            handoff,
            counters: Arc::default(),
        }
    }

    pub fn counters(&self) -> Arc<HandlerCounters> {
        Arc::clone(&self.counters)
    }

    fn handle_span(envelope: &Envelope) -> tracing::Span {
        crate::telemetry::handle_span(S::NAME, &envelope.meta)
    }

    async fn apply_once(&self, envelope: &Envelope) -> Result<bool, ServiceError> {
        let span = Self::handle_span(envelope);
        self.apply_in_span(envelope, &span).instrument(span.clone()).await
    }

    async fn apply_in_span(&self, envelope: &Envelope, span: &tracing::Span) -> Result<bool, ServiceError> {
        let mut tx = self.db.begin().await?;
        let effects = match self.service.apply(&mut tx, envelope).await {
            Ok(effects) => effects,
            Err(failure @ ServiceError::Permanent(_)) => {
                drop(tx); // rolls back
                return self.processed_before(envelope, failure).await;
            }
            // A copy of a processed message that the service does not recognise as one (say, inventory
            // reserving an order's stock again) collides with the first copy's rows: a duplicate, not a
            // failure to retry until it is dead-lettered.
            Err(ServiceError::Conflict(reason)) => {
                drop(tx);
                return self.processed_before(envelope, ServiceError::Transient(reason)).await;
            }
            // Retried: if this is a copy of a message processed meanwhile, the retry finds it in the inbox. No
            // lookup here, so that an outage of a dependency does not add a transaction per failed message.
            Err(failure) => return Err(failure),
        };
        let mut written = Written::new(S::NAME);
        written.add(envelope, effects, span);
        let fresh = self.inbox.record_handled(&mut tx, &[&envelope.meta], &written.events, self.handoff.hold()).await?;
        if !fresh.contains(&envelope.meta.message_id) {
            tx.rollback().await?;
            return Ok(false);
        }
        tx.commit().await?;
        written.committed(&self.handoff).await;
        Ok(true)
    }

    /// The service rejected `envelope` for good: `Ok(false)` (a duplicate) if the message was processed
    /// before, since its effect is then in place whatever the service made of it again; otherwise `failure`,
    /// which dead-letters it. If the inbox cannot be read, the failure becomes transient: a processed message
    /// must not be dead-lettered for want of a lookup.
    async fn processed_before(&self, envelope: &Envelope, failure: ServiceError) -> Result<bool, ServiceError> {
        match self.inbox.processed(&self.db, &envelope.meta).await {
            Ok(true) => Ok(false),
            Ok(false) => Err(failure),
            Err(e) => {
                warn!(error = %e, failure = %failure, "the inbox could not be checked after a failure; the message will be retried");
                Err(ServiceError::Transient(format!("{failure} (and the inbox could not be checked: {e})")))
            }
        }
    }

    /// Apply `envelopes` in one transaction; for each, whether it took effect (`false`: a second copy of an
    /// id in the batch). If a message of the batch was processed before, the transaction rolls back and the
    /// error sends the batch one by one, where that message is found to be a duplicate.
    async fn apply_batch(&self, envelopes: &[Envelope]) -> Result<Vec<bool>, ServiceError> {
        let mut tx = self.db.begin().await?;
        // The first delivery of an id in the batch is the one applied.
        let mut seen = HashSet::with_capacity(envelopes.len());
        let applied: Vec<bool> = envelopes.iter().map(|e| seen.insert(e.meta.message_id)).collect();
        // Each message keeps its own span: its log lines carry its ids, its events continue its trace.
        let batch: Vec<(&Envelope, tracing::Span)> = envelopes
            .iter()
            .zip(&applied)
            .filter(|(_, a)| **a)
            .map(|(e, _)| (e, crate::telemetry::message_span(S::NAME, &e.meta).in_scope(|| Self::handle_span(e))))
            .collect();
        let effects = self.service.apply_batch(&mut tx, &batch).await?;
        if effects.len() != batch.len() {
            return Err(ServiceError::Permanent(format!(
                "{} gave {} results for a batch of {}",
                S::NAME,
                effects.len(),
                batch.len()
            )));
        }
        let mut written = Written::new(S::NAME);
        for ((envelope, span), effects) in batch.iter().zip(effects) {
            written.add(envelope, effects, span);
        }
        let metas: Vec<_> = batch.iter().map(|(e, _)| &e.meta).collect();
        let fresh = self.inbox.record_handled(&mut tx, &metas, &written.events, self.handoff.hold()).await?;
        if fresh.len() != metas.len() {
            tx.rollback().await?;
            return Err(ServiceError::Transient(format!(
                "{} of the batch's {} messages were processed before",
                metas.len() - fresh.len(),
                metas.len()
            )));
        }
        tx.commit().await?;
        written.committed(&self.handoff).await;
        Ok(applied)
    }

    /// Whether this worker's queue is bound to the message's type.
    fn consumes(envelope: &Envelope) -> bool {
        S::CONSUMES.iter().any(|t| t.as_str() == envelope.meta.message_type)
    }

    fn count_duplicate(envelope: &Envelope) {
        metrics::counter!("choreo_duplicates_skipped_total", "worker" => S::NAME, "type" => envelope.message.message_type().as_str())
            .increment(1);
    }
}

/// What handled messages wrote: their events for the outbox and what to observe once committed.
struct Written {
    producer: &'static str,
    events: Vec<EncodedEnvelope>,
    on_commit: Vec<Box<dyn FnOnce() + Send>>,
}

impl Written {
    fn new(producer: &'static str) -> Self {
        Written { producer, events: Vec::new(), on_commit: Vec::new() }
    }

    /// Encode `effects.events` as caused by `cause`, each carrying `span` as its parent: one workflow, one
    /// trace.
    fn add(&mut self, cause: &Envelope, effects: Effects, span: &tracing::Span) {
        let traceparent = crate::telemetry::traceparent_of(span).or_else(|| cause.meta.traceparent.clone());
        for message in effects.events {
            let mut e = Envelope::caused_by(&cause.meta, message, self.producer);
            e.meta.traceparent = traceparent.clone();
            self.events.push(e.encode());
        }
        self.on_commit.extend(effects.on_commit);
    }

    async fn committed(self, handoff: &OutboxHandoff) {
        for observe in self.on_commit {
            observe();
        }
        for e in &self.events {
            debug!(emitted = %e.meta.message_type, emitted_id = %e.meta.message_id, correlation_id = %e.meta.correlation_id,
                "event written to the outbox");
        }
        handoff.committed(self.events).await;
    }
}

impl<S: Service> choreo_rabbitmq::Handler for TransactionalHandler<S> {
    const BATCHES: bool = true;

    async fn handle(&self, envelope: &Envelope) -> Outcome {
        if !Self::consumes(envelope) {
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
                Self::count_duplicate(envelope);
                info!("duplicate delivery acknowledged with no effect");
                Outcome::Duplicate
            }
            Err(ServiceError::Transient(reason) | ServiceError::Conflict(reason)) => Outcome::Retry { reason },
            Err(ServiceError::Permanent(reason)) => Outcome::Reject { kind: ErrorKind::Permanent, reason },
        }
    }

    async fn record_restart(&self, envelope: &Envelope) -> Result<u32, String> {
        self.inbox.record_restart(&self.db, &envelope.meta).await.map_err(|e| e.to_string())
    }

    async fn handle_batch(&self, envelopes: &[Envelope]) -> Option<Vec<Outcome>> {
        if !envelopes.iter().all(Self::consumes) {
            return None;
        }
        match self.apply_batch(envelopes).await {
            Ok(applied) => Some(
                envelopes
                    .iter()
                    .zip(applied)
                    .map(|(envelope, applied)| {
                        if applied {
                            self.counters.processed.fetch_add(1, Ordering::Relaxed);
                            Outcome::Done
                        } else {
                            self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                            Self::count_duplicate(envelope);
                            info!(message_id = %envelope.meta.message_id, correlation_id = %envelope.meta.correlation_id,
                                "duplicate delivery acknowledged with no effect");
                            Outcome::Duplicate
                        }
                    })
                    .collect(),
            ),
            Err(e) => {
                debug!(worker = S::NAME, size = envelopes.len(), error = %e, "batch rolled back; its messages go one by one");
                None
            }
        }
    }
}
