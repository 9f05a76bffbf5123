//! A private choreo deployment for one test: its own broker namespace, its own three databases, and the
//! real worker binaries as child processes.
#![allow(dead_code)]

use std::collections::HashMap;
use std::process::Stdio;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use choreo_messages::payloads::{OrderCreated, OrderLine, PlaceOrder};
use choreo_messages::{EncodedEnvelope, Envelope, Message};
use choreo_rabbitmq::publisher::Outgoing;
use choreo_rabbitmq::{ConfirmingPublisher, Topology, connect_pool};
use choreo_testkit::{Infra, unique_namespace, wait_for};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};
use tokio::process::{Child, Command};
use uuid::Uuid;

pub const WORKERS: [&str; 3] = ["order", "payment", "inventory"];

pub struct Cluster {
    pub infra: Infra,
    pub namespace: String,
    pub topology: Topology,
    children: HashMap<&'static str, Child>,
    publisher: Arc<ConfirmingPublisher>,
    dbs: HashMap<&'static str, PgPool>,
    pub extra_env: Vec<(String, String)>,
    /// The port each worker process serves /metrics and /health on, by worker and process id: the workers
    /// bind port 0 and say which port they got in their log (see [`follow_log`]). A port chosen here and
    /// bound later by the worker could be taken in between by another test running at the same time.
    metrics_ports: MetricsPorts,
    /// The threads copying each worker process's log, by process id.
    logs: HashMap<u32, std::thread::JoinHandle<()>>,
    /// The participants of this cluster: the reference workers, then any that joined.
    workers: Vec<&'static str>,
}

/// Where the worker logs the address it serves /metrics on (at info; tests log at warn otherwise).
const SERVING_TARGET: &str = "choreo::health";

/// Settings for a worker process started with [`follow_log`]: JSON logs on stdout, at warn but for the line
/// that says where /metrics is served, on a port the worker picks itself.
pub fn followed_worker_env(command: &mut Command) -> &mut Command {
    command
        .env("CHOREO_LOG_FORMAT", "json")
        .env("CHOREO_METRICS_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", format!("warn,{SERVING_TARGET}=info"))
        .stdout(Stdio::piped())
}

/// Copy a worker's log (JSON lines on its stdout, piped) to the test's stderr, which the test runner shows
/// when the test fails, and note in `ports` the port it serves /metrics on, under its process id, for as long
/// as it runs. A thread of its own, so that a test busy elsewhere never leaves the pipe full and the worker
/// blocked on a log line; it ends when the worker has exited.
pub fn follow_log(worker: &'static str, child: &mut Child, ports: MetricsPorts) -> std::thread::JoinHandle<()> {
    use std::io::BufRead;
    let pid = child.id().expect("a running child has a pid");
    let log = std::fs::File::from(child.stdout.take().expect("piped stdout").into_owned_fd().expect("stdout pipe"));
    std::thread::spawn(move || {
        let mut log = std::io::BufReader::new(log);
        let mut bytes = Vec::new();
        loop {
            bytes.clear();
            match log.read_until(b'\n', &mut bytes) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&bytes);
            let line = line.trim_end();
            if line.contains("serving /metrics")
                && let Ok(event) = serde_json::from_str::<serde_json::Value>(line)
                && let Some(addr) = event["addr"].as_str().and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            {
                ports.lock().expect("ports").insert(pid, addr.port());
                continue;
            }
            eprintln!("[{worker}-worker {pid}] {line}");
        }
        ports.lock().expect("ports").remove(&pid);
    })
}

/// Where each followed worker process serves /metrics: process id to port.
pub type MetricsPorts = Arc<Mutex<HashMap<u32, u16>>>;

/// The port process `pid` of `worker` serves /metrics on, once its log has said so.
pub async fn metrics_port_of(ports: &MetricsPorts, worker: &str, pid: u32) -> u16 {
    wait_for(&format!("the {worker} worker's metrics port (process {pid})"), Duration::from_secs(60), || async {
        ports.lock().expect("ports").get(&pid).copied().ok_or("not logged yet")
    })
    .await
}

