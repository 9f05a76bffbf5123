//! The contract's metadata in AMQP properties and headers, both ways.
//!
//! Strings in headers are accepted as long strings, short strings or byte arrays, and integers at any width,
//! because clients in other languages pick different AMQP types for the same value.

use choreo_messages::envelope::CONTENT_TYPE_JSON;
use choreo_messages::{Contract, DecodeError, EncodedEnvelope, Envelope, Metadata, headers};
use chrono::{DateTime, TimeZone, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use uuid::Uuid;

/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// Properties of an outgoing message.
pub fn properties_for(meta: &Metadata) -> BasicProperties {
    let mut table = FieldTable::default();
    table.insert(headers::SCHEMA_VERSION.into(), AMQPValue::LongLongInt(i64::from(meta.schema_version)));
    table.insert(headers::PRODUCER.into(), long(&meta.producer));
    table.insert(
        headers::OCCURRED_AT.into(),
        long(&meta.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
    );
    if let Some(causation) = meta.causation_id {
        table.insert(headers::CAUSATION_ID.into(), long(&causation.to_string()));
    }
    if let Some(traceparent) = &meta.traceparent {
        table.insert(headers::TRACEPARENT.into(), long(traceparent));
    }
    BasicProperties::default()
        .with_message_id(meta.message_id.to_string().into())
        .with_correlation_id(meta.correlation_id.to_string().into())
        .with_type(short(&meta.message_type))
        .with_content_type(CONTENT_TYPE_JSON.into())
        .with_timestamp(u64::try_from(meta.occurred_at.timestamp()).unwrap_or(0))
        .with_app_id(short(&meta.producer))
        .with_delivery_mode(PERSISTENT)
        .with_headers(table)
}

/// Read the contract's metadata from a delivery's properties.
pub fn metadata_from(properties: &BasicProperties) -> Result<Metadata, DecodeError> {
    let message_id = properties
        .message_id()
        .as_ref()
        .and_then(|id| Uuid::parse_str(id.as_str()).ok())
        .ok_or(DecodeError::MissingMetadata("property message_id (a UUID)"))?;
    let message_type = properties
        .kind()
        .as_ref()
        .map(|t| t.as_str().to_owned())
        .filter(|t| !t.is_empty())
        .ok_or(DecodeError::MissingMetadata("property type"))?;
    let empty = FieldTable::default();
    let table = properties.headers().as_ref().unwrap_or(&empty);
    let schema_version = header_u32(table, headers::SCHEMA_VERSION)
        .ok_or(DecodeError::MissingMetadata("header schema-version (an integer)"))?;
    let correlation_id = match properties.correlation_id() {
        Some(c) => {
            Uuid::parse_str(c.as_str()).map_err(|_| DecodeError::MissingMetadata("property correlation_id (a UUID)"))?
        }
        None => message_id,
    };
    // Absent is fine (a command starts a workflow); present but unreadable (not text, not UTF-8, not a UUID)
    // breaks the contract rather than passing as absent.
    let causation_id = match table.inner().get(headers::CAUSATION_ID) {
        None | Some(AMQPValue::Void) => None,
        Some(_) => {
            let text = header_string(table, headers::CAUSATION_ID)
                .ok_or(DecodeError::MissingMetadata("header causation-id (a UUID)"))?;
            Some(Uuid::parse_str(&text).map_err(|_| DecodeError::MissingMetadata("header causation-id (a UUID)"))?)
        }
    };
    let producer = header_string(table, headers::PRODUCER)
        .or_else(|| properties.app_id().as_ref().map(|a| a.to_string()))
        .unwrap_or_else(|| "unknown".to_owned());
    let occurred_at = header_string(table, headers::OCCURRED_AT)
        .and_then(|s| DateTime::parse_from_rfc3339(&s).ok().map(|t| t.with_timezone(&Utc)))
        .or_else(|| {
            properties
                .timestamp()
                .and_then(|secs| i64::try_from(secs).ok())
                .and_then(|secs| Utc.timestamp_opt(secs, 0).single())
        })
        .unwrap_or_else(Utc::now);
    let traceparent = header_string(table, headers::TRACEPARENT);
    Ok(Metadata {
        message_id,
        message_type,
        schema_version,
        correlation_id,
        causation_id,
        producer,
        occurred_at,
        traceparent,
    })
}

/// Check size and content type, read the metadata and decode the body strictly.
pub fn decode_delivery<M: Contract>(
    properties: &BasicProperties,
    body: &[u8],
    max_body_bytes: usize,
) -> Result<Envelope<M>, DecodeError> {
    if body.len() > max_body_bytes {
        return Err(DecodeError::Oversized { size: body.len(), max: max_body_bytes });
    }
    let content_type = properties.content_type().as_ref().map(|c| c.as_str()).unwrap_or("");
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    if !media_type.eq_ignore_ascii_case(CONTENT_TYPE_JSON) {
        return Err(DecodeError::WrongContentType(content_type.chars().take(64).collect()));
    }
    let meta = metadata_from(properties)?;
    EncodedEnvelope { meta, body: body.to_vec() }.decode()
}

/// The routing key a message was published to the events exchange with must be its type (the contract
/// routes by type). Known for what comes through the events exchange, and for what a worker parked or
/// dead-lettered after it came that way and that comes back through the default exchange (its
/// `choreo-original-exchange` is the events exchange, `choreo-original-routing-key` the key). Not checked
/// for a message that was published straight to a queue, then or originally: its routing key is the queue's
/// name, not a type.
pub fn check_routing_key(
    exchange: &str,
    routing_key: &str,
    properties: &BasicProperties,
    events_exchange: &str,
    message_type: &str,
) -> Result<(), DecodeError> {
    use crate::dead_letter::headers::{ORIGINAL_EXCHANGE, ORIGINAL_ROUTING_KEY};
    let published_with = if exchange == events_exchange {
        Some(routing_key.to_owned())
    } else {
        properties
            .headers()
            .as_ref()
            .filter(|h| header_string(h, ORIGINAL_EXCHANGE).as_deref() == Some(events_exchange))
            .and_then(|h| header_string(h, ORIGINAL_ROUTING_KEY))
    };
    match published_with {
        Some(key) if key != message_type => Err(DecodeError::TypeNotRoutingKey {
            message_type: message_type.chars().take(128).collect(),
            routing_key: key.chars().take(128).collect(),
        }),
        _ => Ok(()),
    }
}

pub(crate) fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// A short string from text we control; text longer than AMQP allows is cut at a char boundary.
pub(crate) fn short(s: &str) -> ShortString {
    ShortString::from(truncate_utf8(s, 255))
}

/// At most `max` bytes of `text`, cut at a char boundary.
pub(crate) fn truncate_utf8(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A header's value as text, whatever string type the client chose.
pub fn header_string(table: &FieldTable, key: &str) -> Option<String> {
    match table.inner().get(key)? {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::ByteArray(b) => String::from_utf8(b.as_slice().to_vec()).ok(),
        _ => None,
    }
}

/// A header's value as an integer, whatever width (or text) the client chose.
pub fn header_i64(table: &FieldTable, key: &str) -> Option<i64> {
    match table.inner().get(key)? {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        _ => header_string(table, key).and_then(|s| s.trim().parse().ok()),
    }
}

/// A header's value as a non-negative 32-bit integer.
pub fn header_u32(table: &FieldTable, key: &str) -> Option<u32> {
    header_i64(table, key).and_then(|v| u32::try_from(v).ok())
}

/// A header of a message's properties as a non-negative 32-bit integer.
pub fn properties_header_u32(properties: &BasicProperties, key: &str) -> Option<u32> {
    properties.headers().as_ref().and_then(|h| header_u32(h, key))
}

/// The header in which a quorum queue tells a consumer how many times it delivered the message before.
pub const DELIVERY_COUNT: &str = "x-delivery-count";

/// The headers of a delivery, to publish again elsewhere: without [`DELIVERY_COUNT`], which counts
/// deliveries out of the queue it came from (reads of a dead-letter queue included) and, copied into a
/// new message, would make its first delivery look like a redelivery.
pub fn headers_to_republish(properties: &BasicProperties) -> FieldTable {
    let mut inner = properties.headers().clone().unwrap_or_default().inner().clone();
    inner.remove(DELIVERY_COUNT);
    inner.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_causation_id_that_is_present_but_unreadable_is_refused_not_dropped() {
        let e = envelope().encode();
        let with = |value: AMQPValue| {
            let mut props = properties_for(&e.meta);
            let mut h = props.headers().clone().unwrap_or_default();
            h.insert(headers::CAUSATION_ID.into(), value);
            props = props.with_headers(h);
            decode_delivery::<Message>(&props, &e.body, 1024)
        };
        let bytes =
            with(AMQPValue::ByteArray(ByteArray::from(vec![0xff_u8; 16]))).expect_err("16 raw bytes, not UTF-8");
        assert_eq!(bytes.kind(), ErrorKind::MissingMetadata);
        assert_eq!(with(AMQPValue::LongLongInt(7)).expect_err("a number").kind(), ErrorKind::MissingMetadata);
        assert!(with(AMQPValue::Void).expect("void is absent").meta.causation_id.is_none());
    }

    #[test]
    fn the_routing_key_a_message_was_published_with_must_be_its_type() {
        let none = BasicProperties::default();
        assert!(check_routing_key("ns.events", "order.place", &none, "ns.events", "order.place").is_ok());
        let wrong =
            check_routing_key("ns.events", "order.place", &none, "ns.events", "payment.failed").expect_err("mismatch");
        assert_eq!(wrong.kind(), choreo_messages::ErrorKind::UnknownType);
        assert!(wrong.to_string().contains("routing key `order.place`"), "{wrong}");
        // Back from a delay queue or a replay: the default exchange, the key it was first published with.
        let origin = |exchange: &str, key: &str| {
            let mut h = FieldTable::default();
            h.insert(crate::dead_letter::headers::ORIGINAL_EXCHANGE.into(), long(exchange));
            h.insert(crate::dead_letter::headers::ORIGINAL_ROUTING_KEY.into(), long(key));
            BasicProperties::default().with_headers(h)
        };
        let parked = origin("ns.events", "order.place");
        assert!(check_routing_key("", "ns.order", &parked, "ns.events", "order.place").is_ok());
        assert!(check_routing_key("", "ns.order", &parked, "ns.events", "payment.failed").is_err());
        // Published straight to the queue, now or before it was parked or replayed: nothing to compare.
        assert!(check_routing_key("", "ns.order", &none, "ns.events", "payment.failed").is_ok());
        assert!(check_routing_key("", "ns.order", &origin("", "ns.order"), "ns.events", "order.place").is_ok());
    }
    use choreo_messages::payloads::OrderConfirmed;
    use choreo_messages::{ErrorKind, Message};
    use lapin::types::ByteArray;

    fn envelope() -> Envelope {
        let message = Message::OrderConfirmed(OrderConfirmed {
            order_id: Uuid::now_v7(),
            total_cents: 10,
            currency: "EUR".into(),
        });
        let cause = Envelope::new_command(message.clone(), "client", None);
        let mut e = Envelope::caused_by(&cause.meta, message, "order");
        e.meta.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        e
    }

    #[test]
    fn metadata_round_trips_through_properties() {
        let e = envelope();
        let encoded = e.encode();
        let props = properties_for(&encoded.meta);
        let decoded = decode_delivery(&props, &encoded.body, 1024).expect("decode");
        assert_eq!(decoded, e);
    }

    #[test]
    fn headers_from_other_clients_are_understood() {
        let e = envelope().encode();
        let mut table = FieldTable::default();
        table.insert(headers::SCHEMA_VERSION.into(), AMQPValue::ShortShortUInt(1));
        table.insert(headers::PRODUCER.into(), AMQPValue::ByteArray(ByteArray::from(b"python".to_vec())));
        let props = properties_for(&e.meta).with_headers(table);
        let meta = metadata_from(&props).expect("meta");
        assert_eq!(meta.schema_version, 1);
        assert_eq!(meta.producer, "python");
        assert_eq!(meta.causation_id, None);
    }

    #[test]
    fn bad_input_is_classified() {
        let e = envelope().encode();
        let props = properties_for(&e.meta);
        let kind =
            |p: &BasicProperties, body: &[u8], max| decode_delivery::<Message>(p, body, max).expect_err("bad").kind();
        assert_eq!(kind(&props, &e.body, 4), ErrorKind::Oversized);
        assert_eq!(kind(&BasicProperties::default(), &e.body, 1024), ErrorKind::WrongContentType);
        let no_id = BasicProperties::default().with_content_type("application/json".into());
        assert_eq!(kind(&no_id, &e.body, 1024), ErrorKind::MissingMetadata);
        let text = props.clone().with_content_type("text/plain".into());
        assert_eq!(kind(&text, &e.body, 1024), ErrorKind::WrongContentType);
        assert_eq!(kind(&props, b"\xff\xfe garbage", 1024), ErrorKind::MalformedBody);
        let unknown = props.clone().with_type("order.teleport".into());
        assert_eq!(kind(&unknown, &e.body, 1024), ErrorKind::UnknownType);
        let charset = props.with_content_type("application/json; charset=utf-8".into());
        assert!(decode_delivery::<Message>(&charset, &e.body, 1024).is_ok());
    }
}
