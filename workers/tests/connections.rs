//! A handler keeps the database connection a message used for the next one, untested (sqlx's pool would
//! test it with a round trip on its return), and gives back one that may be broken. Through the real handler
//! and a real PostgreSQL.

mod common;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use choreo::{Effects, Service, ServiceError, TransactionalHandler};
use choreo_messages::Envelope;
use choreo_outbox::Change;
use choreo_rabbitmq::{Handler, Outcome};
use choreo_testkit::Infra;
use choreo_workers::gateway::SimulatedGateway;
use choreo_workers::payment::{self, PaymentService};
use common::order_created;
use sqlx::{PgConnection, PgPool};

const POOL_SIZE: u32 = 4;

/// `inner`, noting which server process served each decision; while `refuse` is set, it refuses every
/// message for good after its read.
struct Backends<S> {
    inner: S,
    seen: Mutex<Vec<i32>>,
    refuse: AtomicBool,
}

impl<S: Service> Service for Backends<S> {
    const NAME: &'static str = S::NAME;
    type Message = S::Message;
    const CONSUMES: &'static [&'static str] = S::CONSUMES;

    fn batchable(&self, envelope: &Envelope<S::Message>) -> bool {
        self.inner.batchable(envelope)
    }

    async fn decide(
        &self,
        db: &mut PgConnection,
        batch: &[(&Envelope<S::Message>, tracing::Span)],
        change: &mut Change,
    ) -> Result<Vec<Effects<S::Message>>, ServiceError> {
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *db).await?;
        self.seen.lock().expect("seen").push(pid);
        if self.refuse.load(Ordering::SeqCst) {
            return Err(ServiceError::Permanent("refused by the test".into()));
        }
        self.inner.decide(db, batch, change).await
    }
}

fn handler(db: &PgPool) -> TransactionalHandler<Backends<PaymentService<SimulatedGateway>>> {
    let service = Backends {
        inner: PaymentService::new(SimulatedGateway::new(1_000_000, 0.0)),
        seen: Mutex::default(),
        refuse: AtomicBool::new(false),
    };
    TransactionalHandler::new(service, db.clone(), Default::default())
}

fn last_backend<S: Service>(handler: &TransactionalHandler<Backends<S>>) -> i32 {
    *handler.service().seen.lock().expect("seen").last().expect("a decision was made")
}

async fn database(infra: &Infra) -> (String, PgPool) {
    common::migrated_database(infra, "payment", POOL_SIZE, &payment::MIGRATIONS).await
}

#[tokio::test]
async fn a_handler_keeps_its_connection_for_the_next_message_and_gives_back_a_broken_one() {
    let infra = Infra::from_env();
    let (name, db) = database(&infra).await;
    let handler = handler(&db).keeping_connections(2);

    assert_eq!(handler.handle(&order_created()).await, Outcome::Done);
    assert_eq!(handler.kept_connections(), 1, "the connection is kept, not given back to the pool");
    let first = last_backend(&handler);
    assert_eq!(handler.handle(&order_created()).await, Outcome::Done);
    assert_eq!(last_backend(&handler), first, "the next message is served by the same connection");
    assert_eq!(handler.kept_connections(), 1);

    // The server ends the kept connection's process (a restart, an administrator): the next message finds it
    // broken, fails as a transient error (the consumer retries it), and the connection is not kept.
    terminate(&db, first).await;
    let message = order_created();
    assert!(
        matches!(handler.handle(&message).await, Outcome::Retry { .. }),
        "a broken connection is a transient failure"
    );
    assert_eq!(handler.kept_connections(), 0, "the broken connection is not kept");
    assert_eq!(handler.handle(&message).await, Outcome::Done, "the retry runs on a sound connection");
    assert_ne!(last_backend(&handler), first);
    assert_eq!(handler.kept_connections(), 1);
    let payments: i64 = sqlx::query_scalar("SELECT count(*) FROM payments").fetch_one(&db).await.expect("count");
    assert_eq!(payments, 3, "each message charged once");
    drop(handler); // its kept connections go back to the pool, which can then close
    db.close().await;
    infra.drop_databases(&[name]).await;
}

/// End `pid`'s server process and wait, within a deadline, until it is gone.
async fn terminate(db: &PgPool, pid: i32) {
    let ended: bool =
        sqlx::query_scalar("SELECT pg_terminate_backend($1)").bind(pid).fetch_one(db).await.expect("terminate");
    assert!(ended, "backend {pid} was running");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alive: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = $1")
            .bind(pid)
            .fetch_one(db)
            .await
            .expect("activity");
        if alive == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "backend {pid} still alive after 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A server restart breaks every kept connection at once. The first message to meet a broken one fails once
/// (a transient error, retried); the others go back to the pool with it, which tests them, so its retry does
/// not meet the next broken one.
#[tokio::test]
async fn one_broken_connection_sends_every_kept_one_back_to_the_pool() {
    let infra = Infra::from_env();
    let (name, db) = database(&infra).await;
    let handler = handler(&db).keeping_connections(3);
    // Two messages at once take two connections; both are kept.
    let (a, b) = (order_created(), order_created());
    let (first, second) = tokio::join!(handler.handle(&a), handler.handle(&b));
    assert_eq!((first, second), (Outcome::Done, Outcome::Done));
    assert_eq!(handler.kept_connections(), 2);
    let backends: Vec<i32> = handler.service().seen.lock().expect("seen").clone();
    assert_eq!(backends.len(), 2);
    assert_ne!(backends[0], backends[1], "two messages at once, two connections");
    for pid in &backends {
        terminate(&db, *pid).await;
    }

    let message = order_created();
    assert!(matches!(handler.handle(&message).await, Outcome::Retry { .. }), "the first broken connection met");
    assert_eq!(handler.kept_connections(), 0, "every kept connection went back to the pool");
    assert_eq!(handler.handle(&message).await, Outcome::Done, "the retry does not meet the other broken one");
    assert!(!backends.contains(&last_backend(&handler)));
    drop(handler); // its kept connections go back to the pool, which can then close
    db.close().await;
    infra.drop_databases(&[name]).await;
}

#[tokio::test]
async fn a_service_refusal_keeps_the_connection() {
    let infra = Infra::from_env();
    let (name, db) = database(&infra).await;
    let handler = handler(&db).keeping_connections(2);
    handler.service().refuse.store(true, Ordering::SeqCst);
    let outcome = handler.handle(&order_created()).await;
    assert!(matches!(outcome, Outcome::Reject { .. }), "{outcome:?}");
    assert_eq!(handler.kept_connections(), 1, "the server answered every statement: the connection is sound");
    let first = last_backend(&handler);
    handler.service().refuse.store(false, Ordering::SeqCst);
    assert_eq!(handler.handle(&order_created()).await, Outcome::Done);
    assert_eq!(last_backend(&handler), first);
    drop(handler); // its kept connections go back to the pool, which can then close
    db.close().await;
    infra.drop_databases(&[name]).await;
}

#[tokio::test]
async fn no_connection_is_kept_unless_the_pool_is_larger_than_the_messages_handled_at_once() {
    let infra = Infra::from_env();
    let (name, db) = database(&infra).await;
    // The inbox lookups and the jobs share the pool: kept connections must never take all of it.
    let handler = handler(&db).keeping_connections(POOL_SIZE as usize);
    assert_eq!(handler.handle(&order_created()).await, Outcome::Done);
    assert_eq!(handler.kept_connections(), 0);
    assert_eq!(handler.handle(&order_created()).await, Outcome::Done);
    drop(handler); // its kept connections go back to the pool, which can then close
    db.close().await;
    infra.drop_databases(&[name]).await;
}
