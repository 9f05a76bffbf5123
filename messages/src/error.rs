//! Why an incoming message could not be turned into a [`crate::Envelope`].

/// A short, stable code for a failure, used in dead-letter headers, metrics labels and the admin CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The body is not JSON, or not the JSON the type requires.
    MalformedBody,
    /// The `content_type` property is missing or not `application/json`.
    WrongContentType,
    /// A required property or header is missing or unreadable.
    MissingMetadata,
    /// The `type` property names no message of the contract.
    UnknownType,
    /// The schema version is not one this build understands.
    UnsupportedSchemaVersion,
    /// The body parsed but breaks a rule of the contract (empty order, negative quantity...).
    ValidationFailed,
    /// The body is larger than the configured maximum.
    Oversized,
    /// A handler failed on a dependency that may recover (database, broker, gateway).
    Transient,
    /// A handler failed in a way that no retry will fix.
    Permanent,
    /// The worker stopped (crashed, was killed, hung until restarted) while handling it, again and again.
    Crashed,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 10] = [
        ErrorKind::MalformedBody,
        ErrorKind::WrongContentType,
        ErrorKind::MissingMetadata,
        ErrorKind::UnknownType,
        ErrorKind::UnsupportedSchemaVersion,
        ErrorKind::ValidationFailed,
        ErrorKind::Oversized,
        ErrorKind::Transient,
        ErrorKind::Permanent,
        ErrorKind::Crashed,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::MalformedBody => "malformed_body",
            ErrorKind::WrongContentType => "wrong_content_type",
            ErrorKind::MissingMetadata => "missing_metadata",
            ErrorKind::UnknownType => "unknown_type",
            ErrorKind::UnsupportedSchemaVersion => "unsupported_schema_version",
            ErrorKind::ValidationFailed => "validation_failed",
            ErrorKind::Oversized => "oversized",
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
            ErrorKind::Crashed => "crashed",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message that breaks the contract. Every variant is permanent: redelivering it cannot help.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("body is not valid JSON for `{message_type}`: {source}")]
    MalformedBody {
        message_type: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("content type must be `application/json`, got `{0}`")]
    WrongContentType(String),
    #[error("missing or unreadable {0}")]
    MissingMetadata(&'static str),
    #[error("unknown message type `{0}`")]
    UnknownType(String),
    /// Published to the events exchange with a routing key other than its type: it reached a queue bound
    /// for another type, and handling it as its `type` would act on what no one sent that queue.
    #[error("type `{message_type}` was published with routing key `{routing_key}`; the routing key must be the type")]
    TypeNotRoutingKey { message_type: String, routing_key: String },
    #[error("`{message_type}` schema version {version} is not supported (supported: {supported})")]
    UnsupportedSchemaVersion { message_type: String, version: u32, supported: u32 },
    #[error("`{message_type}` is invalid: {reason}")]
    ValidationFailed { message_type: String, reason: String },
    #[error("body of {size} bytes exceeds the maximum of {max} bytes")]
    Oversized { size: usize, max: usize },
}

impl DecodeError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            DecodeError::MalformedBody { .. } => ErrorKind::MalformedBody,
            DecodeError::WrongContentType(_) => ErrorKind::WrongContentType,
            DecodeError::MissingMetadata(_) => ErrorKind::MissingMetadata,
            DecodeError::UnknownType(_) | DecodeError::TypeNotRoutingKey { .. } => ErrorKind::UnknownType,
            DecodeError::UnsupportedSchemaVersion { .. } => ErrorKind::UnsupportedSchemaVersion,
            DecodeError::ValidationFailed { .. } => ErrorKind::ValidationFailed,
            DecodeError::Oversized { .. } => ErrorKind::Oversized,
        }
    }
}
