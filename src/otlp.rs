//! OpenTelemetry trace export over OTLP/HTTP (protobuf), off unless an endpoint is configured.
//!
//! `KOTODAMA_OTLP_ENDPOINT=http://collector:4318` (or the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT`) turns it on: every tracing span (a session's, with its
//! `session_id`, `trace_id` and `turn`) becomes an OTLP span, batched on a background thread so the
//! media path never waits for the collector. Nothing secret is in a span: tokens are never
//! recorded anywhere.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;

/// The configured collector base URL, if any.
pub fn endpoint_from_env() -> Option<String> {
    ["KOTODAMA_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
}

/// A tracer provider exporting to `{endpoint}/v1/traces`.
pub fn provider(endpoint: &str) -> Result<SdkTracerProvider, String> {
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url)
        .build()
        .map_err(|e| format!("KOTODAMA_OTLP_ENDPOINT: cannot build the OTLP exporter: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder().with_service_name("kotodama").build();
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}

/// The tracing layer that feeds `provider`.
pub fn layer<S>(
    provider: &SdkTracerProvider,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("kotodama"))
}
