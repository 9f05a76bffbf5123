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
//! Kept connections stay counted in the pool. The handler never holds more connections than the messages it
//! handles at once (`concurrency`): a message takes a kept one first and opens none while one is kept. It
//! keeps none unless the pool is larger than `concurrency`, so that the inbox lookups and the jobs sharing
//! the pool always find a connection.

use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, PoisonError};

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};

/// The connections a handler keeps between messages (none unless turned on with [`HandlerConnections::keeping`]).
pub struct HandlerConnections {
    pool: PgPool,
    keep: usize,
    idle: Mutex<Vec<PoolConnection<Postgres>>>,
}

impl HandlerConnections {
    /// Connections from `pool`, each given back to it after use.
    pub fn new(pool: PgPool) -> Self {
        HandlerConnections { pool, keep: 0, idle: Mutex::new(Vec::new()) }
    }

    /// Keep up to `concurrency` connections between messages, if the pool is larger than that.
    pub fn keeping(mut self, concurrency: usize) -> Self {
        let pool_size = usize::try_from(self.pool.options().get_max_connections()).unwrap_or(usize::MAX);
        self.keep = if pool_size > concurrency { concurrency } else { 0 };
        self
    }

    /// The pool the connections come from.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// How many connections are kept now, between messages.
    pub fn kept(&self) -> usize {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// A kept connection, or one from the pool.
    pub async fn get(&self) -> Result<HandlerConnection<'_>, sqlx::Error> {
        let kept = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let conn = match kept {
            Some(conn) => conn,
            None => self.pool.acquire().await?,
        };
        Ok(HandlerConnection { owner: self, conn: Some(conn), clean: false })
    }

    /// Give every kept connection back to the pool, which tests each: after a failure that may mean the
    /// server restarted, so that the next messages do not find the broken ones one by one.
    pub fn give_back(&self) {
        let kept = std::mem::take(&mut *self.idle.lock().unwrap_or_else(PoisonError::into_inner));
        drop(kept);
    }

    fn keep(&self, conn: PoolConnection<Postgres>) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.keep {
            idle.push(conn);
        }
        // Otherwise dropped here, after the lock: back to the pool.
    }
}

/// A connection in use by a handler; kept for the next message when dropped if marked [`clean`], else given
/// back to the pool.
///
/// [`clean`]: HandlerConnection::clean
pub struct HandlerConnection<'a> {
    owner: &'a HandlerConnections,
    conn: Option<PoolConnection<Postgres>>,
    clean: bool,
}

impl HandlerConnection<'_> {
    /// Its last statement ended with an answer from the server (a result or an error of the server's): the
    /// connection can serve the next message as it is.
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
        if let Some(conn) = self.conn.take()
            && self.clean
            && self.owner.keep > 0
        {
            self.owner.keep(conn);
        }
    }
}
