//! [`Service`]: the business side of a worker, and [`TransactionalHandler`], which gives every message
//! exactly one effect.
//!
//! For each delivery: the service reads what its decision needs and decides, describing its change as a
//! [`Change`]; then one statement, sent outside any transaction and so a transaction of its own, makes the
//! change, records the message id in the inbox and writes the events to the outbox
//! ([`InboxGuard::commit`]); the events go to the relay. Only then is the delivery acked (by the consumer
//! runner). If the inbox already held the id (a redelivery, a relay re-publish, a replay), the statement
//! writes nothing and the delivery is acked with no effect. A hop is one round trip for the write, plus the
//! service's reads: no `BEGIN`, no `COMMIT`, one flush.
//!
//! The reads and the write are separate snapshots, so a change must hold whatever happened in between: it
//! applies only where the state it was decided on still holds (`WHERE status = 'PENDING'`, `ON CONFLICT DO
//! NOTHING`) and names the keys it applied, and events written under a key are kept only if it was applied
//! ([`Effects::applies_if`]); where that cannot be expressed, the change fails with `serialization_failure`
//! and the handler decides again on fresh reads.
//!
//! A batch of deliveries is the same in one statement: the service decides them in delivery order, as if
//! one by one. If the statement fails or a message of the batch was processed before, nothing is written
//! and the consumer handles each message alone, so a batch never changes what happens to a message, only
//! how many commits it takes.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use choreo_messages::{Contract, EncodedEnvelope, Envelope, ErrorKind, Message};
use choreo_outbox::{Change, CommitError, InboxGuard, OutboxError, OutboxHandoff};
use choreo_rabbitmq::Outcome;
use sqlx::{PgConnection, PgPool};
use tracing::{Instrument, debug, info, warn};
use uuid::Uuid;

use crate::connections::HandlerConnections;

/// How many decisions a message gets, in all, when the rows its change was decided on keep changing before
/// it is written (the first and two more, made at once); past that it is retried like any transient failure.
const DECISIONS: u32 = 3;

/// Why a service could not apply a message.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A dependency failed (database, gateway): retrying may succeed.
    #[error("{0}")]
    Transient(String),
    /// Retrying cannot help (a message this service does not handle, an order it never heard of).
    #[error("{0}")]
    Permanent(String),
    /// A collision with a row already in place (a unique key): most likely a copy of a message processed
    /// before, whose effect was made again. The inbox decides: a duplicate if it holds the id, otherwise
    /// transient (a race that a retry resolves). A change collides when it is written
    /// ([`CommitError::Conflict`], handled the same way); a service may also say so of what it read.
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

/// Something to observe once a message's effects committed (a metric of a business outcome).
pub type Observation = Box<dyn FnOnce() + Send>;

/// What a message causes: events for the outbox, and observations to make once it committed (metrics of
/// business outcomes must count only what really happened); with a key, only if the change applied that key.
pub struct Effects<M = Message> {
    /// Events to write to the outbox, caused by the message.
    pub events: Vec<M>,
    /// What to observe once the message's effects committed.
    pub on_commit: Vec<Observation>,
    /// The key these effects depend on, if any ([`Effects::applies_if`]).
    pub key: Option<Uuid>,
}

impl<M> Default for Effects<M> {
    fn default() -> Self {
        Effects { events: Vec::new(), on_commit: Vec::new(), key: None }
    }
}

impl<M> Effects<M> {
    /// These events, unconditionally.
    pub fn events(events: Vec<M>) -> Self {
        Effects { events, on_commit: Vec::new(), key: None }
    }

    /// These effects happen only if the change applied `key` (see [`Change::applied`]): the change found the
    /// state it was decided on (say, the order still PENDING) when it was written.
    pub fn applies_if(mut self, key: Uuid) -> Self {
        self.key = Some(key);
        self
    }

    /// No event and nothing to observe.
    pub fn none() -> Self {
        Effects::default()
    }

    /// Observe something (a metric of a business outcome) once the effects committed.
    pub fn after_commit(mut self, observe: impl FnOnce() + Send + 'static) -> Self {
        self.on_commit.push(Box::new(observe));
        self
    }
}

