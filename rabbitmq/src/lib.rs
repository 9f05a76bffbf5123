//! RabbitMQ for choreo.
//!
//! - [`connection`]: the connection pool (deadpool-lapin) every part of a process shares;
//! - [`topology`]: names of exchanges and queues, and their idempotent declaration;
//! - [`codec`]: the contract's metadata in AMQP properties and headers, both ways;
//! - [`publisher`]: [`ConfirmingPublisher`], publisher confirms plus the mandatory flag;
//! - [`consumer`]: [`ConsumerRunner`], bounded prefetch and concurrency, ack only after the handler is done;
//! - [`dead_letter`]: how a message the consumer gives up on reaches the dead-letter queue with its story.
//!
//! **Architecture invariant**: handlers never see a channel. They get an [`choreo_messages::Envelope`] and return
//! an [`consumer::Outcome`]; acking, dead-lettering and reconnecting are this crate's business.

pub mod codec;
pub mod connection;
pub mod consumer;
pub mod dead_letter;
pub mod error;
pub mod publisher;
pub mod topology;

pub use connection::{BrokerPool, connect_pool};
pub use consumer::{ConsumerConfig, ConsumerRunner, Handler, Outcome};
pub use error::{BrokerError, PublishError, TopologyError};
pub use publisher::ConfirmingPublisher;
pub use topology::{Topology, WorkerQueue};

/// Re-exported so that users of this crate name one lapin version.
pub use lapin;
