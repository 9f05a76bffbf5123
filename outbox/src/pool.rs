//! PostgreSQL pool settings of the hot path (handlers and relay).
//!
//! sqlx tests every connection it hands out with a round trip by default. On the hot path a connection is
//! back in the pool within milliseconds, so that round trip only doubles the wake-ups of the database and
//! the worker (a handler takes one or two round trips per message, or batch). A connection is tested instead when
//! it has been idle for [`TEST_IDLE_AFTER`], the case where a restart of the server or a firewall may have
//! cut it; one that breaks in use fails its transaction, which is retried, and is dropped by the pool.
//! (sqlx also tests each connection as it comes back to the pool, in the background; that one it does not let
//! us turn off.)

use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::PgPoolOptions;

/// A connection idle for this long is tested (one round trip) before it is used again.
pub const TEST_IDLE_AFTER: Duration = Duration::from_secs(5);

/// Pool options that test a connection only after [`TEST_IDLE_AFTER`] of idleness: a failed test drops the
/// connection and the pool hands out (or opens) another.
pub fn hot_path_pool_options() -> PgPoolOptions {
    PgPoolOptions::new().test_before_acquire(false).before_acquire(|conn, meta| {
        Box::pin(async move {
            if meta.idle_for < TEST_IDLE_AFTER {
                return Ok(true);
            }
            match conn.ping().await {
                Ok(()) => Ok(true),
                Err(e) => {
                    tracing::info!(error = %e, "an idle database connection failed its test; opening another");
                    Ok(false)
                }
            }
        })
    })
}
