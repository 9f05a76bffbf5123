//! [`ConsumerRunner`]: takes deliveries from a worker's queue, decodes them strictly, hands them to a
//! [`Handler`] and settles them by what the handler says.
//!
//! - Prefetch bounds what the broker pushes; `concurrency` bounds what runs at once (a bulkhead: one slow
//!   dependency cannot take more than this worker's slots).
//! - Deliveries that are already waiting when a slot frees are taken together, up to `batch_size`, and given
//!   to [`Handler::handle_batch`] (one database transaction for all of them). Under light load a batch is a
//!   single delivery and nothing waits to fill one. When a batch cannot be applied as a whole, each of its
//!   messages goes through [`Handler::handle`] alone, with the retry and dead-letter rules below.
//! - A redelivered message is never batched, and redelivered messages are handled one at a time: one of them
//!   may be the message that took the process down last time. Before handling one, the handler counts the
//!   restart durably ([`Handler::record_restart`]); past `crash_limit` it is dead-lettered as
//!   [`ErrorKind::Crashed`]. As only the guilty message is in flight when the crash strikes again, only it
//!   is counted; the broker's delivery limit, which counts every unacked message returned by a crash (started
//!   or not), stays the backstop.
//! - A delivery is acked only after the handler returns [`Outcome::Done`] or [`Outcome::Duplicate`], which
//!   handlers return only after their database transaction committed. A crash at any instant therefore means redelivery, never loss.
//! - A message that breaks the contract, or that the handler rejects, goes to the dead-letter queue with its
//!   story (see [`crate::dead_letter`]) and is acked only once the dead letter is confirmed.
//! - A transient failure is retried in process with exponential backoff and jitter; then it waits in the
//!   worker's delay queues, one level per round (`choreo-retries` counts rounds, `choreo-attempts` counts
//!   handler attempts: the broker's `x-death` no longer counts client re-publishes since 3.13); when every
//!   level is used it is dead-lettered with error kind `transient`.
//! - When the channel or connection breaks, everything in flight is abandoned to redelivery and the runner
//!   reconnects with backoff until shutdown.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use choreo_messages::{Contract, Envelope, ErrorKind};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio_retry2::strategy::{ExponentialFactorBackoff, jitter};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::codec::{DELIVERY_COUNT, check_routing_key, decode_delivery, properties_header_u32};
use crate::connection::{BrokerPool, open_channel};
use crate::dead_letter::{Failure, dead_letter, delay_for_retry, recorded_attempts, recorded_retries};
use crate::publisher::ConfirmingPublisher;
use crate::{BrokerError, Topology, TopologyError, WorkerQueue};

/// Messages of a batch that could not be applied as a whole, handled at once within its slot: with the
/// default 8 slots, 16 transactions at most, the default database pool.
const ALONE_PER_SLOT: usize = 2;

/// What a handler made of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Processed and committed: ack.
    Done,
    /// Processed before (the inbox knew its id): ack, no effect.
    Duplicate,
    /// No retry can help: dead-letter now.
    Reject { kind: ErrorKind, reason: String },
    /// A dependency failed and may recover: retry.
    Retry { reason: String },
}

/// The business side of a worker. Never sees a channel.
pub trait Handler: Send + Sync + 'static {
    /// Whether [`Handler::handle_batch`] applies batches; if not, the consumer never forms one.
    const BATCHES: bool = false;

    /// The contract deliveries are decoded into; a type outside it is dead-lettered as `unknown_type`.
    type Message: Contract;

    /// Apply one message: the [`Outcome`] says whether to ack, retry or dead-letter it.
    fn handle(&self, envelope: &Envelope<Self::Message>) -> impl Future<Output = Outcome> + Send;

    /// Count, durably, that this redelivered message is being handled again, and return the count so far; the
    /// consumer dead-letters it as [`ErrorKind::Crashed`] past its `crash_limit`. The default counts nothing.
    fn record_restart(&self, envelope: &Envelope<Self::Message>) -> impl Future<Output = Result<u32, String>> + Send {
        let _ = envelope;
        std::future::ready(Ok(0))
    }

    /// Which of `envelopes` may be applied together, one flag per envelope in order; the others are handled
    /// alone, after the batch, and the rest still make one. The default: all of them.
    fn batch_members(&self, envelopes: &[Envelope<Self::Message>]) -> Vec<bool> {
        vec![true; envelopes.len()]
    }

    /// Apply several messages all or nothing: `Some` with one outcome per envelope (in order) once all of them
    /// took effect, or `None` when nothing did, and the consumer then hands each to [`Handler::handle`] alone.
    /// The default applies no batch.
    fn handle_batch(&self, envelopes: &[Envelope<Self::Message>]) -> impl Future<Output = Option<Vec<Outcome>>> + Send {
        let _ = envelopes;
        std::future::ready(None)
    }
}

