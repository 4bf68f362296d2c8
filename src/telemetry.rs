//! What a process tells its operators besides its answers: logs (one subscriber for the
//! whole process, pretty for people, JSON for log pipelines) and, only when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `…_TRACES_ENDPOINT`) is set, OpenTelemetry traces
//! exported over OTLP. Owns the trace context's wire form, a W3C `traceparent`.
//!
//! An event is one trace: the gateway's `discord.dispatch` span (shard, guild, sequence),
//! its `bus.append`, and on every web replica that receives it one `stream.write` span
//! (with the number of streams it went to). The context crosses Redis beside the event's
//! envelope (see [`crate::event::Event::parse_message`]), never inside what browsers get.
//! HTTP requests and Discord REST calls are spans too. Spans are made only while tracing
//! is on ([`enabled`]), so it costs nothing when off.
//!
//! Must not decide what is logged, nor hold any command's logic.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, LogSettings, OtlpProtocol, SamplerSetting, TraceSettings};

/// Whether spans are being exported. Read on the hot path (per dispatch, per event per
/// replica) before any span is made.
static TRACING: AtomicBool = AtomicBool::new(false);

/// Whether this process exports traces.
pub fn enabled() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// The process's telemetry, to be shut down (spans still batched are sent) before the
/// runtime stops.
#[must_use]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans still batched; waits at most the exporter's timeout.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            TRACING.store(false, Ordering::Relaxed);
            if let Err(e) = provider.shutdown() {
                eprintln!("warning: traces not all exported at shutdown: {e}");
            }
        }
    }
}

/// Installs the global subscriber, with traces when `traces` is set. Must run inside the
/// runtime (the gRPC exporter is a tokio client; the HTTP one runs its requests on it).
/// Safe to call more than once (tests): later calls install nothing.
pub fn init(log: &LogSettings, traces: Option<&TraceSettings>, command: &str) -> Telemetry {
    // The filter string was validated for LOG_LEVEL; RUST_LOG is the operator's own
    // directive, and an unparsable one falls back to "info" rather than silence.
    let filter = EnvFilter::try_new(&log.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        // Colour codes only for a person at a terminal, never into files or collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_span_events(FmtSpan::NONE)
        .with_writer(std::io::stderr);
    // With traces on, a log line inside a traced span carries the spans' fields, among
    // them `trace_id`: logs and traces share ids.
    let fmt = match log.format {
        LogFormat::Pretty => fmt.with_target(true).with_filter(filter).boxed(),
        LogFormat::Json => fmt
            .json()
            .with_current_span(false)
            .with_span_list(traces.is_some())
            .with_filter(filter)
            .boxed(),
    };
    let provider = traces.and_then(|settings| match provider(settings, command) {
        Ok(provider) => Some(provider),
        Err(e) => {
            eprintln!("warning: traces are off: {e}");
            None
        }
    });
    // Coven's own spans only, whatever the log filter: the HTTP clients' and Redis
    // client's internals would be noise (and the exporter's own requests a loop).
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("coven"))
            .with_filter(Targets::new().with_target("coven", tracing::Level::INFO))
    });
    let installed = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .is_ok();
    if installed && provider.is_some() {
        TRACING.store(true, Ordering::Relaxed);
    }
    Telemetry {
        provider: provider.filter(|_| installed),
    }
}

