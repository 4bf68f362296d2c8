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

use std::collections::HashMap;

use twilight_model::id::Id;
use twilight_model::id::marker::GuildMarker;

use super::communities::Communities;
use crate::bus::{Deployment, GatewayReport};
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
    current: Arc<Mutex<Shards>>,
}

/// The readings of every shard, by shard number.
#[derive(Clone, Default)]
struct Shards {
    count: u32,
    readings: Vec<GatewayReading>,
}

impl Freshness {
    /// The reading of the shard that holds `guild`.
    pub fn of(&self, guild: Id<GuildMarker>) -> GatewayReading {
        let shards = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let shard = crate::bus::shard_of(guild, shards.count) as usize;
        shards.readings.get(shard).cloned().unwrap_or_default()
    }

    /// Reads every shard's status each second, tells the streams of each guild watched
    /// here when its shard went quiet or came back, and keeps the readings for pages.
    pub fn start(
        &self,
        deployment: Arc<dyn Deployment>,
        communities: Arc<Communities>,
        shutdown: CancellationToken,
    ) {
        let watch = self.clone();
        tokio::spawn(async move {
            let mut told: HashMap<Id<GuildMarker>, Option<GatewayState>> = HashMap::new();
            let fresh = metrics::gauge!("coven_web_gateway_fresh");
            let age = metrics::gauge!("coven_web_gateway_status_age_seconds");
            let mut tick = tokio::time::interval(EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Ok(shards) = read(&*deployment).await else {
                    continue;
                };
                let worst = shards.worst();
                fresh.set(if worst.fresh() { 1.0 } else { 0.0 });
                if let Some(ms) = worst.age_ms() {
                    age.set(ms as f64 / 1000.0);
                }
                *watch.current.lock().unwrap_or_else(|e| e.into_inner()) = shards.clone();
                let watched = communities.all();
                told.retain(|g, _| watched.iter().any(|c| c.id == *g));
                for community in watched {
                    let delayed = watch.of(community.id).delayed();
                    let state = delayed.as_ref().map(|(s, _)| *s);
                    let before = told.insert(community.id, state);
                    if before == Some(state) {
                        continue;
                    }
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
                    if before.is_some() || state.is_some() {
                        tracing::info!(guild = %community.id, ?data, "telling streams about the gateway");
                        community.hub.notice(&data);
                    }
                }
            }
        });
    }
}

impl Shards {
    /// The reading furthest from fresh: what the replica's gauges and `/readyz` report.
    fn worst(&self) -> GatewayReading {
        self.readings
            .iter()
            .find(|r| r.delayed().is_some())
            .or(self.readings.first())
            .cloned()
            .unwrap_or_default()
    }
}

/// Every shard's status as the shards' holders last wrote it.
async fn read(deployment: &dyn Deployment) -> Result<Shards, crate::bus::BusError> {
    let count = deployment
        .get(crate::bus::SHARD_COUNT)
        .await?
        .and_then(|c| c.trim().parse::<u32>().ok())
        .unwrap_or(1)
        .clamp(1, MAX_SHARDS);
    let mut readings = Vec::with_capacity(count as usize);
    for shard in 0..count {
        let raw = deployment
            .get(&crate::bus::shard_key(shard, "status"))
            .await?;
        let report = raw.and_then(|raw| {
            serde_json::from_str::<GatewayReport>(&raw)
                .inspect_err(|e| tracing::warn!(error = %e, shard, "unreadable gateway status"))
                .ok()
        });
        readings.push(GatewayReading {
            report,
            read_at: now_ms(),
        });
    }
    Ok(Shards { count, readings })
}

/// The gateway as `/readyz` reports it: the shard furthest from fresh.
pub async fn gateway_now(
    deployment: &dyn Deployment,
) -> Result<GatewayReading, crate::bus::BusError> {
    Ok(read(deployment).await?.worst())
}

/// Shards read at most (a stored count past it is a typo, not a deployment).
use crate::bus::MAX_SHARDS;

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