/// Panic, naming the worker and how it ended, if a worker process has exited: a start-up that failed says so
/// at once, after the last lines of its log, instead of at the end of a wait for something it will never do.
fn assert_running(children: &mut HashMap<&'static str, Child>, logs: &mut HashMap<u32, std::thread::JoinHandle<()>>) {
    for (worker, child) in children.iter_mut() {
        let pid = child.id();
        if let Ok(Some(status)) = child.try_wait() {
            // The process is gone, so its log ends: let the thread copy what is left before the panic.
            if let Some(log) = pid.and_then(|pid| logs.remove(&pid)) {
                let _ = log.join();
            }
            panic!("the {worker} worker exited while the test waited for it ({status}); its log is above");
        }
    }
}

fn binary(worker: &str) -> &'static str {
    match worker {
        "order" => env!("CARGO_BIN_EXE_order-worker"),
        "payment" => env!("CARGO_BIN_EXE_payment-worker"),
        "inventory" => env!("CARGO_BIN_EXE_inventory-worker"),
        "shipping" => shipping_binary(),
        other => panic!("no worker {other}"),
    }
}

/// The shipping example's binary, built beside this package's (`cargo build --workspace` builds it).
fn shipping_binary() -> &'static str {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let beside = std::path::Path::new(env!("CARGO_BIN_EXE_order-worker")).with_file_name("shipping-worker");
        assert!(beside.exists(), "{} is missing: build it with `cargo build -p choreo-shipping`", beside.display());
        beside.display().to_string()
    })
}

impl Cluster {
    /// Start all three workers and wait until their databases are migrated and queues declared.
    pub async fn start() -> Cluster {
        Self::start_with(vec![]).await
    }

    pub async fn start_with(extra_env: Vec<(String, String)>) -> Cluster {
        let infra = Infra::from_env();
        let namespace = unique_namespace();
        let topology = Topology::new(namespace.clone());
        let pool = connect_pool(&infra.amqp_url, "choreo-test", 1).expect("broker pool");
        let publisher = Arc::new(ConfirmingPublisher::new(pool, Duration::from_secs(10)));
        let mut cluster = Cluster {
            infra,
            namespace,
            topology,
            children: HashMap::new(),
            publisher,
            dbs: HashMap::new(),
            extra_env,
            metrics_ports: MetricsPorts::default(),
            logs: HashMap::new(),
            workers: WORKERS.to_vec(),
        };
        for worker in WORKERS {
            cluster.spawn(worker);
        }
        for worker in WORKERS {
            cluster.wait_database(worker).await;
        }
        cluster.wait_consuming().await;
        cluster
    }

    /// Start one more participant (`shipping`) in the running cluster, and wait until it consumes.
    pub async fn join(&mut self, worker: &'static str) {
        self.workers.push(worker);
        self.spawn(worker);
        self.wait_database(worker).await;
        self.wait_consuming().await;
    }

    /// Wait until `worker` has migrated its database, and keep a pool on it.
    async fn wait_database(&mut self, worker: &'static str) {
        let cluster = self;
        {
            let url = cluster.database_url(worker);
            let (children, logs) = (&mut cluster.children, &mut cluster.logs);
            let db = wait_for(&format!("{worker} database"), Duration::from_secs(60), || {
                assert_running(children, logs);
                let url = url.clone();
                async move {
                    let options = PgConnectOptions::from_str(&url).map_err(|e| e.to_string())?;
                    let pool = PgPoolOptions::new()
                        .max_connections(4)
                        .connect_with(options)
                        .await
                        .map_err(|e| e.to_string())?;
                    // The worker migrated its database once its outbox exists.
                    sqlx::query("SELECT 1 FROM outbox LIMIT 1")
                        .fetch_optional(&pool)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>(pool)
                }
            })
            .await;
            cluster.dbs.insert(worker, db);
        }
    }

    pub fn database_name(&self, worker: &str) -> String {
        format!("{}_{worker}", self.namespace)
    }

    pub fn database_url(&self, worker: &str) -> String {
        self.infra.database(&self.database_name(worker))
    }

    pub fn db(&self, worker: &str) -> &PgPool {
        &self.dbs[worker]
    }

    pub fn spawn(&mut self, worker: &'static str) {
        self.spawn_with(worker, &[]);
    }

