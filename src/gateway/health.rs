//! The gateway's health endpoint (`GET /healthz`) on its own `BIND` (metrics are on
//! `METRICS_BIND`, see [`crate::prometheus`]). Reads the state the run loop reports;
//! changes nothing.

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

#[derive(Debug)]
struct Inner {
    role: Role,
    state: GatewayState,
    backend_ok: bool,
    /// Guilds served (a count: ids would make the page grow with the bot).
    guilds: usize,
}

/// Shared between the run loop (writer) and the HTTP handlers (readers).
#[derive(Debug, Clone)]
pub struct Health(Arc<Mutex<Inner>>);

impl Default for Health {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Inner {
            role: Role::Standby,
            state: GatewayState::Disconnected,
            backend_ok: true,
            guilds: 0,
        })))
    }
}

impl Health {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut inner)
    }

    pub fn set_role(&self, role: Role) {
        self.with(|i| {
            i.role = role;
            if role == Role::Standby {
                i.state = GatewayState::Disconnected;
                i.guilds = 0;
            }
        });
        metrics::gauge!("coven_gateway_active").set(if role == Role::Active { 1.0 } else { 0.0 });
    }

    pub fn set_state(&self, state: GatewayState) {
        self.with(|i| i.state = state);
    }

    pub fn set_guilds(&self, guilds: usize) {
        self.with(|i| i.guilds = guilds);
        metrics::gauge!("coven_gateway_guilds").set(guilds as f64);
    }

    pub fn set_backend_ok(&self, ok: bool) {
        self.with(|i| i.backend_ok = ok);
    }

    /// Healthy: active and connected to Discord, or a standby that can reach the bus.
    pub fn report(&self) -> (bool, serde_json::Value) {
        self.with(|i| {
            let healthy = match i.role {
                Role::Active => i.state == GatewayState::Connected,
                Role::Standby => i.backend_ok,
            };
            let body = json!({
                "status": if healthy { "ok" } else { "unhealthy" },
                "state": i.state.as_str(),
                "role": if i.role == Role::Active { "active" } else { "standby" },
                "shards": if i.role == Role::Active {
                    json!([{"shard": [super::run::SHARD, super::run::SHARDS], "state": i.state.as_str()}])
                } else {
                    json!([])
                },
                "guilds": i.guilds,
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