/// A worker's business logic.
pub trait Service: Send + Sync + Sized + 'static {
    /// The messages this service reads and writes.
    type Message: Contract;
    /// Worker name: queue, producer and inbox consumer name.
    const NAME: &'static str;
    /// Wire names of the message types this worker's queue is bound to.
    const CONSUMES: &'static [&'static str];
    /// Wire names of the types this worker emits that end a workflow: no participant consumes them, so they
    /// are routed to the namespace's bounded outcomes feed (`{ns}.outcomes`) for downstream systems.
    const OUTCOMES: &'static [&'static str] = &[];

    /// Register this service's own metrics at zero, so that rates and increases see their first events.
    fn register_metrics(&self) {}

    /// Whether [`Service::decide`] can take this message together with messages about other orders (default:
    /// yes). One it cannot is handled alone, and so is every message about an order that another message of
    /// the batch is about too: the second must see the first's change, which one statement cannot show it.
    fn batchable(&self, envelope: &Envelope<Self::Message>) -> bool {
        let _ = envelope;
        true
    }

    /// Decide what each message of `batch` does, in order, as if one by one: one [`Effects`] per message,
    /// and the change to this service's tables pushed onto `change`. Reads go through `db`, outside any
    /// transaction; the change is written later, with the inbox and outbox rows, in one statement, so it
    /// must apply only where what was read still holds (see the module's notes). Must not write through `db`
    /// or call out to anything that is not idempotent on a key derived from the message. Each message comes
    /// with its span: whatever is logged about one message must be logged inside it (entered, or with
    /// `instrument`), so that the line carries the message's ids.
    fn decide(
        &self,
        db: &mut PgConnection,
        batch: &[(&Envelope<Self::Message>, tracing::Span)],
        change: &mut Change,
    ) -> impl Future<Output = Result<Vec<Effects<Self::Message>>, ServiceError>> + Send;
}

/// Counters a test or `/metrics` can read.
#[derive(Debug, Default)]
pub struct HandlerCounters {
    /// Messages that took effect.
    pub processed: AtomicU64,
    /// Copies of processed messages acknowledged with no effect.
    pub duplicates: AtomicU64,
}

