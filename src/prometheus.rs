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
use twilight_model::id::Id;
use twilight_model::id::marker::GuildMarker;

/// Latency buckets in seconds: from a Redis round trip on loopback to a Discord call
/// that is about to time out.
const BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Per-guild series are per guild bucket instead, so their cardinality stays the same
/// with a thousand guilds as with one: the bucket is `(guild_id >> 22) % 16`, the same
/// formula as Discord's shard (with `SHARD_COUNT` dividing 16, every guild of a bucket is
/// on shard `bucket % SHARD_COUNT`).
pub const GUILD_BUCKETS: u64 = 16;

/// The `guild_bucket` label of `guild`'s series.
pub fn guild_bucket(guild: Id<GuildMarker>) -> &'static str {
    const NAMES: [&str; GUILD_BUCKETS as usize] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15",
    ];
    NAMES[((guild.get() >> 22) % GUILD_BUCKETS) as usize]
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guild_bucket_is_its_shard_for_shard_counts_dividing_sixteen() {
        for raw in [
            1u64,
            81_384_788_765_712_384,
            1_190_000_000_000_000_001,
            u64::MAX,
        ] {
            let guild = Id::new(raw);
            let bucket: u64 = guild_bucket(guild).parse().unwrap();
            for shards in [1u64, 2, 4, 8, 16] {
                assert_eq!(bucket % shards, (raw >> 22) % shards);
            }
        }
    }
}
