//! Replaying thousands of dead letters survives the CLI being killed half way: run it again and every
//! message is replayed, none lost, none left behind, and no order is affected twice.

mod common;

use std::time::Duration;

use choreo_testkit::wait_for;
use common::{Cluster, mixed_orders};

const ORDERS: usize = 5_000;

#[tokio::test]
async fn a_replay_killed_half_way_and_run_again_replays_everything_exactly_once_in_effect() {
    let mut cluster = Cluster::start().await;
    // A payment gateway that is down, and no patience: every order.created ends in payment's dead-letter queue.
    cluster.kill("payment").await;
    cluster.spawn_with(
        "payment",
        &[
            ("CHOREO_GATEWAY_TRANSIENT_FAILURE_RATE", "1"),
            ("CHOREO_HANDLER_RETRIES", "0"),
            ("CHOREO_RETRY_DELAYS", "1ms"),
        ],
    );
    let ids = cluster.place(&mixed_orders(ORDERS)).await;
    let dlq = cluster.topology.dead_letter_queue("payment");
    wait_for("every order.created dead-lettered", Duration::from_secs(300), || async {
        let d = cluster.depth(&dlq).await;
        if d as usize == ORDERS { Ok(()) } else { Err(d) }
    })
    .await;

    // The gateway is back.
    cluster.kill("payment").await;
    cluster.spawn("payment");
    cluster.wait_consuming().await;

    // Replay, and kill the CLI while it is at it.
    let mut replay =
        cluster.choreoctl().args(["dlq", "replay", "payment", "--all", "--rate", "1000"]).spawn().expect("replay");
    let payment_db = cluster.db("payment").clone();
    wait_for("the replay under way", Duration::from_secs(120), || {
        let db = payment_db.clone();
        async move {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM payments").fetch_one(&db).await.map_err(|e| e.to_string())?;
            if n >= 200 { Ok(()) } else { Err(format!("{n} payments")) }
        }
    })
    .await;
    replay.kill().await.expect("kill the CLI");
    // What it had not acknowledged goes back to the dead-letter queue once the broker has noticed that the
    // CLI is gone, and the broker returns them some time after the consumer is gone. Every order.created is
    // then in the queue or paid (or declined) by the payment worker, or both (published again and not yet
    // acked when the CLI died): wait until they add up, with no consumer left.
    let left = wait_for("the killed replay's unacked dead letters back in the queue", Duration::from_secs(60), || {
        let db = payment_db.clone();
        let cluster = &cluster;
        let dlq = &dlq;
        async move {
            let (depth, consumers) = cluster.depth_and_consumers(dlq).await;
            let paid: i64 =
                sqlx::query_scalar("SELECT count(*) FROM payments").fetch_one(&db).await.map_err(|e| e.to_string())?;
            if consumers == 0 && depth as usize + paid as usize >= ORDERS {
                Ok(depth)
            } else {
                Err(format!("{depth} dead letters, {consumers} consumers, {paid} payments"))
            }
        }
    })
    .await;
    assert!((left as usize) < ORDERS, "the first run replayed part of the queue ({left} left)");

    // Run it again until the queue is empty, as an operator would: copies the killed run had not acknowledged
    // can come back to the queue after a run has counted it.
    let replay_until_empty = || async {
        for run in 1..=5 {
            let (code, out, err) = cluster.run_choreoctl(&["dlq", "replay", "payment", "--all", "--json"]).await;
            assert_eq!(code, 0, "{out} {err}");
            let depth = cluster.depth(&dlq).await;
            if depth == 0 {
                return;
            }
            let (_, groups, _) = cluster.run_choreoctl(&["dlq", "list", "--group-by", "error-kind"]).await;
            assert!(run < 5, "{depth} dead letters still there after {run} replays (last: {out}):\n{groups}");
        }
    };
    replay_until_empty().await;
    cluster.wait_terminal(&ids, Duration::from_secs(600)).await;
    // A late copy of a message that was replayed and processed meanwhile has no effect when replayed.
    replay_until_empty().await;
    let (_, groups, _) = cluster.run_choreoctl(&["dlq", "list", "--group-by", "error-kind"]).await;
    assert_eq!(cluster.depth(&dlq).await, 0, "nothing failed again:\n{groups}");
    cluster.assert_invariants().await;
    let (payments, distinct): (i64, i64) = sqlx::query_as("SELECT count(*), count(DISTINCT order_id) FROM payments")
        .fetch_one(cluster.db("payment"))
        .await
        .expect("payments");
    assert_eq!((payments as usize, distinct as usize), (ORDERS, ORDERS), "every order paid or declined once");
    cluster.shutdown().await;
}