/// Runs a [`Service`] for the consumer: decides each message or batch, then writes the change, the inbox
/// rows and the outbox rows in one statement, and hands the events to the relay. [`crate::run_worker`]
/// builds one; tests may drive one directly with [`choreo_rabbitmq::Handler::handle`].
pub struct TransactionalHandler<S> {
    service: S,
    db: PgPool,
    connections: HandlerConnections,
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
            connections: HandlerConnections::new(db.clone()),
            db,
            inbox: InboxGuard::new(S::NAME),
            handoff,
            counters: Arc::default(),
        }
    }

    /// Keep the connections of up to `concurrency` messages handled at once from one message to the next,
    /// untested, if the pool is larger than that: sqlx tests every connection given back with a round trip, so
    /// this saves one per message.
    pub fn keeping_connections(mut self, concurrency: usize) -> Self {
        self.connections = self.connections.keeping(concurrency);
        self
    }

    /// Connections kept now, between messages.
    pub fn kept_connections(&self) -> usize {
        self.connections.kept()
    }

    /// The service this handler runs.
    pub fn service(&self) -> &S {
        &self.service
    }

    /// Counters a test or `/metrics` can read.
    pub fn counters(&self) -> Arc<HandlerCounters> {
        Arc::clone(&self.counters)
    }

    fn handle_span(envelope: &Envelope<S::Message>) -> tracing::Span {
        crate::telemetry::handle_span(S::NAME, &envelope.meta)
    }

    async fn apply_once(&self, envelope: &Envelope<S::Message>) -> Result<bool, ServiceError> {
        let span = Self::handle_span(envelope);
        self.apply_in_span(envelope, &span).instrument(span.clone()).await
    }

    async fn apply_in_span(&self, envelope: &Envelope<S::Message>, span: &tracing::Span) -> Result<bool, ServiceError> {
        let mut db = self.connections.get().await?;
        let mut decision = 1;
        // `db.clean()` only on the way out: a connection marked so is never used again before it is dropped.
        loop {
            let decided = self.decide(&mut db, &[(envelope, span.clone())]).await;
            if decided.as_ref().is_err_and(is_verdict) {
                db.clean();
            }
            let (change, written) = match decided {
                Ok(decided) => decided,
                // The inbox lookup takes a connection of its own: this one is let go first (kept for the next
                // message only while the pool has one to spare), so that a pool no larger than the handler
                // slots cannot run dry with every slot waiting for a second one.
                Err(failure @ ServiceError::Permanent(_)) => {
                    drop(db);
                    return self.processed_before(envelope, failure).await;
                }
                Err(ServiceError::Conflict(reason)) => {
                    drop(db);
                    return self.processed_before(envelope, ServiceError::Transient(reason)).await;
                }
                // Retried: if this is a copy of a message processed meanwhile, the retry finds it in the inbox. No
                // lookup here, so that an outage of a dependency does not add a query per failed message.
                Err(failure) => return Err(failure),
            };
            let committed =
                self.inbox.commit(&mut db, change, &[&envelope.meta], &written.events, self.handoff.hold()).await;
            let decide_again = decision < DECISIONS && matches!(committed, Err(CommitError::Stale(_)));
            if !decide_again && server_answered(&committed) {
                db.clean();
            }
            match committed {
                Ok(applied) => {
                    // The connection goes back before the hand-off, which may wait for the relay.
                    drop(db);
                    written.committed(&applied, &self.handoff).await;
                    return Ok(true);
                }
                Err(CommitError::ProcessedBefore) => return Ok(false),
                // A copy of a processed message that the service does not recognise as one (say, inventory
                // reserving an order's stock again) collides with the first copy's rows: a duplicate, not a
                // failure to retry until it is dead-lettered.
                Err(CommitError::Conflict(e)) => {
                    drop(db);
                    return self.processed_before(envelope, ServiceError::Transient(format!("database: {e}"))).await;
                }
                Err(CommitError::Stale(e)) if decide_again => {
                    debug!(error = %e, decision, "the change was decided on rows that changed meanwhile; deciding again");
                    decision += 1;
                }
                Err(e) => return Err(ServiceError::Transient(e.to_string())),
            }
        }
    }

    /// Have the service decide `batch`: its change, and its events encoded with what to observe once
    /// committed. A service that does not give one result per message is at fault: a permanent error.
    async fn decide(
        &self,
        db: &mut PgConnection,
        batch: &[(&Envelope<S::Message>, tracing::Span)],
    ) -> Result<(Change, Written), ServiceError> {
        let mut change = Change::new();
        let effects = self.service.decide(db, batch, &mut change).await?;
        if effects.len() != batch.len() {
            return Err(ServiceError::Permanent(format!(
                "{} gave {} results for {} messages",
                S::NAME,
                effects.len(),
                batch.len()
            )));
        }
        let mut written = Written::new(S::NAME);
        for ((envelope, span), effects) in batch.iter().zip(effects) {
            written.add(envelope, effects, span);
        }
        Ok((change, written))
    }

    /// The service rejected `envelope` for good: `Ok(false)` (a duplicate) if the message was processed
    /// before, since its effect is then in place whatever the service made of it again; otherwise `failure`,
    /// which dead-letters it. If the inbox cannot be read, the failure becomes transient: a processed message
    /// must not be dead-lettered for want of a lookup.
    async fn processed_before(
        &self,
        envelope: &Envelope<S::Message>,
        failure: ServiceError,
    ) -> Result<bool, ServiceError> {
        match self.inbox.processed(&self.db, &envelope.meta).await {
            Ok(true) => Ok(false),
            Ok(false) => Err(failure),
            Err(e) => {
                warn!(error = %e, failure = %failure, "the inbox could not be checked after a failure; the message will be retried");
                Err(ServiceError::Transient(format!("{failure} (and the inbox could not be checked: {e})")))
            }
        }
    }

    /// Apply `envelopes` in one statement; for each, whether it took effect (`false`: a second copy of an
    /// id in the batch). If a message of the batch was processed before, or the statement fails, nothing is
    /// written and the error sends the batch one by one, where that message is found to be a duplicate.
    async fn apply_batch(&self, envelopes: &[Envelope<S::Message>]) -> Result<Vec<bool>, ServiceError> {
        // The first delivery of an id in the batch is the one applied.
        let mut seen = HashSet::with_capacity(envelopes.len());
        let applied: Vec<bool> = envelopes.iter().map(|e| seen.insert(e.meta.message_id)).collect();
        // Each message keeps its own span: its log lines carry its ids, its events continue its trace.
        let batch: Vec<(&Envelope<S::Message>, tracing::Span)> = envelopes
            .iter()
            .zip(&applied)
            .filter(|(_, a)| **a)
            .map(|(e, _)| (e, crate::telemetry::message_span(S::NAME, &e.meta).in_scope(|| Self::handle_span(e))))
            .collect();
        let mut db = self.connections.get().await?;
        let decided = self.decide(&mut db, &batch).await;
        if decided.as_ref().is_err_and(is_verdict) {
            db.clean();
        }
        let (change, written) = decided?;
        let metas: Vec<_> = batch.iter().map(|(e, _)| &e.meta).collect();
        let committed = self.inbox.commit(&mut db, change, &metas, &written.events, self.handoff.hold()).await;
        if server_answered(&committed) {
            db.clean();
        }
        drop(db);
        let keys = committed.map_err(|e| ServiceError::Transient(e.to_string()))?;
        written.committed(&keys, &self.handoff).await;
        Ok(applied)
    }

    /// Whether this worker's queue is bound to the message's type.
    fn consumes(envelope: &Envelope<S::Message>) -> bool {
        S::CONSUMES.contains(&envelope.meta.message_type.as_str())
    }

    /// What a message is about: two messages about one entity are never decided in one statement.
    fn entity_of(envelope: &Envelope<S::Message>) -> Uuid {
        envelope.message.entity_id().unwrap_or(envelope.meta.correlation_id)
    }

    fn count_duplicate(envelope: &Envelope<S::Message>) {
        metrics::counter!("choreo_duplicates_skipped_total", "worker" => S::NAME, "type" => envelope.message.type_name())
            .increment(1);
    }
}

