//! `choreoctl`: the admin CLI of choreo. Start workflows, watch orders.
//!
//! Exit codes: 0 success; 1 failure (the message says what to do); 2 usage error;
//! 3 `publish --wait` timed out before every order was terminal; 4 some dead letters could not be replayed or
//! purged (they stay in their queue) or imported (the report says which lines, and where to start again);
//! 5 a purge was not confirmed (nothing deleted); 6 a replay left dead letters older than the inbox retention
//! in their queue, and nothing else failed (`dlq replay --force` replays them).

mod broker;
mod databases;
mod dlq;
mod orders;
mod outbox;
mod progress;
mod publish;
mod table;
mod top;
mod trace;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(version, about = "Admin CLI of choreo: start workflows and inspect orders")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Place orders: one from flags or a JSON file, or --count N generated ones.
    Publish(publish::PublishArgs),
    /// Order counts by status, or one order's status and history.
    Orders(orders::OrdersArgs),
    /// Dead letters: list, show, replay, purge, export, import.
    Dlq(dlq::DlqArgs),
    /// Outbox backlog of every service.
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
    /// The whole story of one workflow across the services, by order id or correlation id.
    Trace(trace::TraceArgs),
    /// Live figures from the workers' /metrics: throughput, outcomes, latency, retries, dead letters, outbox.
    Top(top::TopArgs),
}

#[derive(Debug, Subcommand)]
enum OutboxCommand {
    /// Unpublished rows and the age of the oldest, per service.
    Status(outbox::OutboxArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Publish(args) => publish::run(args).await,
        Command::Orders(args) => orders::run(args).await,
        Command::Top(args) => top::run(args).await,
        Command::Dlq(args) => dlq::run(args).await,
        Command::Outbox { command: OutboxCommand::Status(args) } => outbox::status(args).await,
        Command::Trace(args) => trace::run(args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
