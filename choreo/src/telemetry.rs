//! Logs and traces.
//!
//! Logs: pretty for people, JSON for machines (`CHOREO_LOG_FORMAT=json`). Every line written while a message
//! is handled carries its message id, type and correlation id (the consumer's span, then the handler's).
//!
//! Traces: the W3C `traceparent` of an incoming message is the parent of its handler's span, and the events
//! the handler emits carry that span's context, so one workflow is one trace. Spans are exported over OTLP
//! (HTTP/protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and nowhere otherwise.

use std::collections::HashMap;

use opentelemetry::global;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{EnvFilter, Layer, fmt};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// For people: one coloured line per event.
    Pretty,
    /// For log pipelines: one JSON object per line.
    Json,
}

/// Flushes spans on drop; keep it alive for the life of the process.
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// Install logs and traces for `service`. `RUST_LOG` overrides the default filter (`info`).
pub fn init(format: LogFormat, service: &'static str) -> TelemetryGuard {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() {
        match opentelemetry_otlp::SpanExporter::builder().with_http().build() {
            Ok(exporter) => builder = builder.with_batch_exporter(exporter),
            Err(e) => eprintln!("OTLP export disabled: {e}"),
        }
    }
    let provider = builder.build();
    let tracer = provider.tracer(service);
    global::set_tracer_provider(provider.clone());

    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,lapin=off,opentelemetry=warn,reqwest=warn"));
    let fmt = match format {
        LogFormat::Json => json_logs(std::io::stdout).boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer().with_target(false).boxed(),
    };
    // Spans are traced whatever the log level: RUST_LOG=warn must not break a workflow's trace.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(EnvFilter::new("info,sqlx=off,lapin=off,h2=off,hyper=off,reqwest=off,opentelemetry=off"));
    // Installed without `SubscriberInitExt::try_init`, which would also route the `log` crate into tracing
    // (`LogTracer`). With per-layer filters that bridge loses lines: a `log_enabled!` check that every layer
    // refuses leaves its verdict behind, and the next event on the thread is dropped (tokio-rs/tracing#2519).
    // sqlx makes such a check for every server notice (a migration's "already exists, skipping"), so a
    // worker restarted on its database never said where it serves /metrics. sqlx logs through tracing; the
    // `log` crate's lines (reqwest's, at debug) are not shown.
    let subscriber = tracing_subscriber::registry().with(fmt.with_filter(filter)).with(otel);
    if let Err(e) = tracing::subscriber::set_global_default(subscriber) {
        eprintln!("logging was already initialised: {e}");
    }
    TelemetryGuard { provider }
}

/// One JSON object per line, the event's fields at the top level and its innermost span under `span`. Only
/// the innermost span is written, so every span that log lines are written in carries the message's ids
/// ([`message_span`], [`handle_span`]).
fn json_logs<S, W>(writer: W) -> fmt::Layer<S, fmt::format::JsonFields, fmt::format::Format<fmt::format::Json>, W>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> fmt::MakeWriter<'w> + 'static,
{
    fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_target(false)
        .with_writer(writer)
}

/// The span of a handler applying one message: its own span of the workflow's trace (named after the
/// message type), with the message's ids, since a JSON log line shows only its innermost span.
pub fn handle_span(worker: &'static str, meta: &choreo_messages::Metadata) -> tracing::Span {
    let span = tracing::info_span!(
        "handle",
        otel.name = %meta.message_type,
        worker,
        message_id = %meta.message_id,
        correlation_id = %meta.correlation_id,
    );
    continue_trace(&span, meta.traceparent.as_deref());
    span
}

/// Make `traceparent` (if any) the parent of `span`.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent else { return };
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let parent = global::get_text_map_propagator(|p| p.extract(&carrier));
    let _ = span.set_parent(parent);
}

/// The `traceparent` of `span`, if it belongs to a trace.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let mut carrier: HashMap<String, String> = HashMap::new();
    let context = span.context();
    global::get_text_map_propagator(|p| p.inject_context(&context, &mut carrier));
    carrier.remove("traceparent")
}

/// The span of one message of a batch, with the fields every log line about it carries (the same as the
/// consumer's span of a message handled alone).
pub fn message_span(worker: &str, meta: &choreo_messages::Metadata) -> tracing::Span {
    tracing::info_span!(
        "message",
        worker = %worker,
        message_id = %meta.message_id,
        message_type = %meta.message_type,
        correlation_id = %meta.correlation_id,
    )
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use choreo_messages::payloads::OrderCancelled;
    use choreo_messages::{Envelope, Message};
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lines").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A handler's log lines (a refund warning, a circuit opening) name the message and its workflow.
    #[test]
    fn json_lines_written_while_a_message_is_handled_carry_its_ids() {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::registry().with(json_logs(move || writer.clone()));
        let order_id = uuid::Uuid::now_v7();
        let envelope = Envelope::new_command(
            Message::OrderCancelled(OrderCancelled {
                order_id,
                reason: choreo_messages::payloads::CancelReason::OutOfStock,
            }),
            "test",
            Some(order_id),
        );
        let meta = &envelope.meta;
        tracing::subscriber::with_default(subscriber, || {
            let message = message_span("payment", meta);
            message.in_scope(|| {
                tracing::info!("received");
                handle_span("payment", meta).in_scope(|| tracing::warn!(reason = "test", "inside the handler"));
            });
        });
        let text = String::from_utf8(lines.0.lock().expect("lines").clone()).expect("utf-8");
        let lines: Vec<serde_json::Value> =
            text.lines().map(|l| serde_json::from_str(l).expect("a JSON object per line")).collect();
        assert_eq!(lines.len(), 2, "{text}");
        for line in &lines {
            assert_eq!(line["span"]["correlation_id"], meta.correlation_id.to_string(), "{line}");
            assert_eq!(line["span"]["message_id"], meta.message_id.to_string(), "{line}");
        }
        assert_eq!(lines[1]["span"]["name"], "handle");
        assert_eq!(lines[1]["message"], "inside the handler");
    }
}
