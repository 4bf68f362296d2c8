//! Prometheus metrics for `coven web` and `coven gateway`: the process-wide recorder, with
//! latencies as histograms (buckets add up across replicas, quantiles would not), served
//! on its own listener (`METRICS_BIND`, loopback by default) so the public site never
//! shows them.
//!
//! Owns the exposition only; what is measured is decided where it happens.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Latency buckets in seconds: from a Redis round trip on loopback to a Discord call
/// that is about to time out.
const BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How often histogram samples are folded into their buckets when nobody scrapes.
const UPKEEP: Duration = Duration::from_secs(5);

/// Installs the process-wide recorder and keeps it tidy until `shutdown`. `None` (with a
/// warning) when a recorder is already installed, as in tests that run several
/// components in one process.
pub fn install(shutdown: &CancellationToken) -> Option<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets(BUCKETS)
        .and_then(PrometheusBuilder::install_recorder)
        .inspect_err(|e| tracing::warn!(error = %e, "metrics disabled"))
        .ok()?;
    let upkeep = handle.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => upkeep.run_upkeep(),
            }
        }
    });
    Some(handle)
}

/// Binds `bind` (failing like any other listener would) and serves `GET /metrics` there
/// until `shutdown`. Returns the bound address.
pub async fn serve(
    bind: SocketAddr,
    handle: PrometheusHandle,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(bind)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {bind} (METRICS_BIND): {e}"))?;
    let addr = listener.local_addr()?;
    let router = Router::new()
        .route("/metrics", get(render))
        .with_state(handle);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "the metrics listener stopped");
        }
    });
    Ok(addr)
}

async fn render(State(handle): State<PrometheusHandle>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        handle.render(),
    )
        .into_response()
}
