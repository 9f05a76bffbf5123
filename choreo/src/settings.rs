//! Worker settings, from flags or environment variables, with documented defaults (`--help` lists them).
//!
//! Every worker reads the same common settings; each binary adds its database URL variable
//! (`CHOREO_ORDER_DATABASE_URL`, ...) and its own extras. Secrets (URLs with passwords) are never echoed:
//! `--help` hides their values and logs redact them.

use std::net::SocketAddr;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;

use crate::telemetry::LogFormat;

/// Settings every worker shares.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// AMQP URL of the broker.
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f", hide_env_values = true)]
    pub amqp_url: String,
    /// PostgreSQL server URL; a worker without its own database URL uses database `choreo_<worker>` on it.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://choreo:choreo@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    pub server_database_url: String,
    /// Prefix of every exchange and queue name; lets several environments share one broker.
    #[arg(long, env = "CHOREO_NAMESPACE", default_value = "choreo")]
    pub namespace: String,
    /// Unacknowledged deliveries the broker may push to this worker (at least 1: 0 would mean no limit).
    #[arg(long, env = "CHOREO_PREFETCH", default_value_t = 128, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,
    /// Handler transactions run at once (bulkhead); each holds one message or one batch.
    #[arg(long, env = "CHOREO_CONCURRENCY", default_value_t = 8, value_parser = at_least_one())]
    pub concurrency: usize,
    /// Most waiting deliveries applied in one transaction (1: one transaction per message). Batches form
    /// only from deliveries already waiting: under light load nothing waits to fill one.
    #[arg(long, env = "CHOREO_BATCH_SIZE", default_value_t = 32, value_parser = at_least_one())]
    pub batch_size: usize,
    /// Largest message body accepted, in bytes; larger ones are dead-lettered.
    #[arg(long, env = "CHOREO_MAX_MESSAGE_BYTES", default_value_t = 262_144, value_parser = at_least_one())]
    pub max_message_bytes: usize,
    /// Deliveries of one message before the broker dead-letters it (set when the queue is first declared).
    #[arg(long, env = "CHOREO_DELIVERY_LIMIT", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub delivery_limit: u32,
    /// Times a redelivered message may be started again before it is dead-lettered as `crashed` (a message
    /// that takes the worker down every time). The broker's delivery limit stays the backstop.
    #[arg(long, env = "CHOREO_CRASH_LIMIT", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub crash_limit: u32,
    /// In-process retries of a transient failure, with exponential backoff and jitter.
    #[arg(long, env = "CHOREO_HANDLER_RETRIES", default_value_t = 3)]
    pub handler_retries: usize,
    /// Delay levels of broker-side retries, after the in-process ones; then the dead-letter queue.
    /// One delay queue per level is declared.
    #[arg(long, env = "CHOREO_RETRY_DELAYS", value_delimiter = ',', default_value = "1s,10s,60s", value_parser = humantime::parse_duration)]
    pub retry_delays: Vec<Duration>,
    /// Address of `/metrics`, `/health/live` and `/health/ready` (default: 127.0.0.1:9464; the reference
    /// workers take 9464 order, 9465 payment, 9466 inventory; port 0 takes a free port, logged at start-up).
    #[arg(long, env = "CHOREO_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Database connections of this worker's handlers and jobs (its relay opens two more of its own, its
    /// readiness check one). When it exceeds the concurrency, the handlers keep up to that many of them from
    /// one message to the next, which saves sqlx's test of each connection given back.
    #[arg(long, env = "CHOREO_DB_POOL_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub db_pool_size: u32,
    /// Outbox rows published per relay cycle.
    #[arg(long, env = "CHOREO_RELAY_BATCH", default_value_t = 256, value_parser = clap::value_parser!(i64).range(1..=65_535))]
    pub relay_batch: i64,
    /// Longest pause of the relay between sweeps for rows no hand-off published (left by a crash, a failed
    /// publish or another process).
    #[arg(long, env = "CHOREO_RELAY_SWEEP", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub relay_sweep: Duration,
    /// How long events a handler committed are left to its own relay's hand-off before any sweep may
    /// publish them: the longest a crash between commit and publish delays them.
    #[arg(long, env = "CHOREO_RELAY_HANDOFF_HOLD", default_value = "5s", value_parser = humantime::parse_duration)]
    pub relay_handoff_hold: Duration,
    /// How long a handler waits for its relay when the relay is 64 hand-offs behind, before it leaves its
    /// events to the relay's sweep (0: never waits). Waiting holds the handler's slot, so the backlog of an
    /// overload stays in the broker's queue instead of turning into sweeps, which cost the database more.
    #[arg(long, env = "CHOREO_RELAY_HANDOFF_WAIT", default_value = "250ms", value_parser = humantime::parse_duration)]
    pub relay_handoff_wait: Duration,
    /// How long published outbox rows are kept (for tracing workflows).
    #[arg(long, env = "CHOREO_OUTBOX_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub outbox_retention: Duration,
    /// How long processed message ids are remembered. Must outlast the longest retry and replay window.
    #[arg(long, env = "CHOREO_INBOX_RETENTION", default_value = "30d", value_parser = humantime::parse_duration)]
    pub inbox_retention: Duration,
    /// Longest wait for in-flight work after SIGTERM.
    #[arg(long, env = "CHOREO_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
    /// `pretty` for people, `json` for log pipelines.
    #[arg(long, env = "CHOREO_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,
}

