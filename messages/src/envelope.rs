//! The metadata that travels beside every body, and its place in AMQP.
//!
//! On the wire the body is the bare payload JSON. The metadata rides in AMQP properties (`message_id`,
//! `correlation_id`, `type`, `content_type`, `timestamp`) and in the headers named in [`headers`].

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{Contract, DecodeError, Message};

/// Names of the AMQP headers of the contract.
pub mod headers {
    /// Schema version of the body, an integer (required).
    pub const SCHEMA_VERSION: &str = "schema-version";
    /// Message id of the message that caused this one (absent on commands from clients).
    pub const CAUSATION_ID: &str = "causation-id";
    /// Name of the service that produced the message.
    pub const PRODUCER: &str = "producer";
    /// RFC 3339 time at which the producer created the message (we write microseconds).
    pub const OCCURRED_AT: &str = "occurred-at";
    /// W3C trace context of the producer.
    pub const TRACEPARENT: &str = "traceparent";
}

/// The only content type of the contract.
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// Everything about a message except its body.
#[derive(Debug, Clone, PartialEq)]
pub struct Metadata {
    /// Unique id of this message; consumers deduplicate on it. UUIDv7 when we produce it.
    pub message_id: Uuid,
    /// The contract type, also the routing key (`order.created`).
    pub message_type: String,
    pub schema_version: u32,
    /// The workflow this message belongs to: every message of one order carries the same id.
    pub correlation_id: Uuid,
    /// The message that caused this one.
    pub causation_id: Option<Uuid>,
    pub producer: String,
    pub occurred_at: DateTime<Utc>,
    pub traceparent: Option<String>,
}

/// A decoded message: metadata and a typed payload of contract `M` (the reference workflow's by default).
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope<M = Message> {
    /// Ids, type, version, producer, time and trace context.
    pub meta: Metadata,
    /// The body, decoded.
    pub message: M,
}

/// A message ready for the wire: metadata and the serialised body. The outbox stores this form.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedEnvelope {
    pub meta: Metadata,
    pub body: Vec<u8>,
}

impl<M: Contract> Envelope<M> {
    /// A message that starts a workflow: its correlation id is its own id unless one is given.
    pub fn new_command(message: M, producer: &str, correlation_id: Option<Uuid>) -> Self {
        let message_id = Uuid::now_v7();
        Envelope {
            meta: Metadata {
                message_id,
                message_type: message.type_name().to_owned(),
                schema_version: message.schema_version(),
                correlation_id: correlation_id.unwrap_or(message_id),
                causation_id: None,
                producer: producer.to_owned(),
                occurred_at: now_micros(),
                traceparent: None,
            },
            message,
        }
    }

    /// A message caused by `cause`: same workflow, same trace, `cause` as causation.
    pub fn caused_by(cause: &Metadata, message: M, producer: &str) -> Self {
        Envelope {
            meta: Metadata {
                message_id: Uuid::now_v7(),
                message_type: message.type_name().to_owned(),
                schema_version: message.schema_version(),
                correlation_id: cause.correlation_id,
                causation_id: Some(cause.message_id),
                producer: producer.to_owned(),
                occurred_at: now_micros(),
                traceparent: cause.traceparent.clone(),
            },
            message,
        }
    }

    /// The wire form: the same metadata and the body as JSON.
    pub fn encode(&self) -> EncodedEnvelope {
        EncodedEnvelope { meta: self.meta.clone(), body: self.message.to_json() }
    }
}

impl EncodedEnvelope {
    /// Strict decoding: the type must be known, the version supported, the body exactly the contract's.
    pub fn decode<M: Contract>(self) -> Result<Envelope<M>, DecodeError> {
        let message = M::decode(&self.meta.message_type, self.meta.schema_version, &self.body)?;
        Ok(Envelope { meta: self.meta, message })
    }
}

/// Now, at the precision the wire and PostgreSQL keep (microseconds), so a round trip is exact.
fn now_micros() -> DateTime<Utc> {
    use chrono::SubsecRound;
    Utc::now().trunc_subsecs(6)
}
