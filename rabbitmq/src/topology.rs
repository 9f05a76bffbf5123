//! Exchanges and queues, named from one namespace and declared idempotently at start.
//!
//! ```text
//! {ns}.events        topic exchange; every command and event, routing key = message type
//! {ns}.{worker}      quorum queue per worker, bound to exactly the types it handles
//! {ns}.dead-letter   direct exchange for messages a worker gives up on
//! {ns}.{worker}.retry.{delay}ms  delay queues: TTL, then back to {ns}.{worker}
//! {ns}.{worker}.dlq  quorum queue per worker holding its dead letters
//! {ns}.outcomes      bounded quorum queue of workflow outcomes (the types workers declare as outcomes)
//! ```
//!
//! Worker queues are quorum queues with a delivery limit (a message that crashes its consumer every time ends
//! in the dead-letter queue instead of looping) and at-least-once dead-lettering, so that dead-lettering
//! itself loses nothing. All of it is set at declare time, not by policy: the queue is what the code says.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use crate::{BrokerError, TopologyError};

/// Delivery limit of dead-letter queues: effectively none (see `declare_worker`).
pub const DEAD_LETTER_DELIVERY_LIMIT: i64 = 1_000_000_000;

/// Outcomes kept in the feed; the oldest are dropped first.
pub const OUTCOMES_MAX_LENGTH: i64 = 100_000;

/// Names of everything on the broker, derived from one namespace so that several environments (or tests)
/// can share a broker without meeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    namespace: String,
}

/// One worker's queue: who it is and which message types it consumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerQueue {
    /// The worker's name: its queues are `{ns}.{worker}`, `{ns}.{worker}.dlq` and its delay queues.
    pub worker: String,
    /// The message types its queue is bound to.
    pub routing_keys: Vec<String>,
    /// The types it emits that end a workflow (no participant consumes them): bound to the outcomes feed,
    /// so that a publish of one with the mandatory flag is routed.
    pub outcomes: Vec<String>,
    /// Deliveries of one message before the broker dead-letters it (poison-message protection).
    pub delivery_limit: u32,
    /// Delay levels of broker-side retries, shortest first; one delay queue each.
    pub retry_delays: Vec<Duration>,
}

