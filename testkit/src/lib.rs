//! Test support for integration tests against the real RabbitMQ and PostgreSQL.
//!
//! The services come from `AMQP_URL` and `DATABASE_URL` (`scripts/test` starts private ones and exports
//! them). Each test works in its own broker namespace and its own databases, so tests run in parallel
//! without meeting, and cleans up after itself.

use std::future::Future;
use std::str::FromStr;
use std::time::{Duration, Instant};

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use sqlx::Executor;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// Where the real services are.
#[derive(Debug, Clone)]
pub struct Infra {
    pub amqp_url: String,
    /// Server URL whose database is `postgres` (used to create and drop test databases).
    pub database_url: String,
}

impl Infra {
    pub fn from_env() -> Infra {
        let get = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("{name} is not set: run the tests through ./scripts/test, which starts a private RabbitMQ and PostgreSQL, or export AMQP_URL and DATABASE_URL")
            })
        };
        Infra { amqp_url: get("AMQP_URL"), database_url: get("DATABASE_URL") }
    }

    /// URL of database `name` on the test server.
    pub fn database(&self, name: &str) -> String {
        database_url(&self.database_url, name).expect("DATABASE_URL is a URL")
    }

    /// Create an empty database `name` and return its URL.
    pub async fn create_database(&self, name: &str) -> String {
        let options = PgConnectOptions::from_str(&self.database_url).expect("DATABASE_URL parses");
        let pool =
            PgPoolOptions::new().max_connections(1).connect_with(options).await.expect("database server reachable");
        pool.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\""))).await.expect("create database");
        pool.close().await;
        self.database(name)
    }

    /// Drop databases (after the workers using them stopped).
    pub async fn drop_databases(&self, names: &[String]) {
        let Ok(options) = PgConnectOptions::from_str(&self.database_url) else { return };
        let Ok(pool) = PgPoolOptions::new().max_connections(1).connect_with(options).await else { return };
        for name in names {
            let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
            let _ = pool.execute(sqlx::AssertSqlSafe(sql)).await;
        }
        pool.close().await;
    }

    /// Delete queues and exchanges of a test namespace.
    pub async fn delete_broker_objects(&self, queues: &[String], exchanges: &[String]) {
        let Ok(conn) = lapin::Connection::connect(&self.amqp_url, lapin::ConnectionProperties::default()).await else {
            return;
        };
        if let Ok(channel) = conn.create_channel().await {
            for q in queues {
                let _ = channel.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
            }
            for e in exchanges {
                let _ = channel.exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default()).await;
            }
        }
        let _ = conn.close(200, "test cleanup".into()).await;
    }
}

/// `server_url` with its database set to `name`, its user, host and query (`?host=/run/postgresql` for a
/// Unix socket, `sslmode`, ...) kept.
pub fn database_url(server_url: &str, name: &str) -> Result<String, url::ParseError> {
    let mut url = url::Url::parse(server_url)?;
    url.set_path(name);
    Ok(url.into())
}

/// A namespace no other test uses: `t<12 hex digits>`.
pub fn unique_namespace() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Poll `check` until it returns `Some`, or panic after `timeout` saying what was awaited and the last state.
pub async fn wait_for<T, S: std::fmt::Debug, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, S>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(state) => {
                if Instant::now() >= deadline {
                    panic!("timed out after {timeout:?} waiting for {what}; last state: {state:?}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Copy a child process's log (its piped stdout or stderr) to this process's stderr, each line after
/// `[label] `, until it ends, and resolve the returned receiver with the port that `port_in` finds in a line
/// (that line is not copied). A task of its own, so that the pipe never fills and blocks the child; lines are
/// read as bytes, so one that is not UTF-8 does not end the copy and close the pipe under the child. The
/// receiver fails if the log ends without such a line.
pub fn follow_log<R>(log: R, label: String, port_in: fn(&str) -> Option<u16>) -> tokio::sync::oneshot::Receiver<u16>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    use tokio::io::AsyncBufReadExt;
    let (port_tx, port_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut port_tx = Some(port_tx);
        let mut log = tokio::io::BufReader::new(log);
        let mut bytes = Vec::new();
        loop {
            bytes.clear();
            match log.read_until(b'\n', &mut bytes).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&bytes);
            let line = line.trim_end();
            match port_in(line) {
                Some(port) => {
                    if let Some(tx) = port_tx.take() {
                        let _ = tx.send(port);
                    }
                }
                None => eprintln!("[{label}] {line}"),
            }
        }
    });
    port_rx
}

/// A port nothing listens on right now (bound, read, released).
pub fn free_port() -> u16 {
    // Below Linux's ephemeral range (32768-60999) and the scripts' 28xxx/29xxx: a port the kernel may hand to
    // an outgoing connection could be taken by one between this call and the bind it is chosen for. At
    // random, so that test processes running at once rarely pick the same one.
    for _ in 0..1000 {
        let port = rand::random_range(10_000..28_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port on 127.0.0.1 between 10000 and 28000")
}

/// A TCP proxy between a client under test and a real server, that a test can cut (every connection
/// dropped, new ones refused) and restore: a broker or database outage without stopping the shared server.
pub struct TcpProxy {
    pub port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    generation: tokio::sync::watch::Sender<u64>,
}

impl TcpProxy {
    pub async fn start(upstream: String) -> TcpProxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let proxy = TcpProxy { port, up: up.clone(), generation: generation.clone() };
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { return };
                if !up.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let upstream = upstream.clone();
                let mut cut = generation.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        proxy
    }

    /// Drop every connection and refuse new ones.
    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Accept connections again.
    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    /// The database is swapped; user, host, port and a Unix socket's `host` query are kept.
    #[test]
    fn a_database_url_keeps_everything_but_the_database() {
        let url = |server: &str| super::database_url(server, "bench_order").expect("a URL");
        assert_eq!(
            url("postgres://choreo:choreo@127.0.0.1:5432/postgres"),
            "postgres://choreo:choreo@127.0.0.1:5432/bench_order"
        );
        assert_eq!(
            url("postgres://choreo:pw@localhost:5432/postgres?host=%2Fsrv%2Fpg%2Frun&sslmode=disable"),
            "postgres://choreo:pw@localhost:5432/bench_order?host=%2Fsrv%2Fpg%2Frun&sslmode=disable"
        );
        assert_eq!(url("postgres://choreo@127.0.0.1:5432"), "postgres://choreo@127.0.0.1:5432/bench_order");
    }

    /// A line that is not UTF-8 does not end the copy: the port line after it is still found.
    #[tokio::test]
    async fn the_port_is_found_past_a_line_that_is_not_utf8() {
        let (mut child, log) = tokio::io::duplex(1024);
        let port =
            super::follow_log(log, "child".into(), |line| line.strip_prefix("port=").and_then(|p| p.parse().ok()));
        child.write_all(b"starting\n\xff\xfe not text\nport=4242\n").await.expect("write");
        assert_eq!(port.await, Ok(4242));
    }

    #[tokio::test]
    async fn a_log_that_ends_without_the_port_fails_the_receiver() {
        let (mut child, log) = tokio::io::duplex(1024);
        let port = super::follow_log(log, "child".into(), |_| None);
        child.write_all(b"no port here\n").await.expect("write");
        drop(child);
        assert!(port.await.is_err());
    }
}
