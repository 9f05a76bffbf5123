//! Wiring of one worker process: database, broker, consumer, relay, retention and an orderly shutdown.
//!
//! Shutdown order (SIGTERM or SIGINT): stop taking deliveries and finish the ones in flight; then let the
//! relay publish what those handlers committed; then close. Anything left is safe: unacked deliveries return
//! to the queue and unpublished rows stay in the outbox for the next start.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use choreo_messages::Contract;
use choreo_outbox::migrations::with_service_migrations;
use choreo_outbox::{OutboxHandoff, OutboxRelay, RelayConfig, RetentionConfig, RetentionJob};
use choreo_rabbitmq::connection::redact;
use choreo_rabbitmq::{
    ConfirmingPublisher, ConsumerConfig, ConsumerRunner, Handler, Topology, WorkerQueue, connect_pool,
};
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::health::HealthState;
use crate::migrations::Migrations;
use crate::plain::{PlainHandler, PlainRunner};
use crate::service::{HandlerCounters, Service, TransactionalHandler};
use crate::settings::Settings;

/// Everything a running worker exposes to its caller (tests read the counters).
pub struct WorkerHandle {
    /// Messages processed and duplicates skipped so far.
    pub counters: Arc<HandlerCounters>,
    /// Where `/metrics` and the health endpoints are served (the port the system chose, for port 0).
    pub metrics_addr: std::net::SocketAddr,
}

/// Connect to the worker's database, creating it when it does not exist, and migrate it.
pub async fn prepare_database(
    options: &PgConnectOptions,
    pool_size: u32,
    migrations: &Migrator,
) -> anyhow::Result<PgPool> {
    let name = options.get_database().unwrap_or("postgres").to_owned();
    let pool_options =
        choreo_outbox::hot_path_pool_options().max_connections(pool_size).acquire_timeout(Duration::from_secs(10));
    let pool = match pool_options.clone().connect_with(options.clone()).await {
        Ok(pool) => pool,
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {
            info!(database = %name, "database does not exist; creating it");
            let admin = PgPoolOptions::new()
                .max_connections(1)
                .connect_with(options.clone().database("postgres"))
                .await
                .context("connecting to the server's `postgres` database to create the worker's database")?;
            let create = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
            match sqlx::raw_sql(sqlx::AssertSqlSafe(create)).execute(&admin).await {
                Ok(_) => {}
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
                Err(e) => return Err(e).with_context(|| format!("creating database `{name}`")),
            }
            admin.close().await;
            pool_options.connect_with(options.clone()).await.with_context(|| format!("connecting to `{name}`"))?
        }
        Err(e) => return Err(e).with_context(|| format!("connecting to database `{name}`")),
    };
    with_service_migrations(migrations).run(&pool).await.with_context(|| format!("migrating database `{name}`"))?;
    Ok(pool)
}

/// Run `service` until `shutdown` fires. `db` must be prepared (see [`prepare_database`]).
pub async fn run_worker<S: Service>(
    service: S,
    db: PgPool,
    args: &Settings,
    shutdown: CancellationToken,
    started: impl FnOnce(WorkerHandle),
) -> anyhow::Result<()> {
    let concurrency = args.concurrency;
    run_participant(
        Declared { name: S::NAME, consumes: S::CONSUMES, outcomes: S::OUTCOMES },
        db,
        args,
        shutdown,
        started,
        move |db, handoff| {
            service.register_metrics();
            let handler = TransactionalHandler::new(service, db, handoff).keeping_connections(concurrency);
            let counters = handler.counters();
            (handler, counters)
        },
    )
    .await
}

/// Everything a participant's `main` does once it has its [`Settings`] and its own database URL (see
/// [`Settings::parse_for`]): check them, install logs and traces, create and migrate its database with
/// `migrations`, and run `handler` until SIGTERM or SIGINT.
pub async fn serve_plain<H: PlainHandler>(
    handler: H,
    migrations: &Migrations,
    settings: Settings,
    database_url: Option<String>,
) -> anyhow::Result<()> {
    check_settings(&settings)?;
    let _telemetry = crate::telemetry::init(settings.log_format, H::NAME);
    let options = settings.database_options(H::NAME, database_url.as_deref()).context("database URL")?;
    let db = prepare_database(&options, settings.db_pool_size, &migrations.migrator()).await?;
    run_plain_worker(handler, db, &settings, shutdown_on_signals(), |_| {}).await
}

