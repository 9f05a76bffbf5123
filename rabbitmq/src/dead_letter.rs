//! How a message the consumer gives up on reaches its worker's dead-letter queue with its story.
//!
//! The body is kept byte for byte and the original properties are kept; headers are added that tell an
//! operator why without reading logs. They stay small (a bounded error text, no stack traces): large headers
//! break the frame limits of other clients.

use choreo_messages::ErrorKind;
use chrono::{DateTime, SecondsFormat, Utc};
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};

use crate::codec::{header_string, headers_to_republish, long, properties_header_u32, truncate_utf8};
use crate::publisher::{ConfirmingPublisher, Outgoing};
use crate::{PublishError, Topology};

/// Header names of dead-letter metadata.
pub mod headers {
    pub const ERROR: &str = "choreo-error";
    pub const ERROR_KIND: &str = "choreo-error-kind";
    pub const ATTEMPTS: &str = "choreo-attempts";
    pub const WORKER: &str = "choreo-worker";
    pub const ORIGINAL_EXCHANGE: &str = "choreo-original-exchange";
    pub const ORIGINAL_ROUTING_KEY: &str = "choreo-original-routing-key";
    pub const FIRST_FAILURE_AT: &str = "choreo-first-failure-at";
    pub const LAST_FAILURE_AT: &str = "choreo-last-failure-at";
    /// Broker-side retry rounds so far.
    pub const RETRIES: &str = "choreo-retries";
    /// Set on messages put back by `choreoctl dlq replay`.
    pub const REPLAYED_AT: &str = "choreo-replayed-at";
    /// What the worker saw of the broker's dead-letterings when it wrote the headers above
    /// ([`super::broker_deaths_seen`]): if `x-death` says otherwise now, the broker acted after the worker.
    pub const BROKER_DEATHS_SEEN: &str = "choreo-broker-deaths-seen";
}

/// The `x-death` reason of a message a delay queue sends back to its worker when its TTL ends: not a
/// failure, and never what puts a message in a dead-letter queue.
pub const EXPIRED: &str = "expired";

/// One entry of a message's `x-death` header: the broker dead-lettered it from `queue` for `reason`, `count`
/// times, first at `time` (RabbitMQ keeps one entry per queue and reason, counts repeats, and moves the
/// entry of the latest event to the front without updating its time).
pub struct Death<'a> {
    /// The entry itself, for its other fields (`exchange`, `routing-keys`).
    pub table: &'a FieldTable,
    pub reason: Option<String>,
    pub queue: Option<String>,
    pub count: Option<i64>,
    pub time: Option<DateTime<Utc>>,
}

/// The entries of `x-death`, latest first.
pub fn deaths(headers: &FieldTable) -> Vec<Death<'_>> {
    let Some(AMQPValue::FieldArray(entries)) = headers.inner().get("x-death") else { return Vec::new() };
    entries
        .as_slice()
        .iter()
        .filter_map(|entry| match entry {
            AMQPValue::FieldTable(t) => Some(Death {
                table: t,
                reason: header_string(t, "reason"),
                queue: header_string(t, "queue"),
                count: crate::codec::header_i64(t, "count"),
                time: match t.inner().get("time") {
                    Some(AMQPValue::Timestamp(s)) => {
                        i64::try_from(*s).ok().and_then(|s| DateTime::from_timestamp(s, 0))
                    }
                    _ => None,
                },
            }),
            _ => None,
        })
        .collect()
}

/// The broker's dead-letterings of a message as `x-death` tells them, expiries aside: one
/// `reason queue count time` per entry, sorted. Any change means the broker dead-lettered the message again:
/// RabbitMQ before 4.0 counts a repeat in its entry (keeping the first time), 4.0 and later start new
/// entries once a client has published the message.
pub fn broker_deaths(headers: &FieldTable) -> String {
    let mut seen: Vec<String> = deaths(headers)
        .into_iter()
        .filter(|d| d.reason.as_deref() != Some(EXPIRED))
        .map(|d| {
            format!(
                "{} {} {} {}",
                d.reason.unwrap_or_default(),
                d.queue.unwrap_or_default(),
                d.count.unwrap_or(0),
                d.time.map(|t| t.timestamp().to_string()).unwrap_or_default()
            )
        })
        .collect();
    seen.sort_unstable();
    seen.join("; ")
}

