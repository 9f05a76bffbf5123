//! The outbox and inbox tables on a real PostgreSQL: claiming by concurrent relays, retention.

use std::time::Duration;

use choreo_messages::payloads::OrderCancelled;
use choreo_messages::{Envelope, Message};
use choreo_outbox::migrations::OUTBOX_MIGRATOR;
use choreo_outbox::{Change, CommitError, InboxGuard, OutboxStore, RetentionConfig, RetentionJob};
use choreo_testkit::{Infra, unique_namespace, wait_for};
use sqlx::PgPool;
use uuid::Uuid;

async fn fresh(infra: &Infra) -> (String, PgPool) {
    let name = format!("{}_outbox", unique_namespace());
    let url = infra.create_database(&name).await;
    let pool = PgPool::connect(&url).await.expect("connect");
    OUTBOX_MIGRATOR.run(&pool).await.expect("migrate");
    (name, pool)
}

fn event() -> Envelope {
    let order_id = Uuid::now_v7();
    Envelope::new_command(
        Message::OrderCancelled(OrderCancelled {
            order_id,
            reason: choreo_messages::payloads::CancelReason::OutOfStock,
        }),
        "test",
        Some(order_id),
    )
}

#[tokio::test]
async fn concurrent_claims_never_overlap_and_rows_committed_late_are_not_skipped() {
    let infra = Infra::from_env();
    let (name, db) = fresh(&infra).await;
    let envelopes: Vec<_> = (0..100).map(|_| event().encode()).collect();
    let mut tx = db.begin().await.expect("tx");
    OutboxStore::enqueue(&mut tx, &envelopes).await.expect("enqueue");
    tx.commit().await.expect("commit");

    // A transaction that took an id early but commits after the others.
    let mut late = db.begin().await.expect("tx");
    OutboxStore::enqueue(&mut late, &[event().encode()]).await.expect("enqueue late");

    let mut a = db.begin().await.expect("tx a");
    let mut b = db.begin().await.expect("tx b");
    let claimed_a = OutboxStore::claim_batch(&mut a, 60).await.expect("claim a");
    let claimed_b = OutboxStore::claim_batch(&mut b, 60).await.expect("claim b");
    let ids_a: Vec<i64> = claimed_a.iter().map(|r| r.id).collect();
    let ids_b: Vec<i64> = claimed_b.iter().map(|r| r.id).collect();
    assert_eq!(ids_a.len(), 60);
    assert_eq!(ids_b.len(), 40, "the second relay gets the rest, not the first one's rows");
    assert!(ids_a.iter().all(|id| !ids_b.contains(id)), "no row claimed twice");
    OutboxStore::mark_published(&mut a, &ids_a).await.expect("mark");
    OutboxStore::mark_published(&mut b, &ids_b).await.expect("mark");
    a.commit().await.expect("commit a");
    b.commit().await.expect("commit b");

    late.commit().await.expect("commit late");
    let mut c = db.begin().await.expect("tx c");
    let rest = OutboxStore::claim_batch(&mut c, 60).await.expect("claim c");
    assert_eq!(rest.len(), 1, "the row committed out of id order is still published");
    c.rollback().await.expect("rollback");
    db.close().await;
    infra.drop_databases(&[name]).await;
}

#[tokio::test]
async fn failed_publishes_wait_before_the_next_attempt() {
    let infra = Infra::from_env();
    let (name, db) = fresh(&infra).await;
    let mut tx = db.begin().await.expect("tx");
    OutboxStore::enqueue(&mut tx, &[event().encode()]).await.expect("enqueue");
    let rows = OutboxStore::claim_batch(&mut tx, 10).await.expect("claim");
    OutboxStore::record_failures(&mut tx, &[(rows[0].id, "NO_ROUTE".into())], 60_000).await.expect("failure");
    tx.commit().await.expect("commit");
    let mut tx = db.begin().await.expect("tx");
    assert!(OutboxStore::claim_batch(&mut tx, 10).await.expect("claim").is_empty(), "the row waits");
    tx.rollback().await.expect("rollback");
    let (attempts, error): (i32, String) =
        sqlx::query_as("SELECT publish_attempts, last_error FROM outbox").fetch_one(&db).await.expect("row");
    assert_eq!((attempts, error.as_str()), (1, "NO_ROUTE"));
    db.close().await;
    infra.drop_databases(&[name]).await;
}

