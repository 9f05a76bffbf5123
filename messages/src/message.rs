//! [`Message`]: every body of the contract in one type, and strict decoding by type and schema version.

use std::str::FromStr;

use crate::DecodeError;
use crate::contract::{Contract, Payload, TypeSchema, decode_payload, encode_payload};
use crate::payloads::*;

/// Every message type of the contract. The string form is both the AMQP `type` and the routing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MessageType {
    OrderPlace,
    OrderCreated,
    PaymentSucceeded,
    PaymentFailed,
    InventoryReserved,
    InventoryFailed,
    PaymentRefunded,
    OrderConfirmed,
    OrderCancelled,
}

impl MessageType {
    pub const ALL: [MessageType; 9] = [
        MessageType::OrderPlace,
        MessageType::OrderCreated,
        MessageType::PaymentSucceeded,
        MessageType::PaymentFailed,
        MessageType::InventoryReserved,
        MessageType::InventoryFailed,
        MessageType::PaymentRefunded,
        MessageType::OrderConfirmed,
        MessageType::OrderCancelled,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            MessageType::OrderPlace => "order.place",
            MessageType::OrderCreated => "order.created",
            MessageType::PaymentSucceeded => "payment.succeeded",
            MessageType::PaymentFailed => "payment.failed",
            MessageType::InventoryReserved => "inventory.reserved",
            MessageType::InventoryFailed => "inventory.failed",
            MessageType::PaymentRefunded => "payment.refunded",
            MessageType::OrderConfirmed => "order.confirmed",
            MessageType::OrderCancelled => "order.cancelled",
        }
    }

    /// `text` as a metrics label: the type's name when it is one of the contract, else `unknown`, so that
    /// whatever a client sends cannot multiply label values.
    pub fn label_for(text: &str) -> &'static str {
        text.parse::<MessageType>().map(MessageType::as_str).unwrap_or("unknown")
    }

    /// The schema version this build produces and accepts. A breaking change to a body is a new version;
    /// consumers are upgraded to accept it before producers start sending it.
    pub const fn schema_version(self) -> u32 {
        1
    }
}

impl std::fmt::Display for MessageType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MessageType {
    type Err = DecodeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MessageType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| DecodeError::UnknownType(s.chars().take(128).collect()))
    }
}

/// A body of the contract.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    OrderPlace(PlaceOrder),
    OrderCreated(OrderCreated),
    PaymentSucceeded(PaymentSucceeded),
    PaymentFailed(PaymentFailed),
    InventoryReserved(InventoryReserved),
    InventoryFailed(InventoryFailed),
    PaymentRefunded(PaymentRefunded),
    OrderConfirmed(OrderConfirmed),
    OrderCancelled(OrderCancelled),
}

impl Message {
    pub fn message_type(&self) -> MessageType {
        match self {
            Message::OrderPlace(_) => MessageType::OrderPlace,
            Message::OrderCreated(_) => MessageType::OrderCreated,
            Message::PaymentSucceeded(_) => MessageType::PaymentSucceeded,
            Message::PaymentFailed(_) => MessageType::PaymentFailed,
            Message::InventoryReserved(_) => MessageType::InventoryReserved,
            Message::InventoryFailed(_) => MessageType::InventoryFailed,
            Message::PaymentRefunded(_) => MessageType::PaymentRefunded,
            Message::OrderConfirmed(_) => MessageType::OrderConfirmed,
            Message::OrderCancelled(_) => MessageType::OrderCancelled,
        }
    }

    /// The order every message of the workflow is about.
    pub fn order_id(&self) -> uuid::Uuid {
        match self {
            Message::OrderPlace(m) => m.order_id,
            Message::OrderCreated(m) => m.order_id,
            Message::PaymentSucceeded(m) => m.order_id,
            Message::PaymentFailed(m) => m.order_id,
            Message::InventoryReserved(m) => m.order_id,
            Message::InventoryFailed(m) => m.order_id,
            Message::PaymentRefunded(m) => m.order_id,
            Message::OrderConfirmed(m) => m.order_id,
            Message::OrderCancelled(m) => m.order_id,
        }
    }