/// The value of [`headers::BROKER_DEATHS_SEEN`]: the worker's last failure time it goes with (so that a
/// worker that copies the header without writing it, an older build, cannot make it stale), then what the
/// worker saw.
pub fn broker_deaths_seen(last_failure_at: &str, table: &FieldTable) -> String {
    format!("{last_failure_at}|{}", broker_deaths(table))
}

/// Longest error text kept in a header, in bytes.
pub const MAX_ERROR_BYTES: usize = 512;

/// Why a message is dead-lettered, and where it failed.
#[derive(Debug, Clone)]
pub struct Failure<'a> {
    pub worker: &'a str,
    pub kind: ErrorKind,
    pub error: &'a str,
    /// Deliveries so far, including this one.
    pub attempts: u32,
}

/// Properties of a failed message (dead letter or delayed retry): the original ones plus the failure headers.
pub fn dead_letter_properties(delivery: &Delivery, failure: &Failure<'_>) -> BasicProperties {
    let original = headers_to_republish(&delivery.properties);
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
    let first = header_string(&original, headers::FIRST_FAILURE_AT).unwrap_or_else(|| now.clone());
    let mut table: FieldTable = original.clone();
    table.insert(headers::ERROR.into(), long(truncate_utf8(failure.error, MAX_ERROR_BYTES)));
    table.insert(headers::ERROR_KIND.into(), long(failure.kind.as_str()));
    table.insert(headers::ATTEMPTS.into(), AMQPValue::LongLongInt(i64::from(failure.attempts)));
    table.insert(headers::WORKER.into(), long(failure.worker));
    // A replayed message that fails again keeps the place it first came from.
    let exchange =
        header_string(&original, headers::ORIGINAL_EXCHANGE).unwrap_or_else(|| delivery.exchange.to_string());
    let key =
        header_string(&original, headers::ORIGINAL_ROUTING_KEY).unwrap_or_else(|| delivery.routing_key.to_string());
    table.insert(headers::ORIGINAL_EXCHANGE.into(), long(&exchange));
    table.insert(headers::ORIGINAL_ROUTING_KEY.into(), long(&key));
    table.insert(headers::FIRST_FAILURE_AT.into(), long(&first));
    table.insert(headers::LAST_FAILURE_AT.into(), long(&now));
    table.insert(headers::BROKER_DEATHS_SEEN.into(), long(&broker_deaths_seen(&now, &original)));
    kept_properties(&delivery.properties).with_headers(table).with_delivery_mode(2)
}

/// The properties a message keeps when we publish it again (dead letter, retry, replay, export and import):
/// all but two, as RabbitMQ's own dead-lettering does. Not its `expiration` (a dead-letter queue has no
/// dead-letter exchange: an expiring copy would vanish, and a retry queue's delay is its own TTL), nor its
/// `user_id` (the broker checks it against the publishing connection's user, which is now ours: another
/// user's id would close the channel). Headers are kept as they are.
pub fn kept_properties(p: &BasicProperties) -> BasicProperties {
    let mut kept = BasicProperties::default();
    if let Some(v) = p.content_type() {
        kept = kept.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        kept = kept.with_content_encoding(v.clone());
    }
    if let Some(v) = p.priority() {
        kept = kept.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        kept = kept.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        kept = kept.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        kept = kept.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        kept = kept.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        kept = kept.with_type(v.clone());
    }
    if let Some(v) = p.app_id() {
        kept = kept.with_app_id(v.clone());
    }
    if let Some(v) = p.cluster_id() {
        kept = kept.with_cluster_id(v.clone());
    }
    if let Some(v) = p.headers() {
        kept = kept.with_headers(v.clone());
    }
    if let Some(v) = p.delivery_mode() {
        kept = kept.with_delivery_mode(*v);
    }
    kept
}