/// A row that keeps failing (a queue missing for days) must go on being retried once a minute: the
/// doubling of its delay must not overflow, which would fail the whole sweep, confirmed marks included.
#[tokio::test]
async fn a_row_that_failed_a_thousand_times_still_waits_at_most_a_minute() {
    let infra = Infra::from_env();
    let (name, db) = fresh(&infra).await;
    let mut tx = db.begin().await.expect("tx");
    OutboxStore::enqueue(&mut tx, &[event().encode()]).await.expect("enqueue");
    let rows = OutboxStore::claim_batch(&mut tx, 10).await.expect("claim");
    sqlx::query("UPDATE outbox SET publish_attempts = 1100").execute(&mut *tx).await.expect("attempts");
    OutboxStore::record_failures(&mut tx, &[(rows[0].id, "NO_ROUTE".into())], 1_000).await.expect("failure recorded");
    tx.commit().await.expect("commit");
    let (attempts, wait): (i32, f64) =
        sqlx::query_as("SELECT publish_attempts, extract(epoch FROM available_at - now())::float8 FROM outbox")
            .fetch_one(&db)
            .await
            .expect("row");
    assert_eq!(attempts, 1101);
    assert!((0.0..=60.0).contains(&wait), "waits {wait} s, at most a minute");
    db.close().await;
    infra.drop_databases(&[name]).await;
}

#[tokio::test]
async fn the_backlog_counts_unpublished_rows_and_the_age_of_the_oldest_on_the_databases_clock() {
    let infra = Infra::from_env();
    let (name, db) = fresh(&infra).await;
    let empty = OutboxStore::backlog(&db).await.expect("backlog");
    assert_eq!((empty.unpublished, empty.oldest_age_seconds), (0, 0.0));
    let mut tx = db.begin().await.expect("tx");
    OutboxStore::enqueue(&mut tx, &[event().encode(), event().encode()]).await.expect("enqueue");
    tx.commit().await.expect("commit");
    sqlx::query("UPDATE outbox SET created_at = now() - interval '90 seconds' WHERE id = (SELECT min(id) FROM outbox)")
        .execute(&db)
        .await
        .expect("age");
    let backlog = OutboxStore::backlog(&db).await.expect("backlog");
    assert_eq!(backlog.unpublished, 2);
    assert!((90.0..120.0).contains(&backlog.oldest_age_seconds), "oldest {} s", backlog.oldest_age_seconds);
    db.close().await;
    infra.drop_databases(&[name]).await;
}

#[tokio::test]
async fn retention_deletes_only_what_is_past_retention() {
    let infra = Infra::from_env();
    let (name, db) = fresh(&infra).await;
    let envelopes: Vec<_> = (0..30).map(|_| event().encode()).collect();
    let mut tx = db.begin().await.expect("tx");
    OutboxStore::enqueue(&mut tx, &envelopes).await.expect("enqueue");
    tx.commit().await.expect("commit");
    let inbox = InboxGuard::new("test");
    let metas: Vec<_> = envelopes.iter().map(|e| &e.meta).collect();
    let mut conn = db.acquire().await.expect("connection");
    inbox.commit(&mut conn, Change::new(), &metas, &[], Duration::ZERO).await.expect("inbox");
    drop(conn);
    // 10 published long ago, 10 published just now, 10 unpublished; 10 inbox rows old.
    sqlx::query("UPDATE outbox SET published_at = now() - interval '10 days' WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT 10)")
        .execute(&db)
        .await
        .expect("age");
    sqlx::query("UPDATE outbox SET published_at = now() WHERE id IN (SELECT id FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT 10)")
        .execute(&db)
        .await
        .expect("recent");
    sqlx::query("UPDATE inbox SET received_at = now() - interval '40 days' WHERE message_id IN (SELECT message_id FROM inbox LIMIT 10)")
        .execute(&db)
        .await
        .expect("age inbox");
    let job = RetentionJob::new(
        db.clone(),
        RetentionConfig {
            outbox_retention: Duration::from_secs(7 * 86_400),
            inbox_retention: Duration::from_secs(30 * 86_400),
            batch_size: 3,
            interval: Duration::from_secs(3600),
        },
    );
    let deleted = job.run_once().await.expect("retention");
    assert_eq!((deleted.outbox, deleted.inbox), (10, 10), "batches of 3 still reach every old row");
    let left: (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE published_at IS NULL), count(*) FILTER (WHERE published_at IS NOT NULL) FROM outbox",
    )
    .fetch_one(&db)
    .await
    .expect("left");
    assert_eq!(left, (10, 10), "unpublished and recently published rows stay");
    let inbox_left: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox").fetch_one(&db).await.expect("inbox");
    assert_eq!(inbox_left, 20);
    db.close().await;
    infra.drop_databases(&[name]).await;
}

