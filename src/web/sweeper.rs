//! Closing idle rooms: one sweeper across all replicas, walking every community the
//! registry lists.
//!
//! Every replica runs this loop, but only the holder of the deployment's `rooms:sweeper`
//! lease acts; in each guild it also holds that guild's `rooms:sweeper` lease, and its
//! writes are fenced by it, so a paused former holder cannot close a room
//! another replica has already reprieved. A Coven-made room with nobody in voice and
//! nobody on its page for `ROOM_IDLE_TIMEOUT` gets `room.closing`, and is closed
//! `ROOM_CLOSE_WARNING` later unless someone joins or opens it meanwhile (those events
//! clear the warning in the snapshot). Voice channels Coven did not make are never
//! touched. Owns nothing but the loop; closing itself is [`super::rooms::close_room`].

use std::collections::HashMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use twilight_model::id::Id;
use twilight_model::id::marker::GuildMarker;

use super::AppState;
use super::guilds::Guild;
use super::http::error::WebError;
use super::rooms;
use crate::bus::{Backend, Bus, BusResult, Deployment, Fence};
use crate::event::{EventData, now_ms};

pub const LEASE: &str = "rooms:sweeper";

pub fn start(app: AppState, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let holder = format!("web-{:016x}", rand::random::<u64>());
        let interval = app.settings.room_sweep_interval;
        // Held across several sweeps, so the sweeper stays put while its replica lives
        // and moves within a few intervals when it dies.
        let ttl = (interval * 3).max(Duration::from_secs(1));
        let deployment = app.guilds.deployment().clone();
        let mut fence: Option<Fence> = None;
        // The guilds' own sweeper leases, held while this replica holds the deployment's:
        // appends are fenced per guild, in the guild's slot.
        let mut guilds: HashMap<Id<GuildMarker>, Fence> = HashMap::new();
        loop {
            let mut wait = interval;
            fence = hold(&*deployment, fence, &holder, ttl).await;
            if fence.is_some() {
                match sweep_all(&app, &mut guilds, &holder, ttl).await {
                    Ok(next) => wait = wait.min(next),
                    Err(e) => tracing::warn!(error = %e, "room sweep failed; trying again"),
                }
            } else {
                guilds.clear();
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(wait.max(Duration::from_millis(50))) => {}
            }
        }
        for (guild, f) in guilds {
            let _ = app.guilds.bus(guild).release(&f).await;
        }
        if let Some(f) = fence {
            let _ = deployment.release(&f).await;
        }
    });
}

/// A lease as both the deployment and a guild's bus hold them.
#[async_trait::async_trait]
trait Lease: Send + Sync {
    async fn acquire(&self, name: &str, holder: &str, ttl: Duration) -> BusResult<Option<Fence>>;
    async fn renew(&self, fence: &Fence, ttl: Duration) -> BusResult<bool>;
}

#[async_trait::async_trait]
impl Lease for dyn Deployment {
    async fn acquire(&self, name: &str, holder: &str, ttl: Duration) -> BusResult<Option<Fence>> {
        Deployment::acquire(self, name, holder, ttl).await
    }
    async fn renew(&self, fence: &Fence, ttl: Duration) -> BusResult<bool> {
        Deployment::renew(self, fence, ttl).await
    }
}

#[async_trait::async_trait]
impl Lease for dyn Backend {
    async fn acquire(&self, name: &str, holder: &str, ttl: Duration) -> BusResult<Option<Fence>> {
        Bus::acquire(self, name, holder, ttl).await
    }
    async fn renew(&self, fence: &Fence, ttl: Duration) -> BusResult<bool> {
        Bus::renew(self, fence, ttl).await
    }
}

/// Keeps (or takes) a lease; `None` while another replica holds it.
async fn hold<L: Lease + ?Sized>(
    lease: &L,
    fence: Option<Fence>,
    holder: &str,
    ttl: Duration,
) -> Option<Fence> {
    if let Some(f) = fence {
        match lease.renew(&f, ttl).await {
            Ok(true) => return Some(f),
            Ok(false) => tracing::info!("another replica took over the room sweeper"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the room sweeper lease");
                return None;
            }
        }
    }
    match lease.acquire(LEASE, holder, ttl).await {
        Ok(Some(f)) => {
            tracing::debug!(epoch = f.epoch, "this replica sweeps idle rooms");
            Some(f)
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot take the room sweeper lease");
            None
        }
    }
}

/// One pass over every community served; returns how soon the next one is due.
async fn sweep_all(
    app: &AppState,
    fences: &mut HashMap<Id<GuildMarker>, Fence>,
    holder: &str,
    ttl: Duration,
) -> Result<Duration, WebError> {
    let registry = app.guilds.deployment().registry().await?;
    fences.retain(|g, _| registry.contains_key(g));
    let mut next = app.settings.room_sweep_interval;
    for guild in registry.into_keys() {
        let Some(served) = app.guilds.get(guild).await?.filter(|g| !g.past_limit) else {
            continue;
        };
        let Some(fence) = hold(&*served.bus, fences.remove(&guild), holder, ttl).await else {
            continue;
        };
        match sweep(app, &served, &fence).await {
            Ok(due) => next = next.min(due),
            Err(e) => tracing::warn!(error = %e, %guild, "room sweep of a community failed"),
        }
        fences.insert(guild, fence);
    }
    Ok(next)
}

/// One pass over one community; returns how soon the next one is due (the earliest
/// warning running out).
async fn sweep(app: &AppState, guild: &Guild, fence: &Fence) -> Result<Duration, WebError> {
    let settings = &app.settings;
    let idle_ms = u64::try_from(settings.room_idle_timeout.as_millis()).unwrap_or(u64::MAX);
    let warning_ms = u64::try_from(settings.room_close_warning.as_millis()).unwrap_or(u64::MAX);
    let snapshot = guild.bus.snapshot().await?;
    let now = now_ms();
    let mut next = settings.room_sweep_interval;
    for (id, room) in &snapshot.rooms {
        if room.creator_id.is_none() {
            continue;
        }
        let busy = snapshot.members(*id).next().is_some() || !room.viewers.is_empty();
        if busy {
            continue;
        }
        match room.closes_at {
            None if now >= room.last_active.saturating_add(idle_ms) => {
                let closes_at = now.saturating_add(warning_ms);
                guild
                    .bus
                    .append(
                        EventData::RoomClosing {
                            channel_id: *id,
                            reason: "idle".to_owned(),
                            closes_at,
                        },
                        Some(fence),
                    )
                    .await?;
                tracing::info!(channel = %id, closes_at, "idle room will close");
                next = next.min(settings.room_close_warning);
            }
            None => {}
            Some(at) if now >= at => {
                rooms::close_room(app, guild.id, &*guild.bus, *id, room.role_id, Some(fence))
                    .await?;
                tracing::info!(channel = %id, "idle room closed");
            }
            Some(at) => next = next.min(Duration::from_millis(at - now)),
        }
    }
    Ok(next)
}
