//! The transactional outbox and the idempotent inbox.
//!
//! - [`inbox`]: [`InboxGuard`] commits a handler's work in one statement: its [`Change`], the message ids
//!   in the inbox (a second delivery of the same id finds it and has no effect) and the events in the outbox;
//! - [`change`]: [`Change`], a service's change to its own tables, as expressions of that statement;
//! - [`store`]: [`OutboxStore`] claims, marks and inspects rows for the relay, and writes events for code
//!   that commits them in a transaction of its own (handlers write theirs through [`InboxGuard`]);
//! - [`relay`]: [`OutboxRelay`] publishes committed rows with confirms and marks them only after the confirm:
//!   rows its own process hands off ([`OutboxHandoff`]) at once, others by a periodic sweep;
//! - [`retention`]: [`RetentionJob`] deletes published outbox rows and old inbox rows in batches;
//! - [`migrations`]: the tables, to be combined with a service's own migrations into one set per database.
//!
//! **Architecture invariant**: only the relay publishes domain events. Handlers write to the outbox; what they
//! write is on the broker only once their transaction committed.

pub mod change;
pub mod database;
pub mod error;
pub mod inbox;
pub mod migrations;
pub mod pool;
pub mod relay;
pub mod retention;
pub mod store;

pub use change::Change;
pub use database::service_database;
pub use error::{CommitError, OutboxError};
pub use inbox::InboxGuard;
pub use pool::hot_path_pool_options;
pub use relay::{OutboxHandoff, OutboxRelay, RelayConfig};
pub use retention::{RetentionConfig, RetentionJob};
pub use store::{OutboxRow, OutboxStore};
