//! The whole workflow on the release worker binaries: bursts, the maximum sustainable rate, then fixed offered
//! loads.

use std::path::Path;
use std::process::Stdio;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use choreo_messages::payloads::{OrderLine, PlaceOrder};
use choreo_messages::{EncodedEnvelope, Envelope, Message};
use choreo_rabbitmq::publisher::Outgoing;
use choreo_rabbitmq::{ConfirmingPublisher, Topology, connect_pool};
use prometheus_parse::{Scrape, Value};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool, Row};
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::Args;
use crate::capacity::{self, Bracket};
use crate::cpu::{self, CpuUse, Snapshot};
use crate::probe::{Probe, Stalls};
use crate::sustained::{self, Search};

const WORKERS: [&str; 3] = ["order", "payment", "inventory"];
/// Broker messages per happy-path workflow: order.place, order.created, payment.succeeded,
/// inventory.reserved, order.confirmed.
pub const MESSAGES_PER_WORKFLOW: f64 = 5.0;
/// Saga-step transactions per happy-path workflow (one per handled message).
pub const STEPS_PER_WORKFLOW: f64 = 4.0;

#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub label: String,
    pub offered_per_second: Option<f64>,
    pub orders: usize,
    pub workflows_per_second: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    /// Median latency of the orders placed in the first half of the run and in the second, in ms: a backlog
    /// that grows through the run shows as a second half much slower than the first.
    pub latency_p50_halves_ms: Option<(f64, f64)>,
    /// Peak resident memory of each worker so far (VmHWM), in MiB.
    pub peak_rss_mib: Vec<(String, f64)>,
    /// Median time of each hop of the happy path, in ms: where the latency is.
    pub hops_p50_ms: Vec<(String, f64)>,
    /// Each hop of the slowest confirmed workflow, in ms: which hop a stall was in.
    pub slowest_hops_ms: Vec<(String, f64)>,
    /// Processor time per workflow, by part: where the CPU is.
    pub cpu: CpuUse,
    /// What left the fast path during the run, counted by the workers ([`OFF_PATH`]): where a stall may come
    /// from.
    pub off_path: Vec<(String, f64)>,
    /// The largest stalls of the machine during the run ([`crate::probe`]): whether a stall was the machine's.
    pub machine: Stalls,
}

/// The workers' counters of what leaves the fast path, with the names the report gives them: rows a relay
/// sweep published (a hand-off the relay could not take, or a failed publish), batches gone one message at a
/// time, retries of a message, dead letters.
pub const OFF_PATH: [(&str, &str); 4] = [
    ("choreo_relay_swept_total", "relay sweeps"),
    ("choreo_batch_fallbacks_total", "batch fallbacks"),
    ("choreo_retries_total", "retries"),
    ("choreo_dead_lettered_total", "dead letters"),
];

/// The sum over all series of each [`OFF_PATH`] counter in a Prometheus text exposition.
fn off_path_counts(exposition: &str) -> [f64; OFF_PATH.len()] {
    let mut counts = [0.0; OFF_PATH.len()];
    let Ok(scrape) = Scrape::parse(exposition.lines().map(|l| Ok(l.to_owned()))) else { return counts };
    for sample in &scrape.samples {
        if let (Some(i), Value::Counter(v) | Value::Untyped(v)) =
            (OFF_PATH.iter().position(|(metric, _)| *metric == sample.metric), &sample.value)
        {
            counts[i] += v;
        }
    }
    counts
}

/// `GET path` on a worker's HTTP port; the body of a 200 reply.
async fn http_get(client: &reqwest::Client, port: u16, path: &str) -> Option<String> {
    let reply = client.get(format!("http://127.0.0.1:{port}{path}")).send().await.ok()?;
    if !reply.status().is_success() {
        return None;
    }
    reply.text().await.ok()
}