    /// Start a worker with settings of its own on top of the cluster's.
    pub fn spawn_with(&mut self, worker: &'static str, own: &[(&str, &str)]) {
        let mut command = Command::new(binary(worker));
        command
            .env("AMQP_URL", &self.infra.amqp_url)
            .env("DATABASE_URL", &self.infra.database_url)
            .env(format!("CHOREO_{}_DATABASE_URL", worker.to_uppercase()), self.database_url(worker))
            .env("CHOREO_NAMESPACE", &self.namespace)
            .env("CHOREO_RELAY_SWEEP", "200ms")
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        followed_worker_env(&mut command);
        for (k, v) in &self.extra_env {
            command.env(k, v);
        }
        for (k, v) in own {
            command.env(k, v);
        }
        let mut child = command.spawn().unwrap_or_else(|e| panic!("spawning {worker}-worker: {e}"));
        let pid = child.id().expect("a running child has a pid");
        self.logs.retain(|_, log| !log.is_finished());
        self.logs.insert(pid, follow_log(worker, &mut child, Arc::clone(&self.metrics_ports)));
        self.children.insert(worker, child);
    }

    /// The port the running `worker` process serves /metrics on, once it has bound it.
    pub async fn metrics_port(&self, worker: &str) -> u16 {
        let pid = self
            .children
            .get(worker)
            .and_then(|c| c.id())
            .unwrap_or_else(|| panic!("the {worker} worker is not running"));
        metrics_port_of(&self.metrics_ports, worker, pid).await
    }

    /// SIGKILL a worker: no draining, no final relay pass.
    /// Kill a worker's process and wait until the broker has dropped its consumer. Until the broker notices
    /// the lost connection it still delivers to the dead consumer, and what it delivered there comes back
    /// marked redelivered, which a test publishing right after the kill would not expect.
    pub async fn kill(&mut self, worker: &'static str) {
        if let Some(mut child) = self.children.remove(worker) {
            let queue = self.topology.worker_queue(worker);
            let (_, before) = self.depth_and_consumers(&queue).await;
            child.kill().await.expect("kill");
            if before > 0 {
                wait_for(
                    &format!("the broker to drop the killed {worker} worker's consumer"),
                    Duration::from_secs(60),
                    || async {
                        let (_, now) = self.depth_and_consumers(&queue).await;
                        if now < before { Ok(()) } else { Err(now) }
                    },
                )
                .await;
            }
        }
    }

    /// Whether a worker's process has exited (and it is then forgotten).
    pub fn exited(&mut self, worker: &'static str) -> bool {
        let gone = match self.children.get_mut(worker) {
            Some(child) => matches!(child.try_wait(), Ok(Some(_))),
            None => true,
        };
        if gone {
            self.children.remove(worker);
        }
        gone
    }