/// Run a [`PlainHandler`] until `shutdown` fires. `db` must be prepared (see [`prepare_database`]).
pub async fn run_plain_worker<H: PlainHandler>(
    handler: H,
    db: PgPool,
    args: &Settings,
    shutdown: CancellationToken,
    started: impl FnOnce(WorkerHandle),
) -> anyhow::Result<()> {
    run_participant(
        Declared { name: H::NAME, consumes: H::CONSUMES, outcomes: H::OUTCOMES },
        db,
        args,
        shutdown,
        started,
        move |db, handoff| {
            handler.register_metrics();
            let runner = PlainRunner::new(handler, db, handoff);
            let counters = runner.counters();
            (runner, counters)
        },
    )
    .await
}

/// What a worker declares about itself, from which its queues and bindings are made.
struct Declared {
    name: &'static str,
    consumes: &'static [&'static str],
    outcomes: &'static [&'static str],
}

/// The process around one handler: `build` makes it (once metrics are being recorded) from the database and
/// the relay's hand-off.
async fn run_participant<H: Handler>(
    declared: Declared,
    db: PgPool,
    args: &Settings,
    shutdown: CancellationToken,
    started: impl FnOnce(WorkerHandle),
    build: impl FnOnce(PgPool, OutboxHandoff) -> (H, Arc<HandlerCounters>),
) -> anyhow::Result<()> {
    let Declared { name, consumes, outcomes } = declared;
    check_settings(args)?;
    let metrics = crate::health::metrics_handle(&args.namespace)?;
    let listener = crate::health::bind(args.metrics_addr.unwrap_or(DEFAULT_METRICS_ADDR)).await?;
    let topology = Topology::new(args.namespace.clone());
    // Consuming and publishing on separate connections: during a memory or disk alarm RabbitMQ stops reading
    // from every connection that publishes, and acks sent on such a connection would wait with it, so the
    // queues could not drain while the alarm lasts. The consuming connection only receives and acks.
    let broker = connect_pool(&args.amqp_url, &format!("choreo-{}-consume", name), 4)
        .with_context(|| format!("broker pool for {}", redact(&args.amqp_url)))?;
    let publishing = connect_pool(&args.amqp_url, &format!("choreo-{}-publish", name), 4)
        .with_context(|| format!("broker pool for {}", redact(&args.amqp_url)))?;
    let publisher = Arc::new(ConfirmingPublisher::new(publishing.clone(), Duration::from_secs(10)));

    let relay = Arc::new(OutboxRelay::new(
        &db,
        Arc::clone(&publisher),
        topology.events_exchange(),
        RelayConfig {
            worker: name.to_owned(),
            message_types: <H::Message as Contract>::TYPES,
            batch_size: args.relay_batch,
            sweep_interval: args.relay_sweep,
            handoff_hold: args.relay_handoff_hold,
            handoff_wait: args.relay_handoff_wait,
            ..RelayConfig::default()
        },
    ));
    let (handler, counters) = build(db.clone(), relay.handoff());
    let handler = Arc::new(handler);
    let metrics_addr = listener.local_addr().context("the metrics listener's address")?;
    started(WorkerHandle { counters, metrics_addr });

    let mut consumer_config = ConsumerConfig::new(WorkerQueue {
        worker: name.to_owned(),
        routing_keys: consumes.iter().map(|t| (*t).to_owned()).collect(),
        outcomes: outcomes.iter().map(|t| (*t).to_owned()).collect(),
        delivery_limit: args.delivery_limit,
        retry_delays: args.retry_delays.clone(),
    });
    consumer_config.handler_retries = args.handler_retries;
    consumer_config.prefetch = args.prefetch;
    consumer_config.concurrency = args.concurrency;
    consumer_config.batch_size = args.batch_size;
    consumer_config.crash_limit = args.crash_limit;
    consumer_config.max_body_bytes = args.max_message_bytes;
    let consumer = ConsumerRunner::new(broker.clone(), Arc::clone(&publisher), topology, consumer_config, handler);
    // Readiness asks whether the database answers, on a connection of its own: on the handlers' pool it would
    // wait behind them and report a busy worker as not ready.
    let probe = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy_with(db.connect_options().as_ref().clone());
    let health = HealthState { worker: name, consuming: consumer.consuming_flag(), db: probe.clone(), metrics };

    let background = CancellationToken::new();
    let relay_task = tokio::spawn({
        let relay = Arc::clone(&relay);
        let token = background.clone();
        async move { relay.run(token).await }
    });
    let retention = RetentionJob::new(
        db.clone(),
        RetentionConfig {
            outbox_retention: args.outbox_retention,
            inbox_retention: args.inbox_retention,
            ..RetentionConfig::default()
        },
    );
    let retention_task = tokio::spawn({
        let token = background.clone();
        async move { retention.run(token).await }
    });

    let backlog_task = tokio::spawn({
        let token = background.clone();
        let db = db.clone();
        async move { watch_backlog(name, db, token).await }
    });
    let health_token = CancellationToken::new();
    let health_task = tokio::spawn(crate::health::serve(listener, health, health_token.clone()));

    info!(worker = name, namespace = %args.namespace, "worker started");
    // One budget for the whole stop, counted from the signal: in-flight handlers finish within it; a handler
    // that hangs (a lock, a dead connection) is then dropped, and its unacked message goes back to the queue
    // when the connection closes. Its statement, sent outside any transaction, may already be on the server:
    // it is either committed (the redelivery is then a duplicate; its events are swept after the hold) or not
    // applied. What time is left goes to the relay's last publishes (rows it cannot publish stay in the
    // outbox for the next sweep), then connections get `CLOSE_ALLOWANCE` at least to close. Nothing is lost
    // whenever the stop is cut short.
    let (consumed, stop_by) = {
        let run = consumer.run(shutdown.clone());
        tokio::pin!(run);
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                let stop_by = tokio::time::Instant::now() + args.shutdown_timeout;
                match tokio::time::timeout_at(stop_by, &mut run).await {
                    Ok(consumed) => (consumed, stop_by),
                    Err(_) => {
                        warn!(worker = name, timeout = ?args.shutdown_timeout,
                            "in-flight messages did not finish within CHOREO_SHUTDOWN_TIMEOUT; they return to the queue, committed or not");
                        (Ok(()), stop_by)
                    }
                }
            }
            consumed = &mut run => (consumed, tokio::time::Instant::now() + args.shutdown_timeout),
        }
    };
    info!(worker = name, "consumer stopped; flushing the outbox");
    // The handler's kept connections go back to the pool with it, before the pool closes.
    drop(consumer);
    background.cancel();
    if tokio::time::timeout_at(stop_by, relay_task).await.is_err() {
        warn!("relay did not stop in time; unpublished rows stay in the outbox for the next sweep");
    }
    let closing = async {
        relay.close().await;
        let _ = retention_task.await;
        let _ = backlog_task.await;
        health_token.cancel();
        let _ = health_task.await;
        broker.close();
        publishing.close();
        probe.close().await;
        db.close().await;
    };
    if tokio::time::timeout_at(stop_by.max(tokio::time::Instant::now() + CLOSE_ALLOWANCE), closing).await.is_err() {
        warn!("connections did not close in time; exiting anyway");
    }
    consumed.context("consumer stopped on an error no reconnect can fix")?;
    info!(worker = name, "worker stopped cleanly");
    Ok(())
}

