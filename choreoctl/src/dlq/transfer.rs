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
use choreo_rabbitmq::dead_letter::kept_properties;
use choreo_rabbitmq::lapin::BasicProperties;
use choreo_rabbitmq::lapin::message::Delivery;
use choreo_rabbitmq::publisher::Outgoing;
use serde::{Deserialize, Serialize};

use super::browse::browse;
use super::filter::Filter;
use super::replay::EXIT_PARTIAL;
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
    // Written out before anything else, and the messages given back even when writing fails (`| head`).
    let written = write_export(queue, held.select(filter).into_iter().map(|(d, _)| d));
    held.release().await;
    let n = written.context("writing the export")?;
    eprintln!("exported {n} messages from {queue} (they are still in the queue)");
    Ok(ExitCode::SUCCESS)
}

/// One JSON line per message on stdout; how many were written.
fn write_export<'a>(queue: &str, letters: impl Iterator<Item = &'a Delivery>) -> std::io::Result<usize> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut n = 0usize;
    for d in letters {
        let line = ExportedLetter {
            queue: queue.to_owned(),
            properties: exported_properties(&d.properties),
            body_base64: STANDARD.encode(&d.data),
        };
        serde_json::to_writer(&mut out, &line)?;
        out.write_all(b"\n")?;
        n += 1;
    }
    out.flush()?;
    Ok(n)
}

/// The message's own properties: without the delivery count the broker adds when it delivers from a
/// quorum queue (it counts our reads, not anything about the message), and without the `expiration` and
/// `user_id` that would make the imported copy vanish or be refused (see [`kept_properties`]).
fn exported_properties(properties: &BasicProperties) -> BasicProperties {
    let kept = kept_properties(properties);
    match properties.headers() {
        Some(_) => kept.with_headers(headers_to_republish(properties)),
        None => kept,
    }
}

/// Messages published per round of confirms.
const IMPORT_CHUNK: usize = 100;

/// What `dlq import` did. Lines are numbered as in the file (from 1).
#[derive(Debug, Default, Serialize)]
struct ImportReport {
    /// Messages in the file.
    letters: usize,
    imported: usize,
    /// One entry per line whose publish failed: `line N (message id X): why`.
    failed: Vec<String>,
    /// Messages not tried after the first failure.
    not_attempted: usize,
    /// The first line not tried: a new run can start there.
    resume_from_line: Option<usize>,
}

pub async fn import(broker: &BrokerArgs, file: &Path, queue: Option<String>, json: bool) -> anyhow::Result<ExitCode> {
    let reader =
        std::io::BufReader::new(std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?);
    // Every line is read and checked before anything is published: a bad line stops the import at no cost.
    let mut letters = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("reading {} line {}", file.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let letter: ExportedLetter = serde_json::from_str(&line)
            .with_context(|| format!("{} line {} is not an exported dead letter", file.display(), i + 1))?;
        let body = STANDARD.decode(&letter.body_base64).with_context(|| format!("line {}: body_base64", i + 1))?;
        letters.push((i + 1, letter, body));
    }
    let pool = broker.pool()?;
    let publisher = ConfirmingPublisher::new(pool, Duration::from_secs(15));
    let mut report = ImportReport { letters: letters.len(), ..ImportReport::default() };
    let mut chunks = letters.chunks(IMPORT_CHUNK);
    for chunk in chunks.by_ref() {
        let outgoing: Vec<Outgoing<'_>> = chunk
            .iter()
            .map(|(_, l, body)| Outgoing {
                exchange: "",
                routing_key: queue.as_deref().unwrap_or(&l.queue),
                properties: l.properties.clone(),
                body,
                message_id: l.properties.message_id().as_ref().map(|m| m.to_string()).unwrap_or_default(),
            })
            .collect();
        for (result, (line, l, _)) in publisher.publish_batch(&outgoing).await.into_iter().zip(chunk) {
            match result {
                Ok(()) => report.imported += 1,
                Err(e) => report.failed.push(format!(
                    "line {line} (message id {}, queue `{}`): {e}",
                    l.properties.message_id().as_ref().map(|m| m.as_str()).unwrap_or("-"),
                    queue.as_deref().unwrap_or(&l.queue)
                )),
            }
        }
        // Stop at the first chunk with a failure: the cause (a missing queue, a broken connection) is likely to
        // fail the rest too, and a short list of what to do again beats a long one.
        if !report.failed.is_empty() {
            break;
        }
    }
    let rest: Vec<_> = chunks.flatten().collect();
    report.not_attempted = rest.len();
    report.resume_from_line = rest.first().map(|(line, _, _)| *line);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("imported {} of {} messages", report.imported, report.letters);
        for f in &report.failed {
            eprintln!("not imported: {f}");
        }
        if !report.failed.is_empty() {
            eprintln!("does the target queue exist? Start its worker once, or pass --queue");
        }
        if let Some(line) = report.resume_from_line {
            eprintln!(
                "stopped after the failure: {} messages from line {line} on were not attempted; once the cause is \
                 fixed, import the failed lines and those: choreoctl dlq import <(tail -n +{line} {})",
                report.not_attempted,
                file.display()
            );
        }
    }
    Ok(if report.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(EXIT_PARTIAL) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_keeps_what_an_import_can_publish_under_another_user() {
        let p = BasicProperties::default()
            .with_message_id("m1".into())
            .with_user_id("shop-client".into())
            .with_expiration("60000".into());
        let exported = exported_properties(&p);
        assert_eq!((exported.user_id(), exported.expiration()), (&None, &None));
        assert_eq!(exported.message_id().as_ref().map(|m| m.as_str()), Some("m1"));
    }
}
