//! `choreoctl dlq`: list, show, replay, purge, export and import dead letters.
//!
//! Nothing here loses a message: reading never removes one (see [`browse`]), and a message leaves a
//! dead-letter queue only after the broker confirmed its replay, or on an explicit purge.

mod age;
mod browse;
mod filter;
mod letter;
mod replay;
mod transfer;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use chrono::Utc;
use clap::Subcommand;
use serde::Serialize;

use crate::broker::BrokerArgs;
use crate::table;
pub use filter::Filter;
use letter::{Story, render_body, story};

#[derive(Debug, clap::Args)]
pub struct DlqArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(subcommand)]
    command: DlqCommand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GroupBy {
    /// Error kind and the worker that raised it.
    ErrorKind,
    /// Message type and worker.
    Type,
    /// Worker only.
    Worker,
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Every dead-letter queue with its count and oldest message age; --group-by shows failure groups.
    List {
        #[arg(long, value_enum)]
        group_by: Option<GroupBy>,
        /// Workers whose dead-letter queues to list.
        #[arg(long, value_delimiter = ',', default_value = "order,payment,inventory")]
        workers: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Headers, metadata and body of dead letters, leaving the queue as it was.
    Show {
        /// A dead-letter queue (`choreo.payment.dlq`) or a worker name (`payment`).
        queue: String,
        /// Only the message with this message id.
        #[arg(long)]
        id: Option<String>,
        /// Show at most this many messages (from the head of the queue).
        #[arg(long, default_value_t = 10)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters back to their worker; each leaves the queue only after its replay is confirmed.
    ///
    /// Letters older than --inbox-retention stay in the queue unless --force: their worker may have processed
    /// them once and forgotten it, and would then apply them twice.
    ///
    /// Exit status: 0 every selected letter was replayed (or would be, with --dry-run); 4 some could not be
    /// replayed and stay in the queue (run again once the cause is fixed); 6 nothing failed, but some letters
    /// were left in the queue for their age (see --force).
    Replay {
        queue: String,
        #[command(flatten)]
        filter: Filter,
        /// Say what would be replayed, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Publish to the original exchange and routing key (every subscriber of the type gets it again)
        /// instead of only the worker's own queue.
        #[arg(long)]
        via_original_exchange: bool,
        /// At most this many messages per second, so that a large replay does not swamp the worker.
        #[arg(long)]
        rate: Option<f64>,
        /// How long the workers remember the ids of processed messages (their CHOREO_INBOX_RETENTION; with
        /// different settings, the shortest among the workers the letters go to). A letter's age counts from
        /// the earliest time it carries: its timestamp, or its first failure.
        #[arg(long, env = "CHOREO_INBOX_RETENTION", default_value = "30d", value_parser = humantime::parse_duration)]
        inbox_retention: Duration,
        /// Replay letters older than --inbox-retention (or of unknown age) too: for letters known never to
        /// have been processed.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Delete dead letters. Asks for confirmation unless --yes.
    Purge {
        queue: String,
        #[command(flatten)]
        filter: Filter,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Write dead letters as JSON lines (properties, headers and body byte for byte) to standard output.
    Export {
        queue: String,
        #[command(flatten)]
        filter: Filter,
    },
    /// Publish dead letters from an export file into a dead-letter queue.
    Import {
        file: std::path::PathBuf,
        /// Target queue (default: the queue each line was exported from).
        #[arg(long)]
        queue: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

/// `payment` -> `choreo.payment.dlq`; a full queue name is kept.
pub fn resolve_queue(broker: &BrokerArgs, queue: &str) -> String {
    if queue.contains('.') { queue.to_owned() } else { broker.topology().dead_letter_queue(queue) }
}

pub async fn run(args: DlqArgs) -> anyhow::Result<ExitCode> {
    let broker = args.broker;
    match args.command {
        DlqCommand::List { group_by, workers, json } => list(&broker, &workers, group_by, json).await,
        DlqCommand::Show { queue, id, limit, json } => {
            show(&broker, &resolve_queue(&broker, &queue), id, limit, json).await
        }
        DlqCommand::Replay { queue, filter, dry_run, via_original_exchange, rate, inbox_retention, force, json } => {
            let options = replay::ReplayOptions { dry_run, via_original_exchange, rate, json, inbox_retention, force };
            replay::replay(&broker, &resolve_queue(&broker, &queue), &filter, options).await
        }
        DlqCommand::Purge { queue, filter, yes, dry_run, json } => {
            replay::purge(&broker, &resolve_queue(&broker, &queue), &filter, yes, dry_run, json).await
        }
        DlqCommand::Export { queue, filter } => {
            transfer::export(&broker, &resolve_queue(&broker, &queue), &filter).await
        }
        DlqCommand::Import { file, queue, json } => {
            transfer::import(&broker, &file, queue.map(|q| resolve_queue(&broker, &q)), json).await
        }
    }
}

#[derive(Debug, Serialize)]
struct QueueSummary {
    queue: String,
    messages: u32,
    oldest_age_seconds: Option<i64>,
}

#[derive(Debug, Serialize)]
struct Group {
    worker: String,
    error_kind: Option<String>,
    message_type: Option<String>,
    messages: usize,
    first_failure_at: Option<chrono::DateTime<Utc>>,
    last_failure_at: Option<chrono::DateTime<Utc>>,
    example_error: Option<String>,
}

async fn list(
    broker: &BrokerArgs,
    workers: &[String],
    group_by: Option<GroupBy>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let pool = broker.pool()?;
    let topology = broker.topology();
    let mut summaries = Vec::new();
    let mut groups: BTreeMap<(String, Option<String>, Option<String>), Group> = BTreeMap::new();
    for worker in workers {
        let queue = topology.dead_letter_queue(worker);
        let browse = browse::browse(&pool, &queue, None).await?;
        let stories: Vec<Story> = browse.deliveries.iter().map(story).collect();
        browse.release().await;
        let oldest = stories.iter().filter_map(|s| s.first_failure_at).min().map(|t| (Utc::now() - t).num_seconds());
        summaries.push(QueueSummary {
            queue: queue.clone(),
            messages: stories.len() as u32,
            oldest_age_seconds: oldest,
        });
        if let Some(by) = group_by {
            for s in stories {
                let w = s.worker.clone().unwrap_or_else(|| worker.clone());
                let key = match by {
                    GroupBy::ErrorKind => (w.clone(), Some(s.error_kind.clone()), None),
                    GroupBy::Type => (w.clone(), None, s.message_type.clone()),
                    GroupBy::Worker => (w.clone(), None, None),
                };
                let g = groups.entry(key.clone()).or_insert_with(|| Group {
                    worker: key.0.clone(),
                    error_kind: key.1.clone(),
                    message_type: key.2.clone(),
                    messages: 0,
                    first_failure_at: None,
                    last_failure_at: None,
                    example_error: s.error.clone(),
                });
                g.messages += 1;
                g.first_failure_at = match (g.first_failure_at, s.first_failure_at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                g.last_failure_at = g.last_failure_at.max(s.last_failure_at);
            }
        }
    }
    let mut groups: Vec<Group> = groups.into_values().collect();
    groups.sort_by_key(|g| std::cmp::Reverse(g.messages));
    if json {
        let value = match group_by {
            Some(_) => serde_json::json!({ "queues": summaries, "groups": groups }),
            None => serde_json::json!({ "queues": summaries }),
        };
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut queues = table::new(&["QUEUE", "MESSAGES", "OLDEST"]);
    for s in &summaries {
        let age = s
            .oldest_age_seconds
            .map(|a| humantime::format_duration(std::time::Duration::from_secs(a.max(0) as u64)).to_string());
        queues.add_row(table::row([s.queue.clone(), s.messages.to_string(), age.unwrap_or_else(|| "-".into())]));
    }
    println!("{}", table::render(&mut queues, &[1, 2]));
    if group_by.is_some() {
        println!();
        let mut t = table::new(&["MESSAGES", "WORKER", "ERROR KIND", "TYPE", "EXAMPLE ERROR"]);
        for g in &groups {
            // The start of the error is enough to tell groups apart; `dlq show` has the whole of it.
            let error: String = g.example_error.as_deref().unwrap_or("-").chars().take(70).collect();
            t.add_row(table::row([
                g.messages.to_string(),
                g.worker.clone(),
                // `*`: the grouping does not split by this column.
                g.error_kind.clone().unwrap_or_else(|| "*".into()),
                g.message_type.clone().unwrap_or_else(|| "*".into()),
                error,
            ]));
        }
        println!("{}", table::render(&mut t, &[0]));
    }
    Ok(ExitCode::SUCCESS)
}

async fn show(
    broker: &BrokerArgs,
    queue: &str,
    id: Option<String>,
    limit: usize,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let pool = broker.pool()?;
    // The whole queue is held even to show its head: a quorum queue puts returned messages at its back, so
    // giving back only the head would move it behind the rest.
    let browse = browse::browse(&pool, queue, None).await?;
    let selected: Vec<_> = browse
        .deliveries
        .iter()
        .filter(|d| id.as_ref().is_none_or(|id| d.properties.message_id().as_ref().is_some_and(|m| m.as_str() == id)))
        .take(limit)
        .map(|d| (story(d), d.properties.clone(), d.data.clone()))
        .collect();
    let depth = browse.queue_depth;
    browse.release().await;
    if json {
        let items: Vec<_> = selected
            .iter()
            .map(|(s, p, body)| {
                serde_json::json!({
                    "story": s,
                    "properties": p,
                    "body": serde_json::from_slice::<serde_json::Value>(body).unwrap_or_else(|_| render_body(body).into()),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "queue": queue, "messages_in_queue": depth, "shown": items })
            )?
        );
    } else {
        println!("{queue}: {depth} messages, showing {}", selected.len());
        for (s, p, body) in &selected {
            println!("──────────────────────────────────────────────────────────────");
            println!("message id      {}", s.message_id.as_deref().unwrap_or("-"));
            println!("type            {}", s.message_type.as_deref().unwrap_or("-"));
            println!("correlation id  {}", s.correlation_id.as_deref().unwrap_or("-"));
            println!("worker          {}", s.worker.as_deref().unwrap_or("-"));
            println!("error kind      {}", s.error_kind);
            println!("error           {}", s.error.as_deref().unwrap_or("-"));
            println!("attempts        {}", s.attempts.map(|a| a.to_string()).unwrap_or_else(|| "-".into()));
            println!(
                "from            exchange `{}`, routing key `{}`",
                s.original_exchange.as_deref().unwrap_or("-"),
                s.original_routing_key.as_deref().unwrap_or("-")
            );
            println!(
                "failed          first {}, last {}",
                s.first_failure_at.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into()),
                s.last_failure_at.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into())
            );
            if let Some(r) = &s.replayed_at {
                println!("replayed at     {r}");
            }
            if let Some(headers) = p.headers() {
                let names: Vec<&str> = headers.inner().keys().map(|k| k.as_str()).collect();
                println!("headers         {}", names.join(", "));
            }
            println!("body ({} bytes):\n{}", s.body_bytes, render_body(body));
        }
    }
    Ok(ExitCode::SUCCESS)
}
