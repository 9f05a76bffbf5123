//! `choreoctl`: the admin CLI of choreo. Start workflows, watch orders.
//!
//! Exit codes: 0 success; 1 failure (the message says what to do); 2 usage error (clap);
//! 3 `publish --wait` timed out before every order was terminal.

mod orders;
mod publish;
mod top;

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
    /// Live figures from the workers' /metrics: throughput, outcomes, latency, retries, dead letters, outbox.
    Top(top::TopArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Publish(args) => publish::run(args).await,
        Command::Orders(args) => orders::run(args).await,
        Command::Top(args) => top::run(args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
