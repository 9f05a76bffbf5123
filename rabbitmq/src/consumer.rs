//! [`ConsumerRunner`]: takes deliveries from a worker's queue, decodes them strictly, hands them to a
//! [`Handler`] and settles them by what the handler says.
//!
//! - Prefetch bounds what the broker pushes; `concurrency` bounds what runs at once (a bulkhead: one slow
//!   dependency cannot take more than this worker's slots).
//! - A delivery is acked only after the handler returns [`Outcome::Done`], which handlers return only after
//!   their database transaction committed. A crash at any instant therefore means redelivery, never loss.
//! - A message that breaks the contract, or that the handler rejects, goes to the dead-letter queue with its
//!   story (see [`crate::dead_letter`]) and is acked only once the dead letter is confirmed.
//! - A transient failure is retried in process with exponential backoff and jitter, then requeued.
//! - When the channel or connection breaks, everything in flight is abandoned to redelivery and the runner
//!   reconnects with backoff until shutdown.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use choreo_messages::{Envelope, ErrorKind};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio_retry2::strategy::{ExponentialFactorBackoff, jitter};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::codec::{decode_delivery, header_i64};
use crate::connection::{BrokerPool, open_channel};
use crate::dead_letter::{Failure, dead_letter, recorded_attempts};
use crate::publisher::ConfirmingPublisher;
use crate::{BrokerError, Topology, TopologyError, WorkerQueue};

/// What a handler made of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Processed and committed, or recognised as a duplicate: ack.
    Done,
    /// No retry can help: dead-letter now.
    Reject { kind: ErrorKind, reason: String },
    /// A dependency failed and may recover: retry.
    Retry { reason: String },
}

/// The business side of a worker. Never sees a channel.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, envelope: &Envelope) -> impl Future<Output = Outcome> + Send;
}

/// Settings of one consumer.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub queue: WorkerQueue,
    /// Unacked deliveries the broker may push at once.
    pub prefetch: u16,
    /// Handlers running at once.
    pub concurrency: usize,
    /// Bodies larger than this are dead-lettered unread.
    pub max_body_bytes: usize,
    /// In-process retries of a transient failure before the message is requeued.
    pub handler_retries: usize,
    /// First in-process retry delay; doubles each time, with jitter.
    pub retry_base: Duration,
    /// Pause before requeueing a message whose retries ran out, so a broken dependency is not hammered.
    pub requeue_delay: Duration,
}

impl ConsumerConfig {
    pub fn new(queue: WorkerQueue) -> Self {
        ConsumerConfig {
            queue,
            prefetch: 64,
            concurrency: 32,
            max_body_bytes: 256 * 1024,
            handler_retries: 3,
            retry_base: Duration::from_millis(50),
            requeue_delay: Duration::from_secs(1),
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
}

impl<H: Handler> ConsumerRunner<H> {
    pub fn new(
        pool: BrokerPool,
        publisher: Arc<ConfirmingPublisher>,
        topology: Topology,
        config: ConsumerConfig,
        handler: Arc<H>,
    ) -> Self {
        ConsumerRunner { pool, publisher, topology, config, handler, consuming: Arc::new(AtomicBool::new(false)) }
    }

    /// True while a consumer is registered with the broker (for readiness).
    pub fn consuming_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.consuming)
    }