/// A change to the handler's own table, writing `value` under `key`; `key` is applied unless the row exists.
fn write_state(key: Uuid, value: i64) -> Change {
    let mut change = Change::new();
    change
        .cte("written", |q| {
            q.push("INSERT INTO state (key, value) VALUES (")
                .push_bind(key)
                .push(", ")
                .push_bind(value)
                .push(") ON CONFLICT (key) DO NOTHING RETURNING key");
        })
        .applied("SELECT key FROM written");
    change
}

#[tokio::test]
async fn a_change_its_handled_messages_and_their_events_commit_in_one_statement_or_not_at_all() {
    let infra = Infra::from_env();
    let (name, db) = fresh(&infra).await;
    sqlx::query("CREATE TABLE state (key UUID PRIMARY KEY, value BIGINT NOT NULL UNIQUE)")
        .execute(&db)
        .await
        .expect("state");
    let mut conn = db.acquire().await.expect("connection");
    let inbox = InboxGuard::new("test");
    let handled: Vec<_> = (0..3).map(|_| event().encode()).collect();
    let metas: Vec<_> = handled.iter().map(|e| &e.meta).collect();
    let (applied_key, other_key) = (Uuid::now_v7(), Uuid::now_v7());
    // Two events with no key, one under the key the change applies, one under a key it does not.
    let events = vec![
        (event().encode(), None),
        (event().encode(), None),
        (event().encode(), Some(applied_key)),
        (event().encode(), Some(other_key)),
    ];
    let applied = inbox
        .commit(&mut conn, write_state(applied_key, 1), &metas, &events, Duration::from_secs(3600))
        .await
        .expect("commit");
    assert_eq!(applied, [applied_key].into_iter().collect(), "the change reports the key it applied");
    let written: Vec<Uuid> = sqlx::query_scalar(
        "SELECT message_id FROM outbox WHERE available_at > now() + interval '50 minutes' ORDER BY id",
    )
    .fetch_all(&mut *conn)
    .await
    .expect("outbox");
    assert_eq!(
        written,
        events[..3].iter().map(|(e, _)| e.meta.message_id).collect::<Vec<_>>(),
        "the events without a key and under the applied key are written, held for the hand-off; the other is not"
    );
    assert!(inbox.processed(&db, &handled[0].meta).await.expect("lookup"));
    assert!(!inbox.processed(&db, &event().encode().meta).await.expect("lookup"));

    // Again with one new id and one processed before: nothing is written, the change included.
    let again = event().encode();
    let refused = inbox
        .commit(
            &mut conn,
            write_state(Uuid::now_v7(), 2),
            &[&handled[1].meta, &again.meta],
            &[(event().encode(), None)],
            Duration::ZERO,
        )
        .await
        .expect_err("a processed id");
    assert!(matches!(refused, CommitError::ProcessedBefore), "{refused:?}");
    let counts: (i64, i64) = sqlx::query_as("SELECT (SELECT count(*) FROM outbox), (SELECT count(*) FROM state)")
        .fetch_one(&mut *conn)
        .await
        .expect("counts");
    assert_eq!(counts, (3, 1), "neither the events nor the change of a refused statement are written");
    assert!(
        !inbox.processed(&db, &again.meta).await.expect("lookup"),
        "the new id of a refused statement is not recorded"
    );

    // A change that collides with another unique key is a conflict, not a processed message.
    let collides = inbox
        .commit(&mut conn, write_state(Uuid::now_v7(), 1), &[&again.meta], &[], Duration::ZERO)
        .await
        .expect_err("a unique value");
    assert!(matches!(collides, CommitError::Conflict(_)), "{collides:?}");

    // A change that finds what it was decided on gone raises serialization_failure: stale, to decide again.
    sqlx::query(
        "CREATE FUNCTION fail_stale() RETURNS BIGINT LANGUAGE plpgsql AS $$ \
         BEGIN RAISE EXCEPTION 'changed' USING ERRCODE = 'serialization_failure'; END $$",
    )
    .execute(&mut *conn)
    .await
    .expect("function");
    let mut stale = Change::new();
    stale.cte("checked", |q| {
        q.push("INSERT INTO state (key, value) SELECT ").push_bind(Uuid::now_v7()).push(", fail_stale()");
    });
    let refused = inbox.commit(&mut conn, stale, &[&again.meta], &[], Duration::ZERO).await.expect_err("stale");
    assert!(matches!(refused, CommitError::Stale(_)), "{refused:?}");

    // Events under a key with a change that names no applied keys could never be written: refused, unsent.
    let unkeyed = inbox
        .commit(&mut conn, Change::new(), &[&again.meta], &[(event().encode(), Some(applied_key))], Duration::ZERO)
        .await
        .expect_err("keys nobody applies");
    assert!(matches!(unkeyed, CommitError::UnappliedKeys), "{unkeyed:?}");
    assert!(!inbox.processed(&db, &again.meta).await.expect("lookup"), "nothing recorded");

    // Another consumer's inbox is its own.
    let other = InboxGuard::new("other");
    other.commit(&mut conn, Change::new(), &[&handled[1].meta], &[], Duration::ZERO).await.expect("another consumer");
    drop(conn);
    db.close().await;
    infra.drop_databases(&[name]).await;
}

