//! An order placed by a client that is not ours (Python's pika, following only docs/contract.md)
//! completes. `scripts/test` installs pika and points `CHOREO_PYTHON` at it.

mod common;

use std::time::Duration;

use common::Cluster;
use uuid::Uuid;

#[tokio::test]
async fn an_order_from_python_pika_completes() {
    let cluster = Cluster::start().await;
    let python = std::env::var("CHOREO_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../clients/python/place_order.py");
    let output = tokio::process::Command::new(&python)
        .arg(script)
        .args(["--amqp-url", &cluster.infra.amqp_url, "--namespace", &cluster.namespace])
        .args(["--customer", "py-customer", "--sku", "sku-004", "--quantity", "2", "--price-cents", "450"])
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {python}: {e}"));
    assert!(
        output.status.success(),
        "place_order.py failed (is pika installed? scripts/test installs it): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let order_id: Uuid =
        String::from_utf8_lossy(&output.stdout).trim().parse().expect("the script prints the order id");
    cluster.wait_terminal(&[order_id], Duration::from_secs(60)).await;
    assert_eq!(cluster.status(order_id).await, ("CONFIRMED".into(), None));
    cluster.assert_invariants().await;
    cluster.shutdown().await;
}
