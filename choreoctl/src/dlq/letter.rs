//! [`DeadLetter`]: one message of a dead-letter queue, with the story its headers tell.

use chrono::{DateTime, Utc};
use choreo_rabbitmq::codec::{header_i64, header_string};
use choreo_rabbitmq::dead_letter::headers as dl;
use choreo_rabbitmq::lapin::message::Delivery;
use choreo_rabbitmq::lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;

/// What an operator needs to know about a dead letter.
#[derive(Debug, Clone, Serialize)]
pub struct Story {
    pub message_id: Option<String>,
    pub message_type: Option<String>,
    pub correlation_id: Option<String>,
    pub worker: Option<String>,
    pub error_kind: String,
    pub error: Option<String>,
    pub attempts: Option<i64>,
    pub original_exchange: Option<String>,
    pub original_routing_key: Option<String>,
    pub first_failure_at: Option<DateTime<Utc>>,
    pub last_failure_at: Option<DateTime<Utc>>,
    pub replayed_at: Option<String>,
    pub body_bytes: usize,
}

/// The story of a delivery from a dead-letter queue. Messages the broker dead-lettered itself (delivery
/// limit) carry `x-death` instead of our headers: their kind is `delivery_limit`.
pub fn story(delivery: &Delivery) -> Story {
    let empty = FieldTable::default();
    let h = delivery.properties.headers().as_ref().unwrap_or(&empty);
    let death = first_death(h);
    let time = |key: &str| header_string(h, key).and_then(|t| DateTime::parse_from_rfc3339(&t).ok()).map(|t| t.with_timezone(&Utc));
    let death_string = |key: &str| death.and_then(|d| header_string(d, key));
    let death_time = death.and_then(|d| match d.inner().get("time") {
        Some(AMQPValue::Timestamp(t)) => DateTime::from_timestamp(i64::try_from(*t).ok()?, 0),
        _ => None,
    });
    Story {
        message_id: delivery.properties.message_id().as_ref().map(|m| m.to_string()),
        message_type: delivery.properties.kind().as_ref().map(|m| m.to_string()),
        correlation_id: delivery.properties.correlation_id().as_ref().map(|m| m.to_string()),
        worker: header_string(h, dl::WORKER),
        error_kind: header_string(h, dl::ERROR_KIND)
            .or_else(|| death_string("reason").map(|r| if r == "delivery_limit" { r } else { format!("broker_{r}") }))
            .unwrap_or_else(|| "unknown".into()),
        error: header_string(h, dl::ERROR),
        attempts: header_i64(h, dl::ATTEMPTS).or_else(|| death.and_then(|d| header_i64(d, "count"))),
        original_exchange: header_string(h, dl::ORIGINAL_EXCHANGE).or_else(|| death_string("exchange")),
        original_routing_key: header_string(h, dl::ORIGINAL_ROUTING_KEY).or_else(|| death.and_then(first_routing_key)),
        first_failure_at: time(dl::FIRST_FAILURE_AT).or(death_time),
        last_failure_at: time(dl::LAST_FAILURE_AT).or(death_time),
        replayed_at: header_string(h, dl::REPLAYED_AT),
        body_bytes: delivery.data.len(),
    }
}

fn first_death(h: &FieldTable) -> Option<&FieldTable> {
    match h.inner().get("x-death")? {
        AMQPValue::FieldArray(deaths) => deaths.as_slice().iter().find_map(|d| match d {
            AMQPValue::FieldTable(t) => Some(t),
            _ => None,
        }),
        _ => None,
    }
}

fn first_routing_key(death: &FieldTable) -> Option<String> {
    match death.inner().get("routing-keys")? {
        AMQPValue::FieldArray(keys) => keys.as_slice().iter().find_map(|k| match k {
            AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            _ => None,
        }),
        _ => None,
    }
}

/// The body for people: pretty JSON when it is JSON, text when it is UTF-8, else a hex dump of the start.
pub fn render_body(body: &[u8]) -> String {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
        return serde_json::to_string_pretty(&value).unwrap_or_default();
    }
    match std::str::from_utf8(body) {
        Ok(text) => text.to_owned(),
        Err(_) => {
            let hex: Vec<String> = body.iter().take(256).map(|b| format!("{b:02x}")).collect();
            format!("<{} bytes of binary> {}{}", body.len(), hex.join(" "), if body.len() > 256 { " ..." } else { "" })
        }
    }
}