/// The hops of workflows whose ends (id, placed, completed) and handler starts (one map per handler, in the
/// order of the path) are given, in seconds; a workflow missing a start is left out.
fn hops_of(ends: Vec<(Uuid, f64, f64)>, steps: &[std::collections::HashMap<Uuid, f64>]) -> Hops {
    let mut hops: Vec<Vec<f64>> = vec![Vec::with_capacity(ends.len()); HOPS.len()];
    let mut slowest: Option<(f64, Vec<f64>)> = None;
    for (id, placed, completed) in ends {
        let Some(times) = steps.iter().map(|s| s.get(&id).copied()).collect::<Option<Vec<f64>>>() else { continue };
        let points: Vec<f64> = std::iter::once(placed).chain(times).chain(std::iter::once(completed)).collect();
        let each: Vec<f64> = points.windows(2).map(|pair| (pair[1] - pair[0]) * 1000.0).collect();
        for (hop, ms) in hops.iter_mut().zip(&each) {
            hop.push(*ms);
        }
        let total = completed - placed;
        if slowest.as_ref().is_none_or(|(t, _)| total > *t) {
            slowest = Some((total, each));
        }
    }
    let named = |times: Vec<f64>| HOPS.iter().map(|n| n.to_string()).zip(times).collect();
    Hops {
        p50: named(
            hops.into_iter()
                .map(|mut times| {
                    times.sort_by(f64::total_cmp);
                    times.get(times.len() / 2).copied().unwrap_or(f64::NAN)
                })
                .collect(),
        ),
        slowest: named(slowest.map(|(_, each)| each).unwrap_or_default()),
    }
}

/// Where a worker logs the address it serves /metrics on (at info; the bench's workers log at warn otherwise).
const SERVING_TARGET: &str = "choreo::health";

/// The port in a worker's "serving /metrics" log line (JSON), if `line` is that line.
fn serving_port(line: &str) -> Option<u16> {
    if !line.contains("serving /metrics") {
        return None;
    }
    let event: serde_json::Value = serde_json::from_str(line).ok()?;
    event["addr"].as_str()?.parse::<std::net::SocketAddr>().ok().map(|a| a.port())
}

/// The hops of one run's confirmed workflows: the median of each, and each of the slowest workflow.
struct Hops {
    p50: Vec<(String, f64)>,
    slowest: Vec<(String, f64)>,
}

/// The hops of a confirmed order, between the moments each handler's write began (`inbox.received_at`,
/// the start of the statement that commits the change, the inbox and the outbox), and from the last one to
/// the order's terminal state.
pub const HOPS: [&str; 5] =
    ["placed -> order worker", "order -> payment", "payment -> inventory", "inventory -> order", "order -> confirmed"];

struct Deployment {
    namespace: String,
    server_url: String,
    children: Vec<(String, Child)>,
    /// Each worker's `/metrics` port.
    ports: Vec<u16>,
    http: reqwest::Client,
    order_db: PgPool,
    payment_db: PgPool,
    inventory_db: PgPool,
    publisher: ConfirmingPublisher,
    exchange: String,
    probe: Probe,
}

/// What the workflow runs measured: the runs (the maximum first), the search for the maximum sustainable rate
/// and the capacity at the latency targets (each `None` when skipped).
pub struct Measured {
    pub runs: Vec<Run>,
    pub sustained: Option<Search>,
    pub capacity: Option<Bracket>,
}

pub async fn measure(args: &Args, bin_dir: &Path) -> anyhow::Result<Measured> {
    let deployment = Deployment::start(args, bin_dir).await?;
    let result = async {
        let (mut runs, sustained) = runs(args, &deployment).await?;
        let capacity = capacity(args, &deployment, &mut runs).await;
        Ok(Measured { runs, sustained, capacity })
    }
    .await;
    deployment.stop(&args.amqp_url).await;
    result
}

/// The maximum-rate run: the first of a measurement's runs.
pub fn maximum(runs: &[Run]) -> Option<&Run> {
    runs.first()
}

