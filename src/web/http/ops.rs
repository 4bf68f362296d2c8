//! The layers every answer goes through: the security headers, request timing (served on
//! `METRICS_BIND` by [`crate::prometheus`], never here), the deadline on request bodies,
//! and `Connection: close` on answers that left a request body unread.
//!
//! Owns nothing users see. Must not touch sessions.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Instant;
use tracing::Instrument as _;

use axum::body::{Body, HttpBody};

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;

use tower_http::set_header::SetResponseHeaderLayer;

const CSP: &str = "default-src 'self'; img-src 'self' data: https://cdn.discordapp.com; \
                   frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// The security headers every answer carries (unless it set its own), as tower-http
/// layers.
pub fn security_headers() -> [SetResponseHeaderLayer<HeaderValue>; 4] {
    let header =
        |name, value| SetResponseHeaderLayer::if_not_present(name, HeaderValue::from_static(value));
    [
        header(header::CONTENT_SECURITY_POLICY, CSP),
        header(header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        header(header::REFERRER_POLICY, "same-origin"),
        header(header::X_FRAME_OPTIONS, "DENY"),
    ]
}

/// Times every request by route.
pub async fn observe(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let response = next.run(request).await;
    metrics::histogram!(
        "coven_web_request_seconds",
        "method" => method.to_string(),
        "route" => route,
        "status" => response.status().as_u16().to_string(),
    )
    .record(started.elapsed().as_secs_f64());
    response
}

/// tower-http's trace layer as [`traces`] sets it up: a span per request, recording the
/// status, logging nothing of its own.
pub type RequestSpans = tower_http::trace::TraceLayer<
    tower_http::classify::SharedClassifier<tower_http::classify::ServerErrorsAsFailures>,
    fn(&Request) -> tracing::Span,
    (),
    fn(&Response, std::time::Duration, &tracing::Span),
    (),
    (),
    (),
>;

/// A span per request while traces are on (`http.request`: method, route, status),
/// linked to the caller's trace when it sent a `traceparent` (a proxy's, a client's).
pub fn traces() -> RequestSpans {
    tower_http::trace::TraceLayer::new_for_http()
        .make_span_with(request_span as fn(&Request) -> tracing::Span)
        .on_request(())
        .on_response(answered as fn(&Response, std::time::Duration, &tracing::Span))
        .on_body_chunk(())
        .on_eos(())
        .on_failure(())
}

fn answered(response: &Response, _: std::time::Duration, span: &tracing::Span) {
    span.record("status", response.status().as_u16());
}

/// A stream's request span: from the request until its answer starts (authorization,
/// the replay's reads), not over the stream's life.
pub async fn stream_span(request: Request, next: Next) -> Response {
    let span = request_span(&request);
    let response = next.run(request).instrument(span.clone()).await;
    span.record("status", response.status().as_u16());
    response
}

/// `http.request`, a trace of its own, linked to the caller's when it sent a `traceparent`:
/// anyone may send that header, and a parent's "sampled" flag would let them decide what
/// this replica records and exports.
fn request_span(request: &Request) -> tracing::Span {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str());
    let span = tracing::info_span!(
        "http.request",
        method = %request.method(),
        route,
        status = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    if let Some(caller) = request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(crate::telemetry::valid_traceparent)
    {
        crate::telemetry::link_to(&span, caller);
    }
    crate::telemetry::record_trace_id(&span);
    span
}

/// How long a request's body may take to arrive, all of it.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A request body must arrive within [`BODY_TIMEOUT`] of its headers, as the headers must
/// within theirs: a client that trickles a form a byte at a time cannot hold a connection
/// (it counts as busy, so the connection limit would not evict it). Past the deadline the
/// body ends in an error, never truncated (a cut form must not pass as a shorter one).
pub async fn body_deadline(request: Request, next: Next) -> Response {
    if request.body().is_end_stream() {
        return next.run(request).await;
    }
    let deadline = tokio::time::Instant::now() + BODY_TIMEOUT;
    let (parts, body) = request.into_parts();
    let mut frames = body.into_data_stream();
    let timed = async_stream::stream! {
        loop {
            match tokio::time::timeout_at(deadline, futures_util::StreamExt::next(&mut frames)).await {
                Ok(Some(frame)) => yield frame,
                Ok(None) => break,
                Err(_) => {
                    metrics::counter!("coven_web_body_timeouts_total").increment(1);
                    yield Err(axum::Error::new(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the request body did not arrive in time",
                    )));
                    break;
                }
            }
        }
    };
    next.run(Request::from_parts(parts, Body::from_stream(timed)))
        .await
}

/// A request body left unread (refused as too large, or answered before reading, like a
/// post that must log in first) stays on the connection, which then cannot carry another
/// request: hyper closes it, and a client that reused it would lose its next request.
/// Such answers say `Connection: close`, so clients know. Bodiless requests (every GET,
/// every stream) pass untouched.
pub async fn close_if_unread(request: Request, next: Next) -> Response {
    if request.body().is_end_stream() {
        return next.run(request).await;
    }
    let read = Arc::new(AtomicBool::new(false));
    let reached_end = read.clone();
    let (parts, body) = request.into_parts();
    // The end marker is polled only after the last chunk: polling it means all was read.
    let end = futures_util::stream::poll_fn(move |_| {
        reached_end.store(true, Ordering::Relaxed);
        Poll::<Option<Result<axum::body::Bytes, axum::Error>>>::Ready(None)
    });
    let body = Body::from_stream(futures_util::StreamExt::chain(body.into_data_stream(), end));
    let mut response = next.run(Request::from_parts(parts, body)).await;
    if !read.load(Ordering::Relaxed) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}
