//! choreo: choreographed, message-driven workers over RabbitMQ, each with its own PostgreSQL database.
//!
//! A participant is a worker that consumes some message types and emits others. It writes its handler
//! against this crate, and the runtime gives every message the same guarantees: the handler's state change,
//! the message's inbox record and the events it causes commit together (a transactional outbox); a relay
//! publishes the events with publisher confirms; a message id is applied once; transient failures are
//! retried in process, then through delay queues, then dead-lettered with their story; bad input is
//! dead-lettered at once; `/metrics`, `/health/live` and `/health/ready` are served; SIGTERM drains.
//!
//! - **Message types** — [`Payload`] for one command or event, [`contract!`] for the set a worker knows
//!   ([`Contract`]), [`Envelope`] for a message with its [`Metadata`].
//! - **Handlers** — [`PlainHandler`]: sqlx work in the transaction the runtime opened, events returned.
//!   [`Service`]: the advanced path for hot paths, a change as one statement ([`Change`]) decided for a
//!   batch of waiting deliveries at once.
//! - **Running** — [`Settings`] (flags and environment, checked at start), [`prepare_database`],
//!   [`run_plain_worker`] / [`run_worker`], [`shutdown_on_signals`], [`init_telemetry`]; or all of it at
//!   once with [`serve_plain`].
//! - **Contract documents** — [`AsyncApi`]: the AsyncAPI 3.0 document of a namespace, from what its
//!   participants declare.
//!
//! ```no_run
//! use choreo::schemars::JsonSchema;
//! use choreo::serde::{Deserialize, Serialize};
//! use choreo::sqlx::PgConnection;
//! use choreo::{Envelope, Migrations, Payload, PlainHandler, ServiceError, contract};
//!
//! /// Event `order.confirmed`, as this participant reads it.
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
//! #[serde(crate = "choreo::serde")]
//! #[schemars(crate = "choreo::schemars")]
//! struct OrderConfirmed {
//!     order_id: choreo::uuid::Uuid,
//! }
//!
//! impl Payload for OrderConfirmed {
//!     const TYPE: &'static str = "order.confirmed";
//! }
//!
//! contract! {
//!     /// What the audit worker reads.
//!     enum Audit { OrderConfirmed(OrderConfirmed) }
//! }
//!
//! struct AuditHandler;
//!
//! impl PlainHandler for AuditHandler {
//!     type Message = Audit;
//!     const NAME: &'static str = "audit";
//!     const CONSUMES: &'static [&'static str] = &[OrderConfirmed::TYPE];
//!
//!     async fn handle(&self, tx: &mut PgConnection, message: &Envelope<Audit>) -> Result<Vec<Audit>, ServiceError> {
//!         let Audit::OrderConfirmed(confirmed) = &message.message;
//!         choreo::sqlx::query("INSERT INTO audit (order_id) VALUES ($1)").bind(confirmed.order_id).execute(&mut *tx).await?;
//!         Ok(Vec::new())
//!     }
//! }
//!
//! static MIGRATIONS: Migrations = Migrations::new(&[(20260101000001, "audit", "CREATE TABLE audit (order_id UUID)")]);
//!
//! #[choreo::tokio::main(crate = "choreo::tokio")]
//! async fn main() -> choreo::anyhow::Result<()> {
//!     let (settings, database_url) = choreo::Settings::parse_for("audit");
//!     choreo::serve_plain(AuditHandler, &MIGRATIONS, settings, database_url).await
//! }
//! ```

#![warn(missing_docs)]

mod asyncapi;
mod connections;
mod health;
mod migrations;
mod plain;
mod runtime;
mod service;
mod settings;
mod telemetry;

pub use choreo_messages::contract::{Contract, Payload, TypeSchema};
pub use choreo_messages::{DecodeError, EncodedEnvelope, Envelope, ErrorKind, Metadata, contract, headers};
pub use choreo_outbox::Change;
pub use choreo_rabbitmq::{Handler, Outcome};

pub use asyncapi::{AsyncApi, AsyncApiError};
pub use migrations::Migrations;
pub use plain::{PlainHandler, PlainRunner};
pub use runtime::{
    CLOSE_ALLOWANCE, WorkerHandle, check_settings, prepare_database, run_plain_worker, run_worker, serve_plain,
    shutdown_on_signals,
};
pub use service::{Effects, HandlerCounters, Observation, Service, ServiceError, TransactionalHandler};
pub use settings::Settings;
pub use telemetry::{LogFormat, TelemetryGuard, init as init_telemetry};

/// Crates a participant needs, re-exported so that it depends on this crate alone (derives take
/// `#[serde(crate = "choreo::serde")]`, `#[schemars(crate = "choreo::schemars")]` and
/// `#[choreo::tokio::main(crate = "choreo::tokio")]`).
pub use {anyhow, schemars, serde, serde_json, sqlx, tokio, tracing, uuid};