/// One line of progress for a finished run.
fn log_run(run: &Run) {
    let offered = run.offered_per_second.map(|o| format!("{o:.0}/s offered, ")).unwrap_or_default();
    let halves = match (run.offered_per_second, run.latency_p50_halves_ms) {
        (Some(_), Some((first, second))) => {
            format!(" (p50 {first:.1} ms in its first half, {second:.1} ms in its second)")
        }
        _ => String::new(),
    };
    eprintln!(
        "[bench]     {}: {offered}{:.0} workflows/s, p50 {:.1} ms, p99 {:.1} ms{halves}",
        run.label, run.workflows_per_second, run.latency_p50_ms, run.latency_p99_ms
    );
}

/// Bisect for the highest offered rate that meets the latency targets, starting from the bracket the runs so
/// far leave; each step's run joins `runs`. `None` when the search is turned off, or when one of its runs
/// failed: the search is an addition, and the runs before it stand without it.
async fn capacity(args: &Args, d: &Deployment, runs: &mut Vec<Run>) -> Option<Bracket> {
    let maximum = maximum(runs)?.workflows_per_second;
    if args.capacity_steps == 0 {
        return None;
    }
    let outcomes: Vec<(f64, bool)> =
        runs.iter().filter_map(|r| r.offered_per_second.map(|rate| (rate, capacity::meets_targets(r)))).collect();
    let mut bracket = Bracket::from_runs(&outcomes, maximum);
    for _ in 0..args.capacity_steps {
        let Some(rate) = bracket.next(maximum * 0.02) else { break };
        let run = match d.run_load(rate, args.load_duration, &format!("capacity {rate:.0}/s")).await {
            Ok(run) => run,
            Err(e) => {
                eprintln!("[bench]     the capacity search stopped: a run at {rate:.0}/s failed: {e:#}");
                return None;
            }
        };
        log_run(&run);
        bracket.record(rate, capacity::meets_targets(&run));
        runs.push(run);
    }
    Some(bracket)
}

async fn runs(args: &Args, d: &Deployment) -> anyhow::Result<(Vec<Run>, Option<Search>)> {
    // Warm up: connections, caches, JIT-free but not cold.
    d.run_burst(500, "warm-up").await?;
    let mut bursts = Vec::new();
    for k in 1..=args.max_rate_bursts {
        let burst = d.run_burst(args.max_rate_orders, &format!("burst {k}")).await?;
        log_run(&burst);
        bursts.push(burst);
    }
    let bursts = fastest_first(bursts);
    let peak = bursts.first().context("no burst ran")?.workflows_per_second;
    let (mut runs, search) = sustained(args, d, peak).await?;
    runs.extend(bursts);
    if search.is_none() {
        // No search: the fastest burst stands for the maximum, as it did before the search existed.
        let fastest = runs.iter().position(|r| r.label == FASTEST_BURST).context("no burst ran")?;
        let mut max = runs.remove(fastest);
        max.label = "maximum".to_owned();
        runs.insert(0, max);
    }
    let max = runs.first().context("no maximum")?.workflows_per_second;
    let mut fixed: Vec<(f64, String)> =
        [0.2, 0.5].iter().map(|share| (max * share, format!("{:.0}% of maximum", share * 100.0))).collect();
    fixed.extend(args.rates.iter().map(|rate| (*rate, format!("{rate:.0}/s"))));
    if args.light_rate > 0.0 {
        fixed.push((args.light_rate, format!("light ({:.0}/s)", args.light_rate)));
    }
    for (rate, label) in fixed {
        let run = d.run_load(rate, args.load_duration, &label).await?;
        log_run(&run);
        runs.push(run);
    }
    Ok((runs, search))
}

