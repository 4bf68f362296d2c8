//! Shared test machinery, and the one place test modules share code: a simulator
//! in-process, a private Redis, `coven` processes, the whole stack with a browser-like
//! HTTP client (`stack`), rooms made and shared through it (`rooms`), real Chromium
//! (`browser`, `axe`), the demo (`demo`), and waiting on conditions with deadlines (never
//! sleeping and hoping). Test modules import from here and never from each other; nothing
//! here imports from a test module.

#![allow(dead_code)]

pub mod axe;
pub mod browser;
pub mod clients;
pub mod cluster;
pub mod demo;
pub mod otlp;
mod process;
pub mod redis;
pub mod rooms;
pub mod sentinel;
mod sim;
mod stack;

use std::future::Future;
use std::time::Duration;

pub use process::CovenProcess;
pub use redis::RedisServer;
pub use sim::{TestSim, next_channel_update, next_event, next_voice_state, shard, shard_with};
pub use stack::{
    Browser, INVITE_SECRET, Message, Sse, Stack, Web, form_value, location, metric, metrics_page,
    spawn_gateway_on, spawn_web,
};

/// The community the stacks serve (the simulator's first guild, Coven Playgroup).
pub const GUILD: u64 = coven::sim::defaults::GUILD_ID;

/// `path` within [`GUILD`]'s pages: `/rooms/1` → `/g/{GUILD}/rooms/1`.
pub fn g(path: &str) -> String {
    format!("/g/{GUILD}{path}")
}

/// How long any single condition may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// Polls `check` until it returns `Some`, failing the test with `what` at the deadline.
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {DEADLINE:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `fut` with the standard deadline.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}"),
    }
}

/// Logs go to the test output only when `TEST_LOG` is set.
pub fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = coven::telemetry::init(
            &coven::config::LogSettings {
                filter: std::env::var("RUST_LOG").unwrap_or_else(|_| "debug".into()),
                format: coven::config::LogFormat::Pretty,
            },
            None,
            "test",
        );
    }
}