fn provider(settings: &TraceSettings, command: &str) -> Result<SdkTracerProvider, String> {
    // The endpoint, headers, timeout and compression are read by the exporter from the
    // standard variables (a base `OTEL_EXPORTER_OTLP_ENDPOINT` gets `/v1/traces` appended
    // for HTTP; `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is used as given); batching from
    // `OTEL_BSP_*` by the SDK.
    let exporter = match settings.protocol {
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build(),
        OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_http_client(OtlpHttp::new(settings.timeout)?)
            .with_timeout(settings.timeout)
            .build(),
    }
    .map_err(|e| format!("cannot set up the OTLP exporter: {e}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES (read by the builder) win over ours.
    if settings.service_name.is_none() {
        resource = resource.with_service_name("coven");
    }
    resource = resource.with_attribute(opentelemetry::KeyValue::new(
        "coven.command",
        command.to_owned(),
    ));
    if !settings.instance_given {
        resource = resource.with_attribute(opentelemetry::KeyValue::new(
            "service.instance.id",
            instance_id(command),
        ));
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler(&settings.sampler))
        .with_resource(resource.build())
        .build())
}

fn sampler(setting: &SamplerSetting) -> Sampler {
    let parent_based = |root| Sampler::ParentBased(Box::new(root));
    match *setting {
        SamplerSetting::AlwaysOn => Sampler::AlwaysOn,
        SamplerSetting::AlwaysOff => Sampler::AlwaysOff,
        SamplerSetting::Ratio(r) => Sampler::TraceIdRatioBased(r),
        SamplerSetting::ParentBasedAlwaysOn => parent_based(Sampler::AlwaysOn),
        SamplerSetting::ParentBasedAlwaysOff => parent_based(Sampler::AlwaysOff),
        SamplerSetting::ParentBasedRatio(r) => parent_based(Sampler::TraceIdRatioBased(r)),
    }
}

/// Which process of the deployment this is: host, pid and a random part (a restarted
/// container keeps its host name and pid 1).
fn instance_id(command: &str) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!(
        "{command}@{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// The OTLP/HTTP exporter's client: our reqwest, its requests run on the process's
/// runtime. The SDK's batch processor calls it from a thread of its own, where an async
/// client has no reactor; a spawned request has, and its handle can be awaited anywhere.
#[derive(Debug)]
struct OtlpHttp {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

impl OtlpHttp {
    fn new(timeout: std::time::Duration) -> Result<Self, String> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "no runtime to run the OTLP exporter on".to_owned())?;
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| format!("cannot build the OTLP HTTP client: {e}"))?;
        Ok(Self { client, runtime })
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpHttp {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let sent = self.runtime.spawn(async move {
            let (parts, body) = request.into_parts();
            let answer = client
                .request(parts.method, parts.uri.to_string())
                .headers(parts.headers)
                .body(body)
                .send()
                .await?;
            let status = answer.status();
            let headers = answer.headers().clone();
            let body = answer.bytes().await?;
            let mut response = http::Response::new(body);
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            Ok::<_, reqwest::Error>(response)
        });
        Ok(sent.await??)
    }
}

/// The W3C `traceparent` of the current span, when it is traced.
pub fn traceparent() -> Option<String> {
    if !enabled() {
        return None;
    }
    let context = tracing::Span::current().context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` (not yet entered) a child of the span `traceparent` names, in its trace,
/// and records the trace's id in the span's `trace_id` field for the logs.
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(parent);
    record_trace_id(span);
}

/// Links `span` (not yet entered) to the span `traceparent` names without joining its
/// trace: for a context from outside, whose sampling decision is not ours to take.
pub fn link_to(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let remote = TraceContextPropagator::new().extract(&carrier);
    span.add_link(remote.span().span_context().clone());
}

/// Records the trace id of `span` in its `trace_id` field (declared empty), so log lines
/// inside it name the trace.
pub fn record_trace_id(span: &tracing::Span) {
    let context = span.context();
    let ids = context.span().span_context().clone();
    if ids.is_valid() {
        span.record("trace_id", tracing::field::display(ids.trace_id()));
    }
}

/// `raw` when it is a well-formed version-00 `traceparent`
/// (`00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`, ids not all zero), as the W3C
/// Trace Context recommendation defines it.
pub fn valid_traceparent(raw: &str) -> Option<&str> {
    let hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let mut parts = raw.split('-');
    let (Some(version), Some(trace), Some(span), Some(flags), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    (version == "00"
        && hex(trace, 32)
        && hex(span, 16)
        && hex(flags, 2)
        && nonzero(trace)
        && nonzero(span))
    .then_some(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_well_formed_traceparent_is_taken() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(valid_traceparent(good), Some(good));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-00",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "{\"v\":1}",
        ] {
            assert_eq!(valid_traceparent(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn off_means_no_context_to_carry() {
        // Nothing installed a tracer in this test binary's unit tests.
        assert!(!enabled());
        let span = tracing::info_span!("nothing");
        let _in = span.enter();
        assert_eq!(traceparent(), None);
    }
}