/// Whether the server itself answered the commit (the connection is then sound): a result, or an error of its
/// own. `CommitError::Database` may be a broken connection or a restarted server.
fn server_answered<T>(committed: &Result<T, CommitError>) -> bool {
    match committed {
        Ok(_)
        | Err(
            CommitError::ProcessedBefore
            | CommitError::Conflict(_)
            | CommitError::Stale(_)
            | CommitError::UnappliedKeys,
        ) => true,
        Err(CommitError::Database(_)) => false,
    }
}

/// Whether a service's failure is a verdict (its own, or a conflict the server reported) rather than a failure
/// of the connection or of a dependency: the connection is then as sound as after any answer.
fn is_verdict(failure: &ServiceError) -> bool {
    matches!(failure, ServiceError::Permanent(_) | ServiceError::Conflict(_))
}

/// What handled messages wrote: their events for the outbox (each with the key it depends on, if any) and
/// what to observe once committed.
struct Written {
    producer: &'static str,
    events: Vec<(EncodedEnvelope, Option<Uuid>)>,
    on_commit: Vec<(Option<Uuid>, Observation)>,
    /// Messages whose effects depend on a key, with their spans, to say so when the key was not applied.
    conditional: Vec<(Uuid, tracing::Span)>,
}

impl Written {
    fn new(producer: &'static str) -> Self {
        Written { producer, events: Vec::new(), on_commit: Vec::new(), conditional: Vec::new() }
    }

    /// Encode `effects.events` as caused by `cause`, each carrying `span` as its parent: one workflow, one
    /// trace.
    fn add<M: Contract>(&mut self, cause: &Envelope<M>, effects: Effects<M>, span: &tracing::Span) {
        let traceparent = crate::telemetry::traceparent_of(span).or_else(|| cause.meta.traceparent.clone());
        for message in effects.events {
            let mut e = Envelope::caused_by(&cause.meta, message, self.producer);
            e.meta.traceparent = traceparent.clone();
            self.events.push((e.encode(), effects.key));
        }
        self.on_commit.extend(effects.on_commit.into_iter().map(|observe| (effects.key, observe)));
        if let Some(key) = effects.key {
            self.conditional.push((key, span.clone()));
        }
    }

    /// Observe and hand to the relay what committed: everything unconditional, and what depends on a key
    /// the change `applied`.
    async fn committed(self, applied: &HashSet<Uuid>, handoff: &OutboxHandoff) {
        let happened = |key: &Option<Uuid>| key.is_none_or(|k| applied.contains(&k));
        for (key, span) in &self.conditional {
            if !applied.contains(key) {
                span.in_scope(|| info!(%key, "the change was made before (by an earlier message, or one that committed meanwhile); nothing to do"));
            }
        }
        for (_, observe) in self.on_commit.into_iter().filter(|(key, _)| happened(key)) {
            observe();
        }
        let events: Vec<EncodedEnvelope> =
            self.events.into_iter().filter(|(_, key)| happened(key)).map(|(e, _)| e).collect();
        for e in &events {
            debug!(emitted = %e.meta.message_type, emitted_id = %e.meta.message_id, correlation_id = %e.meta.correlation_id,
                "event written to the outbox");
        }
        handoff.committed(events).await;
    }
}

impl<S: Service> choreo_rabbitmq::Handler for TransactionalHandler<S> {
    const BATCHES: bool = true;
    type Message = S::Message;

    async fn handle(&self, envelope: &Envelope<S::Message>) -> Outcome {
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

    async fn record_restart(&self, envelope: &Envelope<S::Message>) -> Result<u32, String> {
        self.inbox.record_restart(&self.db, &envelope.meta).await.map_err(|e| e.to_string())
    }

    fn batch_members(&self, envelopes: &[Envelope<S::Message>]) -> Vec<bool> {
        let mut messages_per_order: HashMap<Uuid, usize> = HashMap::with_capacity(envelopes.len());
        for envelope in envelopes {
            *messages_per_order.entry(Self::entity_of(envelope)).or_default() += 1;
        }
        envelopes
            .iter()
            .map(|e| {
                Self::consumes(e)
                    && self.service.batchable(e)
                    && messages_per_order.get(&Self::entity_of(e)) == Some(&1)
            })
            .collect()
    }

    async fn handle_batch(&self, envelopes: &[Envelope<S::Message>]) -> Option<Vec<Outcome>> {
        if self.batch_members(envelopes).contains(&false) {
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
