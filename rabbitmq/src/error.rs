//! Typed errors of the broker layer.

/// The broker could not be reached or refused an operation.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot get a broker connection from the pool: {0}")]
    Pool(String),
    #[error("broker operation `{operation}` failed: {source}")]
    Amqp {
        operation: &'static str,
        #[source]
        source: lapin::Error,
    },
}

impl BrokerError {
    pub(crate) fn amqp(operation: &'static str) -> impl FnOnce(lapin::Error) -> BrokerError {
        move |source| BrokerError::Amqp { operation, source }
    }
}

/// A publish that did not end in a positive confirm. The message may or may not be on the broker
/// (after a timeout it is unknown): callers publish again later and consumers deduplicate.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(
        "message {message_id} was returned unroutable by exchange `{exchange}` with routing key `{routing_key}`: {reply}"
    )]
    Unroutable { message_id: String, exchange: String, routing_key: String, reply: String },
    #[error("message {message_id} was negatively acknowledged by the broker")]
    Nacked { message_id: String },
    #[error("no confirm for message {message_id} within {timeout_ms} ms: outcome unknown, it will be published again")]
    ConfirmTimeout { message_id: String, timeout_ms: u128 },
}

/// Declaring the topology failed.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(
        "{kind} `{name}` already exists with different arguments: {detail}.\n\
         What to do: {remedy} See runbooks/topology-mismatch.md."
    )]
    Mismatch { kind: &'static str, name: String, detail: String, remedy: &'static str },
}