impl Topology {
    pub fn new(namespace: impl Into<String>) -> Self {
        Topology { namespace: namespace.into() }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.namespace)
    }

    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dead-letter", self.namespace)
    }

    /// The bounded feed of workflow outcomes: the types workers declare as ending a workflow.
    pub fn outcomes_queue(&self) -> String {
        format!("{}.outcomes", self.namespace)
    }

    pub fn worker_queue(&self, worker: &str) -> String {
        format!("{}.{worker}", self.namespace)
    }

    /// The delay queue of one retry level: messages wait there `delay`, then return to the worker's queue.
    pub fn retry_queue(&self, worker: &str, delay: Duration) -> String {
        format!("{}.{worker}.retry.{}ms", self.namespace, delay.as_millis())
    }

    pub fn dead_letter_queue(&self, worker: &str) -> String {
        format!("{}.{worker}.dlq", self.namespace)
    }

    /// Every queue declared for one worker: its queue, its delay queues and its dead-letter queue.
    pub fn queue_names(&self, worker: &str, retry_delays: &[Duration]) -> Vec<String> {
        let mut names = vec![self.worker_queue(worker)];
        names.extend(retry_delays.iter().map(|d| self.retry_queue(worker, *d)));
        names.push(self.dead_letter_queue(worker));
        names
    }

    /// The exchanges of the namespace.
    pub fn exchange_names(&self) -> Vec<String> {
        vec![self.events_exchange(), self.dead_letter_exchange()]
    }

    /// Arguments of a worker's queue. Changing any of them needs the queue recreated (see the runbook).
    pub fn worker_queue_arguments(&self, queue: &WorkerQueue) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), long_string("quorum"));
        args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(i64::from(queue.delivery_limit)));
        args.insert("x-dead-letter-exchange".into(), long_string(&self.dead_letter_exchange()));
        args.insert("x-dead-letter-routing-key".into(), long_string(&self.dead_letter_queue(&queue.worker)));
        args.insert("x-dead-letter-strategy".into(), long_string("at-least-once"));
        args.insert("x-overflow".into(), long_string("reject-publish"));
        args
    }

    /// Arguments of a delay queue: no consumer; each message expires after `delay` and is dead-lettered
    /// through the default exchange straight back to the worker's queue, at least once.
    pub fn retry_queue_arguments(&self, worker: &str, delay: Duration) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), long_string("quorum"));
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
        );
        args.insert("x-dead-letter-exchange".into(), long_string(""));
        args.insert("x-dead-letter-routing-key".into(), long_string(&self.worker_queue(worker)));
        args.insert("x-dead-letter-strategy".into(), long_string("at-least-once"));
        args.insert("x-overflow".into(), long_string("reject-publish"));
        args
    }

    /// Declare the exchanges every worker and client needs.
    pub async fn declare_exchanges(&self, channel: &Channel) -> Result<(), TopologyError> {
        declare_exchange(channel, &self.events_exchange(), ExchangeKind::Topic).await?;
        declare_exchange(channel, &self.dead_letter_exchange(), ExchangeKind::Direct).await?;
        // Terminal events have no consumer of ours; without a queue bound for them every publish would come
        // back unroutable. The outcomes feed keeps the latest ones for downstream systems, bounded; each worker
        // binds the types it declares as outcomes.
        let outcomes = self.outcomes_queue();
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), long_string("quorum"));
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(OUTCOMES_MAX_LENGTH));
        args.insert("x-overflow".into(), long_string("drop-head"));
        declare_queue(channel, &outcomes, args).await
    }

    /// Declare a worker's queue, its dead-letter queue and their bindings. Safe to run at every start.
    /// A failed declaration closes the channel (AMQP says so): use a fresh channel afterwards.
    pub async fn declare_worker(&self, channel: &Channel, queue: &WorkerQueue) -> Result<(), TopologyError> {
        self.declare_exchanges(channel).await?;
        let dlq = self.dead_letter_queue(&queue.worker);
        let mut dlq_args = FieldTable::default();
        dlq_args.insert("x-queue-type".into(), long_string("quorum"));
        // Reading a dead letter without removing it counts as a delivery on quorum queues (and 4.x drops
        // messages past a default limit of 20): a limit no operator will reach keeps every dead letter.
        dlq_args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(DEAD_LETTER_DELIVERY_LIMIT));
        declare_queue(channel, &dlq, dlq_args).await?;
        bind(channel, &dlq, &self.dead_letter_exchange(), &dlq).await?;

        let name = self.worker_queue(&queue.worker);
        declare_queue(channel, &name, self.worker_queue_arguments(queue)).await?;
        for delay in &queue.retry_delays {
            let retry = self.retry_queue(&queue.worker, *delay);
            declare_queue(channel, &retry, self.retry_queue_arguments(&queue.worker, *delay)).await?;
        }
        for key in &queue.routing_keys {
            bind(channel, &name, &self.events_exchange(), key).await?;
        }
        for key in &queue.outcomes {
            bind(channel, &self.outcomes_queue(), &self.events_exchange(), key).await?;
        }
        Ok(())
    }
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() }
}

async fn declare_exchange(channel: &Channel, name: &str, kind: ExchangeKind) -> Result<(), TopologyError> {
    let options = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    channel
        .exchange_declare(name.into(), kind, options, FieldTable::default())
        .await
        .map_err(|e| explain(e, "exchange", name, "exchange.declare"))
}

async fn declare_queue(channel: &Channel, name: &str, args: FieldTable) -> Result<(), TopologyError> {
    channel
        .queue_declare(name.into(), durable(), args)
        .await
        .map(|_| ())
        .map_err(|e| explain(e, "queue", name, "queue.declare"))
}