/// The least time connections get to close at the end of a stop, even when the drain used the whole
/// `CHOREO_SHUTDOWN_TIMEOUT`: a stop takes at most that timeout plus this.
pub const CLOSE_ALLOWANCE: Duration = Duration::from_secs(2);

/// Refuse settings that conflict, naming every problem at once. Binaries call it right after parsing, before
/// touching the database or the broker; [`run_worker`] calls it again for callers that build the settings.
pub fn check_settings(args: &Settings) -> anyhow::Result<()> {
    let problems = args.problems();
    if !problems.is_empty() {
        anyhow::bail!("invalid settings:\n  {}", problems.join("\n  "));
    }
    Ok(())
}

/// Where a worker serves metrics when `CHOREO_METRICS_ADDR` is not set: the first of the ports the reference
/// workers take (order 9464, payment 9465, inventory 9466; the shipping example 9467), which their binaries set.
pub const DEFAULT_METRICS_ADDR: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9464);

/// Keep the outbox gauges current.
async fn watch_backlog(worker: &'static str, db: PgPool, shutdown: CancellationToken) {
    loop {
        match choreo_outbox::OutboxStore::backlog(&db).await {
            Ok(b) => {
                metrics::gauge!("choreo_outbox_backlog", "worker" => worker).set(b.unpublished as f64);
                metrics::gauge!("choreo_outbox_oldest_age_seconds", "worker" => worker).set(b.oldest_age_seconds);
            }
            Err(e) => warn!(error = %e, "cannot read the outbox backlog"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// A token cancelled on SIGTERM or SIGINT. A second signal during the drain ends the process at once (exit
/// code 130): acks follow commits, so what was unacked is redelivered, never lost.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                None
            }
        };
        let mut signal = async || -> &'static str {
            let term = async {
                match terminate.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                () = term => "SIGTERM",
            }
        };
        let first = signal().await;
        info!(signal = first, "draining in-flight work (a second signal stops at once)");
        trigger.cancel();
        let second = signal().await;
        warn!(signal = second, "second signal: stopping without draining; unacked messages return to the queue");
        std::process::exit(130);
    });
    token
}