/// Broker-side retry rounds recorded on a message so far.
pub fn recorded_retries(properties: &BasicProperties) -> u32 {
    properties_header_u32(properties, headers::RETRIES).unwrap_or(0)
}

/// Attempts recorded on a message so far (0 when it never failed).
pub fn recorded_attempts(properties: &BasicProperties) -> u32 {
    properties_header_u32(properties, headers::ATTEMPTS).unwrap_or(0)
}

/// Publish `delivery` to the worker's dead-letter queue and wait for the confirm. Only after this returns
/// `Ok` may the original delivery be acked.
pub async fn dead_letter(
    publisher: &ConfirmingPublisher,
    topology: &Topology,
    delivery: &Delivery,
    failure: &Failure<'_>,
) -> Result<(), PublishError> {
    let exchange = topology.dead_letter_exchange();
    let routing_key = topology.dead_letter_queue(failure.worker);
    republish(publisher, &exchange, &routing_key, dead_letter_properties(delivery, failure), delivery).await
}

/// Send `delivery` to a delay queue for broker-side retry round `round` (1-based), with the failure story.
/// Only after this returns `Ok` may the original delivery be acked.
pub async fn delay_for_retry(
    publisher: &ConfirmingPublisher,
    retry_queue: &str,
    delivery: &Delivery,
    failure: &Failure<'_>,
    round: u32,
) -> Result<(), PublishError> {
    let mut properties = dead_letter_properties(delivery, failure);
    let mut table = properties.headers().clone().unwrap_or_default();
    table.insert(headers::RETRIES.into(), AMQPValue::LongLongInt(i64::from(round)));
    properties = properties.with_headers(table);
    republish(publisher, "", retry_queue, properties, delivery).await
}

