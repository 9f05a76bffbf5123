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

/// Why [`crate::InboxGuard::commit`] wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// A handled message's id is in the inbox: it was processed before, and that is committed.
    #[error("a handled message was processed before")]
    ProcessedBefore,
    /// The change collides with a row already in place (a unique key other than the inbox's).
    #[error("the change collides with a row in place: {0}")]
    Conflict(sqlx::Error),
    /// The rows the change was decided on changed before it was written (the change found so and raised
    /// `serialization_failure`), or the database broke a deadlock by aborting the statement: deciding again,
    /// on fresh reads, may succeed.
    #[error("the change was decided on rows that changed meanwhile: {0}")]
    Stale(sqlx::Error),
    /// Events are written under keys, but the change names no keys it applied (see
    /// [`crate::Change::applied`]): they could never be written. A defect of the service; nothing was sent.
    #[error("events are written under keys, but the change names no keys it applied")]
    UnappliedKeys,
    #[error(transparent)]
    Database(OutboxError),
}

impl CommitError {
    pub(crate) fn of(e: sqlx::Error) -> CommitError {
        let Some(db) = e.as_database_error() else {
            return CommitError::Database(OutboxError::Database { operation: "commit handled messages", source: e });
        };
        if db.is_unique_violation() {
            return if db.constraint() == Some("inbox_pkey") {
                CommitError::ProcessedBefore
            } else {
                CommitError::Conflict(e)
            };
        }
        match db.code().as_deref() {
            Some("40001" | "40P01") => CommitError::Stale(e),
            _ => CommitError::Database(OutboxError::Database { operation: "commit handled messages", source: e }),
        }
    }
}
