//! `choreoctl` against a running cluster: dead-letter list, show, filters, purge, export and import, trace
//! and outbox status.

mod common;

use std::time::Duration;

use choreo_rabbitmq::lapin::BasicProperties;
use choreo_rabbitmq::lapin::types::{AMQPValue, FieldTable};
use common::{Cluster, order};
use uuid::Uuid;

fn bad(message_type: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("schema-version".into(), AMQPValue::LongLongInt(1));
    BasicProperties::default()
        .with_message_id(Uuid::now_v7().to_string().into())
        .with_type(message_type.into())
        .with_content_type("application/json".into())
        .with_headers(headers)
}

/// Dead letters: order gets 3 malformed and 2 of unknown type, payment 2 malformed.
async fn poisoned_cluster() -> Cluster {
    let cluster = Cluster::start().await;
    for i in 0..3 {
        cluster.publish_raw("order.place", bad("order.place"), format!("{{broken {i}").as_bytes()).await;
    }
    for i in 0..2 {
        cluster.publish_raw("order.place", bad("order.teleport"), format!("{{\"n\":{i}}}").as_bytes()).await;
        cluster.publish_raw("order.created", bad("order.created"), format!("not json {i}").as_bytes()).await;
    }
    cluster.wait_depth(&cluster.topology.dead_letter_queue("order"), 5).await;
    cluster.wait_depth(&cluster.topology.dead_letter_queue("payment"), 2).await;
    cluster
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

async fn export_lines(cluster: &Cluster, queue: &str) -> Vec<String> {
    let (code, out, err) = cluster.run_choreoctl(&["dlq", "export", queue, "--all"]).await;
    assert_eq!(code, 0, "{err}");
    out.lines().map(str::to_owned).collect()
}

#[tokio::test]
async fn list_show_filters_purge_export_and_import_tell_the_truth_and_lose_nothing() {
    let cluster = poisoned_cluster().await;
    let order_dlq = cluster.topology.dead_letter_queue("order");
    let payment_dlq = cluster.topology.dead_letter_queue("payment");

    // list: counts per queue, and failure groups.
    let (code, out, err) = cluster.run_choreoctl(&["dlq", "list", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let counts: Vec<(String, u64)> = json(&out)["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .map(|q| (q["queue"].as_str().unwrap_or("").to_owned(), q["messages"].as_u64().unwrap_or(99)))
        .collect();
    assert_eq!(
        counts,
        vec![(order_dlq.clone(), 5), (payment_dlq.clone(), 2), (cluster.topology.dead_letter_queue("inventory"), 0)]
    );
    let (_, out, _) = cluster.run_choreoctl(&["dlq", "list", "--group-by", "error-kind", "--json"]).await;
    let mut groups: Vec<(String, String, u64)> = json(&out)["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .map(|g| {
            (
                g["worker"].as_str().unwrap_or("").into(),
                g["error_kind"].as_str().unwrap_or("").into(),
                g["messages"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    groups.sort();
    assert_eq!(
        groups,
        vec![
            ("order".into(), "malformed_body".into(), 3),
            ("order".into(), "unknown_type".into(), 2),
            ("payment".into(), "malformed_body".into(), 2)
        ]
    );

    // show: the queue keeps its count and its order.
    let before = export_lines(&cluster, "order").await;
    assert_eq!(before.len(), 5);
    let (code, out, err) = cluster.run_choreoctl(&["dlq", "show", "order", "--limit", "3"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("error kind      malformed_body") && out.contains("showing 3"), "{out}");
    let first_id = json(&before[0])["properties"]["message_id"].as_str().expect("id").to_owned();
    let (_, out, _) = cluster.run_choreoctl(&["dlq", "show", "order", "--id", &first_id, "--json"]).await;
    assert_eq!(json(&out)["shown"][0]["story"]["message_id"], first_id.as_str());
    assert_eq!(export_lines(&cluster, "order").await, before, "show changed nothing, order included");
    assert_eq!(cluster.depth(&order_dlq).await, 5);

    // filters select exactly; purge without --yes and without a terminal does nothing.
    let (_, out, _) =
        cluster.run_choreoctl(&["dlq", "replay", "order", "--error-kind", "unknown_type", "--dry-run", "--json"]).await;
    assert_eq!(json(&out)["selected"], 2);
    let (_, out, _) =
        cluster.run_choreoctl(&["dlq", "replay", "order", "--id", &first_id, "--dry-run", "--json"]).await;
    assert_eq!(json(&out)["selected"], 1);
    let (_, out, _) = cluster
        .run_choreoctl(&[
            "dlq",
            "replay",
            "order",
            "--type",
            "order.place",
            "--older-than",
            "1h",
            "--dry-run",
            "--json",
        ])
        .await;
    assert_eq!(json(&out)["selected"], 0, "nothing failed an hour ago");
    let (code, _, err) = cluster.run_choreoctl(&["dlq", "purge", "order", "--all"]).await;
    assert!(code != 0 && err.contains("--yes"), "{code} {err}");
    let (code, _, err) = cluster.run_choreoctl(&["dlq", "purge", "order"]).await;
    assert!(code != 0 && err.contains("--all"), "no selection, no purge: {err}");
    assert_eq!(cluster.depth(&order_dlq).await, 5, "nothing was purged");
    let (code, out, err) =
        cluster.run_choreoctl(&["dlq", "purge", "order", "--error-kind", "unknown_type", "--yes", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["done"], 2);
    cluster.wait_depth(&order_dlq, 3).await;
    let (_, out, _) = cluster
        .run_choreoctl(&["dlq", "replay", "order", "--error-kind", "malformed_body", "--dry-run", "--json"])
        .await;
    assert_eq!(json(&out)["selected"], 3, "only the unknown types went");

    // export, purge, import: headers and bodies come back byte for byte.
    let exported = export_lines(&cluster, "payment").await;
    let file = std::env::temp_dir().join(format!("{}-payment.jsonl", cluster.namespace));
    std::fs::write(&file, exported.join("\n")).expect("write export");
    let (code, _, err) = cluster.run_choreoctl(&["dlq", "purge", "payment", "--all", "--yes"]).await;
    assert_eq!(code, 0, "{err}");
    cluster.wait_depth(&payment_dlq, 0).await;
    let (code, out, err) = cluster.run_choreoctl(&["dlq", "import", file.to_str().expect("path")]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("imported 2"), "{out}");
    cluster.wait_depth(&payment_dlq, 2).await;
    assert_eq!(export_lines(&cluster, "payment").await, exported, "round trip is exact");
    let _ = std::fs::remove_file(file);
    cluster.shutdown().await;
}

#[tokio::test]
async fn trace_tells_the_story_of_a_confirmed_and_a_compensated_order() {
    let cluster = Cluster::start().await;
    let confirmed = order("cust-1", &[("sku-001", 1, 100)]);
    let compensated = order("cust-2", &[("sku-001", 1, 100), ("sku-soldout", 1, 100)]);
    let ids = cluster.place(&[confirmed.clone(), compensated.clone()]).await;
    cluster.wait_terminal(&ids, Duration::from_secs(60)).await;
    // The relay publishes the terminal events a moment after the commit.
    choreo_testkit::wait_for("terminal events published", Duration::from_secs(30), || async {
        let (_, out, _) = cluster.run_choreoctl(&["outbox", "status", "--json"]).await;
        let backlog: i64 =
            json(&out).as_array().map(|rows| rows.iter().filter_map(|r| r["unpublished"].as_i64()).sum()).unwrap_or(-1);
        if backlog == 0 { Ok(()) } else { Err(backlog) }
    })
    .await;

    let story = |id: Uuid| {
        let cluster = &cluster;
        async move {
            let (code, out, err) = cluster.run_choreoctl(&["trace", &id.to_string(), "--json"]).await;
            assert_eq!(code, 0, "{err}");
            json(&out)["steps"]
                .as_array()
                .expect("steps")
                .iter()
                .map(|s| {
                    format!(
                        "{} {} {}",
                        s["service"].as_str().unwrap_or(""),
                        s["what"].as_str().unwrap_or(""),
                        s["message_type"].as_str().unwrap_or("")
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        story(confirmed.order_id).await,
        [
            "order received order.place",
            "order status PENDING",
            "order sent order.created",
            "payment received order.created",
            "payment sent payment.succeeded",
            "inventory received payment.succeeded",
            "inventory sent inventory.reserved",
            "order received inventory.reserved",
            "order status CONFIRMED",
            "order sent order.confirmed",
        ]
    );
    assert_eq!(
        story(compensated.order_id).await,
        [
            "order received order.place",
            "order status PENDING",
            "order sent order.created",
            "payment received order.created",
            "payment sent payment.succeeded",
            "inventory received payment.succeeded",
            "inventory sent inventory.failed",
            "payment received inventory.failed",
            "payment sent payment.refunded",
            "order received payment.refunded",
            "order status CANCELLED",
            "order sent order.cancelled",
        ]
    );
    // For people: a heading, then one line per step, in the same order.
    let (code, out, err) = cluster.run_choreoctl(&["trace", &confirmed.order_id.to_string()]).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.len() == 12 && lines[1].starts_with("AT") && lines[1].contains("MESSAGE ID"), "{out}");
    let steps = story(confirmed.order_id).await;
    for (line, step) in lines[2..].iter().zip(&steps) {
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[2..5].join(" "), *step, "{out}");
    }
    let (code, _, err) = cluster.run_choreoctl(&["trace", &Uuid::now_v7().to_string()]).await;
    assert_eq!(code, 1);
    assert!(err.contains("nothing is known"), "{err}");
    cluster.shutdown().await;
}

/// An order of someone else, written straight into the order service's database.
async fn foreign_order(cluster: &Cluster, order_id: Uuid, status: &str) {
    sqlx::query(
        "INSERT INTO orders (order_id, correlation_id, customer_id, currency, total_cents, lines, status, placed_at, completed_at) \
         VALUES ($1, $1, 'someone-else', 'EUR', 100, '[]'::jsonb, $2, now(), CASE WHEN $2 = 'PENDING' THEN NULL ELSE now() END)",
    )
    .bind(order_id)
    .bind(status)
    .execute(cluster.db("order"))
    .await
    .expect("insert a foreign order");
}

#[tokio::test]
async fn publish_wait_waits_for_exactly_the_placed_orders() {
    let mut cluster = Cluster::start().await;
    // Ids taken before the other orders exist: the orders placed below sort before them.
    let from_file = order("cust-1", &[("sku-001", 1, 100)]);
    let never_placed = Uuid::now_v7();
    let other = Uuid::now_v7();

    // Someone else's order, PENDING for good, must not hold up the wait for ours.
    foreign_order(&cluster, other, "PENDING").await;
    let file = std::env::temp_dir().join(format!("{}-order.json", cluster.namespace));
    std::fs::write(&file, choreo_messages::Message::OrderPlace(from_file.clone()).to_json()).expect("write order");
    let (code, out, err) = cluster
        .run_choreoctl(&["publish", "--file", file.to_str().expect("path"), "--wait", "--timeout", "60s", "--json"])
        .await;
    let _ = std::fs::remove_file(&file);
    assert_eq!(code, 0, "{out}\n{err}");
    let summary = json(&out);
    assert_eq!((summary["placed"].as_u64(), summary["confirmed"].as_u64()), (Some(1), Some(1)), "{out}");

    // Someone else's order, terminal, must not end the wait for ours: with no order worker, ours never is.
    sqlx::query("UPDATE orders SET status = 'CONFIRMED', completed_at = now() WHERE order_id = $1")
        .bind(other)
        .execute(cluster.db("order"))
        .await
        .expect("complete the foreign order");
    cluster.kill("order").await;
    let id = never_placed.to_string();
    let args = [
        "publish",
        "--customer",
        "cust-2",
        "--line",
        "sku-001:1:100",
        "--order-id",
        &id,
        "--wait",
        "--timeout",
        "3s",
        "--json",
    ];
    let (code, out, err) = cluster.run_choreoctl(&args).await;
    assert_eq!(code, 3, "timed out, not done: {out}\n{err}");
    assert!(err.contains("1 of 1 orders are not terminal"), "{err}");
    cluster.shutdown().await;
}

#[tokio::test]
async fn an_import_that_fails_half_way_says_what_it_imported_and_where_to_start_again() {
    let cluster = Cluster::start().await;
    let dlq = cluster.topology.dead_letter_queue("payment");
    let nowhere = format!("{}.nowhere.dlq", cluster.namespace);
    // Published 100 at a time: lines 1-100 go, line 103 is for a queue that does not exist (the rest of its
    // round goes), and lines 201-250 are not tried.
    let lines: Vec<String> = (1..=250)
        .map(|n| {
            let properties =
                BasicProperties::default().with_message_id(format!("m{n}").into()).with_type("order.created".into());
            let queue = if n == 103 { &nowhere } else { &dlq };
            serde_json::json!({ "queue": queue, "properties": properties, "body_base64": "e30=" }).to_string()
        })
        .collect();
    let file = std::env::temp_dir().join(format!("{}-import.jsonl", cluster.namespace));
    std::fs::write(&file, lines.join("\n")).expect("write import file");
    let (code, out, err) = cluster.run_choreoctl(&["dlq", "import", file.to_str().expect("path"), "--json"]).await;
    let _ = std::fs::remove_file(&file);
    assert_eq!(code, 4, "partly imported: {out}\n{err}");
    let report = json(&out);
    assert_eq!(report["letters"], 250);
    assert_eq!(report["imported"], 199, "{out}");
    let failed = report["failed"].as_array().expect("failed");
    assert_eq!(failed.len(), 1, "{out}");
    assert!(failed[0].as_str().is_some_and(|f| f.starts_with("line 103 (message id m103")), "{out}");
    assert_eq!((report["not_attempted"].as_u64(), report["resume_from_line"].as_u64()), (Some(50), Some(201)), "{out}");
    cluster.wait_depth(&dlq, 199).await;
    cluster.shutdown().await;
}

/// Whatever goes wrong with a connection, the password in its URL never reaches choreoctl's output: neither
/// when the server cannot be reached nor when the URL does not parse.
#[tokio::test]
async fn a_password_in_a_connection_url_never_reaches_the_output() {
    const PASSWORD: &str = "s3cret-Pa55";
    let closed = choreo_testkit::free_port();
    let broker_urls = [
        format!("amqp://choreo:{PASSWORD}@127.0.0.1:{closed}/%2f"),
        format!("amqp://choreo:{PASSWORD}@127.0.0.1:no-port/%2f"),
        format!("amqp://choreo:{PASSWORD}@127.0.0.1:{closed}/%zz"),
    ];
    for url in &broker_urls {
        for args in [&["dlq", "list"][..], &["publish", "--customer", "c", "--line", "sku-001:1:100"]] {
            let output = tokio::process::Command::new(common::choreoctl())
                .args(args)
                .env("AMQP_URL", url)
                .stdin(std::process::Stdio::null())
                .output()
                .await
                .expect("choreoctl runs");
            let text =
                format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
            assert!(!output.status.success(), "{args:?} with {url}: {text}");
            assert!(!text.contains(PASSWORD), "{args:?} with {url} shows the password: {text}");
        }
    }
    // A database URL that does not parse fails at once (one that cannot connect waits for sqlx's pool).
    let output = tokio::process::Command::new(common::choreoctl())
        .args(["outbox", "status"])
        .env("DATABASE_URL", format!("postgres://choreo:{PASSWORD}@127.0.0.1:no-port/postgres"))
        .env_remove("CHOREO_ORDER_DATABASE_URL")
        .env_remove("CHOREO_PAYMENT_DATABASE_URL")
        .env_remove("CHOREO_INVENTORY_DATABASE_URL")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("choreoctl runs");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(!text.contains(PASSWORD), "outbox status shows the password: {text}");
}