/// Publish a delivery's body unchanged, with `properties`, and wait for the confirm.
async fn republish(
    publisher: &ConfirmingPublisher,
    exchange: &str,
    routing_key: &str,
    properties: BasicProperties,
    delivery: &Delivery,
) -> Result<(), PublishError> {
    let message_id = delivery.properties.message_id().as_ref().map(|m| m.to_string()).unwrap_or_default();
    publisher.publish(Outgoing { exchange, routing_key, properties, body: &delivery.data, message_id }).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::header_i64;

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("abc", 10), "abc");
        assert_eq!(truncate_utf8(&"x".repeat(2000), MAX_ERROR_BYTES).len(), MAX_ERROR_BYTES);
    }

    #[test]
    fn failure_headers_are_added_and_the_first_failure_is_kept() {
        let mut delivery = Delivery::mock(1, "ns.events".into(), "order.place".into(), false, b"{}".to_vec());
        let failure =
            Failure { worker: "order", kind: ErrorKind::MalformedBody, error: &"e".repeat(5000), attempts: 3 };
        let props = dead_letter_properties(&delivery, &failure);
        let h = props.headers().clone().unwrap_or_default();
        assert_eq!(header_string(&h, headers::ERROR).map(|e| e.len()), Some(MAX_ERROR_BYTES));
        assert_eq!(header_string(&h, headers::ERROR_KIND).as_deref(), Some("malformed_body"));
        assert_eq!(header_i64(&h, headers::ATTEMPTS), Some(3));
        assert_eq!(header_string(&h, headers::ORIGINAL_ROUTING_KEY).as_deref(), Some("order.place"));
        let first = header_string(&h, headers::FIRST_FAILURE_AT);
        assert!(first.is_some());
        assert_eq!(recorded_attempts(&props), 3);

        // Failing again after a replay: the first failure time and the origin survive.
        delivery.properties = props;
        delivery.exchange = "".into();
        let again = dead_letter_properties(&delivery, &failure);
        let h2 = again.headers().clone().unwrap_or_default();
        assert_eq!(header_string(&h2, headers::FIRST_FAILURE_AT), first);
        assert_eq!(header_string(&h2, headers::ORIGINAL_EXCHANGE).as_deref(), Some("ns.events"));
    }

    #[test]
    fn a_dead_letter_keeps_the_original_properties_but_its_expiration_and_user_id() {
        let mut delivery = Delivery::mock(1, "ns.events".into(), "order.place".into(), false, b"{}".to_vec());
        delivery.properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id("m-1".into())
            .with_correlation_id("c-1".into())
            .with_type("order.place".into())
            .with_timestamp(1_700_000_000)
            .with_app_id("shop".into())
            .with_priority(3)
            .with_expiration("60000".into())
            .with_user_id("shop-client".into());
        let failure = Failure { worker: "order", kind: ErrorKind::Permanent, error: "no", attempts: 1 };
        let props = dead_letter_properties(&delivery, &failure);
        assert_eq!(props.expiration(), &None, "a dead letter must not expire");
        assert_eq!(props.user_id(), &None, "the worker publishes it, not the client");
        assert_eq!(props.message_id().as_ref().map(|v| v.as_str()), Some("m-1"));
        assert_eq!(props.correlation_id().as_ref().map(|v| v.as_str()), Some("c-1"));
        assert_eq!(props.kind().as_ref().map(|v| v.as_str()), Some("order.place"));
        assert_eq!(props.content_type().as_ref().map(|v| v.as_str()), Some("application/json"));
        assert_eq!(props.app_id().as_ref().map(|v| v.as_str()), Some("shop"));
        assert_eq!(
            (*props.timestamp(), *props.priority(), *props.delivery_mode()),
            (Some(1_700_000_000), Some(3), Some(2))
        );
    }

    #[test]
    fn the_worker_records_the_broker_dead_letterings_it_saw_with_its_failure_time() {
        let entry = |reason: &str, queue: &str, count: i64, time: u64| {
            let mut t = FieldTable::default();
            t.insert("reason".into(), long(reason));
            t.insert("queue".into(), long(queue));
            t.insert("count".into(), AMQPValue::LongLongInt(count));
            t.insert("time".into(), AMQPValue::Timestamp(time));
            AMQPValue::FieldTable(t)
        };
        let mut h = FieldTable::default();
        h.insert(
            "x-death".into(),
            AMQPValue::FieldArray(
                vec![entry("expired", "ns.order.retry.1000ms", 5, 9), entry("delivery_limit", "ns.order", 2, 7)].into(),
            ),
        );
        let mut delivery = Delivery::mock(1, "".into(), "ns.order".into(), true, b"{}".to_vec());
        delivery.properties = BasicProperties::default().with_headers(h);
        let failure = Failure { worker: "order", kind: ErrorKind::Transient, error: "down", attempts: 1 };
        let props = dead_letter_properties(&delivery, &failure);
        let headers = props.headers().clone().unwrap_or_default();
        let last = header_string(&headers, headers::LAST_FAILURE_AT).expect("last failure");
        assert_eq!(
            header_string(&headers, headers::BROKER_DEATHS_SEEN),
            Some(format!("{last}|delivery_limit ns.order 2 7")),
            "expiries are not dead-letterings"
        );
    }

    #[test]
    fn the_broker_delivery_count_is_not_copied_into_the_dead_letter_or_the_retry() {
        let mut delivery = Delivery::mock(1, "ns.events".into(), "order.place".into(), true, b"{}".to_vec());
        let mut h = FieldTable::default();
        h.insert(crate::codec::DELIVERY_COUNT.into(), AMQPValue::LongLongInt(4));
        delivery.properties = BasicProperties::default().with_headers(h);
        let failure = Failure { worker: "order", kind: ErrorKind::Transient, error: "down", attempts: 1 };
        let props = dead_letter_properties(&delivery, &failure);
        assert!(!props.headers().clone().unwrap_or_default().contains_key(crate::codec::DELIVERY_COUNT));
    }
}
