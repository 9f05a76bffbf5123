//! [`HandlerConnections`]: the database connections a handler keeps from one message to the next.
//!
//! sqlx's pool tests every connection given back to it with a round trip to the server (a `Sync`), since a
//! connection dropped in the middle of a statement may be left halfway through the protocol. A handler gives
//! one back after every message or batch: on a steady load that test is one round trip in three between a
//! worker and PostgreSQL, each waking a server process (see docs/performance.md). So the handler keeps the
//! connections whose last statement ended cleanly, untested, for the next message. A connection whose last
//! use failed in a way that may have broken it, or was cut short (a dropped future), goes back to the pool,
//! which tests it and closes it if it is broken.
//!
//! Kept connections stay counted in the pool. The handler keeps at most `concurrency` of them, and only while
//! the pool is larger than that and can still hand out a connection without waiting: the inbox lookups, a
//! failed batch's messages retried one by one (up to twice `concurrency` at once) and the jobs share the pool,
//! and must not wait for a connection that sits kept. A connection kept longer than the pool's idle test
//! ([`TEST_IDLE_AFTER`], the case where a server restart or a firewall may have cut it) or the pool's
//! lifetime goes back to the pool instead of being used. After any use that may have broken a connection,
//! every kept one goes back too: a server restart breaks them all, and a message should not find them one
//! by one, burning a retry on each.

use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use choreo_outbox::pool::TEST_IDLE_AFTER;
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};

/// How long a connection is kept at most when the pool sets no lifetime.
const KEPT_AT_MOST: Duration = Duration::from_secs(30 * 60);

/// The connections a handler keeps between messages (none unless turned on with [`HandlerConnections::keeping`]).
pub struct HandlerConnections {
    pool: PgPool,
    keep: usize,
    lifetime: Duration,
    idle: Mutex<Vec<Kept>>,
}

struct Kept {
    conn: PoolConnection<Postgres>,
    /// When it was taken from the pool.
    taken: Instant,
    /// When its last use ended.
    since: Instant,
}

impl HandlerConnections {
    /// Connections from `pool`, each given back to it after use.
    pub fn new(pool: PgPool) -> Self {
        let lifetime = pool.options().get_max_lifetime().unwrap_or(KEPT_AT_MOST);
        HandlerConnections { pool, keep: 0, lifetime, idle: Mutex::new(Vec::new()) }
    }

    /// Keep up to `concurrency` connections between messages, if the pool is larger than that.
    pub fn keeping(mut self, concurrency: usize) -> Self {
        let pool_size = usize::try_from(self.pool.options().get_max_connections()).unwrap_or(usize::MAX);
        self.keep = if pool_size > concurrency { concurrency } else { 0 };
        self
    }

    /// How many connections are kept now, between messages.
    pub fn kept(&self) -> usize {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// A kept connection, or one from the pool.
    pub async fn get(&self) -> Result<HandlerConnection<'_>, sqlx::Error> {
        let kept = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
        if let Some(kept) = kept {
            if kept.since.elapsed() >= TEST_IDLE_AFTER {
                // The last kept is the most recently used: all of them have been idle this long.
                drop(kept);
                self.give_back();
            } else if kept.taken.elapsed() < self.lifetime {
                return Ok(HandlerConnection { owner: self, conn: Some(kept.conn), taken: kept.taken, clean: false });
            }
        }
        let conn = self.pool.acquire().await?;
        Ok(HandlerConnection { owner: self, conn: Some(conn), taken: Instant::now(), clean: false })
    }

    /// Give every kept connection back to the pool, which tests each.
    pub fn give_back(&self) {
        let kept = std::mem::take(&mut *self.idle.lock().unwrap_or_else(PoisonError::into_inner));
        drop(kept);
    }

    /// Keep `conn` if there is room and the pool can spare it; else it goes back to the pool.
    fn keep(&self, conn: PoolConnection<Postgres>, taken: Instant) {
        let pool_can_spare = self.pool.num_idle() > 0 || self.pool.size() < self.pool.options().get_max_connections();
        if !pool_can_spare {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.keep {
            idle.push(Kept { conn, taken, since: Instant::now() });
        }
        // Otherwise dropped on return, after the lock: back to the pool.
    }
}

/// A connection in use by a handler. Dropped, it is kept for the next message if marked [`clean`]; otherwise
/// it goes back to the pool, and every kept connection with it.
///
/// [`clean`]: HandlerConnection::clean
pub struct HandlerConnection<'a> {
    owner: &'a HandlerConnections,
    conn: Option<PoolConnection<Postgres>>,
    taken: Instant,
    clean: bool,
}

impl HandlerConnection<'_> {
    /// Its last statement ended with an answer from the server (a result or an error of the server's), and
    /// it will not be used again before it is dropped: it can serve the next message as it is. Call it only
    /// on the way out.
    pub fn clean(&mut self) {
        self.clean = true;
    }
}

impl Deref for HandlerConnection<'_> {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        // Taken only in `drop`.
        self.conn.as_deref().unwrap_or_else(|| unreachable!("a handler connection is present until dropped"))
    }
}

impl DerefMut for HandlerConnection<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn.as_deref_mut().unwrap_or_else(|| unreachable!("a handler connection is present until dropped"))
    }
}

impl Drop for HandlerConnection<'_> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        if self.owner.keep == 0 {
            return;
        }
        if self.clean {
            self.owner.keep(conn, self.taken);
        } else {
            drop(conn);
            self.owner.give_back();
        }
    }
}