    /// The body as JSON.
    pub fn to_json(&self) -> Vec<u8> {
        match self {
            Message::OrderPlace(m) => encode_payload(m),
            Message::OrderCreated(m) => encode_payload(m),
            Message::PaymentSucceeded(m) => encode_payload(m),
            Message::PaymentFailed(m) => encode_payload(m),
            Message::InventoryReserved(m) => encode_payload(m),
            Message::InventoryFailed(m) => encode_payload(m),
            Message::PaymentRefunded(m) => encode_payload(m),
            Message::OrderConfirmed(m) => encode_payload(m),
            Message::OrderCancelled(m) => encode_payload(m),
        }
    }

    /// Decode a body of type `message_type` at `version`, rejecting anything the contract does not allow.
    pub fn decode(message_type: MessageType, version: u32, body: &[u8]) -> Result<Message, DecodeError> {
        Ok(match message_type {
            MessageType::OrderPlace => Message::OrderPlace(decode_payload(version, body)?),
            MessageType::OrderCreated => Message::OrderCreated(decode_payload(version, body)?),
            MessageType::PaymentSucceeded => Message::PaymentSucceeded(decode_payload(version, body)?),
            MessageType::PaymentFailed => Message::PaymentFailed(decode_payload(version, body)?),
            MessageType::InventoryReserved => Message::InventoryReserved(decode_payload(version, body)?),
            MessageType::InventoryFailed => Message::InventoryFailed(decode_payload(version, body)?),
            MessageType::PaymentRefunded => Message::PaymentRefunded(decode_payload(version, body)?),
            MessageType::OrderConfirmed => Message::OrderConfirmed(decode_payload(version, body)?),
            MessageType::OrderCancelled => Message::OrderCancelled(decode_payload(version, body)?),
        })
    }
}