/// Settings of one consumer.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub queue: WorkerQueue,
    /// Unacked deliveries the broker may push at once.
    pub prefetch: u16,
    /// Handlers (single messages or batches) running at once.
    pub concurrency: usize,
    /// Most deliveries applied in one batch; 1 turns batching off.
    pub batch_size: usize,
    /// Bodies larger than this are dead-lettered unread.
    pub max_body_bytes: usize,
    /// In-process retries of a transient failure before the message goes to a delay queue.
    pub handler_retries: usize,
    /// First in-process retry delay; doubles each time, with jitter.
    pub retry_base: Duration,
    /// Pause before requeueing a message that could not be parked or dead-lettered (broker trouble).
    pub requeue_delay: Duration,
    /// Times a redelivered message may be started again before it is dead-lettered as `crashed`.
    pub crash_limit: u32,
}

impl ConsumerConfig {
    pub fn new(queue: WorkerQueue) -> Self {
        ConsumerConfig {
            queue,
            prefetch: 128,
            concurrency: 8,
            batch_size: 32,
            max_body_bytes: 256 * 1024,
            handler_retries: 3,
            retry_base: Duration::from_millis(50),
            requeue_delay: Duration::from_secs(1),
            crash_limit: 3,
        }
    }
}

/// How a delivery was settled, for the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    Processed,
    Duplicate,
    Retried,
    DeadLettered,
    Requeued,
}

impl Settled {
    fn as_str(self) -> &'static str {
        match self {
            Settled::Processed => "processed",
            Settled::Duplicate => "duplicate",
            Settled::Retried => "retried",
            Settled::DeadLettered => "dead_lettered",
            Settled::Requeued => "requeued",
        }
    }
}

/// Why one consuming session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("the consumer stream ended: {0}")]
    StreamEnded(String),
}

pub struct ConsumerRunner<H> {
    pool: BrokerPool,
    publisher: Arc<ConfirmingPublisher>,
    topology: Topology,
    config: ConsumerConfig,
    handler: Arc<H>,
    consuming: Arc<AtomicBool>,
    /// Redelivered messages are handled one at a time: after a crash, only the message that caused it is in
    /// flight when it strikes again, so only it is counted (see [`Handler::record_restart`]).
    redelivery_lane: tokio::sync::Semaphore,
    /// Ids of messages this process itself put back in the queue (it could not park or dead-letter them):
    /// their redelivery is not a restart, and must not count towards the crash limit.
    requeued: std::sync::Mutex<HashSet<String>>,
    events_exchange: String,
}

/// How long a session must have consumed to count as a recovery that resets the reconnect backoff.
const STABLE_SESSION: Duration = Duration::from_secs(10);

/// Most ids remembered in [`ConsumerRunner::requeued`]; past it the memory starts again (a few restarts may
/// then be counted that were requeues, which only matters during long broker trouble).
const REQUEUED_MEMORY: usize = 10_000;

impl<H: Handler> ConsumerRunner<H> {
    pub fn new(
        pool: BrokerPool,
        publisher: Arc<ConfirmingPublisher>,
        topology: Topology,
        config: ConsumerConfig,
        handler: Arc<H>,
    ) -> Self {
        // Counters exist from the start at zero, so that `increase()` sees the first dead letter.
        for kind in ErrorKind::ALL {
            metrics::counter!("choreo_dead_lettered_total", "worker" => config.queue.worker.clone(), "error_kind" => kind.as_str())
                .increment(0);
        }
        metrics::counter!("choreo_batch_fallbacks_total", "worker" => config.queue.worker.clone()).increment(0);
        for stage in ["in_process", "delayed"] {
            metrics::counter!("choreo_retries_total", "worker" => config.queue.worker.clone(), "stage" => stage)
                .increment(0);
        }
        let events_exchange = topology.events_exchange();
        ConsumerRunner {
            events_exchange,
            pool,
            publisher,
            topology,
            config,
            handler,
            consuming: Arc::new(AtomicBool::new(false)),
            redelivery_lane: tokio::sync::Semaphore::new(1),
            requeued: std::sync::Mutex::new(HashSet::new()),
        }
    }