/// Search for the maximum sustainable rate with steady loads, from the fastest burst's rate `peak` down
/// (see [`crate::sustained`]). The runs come back the maximum first (relabelled "maximum"), then the others
/// of the search; `None` for the search, and no runs, when it is turned off. When no run kept up, the run
/// that worked off the most stands for the maximum, and the report says the search did not find one.
async fn sustained(args: &Args, d: &Deployment, peak: f64) -> anyhow::Result<(Vec<Run>, Option<Search>)> {
    if args.sustain_steps == 0 {
        return Ok((Vec::new(), None));
    }
    let mut search = Search::new(peak);
    let mut runs: Vec<Run> = Vec::new();
    for _ in 0..args.sustain_steps {
        let Some(rate) = search.next(peak * 0.02) else { break };
        let run = d.run_load(rate, args.load_duration, &format!("steady {rate:.0}/s")).await?;
        log_run(&run);
        search.record_outcome(rate, run.workflows_per_second, sustained::kept_up(&run));
        runs.push(run);
    }
    let best = match search.kept_up {
        Some((kept, _)) => runs.iter().position(|r| r.offered_per_second == Some(kept)),
        None => runs
            .iter()
            .enumerate()
            .max_by(|(_, a), (_, b)| a.workflows_per_second.total_cmp(&b.workflows_per_second))
            .map(|(i, _)| i),
    }
    .context("the search ran no load")?;
    let mut max = runs.remove(best);
    max.label = "maximum".to_owned();
    runs.insert(0, max);
    eprintln!("[bench]     maximum sustainable rate: {}", search.describe());
    Ok((runs, Some(search)))
}

const FASTEST_BURST: &str = "fastest burst";

/// The bursts, the fastest first, the others after it as slower bursts. Noise on a shared machine (another
/// tenant, a stall of the disk) only slows a burst down: the fastest is the best estimate of what the
/// workflow can do in a burst, and where the search for the sustainable rate starts.
fn fastest_first(mut bursts: Vec<Run>) -> Vec<Run> {
    bursts.sort_by(|a, b| b.workflows_per_second.total_cmp(&a.workflows_per_second));
    for (i, burst) in bursts.iter_mut().enumerate() {
        burst.label = if i == 0 { FASTEST_BURST } else { "slower burst" }.to_owned();
    }
    bursts
}

fn order(i: usize) -> PlaceOrder {
    PlaceOrder {
        order_id: Uuid::now_v7(),
        customer_id: format!("cust-{}", i % 1000),
        currency: "EUR".into(),
        lines: vec![OrderLine {
            sku: format!("sku-{:03}", i % 10 + 1),
            quantity: 1,
            unit_price_cents: 100 + (i % 50) as i64,
        }],
    }
}

fn envelope(o: PlaceOrder) -> EncodedEnvelope {
    let id = o.order_id;
    Envelope::new_command(Message::OrderPlace(o), "bench", Some(id)).encode()
}

async fn ready(client: &reqwest::Client, port: u16) -> bool {
    http_get(client, port, "/health/ready").await.is_some()
}