    /// Consume until `shutdown` fires, then finish what is in flight and return. Reconnects on broker
    /// failures; returns an error only for what no reconnect can fix (a topology mismatch).
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), TopologyError> {
        let mut backoff = ExponentialFactorBackoff::from_millis(200, 2.0).max_delay_millis(10_000).map(jitter);
        loop {
            match self.session(&shutdown).await {
                Ok(()) => return Ok(()),
                Err(SessionError::Topology(e @ TopologyError::Mismatch { .. })) => return Err(e),
                Err(e) => {
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

    async fn session(&self, shutdown: &CancellationToken) -> Result<(), SessionError> {
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
            concurrency = self.config.concurrency, "consuming");
        self.consuming.store(true, Ordering::SeqCst);
        let stream_error = std::sync::Mutex::new(None::<String>);
        consumer
            .take_until(shutdown.cancelled())
            .for_each_concurrent(self.config.concurrency, |delivery| async {
                match delivery {
                    Ok(delivery) => self.process(delivery).await,
                    Err(e) => {
                        if let Ok(mut slot) = stream_error.lock() {
                            *slot = Some(e.to_string());
                        }
                    }
                }
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
        let reason = stream_error.lock().ok().and_then(|mut s| s.take()).unwrap_or_else(|| "cancelled by the broker".into());
        Err(SessionError::StreamEnded(reason))
    }

    async fn process(&self, delivery: Delivery) {
        let props = &delivery.properties;
        let span = info_span!(
            "message",
            worker = %self.config.queue.worker,
            message_id = %props.message_id().as_ref().map(|m| m.as_str()).unwrap_or("-"),
            message_type = %props.kind().as_ref().map(|m| m.as_str()).unwrap_or("-"),
            correlation_id = %props.correlation_id().as_ref().map(|m| m.as_str()).unwrap_or("-"),
        );
        self.settle(delivery).instrument(span).await;
    }

    async fn settle(&self, delivery: Delivery) {
        let envelope = match decode_delivery(&delivery.properties, &delivery.data, self.config.max_body_bytes) {
            Ok(envelope) => envelope,
            Err(e) => {
                warn!(error_kind = %e.kind(), error = %e, "message breaks the contract; dead-lettering");
                return self.reject(&delivery, e.kind(), &e.to_string(), 1).await;
            }
        };
        let mut delays = ExponentialFactorBackoff::from_millis(self.config.retry_base.as_millis() as u64, 2.0)
            .max_delay_millis(5_000)
            .map(jitter)
            .take(self.config.handler_retries);
        let mut tries = 0u32;
        loop {
            tries += 1;
            match self.handler.handle(&envelope).await {
                Outcome::Done => return self.ack(&delivery).await,
                Outcome::Reject { kind, reason } => {
                    warn!(error_kind = %kind, error = %reason, "handler rejected the message; dead-lettering");
                    return self.reject(&delivery, kind, &reason, tries).await;
                }
                Outcome::Retry { reason } => match delays.next() {
                    Some(delay) => {
                        debug!(error = %reason, attempt = tries, "transient failure; retrying in process");
                        tokio::time::sleep(delay).await;
                    }
                    None => {
                        warn!(error = %reason, attempts = tries, "transient failure persists; requeueing");
                        tokio::time::sleep(self.config.requeue_delay).await;
                        return self.requeue(&delivery).await;
                    }
                },
            }
        }
    }

    async fn reject(&self, delivery: &Delivery, kind: ErrorKind, reason: &str, tries: u32) {
        let redeliveries = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| header_i64(h, "x-delivery-count"))
            .and_then(|c| u32::try_from(c).ok())
            .unwrap_or(0);
        let attempts = recorded_attempts(&delivery.properties) + redeliveries + tries;
        let failure = Failure { worker: &self.config.queue.worker, kind, error: reason, attempts };
        match dead_letter(&self.publisher, &self.topology, delivery, &failure).await {
            Ok(()) => self.ack(delivery).await,
            Err(e) => {
                error!(error = %e, "could not dead-letter the message; requeueing it so that nothing is lost");
                self.requeue(delivery).await;
            }
        }
    }

    async fn ack(&self, delivery: &Delivery) {
        if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
            // The channel is gone: the broker redelivers and the inbox absorbs the duplicate.
            warn!(error = %e, "ack failed; the message will be redelivered");
        }
    }

    async fn requeue(&self, delivery: &Delivery) {
        let options = BasicNackOptions { multiple: false, requeue: true };
        if let Err(e) = delivery.acker.nack(options).await {
            warn!(error = %e, "nack failed; the message will be redelivered");
        }
    }
}
