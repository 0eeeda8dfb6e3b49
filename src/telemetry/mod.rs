//! Logs, traces and metrics in one place.
//!
//! * Logs: JSON in containers (stdout not a terminal), pretty on a terminal,
//!   or as `log.format` says; `RUST_LOG` wins over `log.level`. Inside a
//!   request or message span, JSON lines carry the span's `trace_id`.
//! * Traces: exported over OTLP/HTTP (protobuf) only when an endpoint is
//!   configured (`tracing.otlp_endpoint`, or the standard
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`).
//!   `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` and
//!   `OTEL_TRACES_SAMPLER[_ARG]` are honoured by the SDK.
//! * Metrics: see [`metrics`].

pub mod metrics;

use std::io::IsTerminal;
use std::time::Duration;

use axum::http::HeaderMap;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, Settings};

/// Keeps the trace pipeline alive; flush it with [`Telemetry::shutdown`].
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// The OTLP traces endpoint, if export is configured.
pub fn otlp_endpoint(settings: &Settings) -> Option<String> {
    let configured = settings.tracing.otlp_endpoint.trim();
    if !configured.is_empty() {
        let base = configured.trim_end_matches('/');
        return Some(if base.ends_with("/v1/traces") {
            base.to_string()
        } else {
            format!("{base}/v1/traces")
        });
    }
    let env_set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    // The exporter resolves these variables itself (appending /v1/traces
    // to the generic one); an empty string tells the caller to let it.
    (env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .then(String::new)
}

/// Installs the global subscriber (logs, and traces when configured) and
/// the metrics recorder. Call once, early in `main`.
pub fn init(settings: &Settings) -> anyhow::Result<Telemetry> {
    metrics::install();
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match settings.log.format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };

    let provider = match otlp_endpoint(settings) {
        None => None,
        Some(endpoint) => {
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_timeout(Duration::from_secs(5));
            if !endpoint.is_empty() {
                builder = builder.with_endpoint(endpoint);
            }
            let exporter = builder.build()?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(
                    std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "shindensen".into()),
                )
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
    };
    let otel_layer = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("shindensen")));
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
    if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init()?;
    } else {
        registry.with(tracing_subscriber::fmt::layer()).try_init()?;
    }
    if provider.is_some() {
        tracing::info!("exporting traces over OTLP/HTTP");
    }
    Ok(Telemetry { provider })
}

impl Telemetry {
    /// Exports what is buffered, waiting at most `timeout`.
    pub fn shutdown(self, timeout: Duration) {
        if let Some(p) = self.provider {
            let _ = p.force_flush();
            if let Err(e) = p.shutdown_with_timeout(timeout) {
                eprintln!("shindensen: flushing traces failed: {e}");
            }
        }
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Makes `span` a child of the W3C `traceparent` in `headers`, if any, and
/// records its trace id for log correlation.
pub fn continue_trace(span: &tracing::Span, headers: &HeaderMap) {
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let _ = span.set_parent(parent);
    record_trace_id(span);
}

/// Records `trace_id` and `span_id` on a span that declared them (when
/// tracing is on), so JSON log lines inside it carry both.
pub fn record_trace_id(span: &tracing::Span) {
    use opentelemetry::trace::TraceContextExt;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.record("trace_id", tracing::field::display(sc.trace_id()));
        span.record("span_id", tracing::field::display(sc.span_id()));
    }
}