async fn bind(channel: &Channel, queue: &str, exchange: &str, key: &str) -> Result<(), TopologyError> {
    channel
        .queue_bind(queue.into(), exchange.into(), key.into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .map_err(|e| TopologyError::Broker(BrokerError::Amqp { operation: "queue.bind", source: e }))
}

/// Turn the broker's bare PRECONDITION_FAILED into what differs and what to do about it.
fn explain(error: lapin::Error, kind: &'static str, name: &str, operation: &'static str) -> TopologyError {
    if let lapin::ErrorKind::ProtocolError(amqp) = error.kind()
        && matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED))
    {
        let text = amqp.get_message().to_string();
        let detail = match argument_of(&text) {
            Some(arg) => format!("argument `{arg}` differs ({})", text.trim_start_matches("PRECONDITION_FAILED - ")),
            None => text,
        };
        let remedy = if kind == "queue" {
            "queue arguments cannot change in place. Stop the publishers, let the worker drain the queue, \
             delete it (`rabbitmqctl delete_queue NAME`) and start the worker again so that it declares the \
             queue with the new arguments; or run this version with the old settings."
        } else {
            "an exchange's type and durability cannot change in place. Delete the exchange \
             (`rabbitmqctl eval` or the management UI) after stopping its users, then start again."
        };
        return TopologyError::Mismatch { kind, name: name.to_owned(), detail, remedy };
    }
    TopologyError::Broker(BrokerError::Amqp { operation, source: error })
}

/// `inequivalent arg 'x-queue-type' for queue ...` -> `x-queue-type`.
fn argument_of(text: &str) -> Option<&str> {
    let start = text.find("inequivalent arg '")? + "inequivalent arg '".len();
    let len = text[start..].find('\'')?;
    Some(&text[start..start + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_the_namespace() {
        let t = Topology::new("acme");
        assert_eq!(t.events_exchange(), "acme.events");
        assert_eq!(t.worker_queue("payment"), "acme.payment");
        assert_eq!(t.dead_letter_queue("payment"), "acme.payment.dlq");
        assert_eq!(t.dead_letter_exchange(), "acme.dead-letter");
        assert_eq!(t.retry_queue("payment", Duration::from_secs(10)), "acme.payment.retry.10000ms");
        assert_eq!(
            t.queue_names("payment", &[Duration::from_secs(1)]),
            ["acme.payment", "acme.payment.retry.1000ms", "acme.payment.dlq"]
        );
        let args = t.retry_queue_arguments("payment", Duration::from_secs(10));
        assert_eq!(args.inner().get("x-message-ttl").cloned(), Some(AMQPValue::LongLongInt(10_000)));
        assert_eq!(args.inner().get("x-dead-letter-routing-key").cloned(), Some(long_string("acme.payment")));
    }

    #[test]
    fn the_differing_argument_is_named() {
        let text = "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'choreo.order' in vhost '/': \
                    received the value 'quorum' of type 'longstr' but current is none";
        assert_eq!(argument_of(text), Some("x-queue-type"));
        assert_eq!(argument_of("something else"), None);
    }

    #[test]
    fn worker_queues_are_quorum_with_a_delivery_limit_and_safe_dead_lettering() {
        let t = Topology::new("ns");
        let q = WorkerQueue {
            worker: "order".into(),
            routing_keys: vec![],
            outcomes: vec![],
            delivery_limit: 7,
            retry_delays: vec![],
        };
        let args = t.worker_queue_arguments(&q);
        let get = |k: &str| args.inner().get(k).cloned();
        assert_eq!(get("x-queue-type"), Some(long_string("quorum")));
        assert_eq!(get("x-delivery-limit"), Some(AMQPValue::LongLongInt(7)));
        assert_eq!(get("x-dead-letter-strategy"), Some(long_string("at-least-once")));
        assert_eq!(get("x-overflow"), Some(long_string("reject-publish")));
        assert_eq!(get("x-dead-letter-routing-key"), Some(long_string("ns.order.dlq")));
    }
}
