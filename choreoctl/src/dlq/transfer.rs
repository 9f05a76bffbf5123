//! `dlq export` and `dlq import`: dead letters as JSON lines, properties, headers and body byte for byte.
//!
//! One line per message: `{"queue": "...", "properties": {...}, "body_base64": "..."}`. Properties use
//! lapin's own serde form, which keeps every AMQP type (a header that was a long string stays one). The
//! broker's `x-delivery-count` is left out: it counts deliveries out of the dead-letter queue, reads included.

use std::io::{BufRead, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use choreo_rabbitmq::ConfirmingPublisher;
use choreo_rabbitmq::codec::headers_to_republish;
use choreo_rabbitmq::lapin::BasicProperties;
use choreo_rabbitmq::publisher::Outgoing;
use serde::{Deserialize, Serialize};

use super::browse::browse;
use super::filter::Filter;
use crate::broker::BrokerArgs;

#[derive(Debug, Serialize, Deserialize)]
pub struct ExportedLetter {
    pub queue: String,
    pub properties: BasicProperties,
    pub body_base64: String,
}

pub async fn export(broker: &BrokerArgs, queue: &str, filter: &Filter) -> anyhow::Result<ExitCode> {
    let pool = broker.pool()?;
    let held = browse(&pool, queue, None).await?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut n = 0usize;
    for (d, _) in held.select(filter) {
        let line = ExportedLetter { queue: queue.to_owned(), properties: exported_properties(&d.properties), body_base64: STANDARD.encode(&d.data) };
        serde_json::to_writer(&mut out, &line)?;
        out.write_all(b"\n")?;
        n += 1;
    }
    out.flush()?;
    held.release().await;
    eprintln!("exported {n} messages from {queue} (they are still in the queue)");
    Ok(ExitCode::SUCCESS)
}

/// The message's own properties: without the delivery count the broker adds when it delivers from a
/// quorum queue (it counts our reads, not anything about the message).
fn exported_properties(properties: &BasicProperties) -> BasicProperties {
    match properties.headers() {
        Some(_) => properties.clone().with_headers(headers_to_republish(properties)),
        None => properties.clone(),
    }
}

pub async fn import(broker: &BrokerArgs, file: &Path, queue: Option<String>, json: bool) -> anyhow::Result<ExitCode> {
    let reader = std::io::BufReader::new(std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?);
    let mut letters = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let letter: ExportedLetter = serde_json::from_str(&line)
            .with_context(|| format!("{} line {} is not an exported dead letter", file.display(), i + 1))?;
        let body = STANDARD.decode(&letter.body_base64).with_context(|| format!("line {}: body_base64", i + 1))?;
        letters.push((letter, body));
    }
    let pool = broker.pool()?;
    let publisher = ConfirmingPublisher::new(pool, Duration::from_secs(15));
    let mut imported = 0usize;
    for chunk in letters.chunks(100) {
        let outgoing: Vec<Outgoing<'_>> = chunk
            .iter()
            .map(|(l, body)| Outgoing {
                exchange: "",
                routing_key: queue.as_deref().unwrap_or(&l.queue),
                properties: l.properties.clone(),
                body,
                message_id: l.properties.message_id().as_ref().map(|m| m.to_string()).unwrap_or_default(),
            })
            .collect();
        for result in publisher.publish_batch(&outgoing).await {
            result.context("importing (does the target queue exist? start its worker once, or pass --queue)")?;
            imported += 1;
        }
    }
    if json {
        println!("{}", serde_json::json!({ "imported": imported }));
    } else {
        println!("imported {imported} messages");
    }
    Ok(ExitCode::SUCCESS)
}
