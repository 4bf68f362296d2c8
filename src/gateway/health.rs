//! The gateway's health endpoint (`GET /healthz`) on its own `BIND` (metrics are on
//! `METRICS_BIND`, see [`crate::prometheus`]). Reads the state the run loop reports;
//! changes nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::event::GatewayState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Active,
    Standby,
}

/// One held shard, as `/healthz` shows it.
#[derive(Debug, Clone, Copy)]
struct ShardHealth {
    state: GatewayState,
    /// Reconnecting with a session to resume (a takeover, a dropped connection): shown
    /// as `RESUMING`, and healthy, since nothing is missed when it resumes.
    resuming: bool,
    guilds: usize,
}

impl ShardHealth {
    fn shown(self) -> &'static str {
        if self.state == GatewayState::Reconnecting && self.resuming {
            "RESUMING"
        } else {
            self.state.as_str()
        }
    }

    fn healthy(self) -> bool {
        self.state == GatewayState::Connected
            || (self.state == GatewayState::Reconnecting && self.resuming)
    }
}

#[derive(Debug)]
struct Inner {
    /// The shards this process holds, by id.
    shards: BTreeMap<u32, ShardHealth>,
    /// Of how many (0 until decided).
    count: u32,
    backend_ok: bool,
    /// Set when the process stopped for good (a fatal close code, the identify reserve).
    failed: bool,
}

/// Shared between the run loop (writer) and the HTTP handlers (readers).
#[derive(Debug, Clone)]
pub struct Health(Arc<Mutex<Inner>>);

impl Default for Health {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Inner {
            shards: BTreeMap::new(),
            count: 0,
            backend_ok: true,
            failed: false,
        })))
    }
}

/// One shard's side of [`Health`]: what its loop reports.
#[derive(Debug, Clone)]
pub struct ShardReport {
    health: Health,
    shard: u32,
}

impl ShardReport {
    fn with(&self, f: impl FnOnce(&mut ShardHealth)) {
        self.health.with(|i| {
            if let Some(s) = i.shards.get_mut(&self.shard) {
                f(s);
            }
        });
    }

    pub fn set_state(&self, state: GatewayState, resuming: bool) {
        self.with(|s| {
            s.state = state;
            s.resuming = resuming;
        });
        metrics::gauge!("coven_gateway_shard_state", "shard" => self.shard.to_string())
            .set(state_number(state));
    }

    pub fn set_guilds(&self, guilds: usize) {
        self.with(|s| s.guilds = guilds);
        metrics::gauge!("coven_gateway_shard_guilds", "shard" => self.shard.to_string())
            .set(guilds as f64);
    }
}

/// A state as a number for a gauge (the order of [`GatewayState`]; CONNECTED is 3).
fn state_number(state: GatewayState) -> f64 {
    f64::from(match state {
        GatewayState::Disconnected => 0,
        GatewayState::Connecting => 1,
        GatewayState::Identifying => 2,
        GatewayState::Connected => 3,
        GatewayState::Reconnecting => 4,
        GatewayState::Failed => 5,
    })
}

impl Health {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut inner)
    }

    pub fn set_count(&self, count: u32) {
        self.with(|i| i.count = count);
    }

    /// A shard is now held here.
    pub fn hold(&self, shard: u32) -> ShardReport {
        let held = self.with(|i| {
            i.shards.insert(
                shard,
                ShardHealth {
                    state: GatewayState::Connecting,
                    resuming: false,
                    guilds: 0,
                },
            );
            i.shards.len()
        });
        metrics::gauge!("coven_gateway_active").set(1.0);
        metrics::gauge!("coven_gateway_shards_held").set(held as f64);
        ShardReport {
            health: self.clone(),
            shard,
        }
    }

    /// The shard is no longer held here.
    pub fn drop_shard(&self, shard: u32) {
        let held = self.with(|i| {
            i.shards.remove(&shard);
            i.shards.len()
        });
        metrics::gauge!("coven_gateway_active").set(if held > 0 { 1.0 } else { 0.0 });
        metrics::gauge!("coven_gateway_shards_held").set(held as f64);
        metrics::gauge!("coven_gateway_shard_state", "shard" => shard.to_string()).set(0.0);
        metrics::gauge!("coven_gateway_shard_guilds", "shard" => shard.to_string()).set(0.0);
    }

    pub fn held(&self) -> Vec<u32> {
        self.with(|i| i.shards.keys().copied().collect())
    }

    pub fn set_failed(&self) {
        self.with(|i| i.failed = true);
    }

    pub fn set_backend_ok(&self, ok: bool) {
        self.with(|i| i.backend_ok = ok);
    }

    /// Healthy: every held shard CONNECTED or RESUMING; holding none, able to reach the
    /// bus (spare capacity ready to take shards).
    pub fn report(&self) -> (bool, serde_json::Value) {
        self.with(|i| {
            let healthy = !i.failed
                && if i.shards.is_empty() {
                    i.backend_ok
                } else {
                    i.shards.values().all(|s| s.healthy())
                };
            // The process's state: its least healthy shard's (FAILED once stopped).
            let state = if i.failed {
                "FAILED"
            } else {
                i.shards
                    .values()
                    .find(|s| !s.healthy())
                    .or_else(|| i.shards.values().find(|s| s.state != GatewayState::Connected))
                    .or_else(|| i.shards.values().next())
                    .map_or(GatewayState::Disconnected.as_str(), |s| s.shown())
            };
            let role = if i.shards.is_empty() { Role::Standby } else { Role::Active };
            let body = json!({
                "status": if healthy { "ok" } else { "unhealthy" },
                "state": state,
                "role": if role == Role::Active { "active" } else { "standby" },
                "shards": i.shards.iter().map(|(id, s)| json!({
                    "shard": [id, i.count],
                    "state": s.shown(),
                    "guilds": s.guilds,
                })).collect::<Vec<_>>(),
                "guilds": i.shards.values().map(|s| s.guilds).sum::<usize>(),
                "timestamp": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            });
            (healthy, body)
        })
    }
}

pub fn router(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .with_state(health)
}

async fn healthz(State(health): State<Health>) -> Response {
    let (healthy, body) = health.report();
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

/// Serves health on `bind` until `shutdown`.
pub async fn serve(
    bind: SocketAddr,
    health: Health,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {bind}: {e}"))?;
    let addr = listener.local_addr()?;
    let app = router(health);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });
    Ok(addr)
}