    /// Take one message off a queue (acked), if there is one.
    pub async fn get(&self, queue: &str) -> Option<choreo_rabbitmq::lapin::message::BasicGetMessage> {
        let conn = choreo_rabbitmq::lapin::Connection::connect(&self.infra.amqp_url, Default::default())
            .await
            .expect("broker");
        let channel = conn.create_channel().await.expect("channel");
        let message = channel
            .basic_get(queue.into(), choreo_rabbitmq::lapin::options::BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get");
        let _ = conn.close(200, "ok".into()).await;
        message
    }

    /// Restart `worker` whenever it has exited (a message keeps crashing it) until a message reaches its
    /// dead-letter queue; return that message, and leave the worker running.
    pub async fn respawn_until_dead_letter(
        &mut self,
        worker: &'static str,
        timeout: Duration,
    ) -> choreo_rabbitmq::lapin::message::BasicGetMessage {
        let dlq = self.topology.dead_letter_queue(worker);
        let deadline = std::time::Instant::now() + timeout;
        let letter = loop {
            if self.exited(worker) {
                self.spawn(worker);
            }
            if let Some(letter) = self.get(&dlq).await {
                break letter;
            }
            assert!(std::time::Instant::now() < deadline, "no message reached {dlq}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if self.exited(worker) {
            self.spawn(worker);
        }
        letter
    }

    /// SIGTERM a worker and return its exit status.
    pub async fn terminate(&mut self, worker: &'static str) -> std::process::ExitStatus {
        let mut child = self.children.remove(worker).expect("worker running");
        let pid = child.id().expect("pid");
        let status = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().expect("kill -TERM");
        assert!(status.success());
        tokio::time::timeout(Duration::from_secs(40), child.wait())
            .await
            .expect("worker exits after SIGTERM")
            .expect("wait")
    }

    /// Wait until every worker's queue has a consumer; panic at once if a worker has exited.
    pub async fn wait_consuming(&mut self) {
        let conn = choreo_rabbitmq::lapin::Connection::connect(
            &self.infra.amqp_url,
            choreo_rabbitmq::lapin::ConnectionProperties::default(),
        )
        .await
        .expect("broker");
        let (children, logs) = (&mut self.children, &mut self.logs);
        for worker in &self.workers {
            let queue = self.topology.worker_queue(worker);
            wait_for(&format!("a consumer on {queue}"), Duration::from_secs(60), || {
                assert_running(children, logs);
                async {
                    let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
                    let options =
                        choreo_rabbitmq::lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
                    let q = channel
                        .queue_declare(queue.as_str().into(), options, Default::default())
                        .await
                        .map_err(|e| e.to_string())?;
                    let _ = channel.close(200, "ok".into()).await;
                    if q.consumer_count() > 0 { Ok(()) } else { Err("no consumer yet".to_string()) }
                }
            })
            .await;
        }
        let _ = conn.close(200, "ok".into()).await;
    }

    pub async fn publish(&self, envelopes: &[EncodedEnvelope]) {
        let exchange = self.topology.events_exchange();
        let outgoing: Vec<Outgoing<'_>> = envelopes.iter().map(|e| Outgoing::envelope(&exchange, e)).collect();
        for chunk in outgoing.chunks(200) {
            for result in self.publisher.publish_batch(chunk).await {
                result.expect("published and confirmed");
            }
        }
    }

    pub async fn place(&self, orders: &[PlaceOrder]) -> Vec<Uuid> {
        self.place_traced(orders, None).await
    }

    /// Place orders whose `order.place` carries `traceparent`.
    pub async fn place_traced(&self, orders: &[PlaceOrder], traceparent: Option<&str>) -> Vec<Uuid> {
        let envelopes: Vec<EncodedEnvelope> = orders
            .iter()
            .map(|o| {
                let mut e = Envelope::new_command(Message::OrderPlace(o.clone()), "test", Some(o.order_id));
                e.meta.traceparent = traceparent.map(str::to_owned);
                e.encode()
            })
            .collect();
        self.publish(&envelopes).await;
        orders.iter().map(|o| o.order_id).collect()
    }

    /// Wait until every order is CONFIRMED or CANCELLED.
    pub async fn wait_terminal(&self, ids: &[Uuid], timeout: Duration) {
        let db = self.db("order").clone();
        wait_for("every order terminal", timeout, || {
            let db = db.clone();
            async move {
                let done: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM orders WHERE order_id = ANY($1) AND status IN ('CONFIRMED','CANCELLED')",
                )
                .bind(ids)
                .fetch_one(&db)
                .await
                .map_err(|e| e.to_string())?;
                if done as usize == ids.len() { Ok(()) } else { Err(format!("{done} of {} terminal", ids.len())) }
            }
        })
        .await;
    }

    pub async fn status(&self, order_id: Uuid) -> (String, Option<String>) {
        let row = sqlx::query("SELECT status, cancel_reason FROM orders WHERE order_id = $1")
            .bind(order_id)
            .fetch_one(self.db("order"))
            .await
            .expect("order exists");
        (row.get("status"), row.get("cancel_reason"))
    }

    /// The invariants of the brief, over every order of this cluster.
    pub async fn assert_invariants(&self) {
        let order = self.db("order");
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM orders WHERE status NOT IN ('CONFIRMED','CANCELLED')")
                .fetch_one(order)
                .await
                .expect("pending");
        assert_eq!(pending, 0, "every order ends CONFIRMED or CANCELLED");

        let confirmed_qty: Vec<(String, i64)> = sqlx::query_as(
            "SELECT l->>'sku', sum((l->>'quantity')::bigint)::bigint FROM orders, jsonb_array_elements(lines) l \
             WHERE status = 'CONFIRMED' GROUP BY 1 ORDER BY 1",
        )
        .fetch_all(order)
        .await
        .expect("confirmed quantities");
        let reserved: Vec<(String, i64)> =
            sqlx::query_as("SELECT sku, reserved FROM stock WHERE reserved > 0 ORDER BY sku")
                .fetch_all(self.db("inventory"))
                .await
                .expect("reserved");
        assert_eq!(reserved, confirmed_qty, "stock reserved equals the quantities of confirmed orders");

        let confirmed_total: i64 =
            sqlx::query_scalar("SELECT COALESCE(sum(total_cents), 0)::bigint FROM orders WHERE status = 'CONFIRMED'")
                .fetch_one(order)
                .await
                .expect("totals");
        let net_charged: i64 = sqlx::query_scalar(
            "SELECT COALESCE(sum(amount_cents) FILTER (WHERE status = 'CHARGED'), 0)::bigint FROM payments",
        )
        .fetch_one(self.db("payment"))
        .await
        .expect("charged");
        assert_eq!(net_charged, confirmed_total, "money charged minus refunded equals the totals of confirmed orders");

        let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders").fetch_one(order).await.expect("orders");
        let (payments, distinct): (i64, i64) =
            sqlx::query_as("SELECT count(*), count(DISTINCT order_id) FROM payments")
                .fetch_one(self.db("payment"))
                .await
                .expect("payments");
        assert_eq!(payments, distinct, "no customer is charged twice for one order");
        assert!(payments <= orders);
        let reservations: i64 = sqlx::query_scalar("SELECT count(DISTINCT order_id) FROM reservations")
            .fetch_one(self.db("inventory"))
            .await
            .expect("reservations");
        let confirmed: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'CONFIRMED'")
            .fetch_one(order)
            .await
            .expect("confirmed");
        assert_eq!(reservations, confirmed, "exactly the confirmed orders hold stock");

        // Nothing was given up on: a duplicate or a compensation that ends in a dead-letter queue would leave
        // the invariants above intact and still be a defect.
        for worker in WORKERS {
            let dlq = self.topology.dead_letter_queue(worker);
            let (ready, _) = self.depth_and_consumers(&dlq).await;
            assert_eq!(ready, 0, "nothing dead-lettered by the {worker} worker ({dlq})");
        }
    }

    pub async fn shutdown(mut self) {
        for worker in self.workers.clone() {
            if let Some(mut child) = self.children.remove(worker) {
                let _ = child.kill().await;
            }
        }
        for (_, db) in self.dbs.drain() {
            db.close().await;
        }
        let names: Vec<String> = self.workers.iter().map(|w| self.database_name(w)).collect();
        self.infra.drop_databases(&names).await;
        let delays: Vec<std::time::Duration> = self
            .extra_env
            .iter()
            .find(|(k, _)| k == "CHOREO_RETRY_DELAYS")
            .map(|(_, v)| v.split(',').filter_map(|d| humantime::parse_duration(d.trim()).ok()).collect())
            .unwrap_or_else(|| {
                vec![
                    std::time::Duration::from_secs(1),
                    std::time::Duration::from_secs(10),
                    std::time::Duration::from_secs(60),
                ]
            });
        let mut queues: Vec<String> = self.workers.iter().flat_map(|w| self.topology.queue_names(w, &delays)).collect();
        queues.push(self.topology.outcomes_queue());
        self.infra.delete_broker_objects(&queues, &self.topology.exchange_names()).await;
    }
}

/// A fresh database `{unique namespace}_{worker}`, migrated, with a pool of `pool_size` connections; its
/// name, for `Infra::drop_databases`, and the pool.
pub async fn migrated_database(
    infra: &Infra,
    worker: &str,
    pool_size: u32,
    migrations: &sqlx::migrate::Migrator,
) -> (String, PgPool) {
    let name = format!("{}_{worker}", unique_namespace());
    let options = PgConnectOptions::from_str(&infra.database(&name)).expect("url");
    let pool = choreo::prepare_database(&options, pool_size, migrations).await.expect("database");
    (name, pool)
}

/// An `order.created` for one unit of `sku-001` at 7.00 EUR, as the order worker publishes it.
pub fn order_created() -> Envelope {
    let order_id = Uuid::now_v7();
    Envelope::new_command(
        Message::OrderCreated(OrderCreated {
            order_id,
            customer_id: "cust-1".into(),
            currency: "EUR".into(),
            lines: vec![OrderLine { sku: "sku-001".into(), quantity: 1, unit_price_cents: 700 }],
            total_cents: 700,
        }),
        "order",
        Some(order_id),
    )
}

pub fn order(customer: &str, lines: &[(&str, u32, i64)]) -> PlaceOrder {
    PlaceOrder {
        order_id: Uuid::now_v7(),
        customer_id: customer.to_owned(),
        currency: "EUR".to_owned(),
        lines: lines
            .iter()
            .map(|(sku, quantity, price)| OrderLine {
                sku: (*sku).to_owned(),
                quantity: *quantity,
                unit_price_cents: *price,
            })
            .collect(),
    }
}

/// A mixed workload: mostly good orders, some declined cards, some sold-out lines.
pub fn mixed_orders(n: usize) -> Vec<PlaceOrder> {
    (0..n)
        .map(|i| match i % 10 {
            0 => order(&format!("decline-{i}"), &[("sku-001", 1, 500)]),
            1 => order(&format!("cust-{i}"), &[("sku-002", 2, 300), ("sku-soldout", 1, 100)]),
            k => order(&format!("cust-{i}"), &[(&format!("sku-00{}", k % 9 + 1), (i % 3 + 1) as u32, 250 + i as i64)]),
        })
        .collect()
}

/// The `choreoctl` binary of this build (`scripts/test` builds every binary before the tests).
pub fn choreoctl() -> std::path::PathBuf {
    let mut path = std::env::current_exe().expect("test binary path");
    path.pop();
    if path.ends_with("deps") {
        path.pop();
    }
    path.push("choreoctl");
    assert!(path.exists(), "{} is missing: run `cargo build -p choreoctl` (scripts/test does)", path.display());
    path
}

impl Cluster {
    /// `choreoctl` pointed at this cluster's broker namespace and databases.
    pub fn choreoctl(&self) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(choreoctl());
        command
            .env("AMQP_URL", &self.infra.amqp_url)
            .env("CHOREO_NAMESPACE", &self.namespace)
            .env("DATABASE_URL", &self.infra.database_url)
            .stdin(Stdio::null());
        for worker in WORKERS {
            command.env(format!("CHOREO_{}_DATABASE_URL", worker.to_uppercase()), self.database_url(worker));
        }
        command
    }

