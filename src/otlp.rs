//! OpenTelemetry trace export over OTLP/HTTP (protobuf), off unless an endpoint is configured.
//!
//! `KOTODAMA_OTLP_ENDPOINT=http://collector:4318` (or the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT`) turns it on: every tracing span (a session's, with its
//! `session_id`, `trace_id` and `turn`) becomes an OTLP span, batched on a background thread so the
//! media path never waits for the collector. Nothing secret is in a span: tokens are never
//! recorded anywhere.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
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
        .with_http_client(BlockingHttp::new()?)
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

/// Collector answers larger than this are cut (they carry at most a partial-success note).
const MAX_RESPONSE_BYTES: u64 = 64 * 1024;

/// The exporter's HTTP client: the tree's one reqwest, blocking, since the batch exporter runs on
/// its own thread outside any async runtime.
#[derive(Debug)]
struct BlockingHttp(reqwest::blocking::Client);

impl BlockingHttp {
    /// Built on a thread of its own: a blocking client must not be made (or dropped) inside an
    /// async runtime, and tests build providers from within one.
    fn new() -> Result<Self, String> {
        let build = || reqwest::blocking::Client::builder().build();
        let client = std::thread::spawn(build)
            .join()
            .map_err(|_| "KOTODAMA_OTLP_ENDPOINT: building the HTTP client panicked".to_owned())?
            .map_err(|e| format!("KOTODAMA_OTLP_ENDPOINT: cannot build the HTTP client: {e}"))?;
        Ok(Self(client))
    }
}

#[async_trait::async_trait]
impl HttpClient for BlockingHttp {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        use std::io::Read as _;
        let (parts, body) = request.into_parts();
        let mut res =
            self.0.request(parts.method, parts.uri.to_string()).headers(parts.headers).body(body.to_vec()).send()?;
        let headers = std::mem::take(res.headers_mut());
        let mut bytes = Vec::new();
        res.by_ref().take(MAX_RESPONSE_BYTES).read_to_end(&mut bytes)?;
        let mut response = Response::builder().status(res.status()).body(Bytes::from(bytes))?;
        *response.headers_mut() = headers;
        Ok(response)
    }
}
