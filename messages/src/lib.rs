//! Wire contracts of choreo.
//!
//! Everything that crosses the broker is defined here and nowhere else:
//!
//! - [`envelope`]: the metadata that travels beside every body (ids, type, schema version, producer, time,
//!   trace context) and the names of the AMQP headers that carry it;
//! - [`payloads`]: the body of every command and event of the order workflow, with validation;
//! - [`message`]: [`Message`], the union of all payloads, and strict decoding by type and schema version;
//! - [`schema`]: JSON Schemas generated from these types (checked in under `messages/schema/`).
//!
//! The human-readable contract is `docs/contract.md`.

pub mod contract;
pub mod envelope;
pub mod error;
pub mod message;
pub mod payloads;
pub mod schema;

pub use contract::{Contract, Payload, TypeSchema};
pub use envelope::{EncodedEnvelope, Envelope, Metadata, headers};
pub use error::{DecodeError, ErrorKind};
pub use message::{Message, MessageType};