/// A count that must be at least 1.
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
}

impl Settings {
    /// The settings of worker `worker` from its flags and environment, and its own database URL
    /// (`--database-url`, `CHOREO_<WORKER>_DATABASE_URL`), for a binary that defines no flags of its own.
    /// Prints help or an error and exits, as a command-line program does, when they say so.
    pub fn parse_for(worker: &'static str) -> (Settings, Option<String>) {
        // Called once per process; clap's names live as long as the program.
        let leak = |text: String| -> &'static str { Box::leak(text.into_boxed_str()) };
        let variable = leak(format!("CHOREO_{}_DATABASE_URL", worker.to_uppercase().replace('-', "_")));
        let database_url = clap::Arg::new("database_url")
            .long("database-url")
            .env(variable)
            .hide_env_values(true)
            .help(format!("This worker's database (default: `choreo_{worker}` on DATABASE_URL's server)"));
        let command = <Settings as clap::Args>::augment_args(
            clap::Command::new(leak(format!("{worker}-worker"))).about(format!("choreo {worker} worker")),
        )
        .arg(database_url);
        let matches = command.get_matches();
        let settings = <Settings as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        (settings, matches.get_one::<String>("database_url").cloned())
    }

    /// What is wrong with these settings taken together (each alone was checked as it was parsed): every
    /// problem, so that one start reports them all.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let retry_window: Duration = self.retry_delays.iter().sum();
        if self.inbox_retention <= retry_window {
            problems.push(format!(
                "CHOREO_INBOX_RETENTION ({}) must outlast the broker-side retries (CHOREO_RETRY_DELAYS, {} in all): \
                 a retried copy of a message whose id was forgotten would take effect twice",
                humantime::format_duration(self.inbox_retention),
                humantime::format_duration(retry_window)
            ));
        }
        if self.relay_sweep.is_zero() {
            problems.push("CHOREO_RELAY_SWEEP must be longer than 0 (the relay would sweep without pause)".into());
        }
        if !self.relay_handoff_hold.is_zero() && self.relay_handoff_wait > self.relay_handoff_hold / 2 {
            problems.push(format!(
                "CHOREO_RELAY_HANDOFF_WAIT ({}) must be at most half CHOREO_RELAY_HANDOFF_HOLD ({}): the relay leaves \
                 a hand-off older than three quarters of its hold to the sweep",
                humantime::format_duration(self.relay_handoff_wait),
                humantime::format_duration(self.relay_handoff_hold)
            ));
        }
        if self.retry_delays.iter().any(Duration::is_zero) {
            problems.push("CHOREO_RETRY_DELAYS must all be longer than 0".into());
        }
        problems
    }

    /// The worker's database: `own_url` if given, else database `choreo_<worker>` on the server URL.
    pub fn database_options(&self, worker: &str, own_url: Option<&str>) -> Result<PgConnectOptions, sqlx::Error> {
        choreo_outbox::service_database(worker, own_url, &self.server_database_url)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Args {
        #[command(flatten)]
        common: Settings,
    }

    fn parse(flags: &[&str]) -> Result<Settings, clap::Error> {
        Args::try_parse_from(std::iter::once("worker").chain(flags.iter().copied())).map(|a| a.common)
    }

    #[test]
    fn counts_of_zero_are_refused_with_the_setting_named() {
        for flag in [
            "--prefetch",
            "--concurrency",
            "--batch-size",
            "--max-message-bytes",
            "--delivery-limit",
            "--crash-limit",
            "--db-pool-size",
            "--relay-batch",
        ] {
            let error = parse(&[flag, "0"]).expect_err(flag).to_string();
            assert!(error.contains(flag), "{flag}: {error}");
        }
        assert!(parse(&["--relay-batch", "-5"]).is_err());
        let ok = parse(&["--prefetch", "1", "--concurrency", "1", "--batch-size", "1"]).expect("ones");
        assert_eq!((ok.prefetch, ok.concurrency, ok.batch_size), (1, 1, 1));
    }

    #[test]
    fn the_defaults_have_no_problems() {
        assert_eq!(parse(&[]).expect("defaults").problems(), Vec::<String>::new());
    }

    #[test]
    fn every_problem_of_settings_taken_together_is_reported() {
        let args = parse(&[
            "--inbox-retention",
            "1m",
            "--retry-delays",
            "0s,10s,60s",
            "--relay-sweep",
            "0s",
            "--relay-handoff-wait",
            "3s",
        ])
        .expect("parse");
        let problems = args.problems();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[2].contains("CHOREO_RELAY_HANDOFF_WAIT (3s)") && problems[2].contains("(5s)"), "{problems:?}");
        assert!(problems[0].contains("CHOREO_INBOX_RETENTION") && problems[0].contains("1m 10s"), "{problems:?}");
    }
}