impl Deployment {
    async fn start(args: &Args, bin_dir: &Path) -> anyhow::Result<Deployment> {
        let namespace = format!("bench{}", &Uuid::new_v4().simple().to_string()[..8]);
        let server = PgConnectOptions::from_str(&args.database_url)?;
        let db_url = |w: &str| choreo_testkit::database_url(&args.database_url, &format!("{namespace}_{w}"));
        let http = reqwest::Client::new();
        let mut children = Vec::new();
        let mut ports = Vec::new();
        for w in WORKERS {
            let binary = bin_dir.join(format!("{w}-worker"));
            if !binary.exists() {
                bail!("{} is missing: build with `cargo build --release -p choreo-workers`", binary.display());
            }
            // Each worker binds a port of its own choosing and says which in its log: a port chosen here and
            // bound later could be taken in between.
            let mut child = Command::new(&binary)
                .env("AMQP_URL", &args.amqp_url)
                .env("DATABASE_URL", &args.database_url)
                .env(format!("CHOREO_{}_DATABASE_URL", w.to_uppercase()), db_url(w)?)
                .env("CHOREO_NAMESPACE", &namespace)
                .env("CHOREO_METRICS_ADDR", "127.0.0.1:0")
                .env("CHOREO_LOG_FORMAT", "json")
                .env("RUST_LOG", format!("warn,{SERVING_TARGET}=info"))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", binary.display()))?;
            let log = child.stdout.take().context("the worker's piped stdout")?;
            ports.push(choreo_testkit::follow_log(log, format!("{w}-worker"), serving_port));
            children.push((w.to_owned(), child));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut ready_ports = Vec::new();
        for ((w, child), port) in children.iter_mut().zip(ports) {
            let port = tokio::select! {
                port = port => match port {
                    Ok(port) => port,
                    Err(_) => bail!("the {w} worker closed its output without saying where it serves /metrics"),
                },
                status = child.wait() => bail!("the {w} worker exited before it was ready ({}); its error is above", status?),
                () = tokio::time::sleep_until(deadline.into()) => {
                    bail!("the {w} worker did not say where it serves /metrics within 60 s")
                }
            };
            while !ready(&http, port).await {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!("the {w} worker exited before it was ready ({status}); its error is above");
                }
                if Instant::now() > deadline {
                    bail!("the {w} worker did not become ready within 60 s (its /health/ready on 127.0.0.1:{port})");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            ready_ports.push(port);
        }
        let ports = ready_ports;
        let connect = |w: &str| {
            PgPoolOptions::new().max_connections(2).connect_with(server.clone().database(&format!("{namespace}_{w}")))
        };
        let order_db = connect("order").await?;
        let payment_db = connect("payment").await?;
        let inventory_db = connect("inventory").await?;
        let pool = connect_pool(&args.amqp_url, "choreo-bench", 2)?;
        let publisher = ConfirmingPublisher::new(pool, Duration::from_secs(30));
        let exchange = Topology::new(namespace.clone()).events_exchange();
        Ok(Deployment {
            namespace,
            server_url: args.database_url.clone(),
            children,
            ports,
            http,
            order_db,
            payment_db,
            inventory_db,
            publisher,
            exchange,
            probe: Probe::start(&args.out),
        })
    }

    async fn publish(&self, envelopes: &[EncodedEnvelope]) -> anyhow::Result<()> {
        let outgoing: Vec<Outgoing<'_>> = envelopes.iter().map(|e| Outgoing::envelope(&self.exchange, e)).collect();
        for r in self.publisher.publish_batch(&outgoing).await {
            r?;
        }
        Ok(())
    }

    /// Bring the planner's statistics of the workers' databases up to date before a run, as autovacuum keeps
    /// them on a database that has been running for a while. The bench starts on empty databases and fills
    /// them within seconds. A worker's connection keeps the generic plan it made of a statement while a table
    /// was nearly empty (a scan of the whole table: cheap then) until that table is next analyzed, which
    /// autovacuum does at most about once a minute per database; without this, whether a run met such plans,
    /// now scanning thousands of rows per message, depended on when autovacuum came by. Outside the
    /// measured window.
    async fn refresh_statistics(&self) -> anyhow::Result<()> {
        for db in [&self.order_db, &self.payment_db, &self.inventory_db] {
            db.execute("ANALYZE").await?;
        }
        Ok(())
    }

    /// Place `n` orders as fast as the broker confirms them.
    async fn run_burst(&self, n: usize, label: &str) -> anyhow::Result<Run> {
        self.refresh_statistics().await?;
        let cpu = self.cpu();
        let off_path = self.off_path().await;
        self.probe.take();
        let orders: Vec<EncodedEnvelope> = (0..n).map(|i| envelope(order(i))).collect();
        let ids: Vec<Uuid> = orders.iter().map(|e| e.meta.correlation_id).collect();
        for chunk in orders.chunks(500) {
            self.publish(chunk).await?;
        }
        self.finish(label, None, &ids, cpu, off_path).await
    }

    /// Place orders at `rate` per second for `duration`.
    async fn run_load(&self, rate: f64, duration: Duration, label: &str) -> anyhow::Result<Run> {
        self.refresh_statistics().await?;
        let cpu = self.cpu();
        let off_path = self.off_path().await;
        self.probe.take();
        let started = Instant::now();
        let mut ids = Vec::new();
        let mut i = 0usize;
        while started.elapsed() < duration {
            let due = (started.elapsed().as_secs_f64() * rate) as usize;
            if due > i {
                let batch: Vec<EncodedEnvelope> = (i..due).map(|k| envelope(order(k))).collect();
                ids.extend(batch.iter().map(|e| e.meta.correlation_id));
                self.publish(&batch).await?;
                i = due;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.finish(label, Some(rate), &ids, cpu, off_path).await
    }

    /// CPU time used so far by the workers, the servers and the benchmark.
    fn cpu(&self) -> Snapshot {
        let pids: Vec<u32> = self.children.iter().filter_map(|(_, c)| c.id()).collect();
        Snapshot::take(&pids)
    }

    /// The workers' [`OFF_PATH`] counters, summed over the workers (a worker that does not answer counts 0).
    async fn off_path(&self) -> [f64; OFF_PATH.len()] {
        let mut counts = [0.0; OFF_PATH.len()];
        for port in &self.ports {
            if let Some(text) = http_get(&self.http, *port, "/metrics").await {
                for (count, n) in counts.iter_mut().zip(off_path_counts(&text)) {
                    *count += n;
                }
            }
        }
        counts
    }

    async fn finish(
        &self,
        label: &str,
        offered: Option<f64>,
        ids: &[Uuid],
        cpu_before: Snapshot,
        off_path_before: [f64; OFF_PATH.len()],
    ) -> anyhow::Result<Run> {
        let deadline = Instant::now() + Duration::from_secs(600);
        // Runs follow each other, so "this run is done" is "every order of this run exists and none is
        // pending": two cheap counts instead of a lookup of every id, which would load the database we measure.
        let first = ids.first().copied().unwrap_or_default();
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let (created, pending): (i64, i64) = sqlx::query_as(
                "SELECT count(*), count(*) FILTER (WHERE status = 'PENDING') FROM orders WHERE order_id >= $1",
            )
            .bind(first)
            .fetch_one(&self.order_db)
            .await?;
            let done = created - pending;
            if done as usize == ids.len() {
                break;
            }
            if Instant::now() > deadline {
                bail!("{label}: only {done} of {} orders completed in 10 minutes", ids.len());
            }
        }
        let cpu = cpu_before.until(&self.cpu(), ids.len());
        let off_path = self.off_path().await;
        let off_path = OFF_PATH
            .iter()
            .zip(off_path.iter().zip(off_path_before))
            .map(|((_, name), (after, before))| ((*name).to_owned(), (after - before).max(0.0)))
            .collect();
        // One pass over the run's orders: its span, latency figures, and the median latency of the orders
        // placed in each half of it.
        let row = sqlx::query(
            "WITH o AS (SELECT placed_at, completed_at, EXTRACT(EPOCH FROM completed_at - placed_at)::float8 AS latency \
                        FROM orders WHERE order_id = ANY($1)), \
                  m AS (SELECT min(placed_at) + (max(placed_at) - min(placed_at)) / 2 AS mid FROM o) \
             SELECT EXTRACT(EPOCH FROM max(completed_at) - min(placed_at))::float8 AS wall, \
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY latency) AS p50, \
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY latency) AS p99, \
                    max(latency) AS max, \
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY latency) FILTER (WHERE placed_at < m.mid) AS first_half, \
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY latency) FILTER (WHERE placed_at >= m.mid) AS second_half \
             FROM o, m GROUP BY m.mid",
        )
        .bind(ids)
        .fetch_one(&self.order_db)
        .await?;
        let wall: f64 = row.try_get("wall")?;
        let halves: (Option<f64>, Option<f64>) = (row.try_get("first_half")?, row.try_get("second_half")?);
        let hops = self.hops_ms(ids).await?;
        Ok(Run {
            label: label.to_owned(),
            offered_per_second: offered,
            orders: ids.len(),
            workflows_per_second: ids.len() as f64 / wall.max(1e-9),
            latency_p50_ms: row.try_get::<f64, _>("p50")? * 1000.0,
            latency_p99_ms: row.try_get::<f64, _>("p99")? * 1000.0,
            latency_max_ms: row.try_get::<f64, _>("max")? * 1000.0,
            latency_p50_halves_ms: match halves {
                (Some(first), Some(second)) => Some((first * 1000.0, second * 1000.0)),
                _ => None,
            },
            peak_rss_mib: self
                .children
                .iter()
                .map(|(w, c)| (w.clone(), c.id().map(cpu::peak_rss_mib).unwrap_or(0.0)))
                .collect(),
            hops_p50_ms: hops.p50,
            slowest_hops_ms: hops.slowest,
            cpu,
            off_path,
            machine: self.probe.take(),
        })
    }

    /// Median of each hop over the confirmed orders of `ids` (their correlation ids).
    async fn hops_ms(&self, ids: &[Uuid]) -> anyhow::Result<Hops> {
        type Stamps = std::collections::HashMap<Uuid, f64>;
        async fn started(db: &PgPool, message_type: &str, ids: &[Uuid]) -> anyhow::Result<Stamps> {
            let rows: Vec<(Uuid, f64)> = sqlx::query_as(
                "SELECT correlation_id, EXTRACT(EPOCH FROM received_at)::float8 FROM inbox \
                 WHERE correlation_id = ANY($1) AND message_type = $2",
            )
            .bind(ids)
            .bind(message_type)
            .fetch_all(db)
            .await?;
            Ok(rows.into_iter().collect())
        }
        let ends: Vec<(Uuid, f64, f64)> = sqlx::query_as(
            "SELECT correlation_id, EXTRACT(EPOCH FROM placed_at)::float8, EXTRACT(EPOCH FROM completed_at)::float8 \
             FROM orders WHERE correlation_id = ANY($1) AND status = 'CONFIRMED'",
        )
        .bind(ids)
        .fetch_all(&self.order_db)
        .await?;
        let steps = [
            started(&self.order_db, "order.place", ids).await?,
            started(&self.payment_db, "order.created", ids).await?,
            started(&self.inventory_db, "payment.succeeded", ids).await?,
            started(&self.order_db, "inventory.reserved", ids).await?,
        ];
        Ok(hops_of(ends, &steps))
    }

    async fn stop(mut self, amqp_url: &str) {
        for (_, child) in &mut self.children {
            let _ = child.kill().await;
        }
        self.order_db.close().await;
        self.payment_db.close().await;
        self.inventory_db.close().await;
        if let Ok(admin) = PgPool::connect(&self.server_url).await {
            for w in WORKERS {
                let _ = admin
                    .execute(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS \"{}_{w}\" WITH (FORCE)",
                        self.namespace
                    )))
                    .await;
            }
        }
        if let Ok(conn) = choreo_rabbitmq::lapin::Connection::connect(amqp_url, Default::default()).await
            && let Ok(ch) = conn.create_channel().await
        {
            let t = Topology::new(self.namespace.clone());
            let delays = [1, 10, 60].map(Duration::from_secs);
            let mut queues = vec![t.outcomes_queue()];
            for w in WORKERS {
                queues.extend(t.queue_names(w, &delays));
            }
            for q in queues {
                let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
            }
            for e in t.exchange_names() {
                let _ = ch.exchange_delete(e.as_str().into(), Default::default()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuUse;

    fn burst(label: &str, per_second: f64) -> Run {
        Run {
            label: label.into(),
            offered_per_second: None,
            orders: 10_000,
            workflows_per_second: per_second,
            latency_p50_ms: 3000.0,
            latency_p99_ms: 6000.0,
            latency_max_ms: 6500.0,
            latency_p50_halves_ms: None,
            peak_rss_mib: vec![],
            hops_p50_ms: vec![],
            slowest_hops_ms: vec![],
            cpu: CpuUse { ms_per_workflow: vec![], cores_busy: 0.0, switches_per_workflow: vec![] },
            off_path: vec![],
            machine: Stalls::default(),
        }
    }

    #[test]
    fn the_fastest_burst_comes_first_and_the_others_follow_it() {
        let runs = fastest_first(vec![burst("burst 1", 1125.0), burst("burst 2", 1690.0), burst("burst 3", 1400.0)]);
        let named: Vec<(&str, f64)> = runs.iter().map(|r| (r.label.as_str(), r.workflows_per_second)).collect();
        assert_eq!(named, [(FASTEST_BURST, 1690.0), ("slower burst", 1400.0), ("slower burst", 1125.0)]);
        assert!(fastest_first(vec![]).is_empty());
    }

    #[test]
    fn the_slowest_workflow_names_the_hop_it_lost_its_time_in() {
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let starts = |times: [(Uuid, f64); 3]| times.into_iter().collect::<std::collections::HashMap<Uuid, f64>>();
        // Placed at 0; handlers start at 1, 2, 3, 4 ms (b: its payment hop took 500 ms); completed 1 ms later.
        let steps = [
            starts([(a, 0.001), (b, 0.001), (c, 0.001)]),
            starts([(a, 0.002), (b, 0.501), (c, 0.002)]),
            starts([(a, 0.003), (b, 0.502), (c, 0.003)]),
            starts([(a, 0.004), (b, 0.503), (c, 0.004)]),
        ];
        let ends = vec![(a, 0.0, 0.005), (b, 0.0, 0.504), (c, 0.0, 0.005)];
        let hops = hops_of(ends, &steps);
        let ms = |v: &[(String, f64)]| v.iter().map(|(_, ms)| ms.round()).collect::<Vec<f64>>();
        assert_eq!(ms(&hops.p50), vec![1.0, 1.0, 1.0, 1.0, 1.0]);
        assert_eq!(ms(&hops.slowest), vec![1.0, 500.0, 1.0, 1.0, 1.0]);
        assert_eq!(hops.slowest[1].0, HOPS[1]);
        // A workflow without every start is left out, and no workflow gives no hops.
        let none = hops_of(vec![(Uuid::now_v7(), 0.0, 1.0)], &steps);
        assert!(none.slowest.is_empty() && none.p50.iter().all(|(_, ms)| ms.is_nan()));
    }

    #[test]
    fn the_port_comes_from_the_serving_line_and_no_other() {
        let serving = r#"{"timestamp":"2026-11-24T06:50:50.588185Z","level":"INFO","message":"serving /metrics, /health/live and /health/ready","addr":"127.0.0.1:9466"}"#;
        assert_eq!(serving_port(serving), Some(9466));
        assert_eq!(serving_port(r#"{"level":"WARN","message":"relay busy","addr":"127.0.0.1:1"}"#), None);
        assert_eq!(serving_port("serving /metrics, not JSON"), None);
    }

    #[test]
    fn off_path_counters_are_summed_over_their_series_and_other_metrics_are_ignored() {
        let exposition = "\
# TYPE choreo_relay_swept_total counter
choreo_relay_swept_total{worker=\"order\"} 12
choreo_batch_fallbacks_total{worker=\"payment\"} 3
choreo_retries_total{worker=\"payment\",stage=\"in_process\"} 2
choreo_retries_total{worker=\"payment\",stage=\"delayed\"} 1
choreo_dead_lettered_total{worker=\"order\",error_kind=\"malformed_body\"} 4
choreo_dead_lettered_total{worker=\"order\",error_kind=\"crashed\"} 0
choreo_relay_swept_total_other 99
choreo_messages_consumed_total{worker=\"order\"} 1000
";
        assert_eq!(off_path_counts(exposition), [12.0, 3.0, 3.0, 4.0]);
        assert_eq!(off_path_counts(""), [0.0; 4]);
    }
}