    /// Run `choreoctl args`, returning (exit code, stdout, stderr).
    pub async fn run_choreoctl(&self, args: &[&str]) -> (i32, String, String) {
        let output = self.choreoctl().args(args).output().await.expect("choreoctl runs");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Messages ready in a queue, and its consumers.
    pub async fn depth_and_consumers(&self, queue: &str) -> (u32, u32) {
        let conn = choreo_rabbitmq::lapin::Connection::connect(&self.infra.amqp_url, Default::default())
            .await
            .expect("broker");
        let channel = conn.create_channel().await.expect("channel");
        let options = choreo_rabbitmq::lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        let q = channel.queue_declare(queue.into(), options, Default::default()).await.expect("queue exists");
        let _ = conn.close(200, "ok".into()).await;
        (q.message_count(), q.consumer_count())
    }

    /// Messages ready in a queue.
    pub async fn depth(&self, queue: &str) -> u32 {
        self.depth_and_consumers(queue).await.0
    }

    /// Wait until a queue holds exactly `n` ready messages.
    pub async fn wait_depth(&self, queue: &str, n: u32) {
        wait_for(&format!("{n} messages in {queue}"), Duration::from_secs(60), || async {
            let d = self.depth(queue).await;
            if d == n { Ok(()) } else { Err(d) }
        })
        .await;
    }

    /// Publish a raw message to the events exchange (bad input for tests).
    pub async fn publish_raw(
        &self,
        routing_key: &str,
        properties: choreo_rabbitmq::lapin::BasicProperties,
        body: &[u8],
    ) {
        let exchange = self.topology.events_exchange();
        self.publisher
            .publish(Outgoing { exchange: &exchange, routing_key, properties, body, message_id: String::new() })
            .await
            .expect("the broker accepts it");
    }
}
