//! `choreoctl outbox status`: how far behind each service's relay is.

use std::process::ExitCode;

use choreo_outbox::OutboxStore;
use serde::Serialize;

use crate::databases::{SERVICES, ServiceDbArgs};
use crate::table;

#[derive(Debug, clap::Args)]
pub struct OutboxArgs {
    #[command(flatten)]
    db: ServiceDbArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Row {
    service: &'static str,
    unpublished: Option<i64>,
    oldest_age_seconds: Option<f64>,
    error: Option<String>,
}

pub async fn status(args: OutboxArgs) -> anyhow::Result<ExitCode> {
    let mut rows = Vec::new();
    for service in SERVICES {
        let row = match args.db.connect(service).await {
            Ok(db) => match OutboxStore::backlog(&db).await {
                Ok(b) => Row {
                    service,
                    unpublished: Some(b.unpublished),
                    oldest_age_seconds: Some(b.oldest_age_seconds),
                    error: None,
                },
                Err(e) => Row { service, unpublished: None, oldest_age_seconds: None, error: Some(e.to_string()) },
            },
            Err(e) => Row { service, unpublished: None, oldest_age_seconds: None, error: Some(format!("{e:#}")) },
        };
        rows.push(row);
    }
    let failed = rows.iter().any(|r| r.error.is_some());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        // The error column only when there is an error to show.
        let headings: &[&str] =
            if failed { &["SERVICE", "UNPUBLISHED", "OLDEST", "ERROR"] } else { &["SERVICE", "UNPUBLISHED", "OLDEST"] };
        let mut t = table::new(headings);
        for r in &rows {
            t.add_row(match &r.error {
                None => table::row([
                    r.service.to_owned(),
                    r.unpublished.unwrap_or(0).to_string(),
                    format!("{:.1}s", r.oldest_age_seconds.unwrap_or(0.0)),
                ]),
                Some(e) => table::row([r.service.to_owned(), "-".into(), "-".into(), e.clone()]),
            });
        }
        println!("{}", table::render(&mut t, &[1, 2]));
    }
    Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
}
