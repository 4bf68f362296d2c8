//! The gateway as this replica sees it: whether its stored status is fresh, and what it
//! says.
//!
//! A dead gateway sends no `gateway.status`, so every replica watches the age of the
//! report the gateway refreshes for the guild's shard (`P:shard:{i}:status`) and itself tells its open
//! streams (and renders on fresh pages) that live updates are delayed, and when they are
//! back. The gateway's freshness is reported in `/readyz`'s body and in metrics but never
//! makes a replica unready: a stale gateway must not take the site out of a load
//! balancer.
//!
//! Owns the replica's view of the gateway. Must not change shared state.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::hub::Hub;
use crate::bus::{Backend, GatewayReport};
use crate::event::{EventData, GatewayState, now_ms};

/// How often the report is looked at.
const EVERY: Duration = Duration::from_secs(1);

/// The last report read, and when.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewayReading {
    pub report: Option<GatewayReport>,
    /// Unix ms of the read.
    pub read_at: u64,
}

impl GatewayReading {
    pub fn fresh(&self) -> bool {
        self.report.as_ref().is_some_and(|r| r.fresh(self.read_at))
    }

    /// How old the report is, in ms.
    pub fn age_ms(&self) -> Option<u64> {
        self.report
            .as_ref()
            .map(|r| self.read_at.saturating_sub(r.ts))
    }

    /// What people are told: `None` when updates flow, else the state and why.
    pub fn delayed(&self) -> Option<(GatewayState, String)> {
        match &self.report {
            None => Some((
                GatewayState::Disconnected,
                "no gateway has reported yet".to_owned(),
            )),
            Some(r) if !r.fresh(self.read_at) => Some((
                GatewayState::Disconnected,
                format!(
                    "no word from the gateway for {} s",
                    self.read_at.saturating_sub(r.ts) / 1000
                ),
            )),
            Some(r) if r.state != GatewayState::Connected => Some((
                r.state,
                r.reason
                    .clone()
                    .filter(|r| !r.is_empty())
                    .unwrap_or_else(|| {
                        format!("the gateway is {}", r.state.as_str().to_lowercase())
                    }),
            )),
            Some(_) => None,
        }
    }

    /// The words a page shows in its banner (none before the first look: a replica
    /// that just started knows nothing yet, and says nothing).
    pub fn banner(&self) -> Option<String> {
        if self.read_at == 0 {
            return None;
        }
        self.delayed().map(|(_, why)| why)
    }
}

/// The replica's watch on the gateway's freshness; cloning shares it.
#[derive(Clone, Default)]
pub struct Freshness {
    current: Arc<Mutex<GatewayReading>>,
}

impl Freshness {
    pub fn current(&self) -> GatewayReading {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the report every second until `shutdown`; tells the hub's streams whenever
    /// "delayed" starts, changes its reason's state, or ends.
    pub fn start(&self, bus: Arc<dyn Backend>, hub: Hub, shutdown: CancellationToken) {
        let watch = self.clone();
        tokio::spawn(async move {
            let mut told: Option<Option<GatewayState>> = None;
            let fresh = metrics::gauge!("coven_web_gateway_fresh");
            let age = metrics::gauge!("coven_web_gateway_status_age_seconds");
            let mut tick = tokio::time::interval(EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let report = match crate::bus::shard_status(&*bus).await {
                    Ok(raw) => raw.and_then(|raw| {
                        serde_json::from_str::<GatewayReport>(&raw)
                            .inspect_err(
                                |e| tracing::warn!(error = %e, "unreadable gateway status"),
                            )
                            .ok()
                    }),
                    // Redis away is this replica's own trouble (readiness says so); the
                    // gateway's last known state stands.
                    Err(_) => continue,
                };
                let now = GatewayReading {
                    report,
                    read_at: now_ms(),
                };
                fresh.set(if now.fresh() { 1.0 } else { 0.0 });
                if let Some(ms) = now.age_ms() {
                    age.set(ms as f64 / 1000.0);
                }
                let delayed = now.delayed();
                let state = delayed.as_ref().map(|(s, _)| *s);
                if told != Some(state) {
                    let data = match delayed {
                        Some((state, why)) => EventData::GatewayStatus {
                            state,
                            reason: Some(why),
                        },
                        None => EventData::GatewayStatus {
                            state: GatewayState::Connected,
                            reason: None,
                        },
                    };
                    if told.is_some() || state.is_some() {
                        tracing::info!(?data, "telling streams about the gateway");
                        hub.notice(&data);
                    }
                    told = Some(state);
                }
                *watch.current.lock().unwrap_or_else(|e| e.into_inner()) = now;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(state: GatewayState, ts: u64) -> Option<GatewayReport> {
        Some(GatewayReport {
            state,
            reason: None,
            ts,
            ttl_ms: 10_000,
        })
    }

    #[test]
    fn a_report_older_than_the_lease_or_not_connected_means_delayed() {
        let up = |report, read_at| GatewayReading { report, read_at };
        assert_eq!(
            up(report(GatewayState::Connected, 1_000), 5_000).delayed(),
            None
        );
        let (state, why) = up(report(GatewayState::Connected, 1_000), 12_000)
            .delayed()
            .unwrap();
        assert_eq!(state, GatewayState::Disconnected);
        assert!(why.contains("11 s"), "{why}");
        let (state, why) = up(report(GatewayState::Reconnecting, 1_000), 2_000)
            .delayed()
            .unwrap();
        assert_eq!(state, GatewayState::Reconnecting);
        assert_eq!(why, "the gateway is reconnecting");
        assert!(up(None, 0).delayed().is_some());
    }
}
