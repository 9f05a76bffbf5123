//! Logs and traces.
//!
//! Logs: pretty for people, JSON for machines (`CHOREO_LOG_FORMAT=json`). Every line written while a message
//! is handled carries its message id, type and correlation id (the consumer's span).
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
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Pretty,
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
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_target(false)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer().with_target(false).boxed(),
    };
    // Spans are traced whatever the log level: RUST_LOG=warn must not break a workflow's trace.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(EnvFilter::new("info,sqlx=off,lapin=off,h2=off,hyper=off,reqwest=off,opentelemetry=off"));
    if let Err(e) = tracing_subscriber::registry().with(fmt.with_filter(filter)).with(otel).try_init() {
        eprintln!("logging was already initialised: {e}");
    }
    TelemetryGuard { provider }
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
