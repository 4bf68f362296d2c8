//! An OpenTelemetry collector for tests: takes OTLP trace exports over HTTP/protobuf
//! (`POST /v1/traces`) and gRPC (`TraceService/Export`) on free ports and keeps every span,
//! decoded with the protocol's own types (`opentelemetry-proto`). Not a mock of Coven's
//! exporter: anything a real collector would reject, this rejects too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;

use super::redis::free_port;

/// One span as received, with its resource's attributes.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// Trace ids of the spans it links to.
    pub links: Vec<String>,
    pub attributes: HashMap<String, String>,
    pub resource: HashMap<String, String>,
}

impl Span {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }

    /// `coven.command` of the process that sent it.
    pub fn command(&self) -> &str {
        self.resource
            .get("coven.command")
            .map_or("", String::as_str)
    }

    pub fn instance(&self) -> &str {
        self.resource
            .get("service.instance.id")
            .map_or("", String::as_str)
    }
}

#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<Span>>>);

impl Received {
    fn take(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.0.lock().unwrap();
        for resource_spans in request.resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| attributes(r.attributes))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Span {
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        name: span.name,
                        links: span.links.iter().map(|l| hex(&l.trace_id)).collect(),
                        attributes: attributes(span.attributes),
                        resource: resource.clone(),
                    });
                }
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attributes(kvs: Vec<KeyValue>) -> HashMap<String, String> {
    kvs.into_iter()
        .map(|kv| {
            let value = match kv.value.and_then(|v| v.value) {
                Some(AnyValue::StringValue(s)) => s,
                Some(AnyValue::IntValue(i)) => i.to_string(),
                Some(AnyValue::BoolValue(b)) => b.to_string(),
                Some(AnyValue::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key, value)
        })
        .collect()
}

pub struct Collector {
    received: Received,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` for `http/protobuf`.
    pub http: String,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` for `grpc`.
    pub grpc: String,
    stop: tokio_util::sync::CancellationToken,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Collector {
    pub async fn start() -> Self {
        let received = Received::default();
        let stop = tokio_util::sync::CancellationToken::new();

        let http_port = free_port();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", http_port))
            .await
            .unwrap();
        let into = received.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            post(move |headers: HeaderMap, body: Bytes| {
                let into = into.clone();
                async move {
                    // OTLP/HTTP: a protobuf body says so (JSON is another encoding).
                    let protobuf = headers
                        .get(header::CONTENT_TYPE)
                        .is_some_and(|v| v == "application/x-protobuf");
                    if !protobuf {
                        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, Vec::new());
                    }
                    match ExportTraceServiceRequest::decode(body) {
                        Ok(request) => {
                            into.take(request);
                            (
                                StatusCode::OK,
                                ExportTraceServiceResponse::default().encode_to_vec(),
                            )
                        }
                        Err(_) => (StatusCode::BAD_REQUEST, Vec::new()),
                    }
                }
            }),
        );
        let until = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(until.cancelled_owned())
                .await
                .unwrap();
        });

        let grpc_port = free_port();
        let service = TraceServiceServer::new(Grpc(received.clone()));
        let until = stop.clone();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_shutdown(([127, 0, 0, 1], grpc_port).into(), until.cancelled_owned())
                .await
                .unwrap();
        });
        super::redis::wait_listening(grpc_port);

        Self {
            received,
            http: format!("http://127.0.0.1:{http_port}"),
            grpc: format!("http://127.0.0.1:{grpc_port}"),
            stop,
        }
    }

    pub fn spans(&self) -> Vec<Span> {
        self.received.0.lock().unwrap().clone()
    }
}

struct Grpc(Received);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.take(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}