/// The reference workflow's contract, for the generic runtime.
impl Contract for Message {
    const TYPES: &'static [&'static str] = &[
        PlaceOrder::TYPE,
        OrderCreated::TYPE,
        PaymentSucceeded::TYPE,
        PaymentFailed::TYPE,
        InventoryReserved::TYPE,
        InventoryFailed::TYPE,
        PaymentRefunded::TYPE,
        OrderConfirmed::TYPE,
        OrderCancelled::TYPE,
    ];

    fn type_name(&self) -> &'static str {
        self.message_type().as_str()
    }

    fn schema_version(&self) -> u32 {
        self.message_type().schema_version()
    }

    fn decode(type_name: &str, version: u32, body: &[u8]) -> Result<Self, DecodeError> {
        Message::decode(type_name.parse()?, version, body)
    }

    fn to_json(&self) -> Vec<u8> {
        Message::to_json(self)
    }

    fn entity_id(&self) -> Option<uuid::Uuid> {
        Some(self.order_id())
    }

    fn schemas() -> Vec<TypeSchema> {
        MessageType::ALL.into_iter().map(crate::schema::type_schema).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EncodedEnvelope, Envelope, ErrorKind};
    use uuid::Uuid;

    fn line(sku: &str, quantity: u32, price: i64) -> OrderLine {
        OrderLine { sku: sku.into(), quantity, unit_price_cents: price }
    }

    fn samples() -> Vec<Message> {
        let order_id = Uuid::now_v7();
        let lines = vec![line("sku-1", 2, 1250), line("sku-2", 1, 99)];
        vec![
            Message::OrderPlace(PlaceOrder {
                order_id,
                customer_id: "cust-1".into(),
                currency: "EUR".into(),
                lines: lines.clone(),
            }),
            Message::OrderCreated(OrderCreated {
                order_id,
                customer_id: "cust-1".into(),
                currency: "EUR".into(),
                lines: lines.clone(),
                total_cents: 2599,
            }),
            Message::PaymentSucceeded(PaymentSucceeded {
                order_id,
                payment_id: Uuid::now_v7(),
                amount_cents: 2599,
                currency: "EUR".into(),
                lines: lines.clone(),
            }),
            Message::PaymentFailed(PaymentFailed { order_id, reason: PaymentFailureReason::CardDeclined }),
            Message::InventoryReserved(InventoryReserved { order_id, lines }),
            Message::InventoryFailed(InventoryFailed {
                order_id,
                reason: InventoryFailureReason::OutOfStock,
                sku: "sku-2".into(),
            }),
            Message::PaymentRefunded(PaymentRefunded {
                order_id,
                payment_id: Uuid::now_v7(),
                amount_cents: 2599,
                currency: "EUR".into(),
                reason: InventoryFailureReason::OutOfStock,
            }),
            Message::OrderConfirmed(OrderConfirmed { order_id, total_cents: 2599, currency: "EUR".into() }),
            Message::OrderCancelled(OrderCancelled { order_id, reason: CancelReason::OutOfStock }),
        ]
    }

    #[test]
    fn every_message_type_round_trips_through_its_encoding() {
        let samples = samples();
        assert_eq!(samples.len(), MessageType::ALL.len(), "a sample per type");
        for message in samples {
            let envelope = Envelope::new_command(message.clone(), "test", None);
            let decoded = envelope.encode().decode().expect("round trip");
            assert_eq!(decoded, envelope);
            assert_eq!(decoded.meta.message_type, message.message_type().as_str());
            assert_eq!(decoded.meta.message_type.parse::<MessageType>().ok(), Some(message.message_type()));
        }
    }

    #[test]
    fn caused_by_keeps_the_workflow_and_names_the_cause() {
        let cause = Envelope::new_command(samples().remove(0), "client", None);
        let effect = Envelope::caused_by(&cause.meta, samples().remove(1), "order");
        assert_eq!(effect.meta.correlation_id, cause.meta.correlation_id);
        assert_eq!(effect.meta.causation_id, Some(cause.meta.message_id));
        assert_ne!(effect.meta.message_id, cause.meta.message_id);
        assert_eq!(effect.meta.message_id.get_version_num(), 7);
    }

    fn decode_place(body: &str) -> Result<Message, DecodeError> {
        Message::decode(MessageType::OrderPlace, 1, body.as_bytes())
    }

    const GOOD: &str = r#"{"order_id":"0190b8a0-0000-7000-8000-000000000001","customer_id":"c","currency":"EUR","lines":[{"sku":"s","quantity":1,"unit_price_cents":5}]}"#;

    #[test]
    fn a_valid_body_decodes() {
        assert!(decode_place(GOOD).is_ok());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let body = GOOD.replacen("{", r#"{"extra":1,"#, 1);
        let err = decode_place(&body).expect_err("unknown field");
        assert_eq!(err.kind(), ErrorKind::MalformedBody);
        assert!(err.to_string().contains("unknown field `extra`"), "{err}");
    }

    #[test]
    fn broken_json_and_missing_fields_are_malformed() {
        for body in ["{", "", "\u{0}\u{1}", "[]", r#"{"order_id":"x"}"#] {
            assert_eq!(decode_place(body).expect_err(body).kind(), ErrorKind::MalformedBody, "{body}");
        }
    }

    #[test]
    fn unknown_type_and_version_are_rejected() {
        assert_eq!("order.teleport".parse::<MessageType>().expect_err("type").kind(), ErrorKind::UnknownType);
        assert_eq!(MessageType::label_for("order.teleport"), "unknown");
        assert_eq!(MessageType::label_for("order.place"), "order.place");
        let err = Message::decode(MessageType::OrderPlace, 2, GOOD.as_bytes()).expect_err("version");
        assert_eq!(err.kind(), ErrorKind::UnsupportedSchemaVersion);
    }

    #[test]
    fn business_rules_are_validated() {
        let cases = [
            GOOD.replace(r#""lines":[{"sku":"s","quantity":1,"unit_price_cents":5}]"#, r#""lines":[]"#),
            GOOD.replace(r#""quantity":1"#, r#""quantity":0"#),
            GOOD.replace(r#""unit_price_cents":5"#, r#""unit_price_cents":-5"#),
            GOOD.replace(r#""currency":"EUR""#, r#""currency":"euro""#),
            GOOD.replace(r#""customer_id":"c""#, r#""customer_id":"""#),
        ];
        for body in cases {
            let err = decode_place(&body).expect_err(&body);
            assert_eq!(err.kind(), ErrorKind::ValidationFailed, "{body}: {err}");
        }
    }

    #[test]
    fn encoded_envelope_with_unknown_type_fails_to_decode() {
        let mut encoded = Envelope::new_command(samples().remove(0), "t", None).encode();
        encoded.meta.message_type = "nope".into();
        let err: DecodeError = EncodedEnvelope::decode::<Message>(encoded).expect_err("unknown");
        assert_eq!(err.kind(), ErrorKind::UnknownType);
    }
}
