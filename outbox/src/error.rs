/// A failure of the outbox or inbox. Database failures are transient from the caller's point of view.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox database operation `{operation}` failed: {source}")]
    Database {
        operation: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("outbox row {id} cannot be published: {reason}")]
    CorruptRow { id: i64, reason: String },
}

impl OutboxError {
    pub(crate) fn db(operation: &'static str) -> impl FnOnce(sqlx::Error) -> OutboxError {
        move |source| OutboxError::Database { operation, source }
    }
}