    /// True while a consumer is registered with the broker (for readiness).
    pub fn consuming_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.consuming)
    }

    /// Consume until `shutdown` fires, then finish what is in flight and return. Reconnects on broker
    /// failures; returns an error only for what no reconnect can fix (a topology mismatch).
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), TopologyError> {
        let fresh_backoff = || ExponentialFactorBackoff::from_millis(200, 2.0).max_delay_millis(10_000).map(jitter);
        let mut backoff = fresh_backoff();
        loop {
            let mut consuming_since = None;
            match self.session(&shutdown, &mut consuming_since).await {
                Ok(()) => return Ok(()),
                Err(SessionError::Topology(e @ TopologyError::Mismatch { .. })) => return Err(e),
                Err(e) => {
                    // A session that consumed for a while was a recovery: the next outage starts the backoff
                    // again from its shortest delay, instead of where the last one left it. One that failed
                    // soon after it started (a queue whose leader keeps moving) does not reset it, or the
                    // worker would reconnect every 200 ms for as long as the trouble lasts.
                    if consuming_since.is_some_and(|since: Instant| since.elapsed() >= STABLE_SESSION) {
                        backoff = fresh_backoff();
                    }
                    let delay = backoff.next().unwrap_or(Duration::from_secs(10));
                    warn!(worker = %self.config.queue.worker, error = %e, retry_in_ms = delay.as_millis() as u64,
                        "broker session lost; reconnecting");
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// One consuming session on one channel; `consuming_since` is set once the broker accepted the consumer.
    async fn session(
        &self,
        shutdown: &CancellationToken,
        consuming_since: &mut Option<Instant>,
    ) -> Result<(), SessionError> {
        let channel = open_channel(&self.pool).await?;
        self.topology.declare_worker(&channel, &self.config.queue).await?;
        channel
            .basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await
            .map_err(BrokerError::amqp("basic.qos"))?;
        let queue = self.topology.worker_queue(&self.config.queue.worker);
        let consumer = channel
            .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map_err(BrokerError::amqp("basic.consume"))?;
        info!(worker = %self.config.queue.worker, %queue, prefetch = self.config.prefetch,
            concurrency = self.config.concurrency, batch_size = self.config.batch_size, "consuming");
        self.consuming.store(true, Ordering::SeqCst);
        *consuming_since = Some(Instant::now());
        let stream_error = std::sync::Mutex::new(None::<String>);
        consumer
            .take_until(shutdown.cancelled())
            .ready_chunks(if H::BATCHES { self.config.batch_size.max(1) } else { 1 })
            .for_each_concurrent(self.config.concurrency.max(1), |chunk| async {
                let mut deliveries = Vec::with_capacity(chunk.len());
                for delivery in chunk {
                    match delivery {
                        Ok(delivery) => deliveries.push(delivery),
                        Err(e) => {
                            if let Ok(mut slot) = stream_error.lock() {
                                *slot = Some(e.to_string());
                            }
                        }
                    }
                }
                self.process_ready(deliveries).await;
            })
            .await;
        self.consuming.store(false, Ordering::SeqCst);
        if shutdown.is_cancelled() {
            // Unacked prefetched deliveries go back to the queue when the channel closes.
            if let Err(e) = channel.close(200, "worker shutting down".into()).await {
                debug!(error = %e, "closing the consumer channel");
            }
            return Ok(());
        }
        let reason =
            stream_error.lock().ok().and_then(|mut s| s.take()).unwrap_or_else(|| "cancelled by the broker".into());
        Err(SessionError::StreamEnded(reason))
    }

    /// Deliveries that were waiting together: one batch when there are several valid ones, else one by one.
    async fn process_ready(&self, deliveries: Vec<Delivery>) {
        if deliveries.len() < 2 {
            for delivery in deliveries {
                self.process(delivery).await;
            }
            return;
        }
        let mut valid = Vec::with_capacity(deliveries.len());
        let mut envelopes = Vec::with_capacity(deliveries.len());
        let mut alone = Vec::new();
        for delivery in deliveries {
            if is_redelivery(&delivery) {
                alone.push(delivery);
                continue;
            }
            match self.decode(&delivery) {
                Ok(envelope) => {
                    envelopes.push(envelope);
                    valid.push(delivery);
                }
                // Dead-lettered with its reason by the single-message path.
                Err(_) => alone.push(delivery),
            }
        }
        if valid.len() >= 2 {
            // A message the handler cannot apply with the others goes alone; the rest still make a batch.
            let members = self.handler.batch_members(&envelopes);
            if members.len() != envelopes.len() || members.contains(&false) {
                let (mut kept, mut kept_envelopes) = (Vec::with_capacity(valid.len()), Vec::with_capacity(valid.len()));
                for (i, (delivery, envelope)) in valid.into_iter().zip(envelopes).enumerate() {
                    if members.get(i).copied().unwrap_or(false) {
                        kept.push(delivery);
                        kept_envelopes.push(envelope);
                    } else {
                        alone.push(delivery);
                    }
                }
                (valid, envelopes) = (kept, kept_envelopes);
            }
        }
        if valid.len() >= 2 {
            let worker = self.config.queue.worker.clone();
            let in_flight = metrics::gauge!("choreo_messages_in_flight", "worker" => worker.clone());
            in_flight.increment(valid.len() as f64);
            let started = Instant::now();
            let outcomes = self.handler.handle_batch(&envelopes).await;
            in_flight.decrement(valid.len() as f64);
            match outcomes {
                Some(outcomes) if outcomes.len() == valid.len() => {
                    metrics::histogram!("choreo_batch_messages", "worker" => worker.clone()).record(valid.len() as f64);
                    let elapsed = started.elapsed().as_secs_f64();
                    let mut acks = Vec::with_capacity(valid.len());
                    for ((delivery, envelope), outcome) in valid.iter().zip(&envelopes).zip(outcomes) {
                        let span = self.delivery_span(delivery);
                        let settled = match outcome {
                            Outcome::Done => Settled::Processed,
                            Outcome::Duplicate => Settled::Duplicate,
                            // A batch that committed has no failures; anything else is the handler's bug.
                            other => {
                                span.in_scope(|| {
                                    error!(outcome = ?other,
                                    "a committed batch reported a failure; leaving the message to redelivery")
                                });
                                self.requeue(delivery).instrument(span.clone()).await;
                                Settled::Requeued
                            }
                        };
                        if settled != Settled::Requeued {
                            acks.push(self.ack(delivery).instrument(span));
                        }
                        self.observe_settled(&envelope.meta.message_type, settled, elapsed);
                    }
                    // All at once: lapin's I/O thread then writes them together, instead of one hand-off
                    // between the threads per ack.
                    futures_util::future::join_all(acks).await;
                }
                _ => {
                    debug!(worker = %worker, size = valid.len(), "batch not applied as a whole; handling its messages one by one");
                    metrics::counter!("choreo_batch_fallbacks_total", "worker" => worker.clone()).increment(1);
                    alone.extend(valid);
                }
            }
        } else {
            alone.extend(valid);
        }
        // One by one, a few at a time: each slot keeps to a bounded share of the database pool.
        futures_util::stream::iter(alone).for_each_concurrent(ALONE_PER_SLOT, |delivery| self.process(delivery)).await;
    }

    /// The span every log line about `delivery` is written in: its ids, whatever its body holds.
    fn delivery_span(&self, delivery: &Delivery) -> tracing::Span {
        let props = &delivery.properties;
        info_span!(
            "message",
            worker = %self.config.queue.worker,
            message_id = %props.message_id().as_ref().map(|m| m.as_str()).unwrap_or("-"),
            message_type = %props.kind().as_ref().map(|m| m.as_str()).unwrap_or("-"),
            correlation_id = %props.correlation_id().as_ref().map(|m| m.as_str()).unwrap_or("-"),
        )
    }

    async fn process(&self, delivery: Delivery) {
        let message_type =
            delivery.properties.kind().as_ref().map(|m| m.as_str().to_owned()).unwrap_or_else(|| "-".into());
        let span = self.delivery_span(&delivery);
        let in_flight = metrics::gauge!("choreo_messages_in_flight", "worker" => self.config.queue.worker.clone());
        in_flight.increment(1.0);
        let started = Instant::now();
        let settled = self.settle(delivery).instrument(span).await;
        in_flight.decrement(1.0);
        self.observe_settled(&message_type, settled, started.elapsed().as_secs_f64());
    }

    /// Duration and outcome of one settled message, alone or in a batch.
    fn observe_settled(&self, message_type: &str, settled: Settled, seconds: f64) {
        let worker = self.config.queue.worker.clone();
        let type_label = H::Message::label_for(message_type);
        metrics::histogram!("choreo_handler_duration_seconds", "worker" => worker.clone(), "type" => type_label)
            .record(seconds);
        metrics::counter!("choreo_messages_consumed_total", "worker" => worker, "type" => type_label, "outcome" => settled.as_str())
            .increment(1);
    }

    /// The delivery's envelope, decoded strictly, published with its type as routing key.
    fn decode(&self, delivery: &Delivery) -> Result<Envelope<H::Message>, choreo_messages::DecodeError> {
        let envelope = decode_delivery(&delivery.properties, &delivery.data, self.config.max_body_bytes)?;
        check_routing_key(
            delivery.exchange.as_str(),
            delivery.routing_key.as_str(),
            &delivery.properties,
            &self.events_exchange,
            &envelope.meta.message_type,
        )?;
        Ok(envelope)
    }

    async fn settle(&self, delivery: Delivery) -> Settled {
        let envelope = match self.decode(&delivery) {
            Ok(envelope) => envelope,
            Err(e) => {
                // The error can quote the body (serde names the offending value): a log line stays short, as
                // the dead letter's error header does.
                let error = e.to_string();
                warn!(error_kind = %e.kind(), error = crate::codec::truncate_utf8(&error, crate::dead_letter::MAX_ERROR_BYTES),
                    "message breaks the contract; dead-lettering");
                return self.reject(&delivery, e.kind(), &e.to_string(), 1).await;
            }
        };
        let redelivered = is_redelivery(&delivery);
        let _alone = if redelivered { self.redelivery_lane.acquire().await.ok() } else { None };
        if redelivered && !self.was_requeued(&delivery) {
            match self.handler.record_restart(&envelope).await {
                Ok(restarts) if restarts > self.config.crash_limit => {
                    let reason = format!(
                        "the worker stopped while handling this message {restarts} times (crash limit {})",
                        self.config.crash_limit
                    );
                    error!(restarts, "message keeps taking the worker down; dead-lettering it");
                    return self.reject(&delivery, ErrorKind::Crashed, &reason, 0).await;
                }
                Ok(_) => {}
                // Handling it will meet the same trouble and retry; the broker's delivery limit stays the backstop.
                Err(e) => warn!(error = %e, "cannot record the restart of a redelivered message"),
            }
        }
        let mut delays = ExponentialFactorBackoff::from_millis(self.config.retry_base.as_millis() as u64, 2.0)
            .max_delay_millis(5_000)
            .map(jitter)
            .take(self.config.handler_retries);
        let mut tries = 0u32;
        loop {
            tries += 1;
            match self.handler.handle(&envelope).await {
                Outcome::Done => {
                    self.ack(&delivery).await;
                    return Settled::Processed;
                }
                Outcome::Duplicate => {
                    self.ack(&delivery).await;
                    return Settled::Duplicate;
                }
                Outcome::Reject { kind, reason } => {
                    warn!(error_kind = %kind, error = %reason, "handler rejected the message; dead-lettering");
                    return self.reject(&delivery, kind, &reason, tries).await;
                }
                Outcome::Retry { reason } => match delays.next() {
                    Some(delay) => {
                        debug!(error = %reason, attempt = tries, "transient failure; retrying in process");
                        metrics::counter!("choreo_retries_total", "worker" => self.config.queue.worker.clone(), "stage" => "in_process")
                            .increment(1);
                        tokio::time::sleep(delay).await;
                    }
                    None => return self.retry_later(&delivery, &reason, tries).await,
                },
            }
        }
    }

    /// Attempts so far: recorded by earlier rounds, plus broker redeliveries, plus this round's tries.
    fn attempts(&self, delivery: &Delivery, tries: u32) -> u32 {
        let redeliveries = properties_header_u32(&delivery.properties, DELIVERY_COUNT).unwrap_or(0);
        recorded_attempts(&delivery.properties) + redeliveries + tries
    }

    /// In-process retries ran out: park the message in the next delay queue, or dead-letter it when every
    /// delay level has been used.
    async fn retry_later(&self, delivery: &Delivery, reason: &str, tries: u32) -> Settled {
        let round = recorded_retries(&delivery.properties);
        let Some(delay) = self.config.queue.retry_delays.get(round as usize).copied() else {
            warn!(error = %reason, attempts = self.attempts(delivery, tries), "transient failure outlasted every retry; dead-lettering");
            return self.reject(delivery, ErrorKind::Transient, reason, tries).await;
        };
        let attempts = self.attempts(delivery, tries);
        let failure =
            Failure { worker: &self.config.queue.worker, kind: ErrorKind::Transient, error: reason, attempts };
        let queue = self.topology.retry_queue(&self.config.queue.worker, delay);
        match delay_for_retry(&self.publisher, &queue, delivery, &failure, round + 1).await {
            Ok(()) => {
                warn!(error = %reason, attempts, retry_in_ms = delay.as_millis() as u64, round = round + 1,
                    "transient failure persists; retrying later through the broker");
                metrics::counter!("choreo_retries_total", "worker" => self.config.queue.worker.clone(), "stage" => "delayed")
                    .increment(1);
                self.ack(delivery).await;
                Settled::Retried
            }
            Err(e) => {
                warn!(error = %e, "could not park the message for a delayed retry; requeueing it");
                tokio::time::sleep(self.config.requeue_delay).await;
                self.requeue(delivery).await;
                Settled::Requeued
            }
        }
    }

    async fn reject(&self, delivery: &Delivery, kind: ErrorKind, reason: &str, tries: u32) -> Settled {
        let attempts = self.attempts(delivery, tries);
        let failure = Failure { worker: &self.config.queue.worker, kind, error: reason, attempts };
        match dead_letter(&self.publisher, &self.topology, delivery, &failure).await {
            Ok(()) => {
                metrics::counter!("choreo_dead_lettered_total", "worker" => self.config.queue.worker.clone(), "error_kind" => kind.as_str())
                    .increment(1);
                self.ack(delivery).await;
                Settled::DeadLettered
            }
            Err(e) => {
                error!(error = %e, "could not dead-letter the message; requeueing it so that nothing is lost");
                tokio::time::sleep(self.config.requeue_delay).await;
                self.requeue(delivery).await;
                Settled::Requeued
            }
        }
    }

    async fn ack(&self, delivery: &Delivery) {
        if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
            // The channel is gone: the broker redelivers and the inbox absorbs the duplicate.
            warn!(error = %e, "ack failed; the message will be redelivered");
        }
    }

    /// Whether this process requeued the message itself (and forget it: the next redelivery counts again).
    fn was_requeued(&self, delivery: &Delivery) -> bool {
        let Some(id) = delivery.properties.message_id().as_ref() else { return false };
        self.requeued.lock().map(|mut ids| ids.remove(id.as_str())).unwrap_or(false)
    }

    async fn requeue(&self, delivery: &Delivery) {
        if let Some(id) = delivery.properties.message_id().as_ref()
            && let Ok(mut ids) = self.requeued.lock()
        {
            if ids.len() >= REQUEUED_MEMORY {
                ids.clear();
            }
            ids.insert(id.to_string());
        }
        let options = BasicNackOptions { multiple: false, requeue: true };
        if let Err(e) = delivery.acker.nack(options).await {
            warn!(error = %e, "nack failed; the message will be redelivered");
        }
    }
}

/// Whether the broker delivered this message before (to this or another consumer) without an ack.
fn is_redelivery(delivery: &Delivery) -> bool {
    delivery.redelivered || properties_header_u32(&delivery.properties, DELIVERY_COUNT).unwrap_or(0) > 0
}