/// A copy that fails while another copy of the same message is committing must not be taken for a failure:
/// the lookup waits for the transaction in flight.
#[tokio::test]
async fn the_processed_lookup_waits_for_a_copy_in_flight() {
    let infra = Infra::from_env();
    let (name, db) = fresh(&infra).await;
    let inbox = InboxGuard::new("test");
    for commits in [true, false] {
        let copy = event().encode();
        let mut in_flight = db.begin().await.expect("tx");
        sqlx::query(
            "INSERT INTO inbox (consumer, message_id, message_type, correlation_id) VALUES ('test', $1, $2, $3)",
        )
        .bind(copy.meta.message_id)
        .bind(&copy.meta.message_type)
        .bind(copy.meta.correlation_id)
        .execute(&mut *in_flight)
        .await
        .expect("record");
        let lookup = tokio::spawn({
            let (inbox, db, meta) = (inbox.clone(), db.clone(), copy.meta.clone());
            async move { inbox.processed(&db, &meta).await }
        });
        wait_for("the lookup to wait on the copy's lock", Duration::from_secs(10), || {
            let db = db.clone();
            async move {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .fetch_one(&db)
                .await
                .map_err(|e| e.to_string())?;
                if waiting == 1 { Ok(()) } else { Err(format!("{waiting} waiting")) }
            }
        })
        .await;
        if commits {
            in_flight.commit().await.expect("commit");
        } else {
            in_flight.rollback().await.expect("rollback");
        }
        let processed = lookup.await.expect("lookup task").expect("lookup");
        assert_eq!(processed, commits, "the lookup reports what the copy in flight did");
    }
    db.close().await;
    infra.drop_databases(&[name]).await;
}
