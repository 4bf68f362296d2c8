//! Closing idle rooms: one sweeper across all replicas.
//!
//! Every replica runs this loop, but only the holder of the `rooms:sweeper` lease acts,
//! and its writes are fenced by that lease, so a paused former holder cannot close a room
//! another replica has already reprieved. A Coven-made room with nobody in voice and
//! nobody on its page for `ROOM_IDLE_TIMEOUT` gets `room.closing`, and is closed
//! `ROOM_CLOSE_WARNING` later unless someone joins or opens it meanwhile (those events
//! clear the warning in the snapshot). Voice channels Coven did not make are never
//! touched. Owns nothing but the loop; closing itself is [`super::rooms::close_room`].

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::AppState;
use super::http::error::WebError;
use super::rooms;
use crate::bus::Fence;
use crate::event::{EventData, now_ms};

pub const LEASE: &str = "rooms:sweeper";

pub fn start(app: AppState, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let holder = format!("web-{:016x}", rand::random::<u64>());
        let interval = app.settings.room_sweep_interval;
        // Held across several sweeps, so the sweeper stays put while its replica lives
        // and moves within a few intervals when it dies.
        let ttl = (interval * 3).max(Duration::from_secs(1));
        let mut fence: Option<Fence> = None;
        loop {
            let mut wait = interval;
            fence = hold(&app, fence, &holder, ttl).await;
            if let Some(f) = &fence {
                match sweep(&app, f).await {
                    Ok(next) => wait = wait.min(next),
                    Err(e) => tracing::warn!(error = %e, "room sweep failed; trying again"),
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(wait.max(Duration::from_millis(50))) => {}
            }
        }
        if let Some(f) = fence {
            let _ = app.bus.release(&f).await;
        }
    });
}

/// Keeps (or takes) the lease; `None` while another replica holds it.
async fn hold(app: &AppState, fence: Option<Fence>, holder: &str, ttl: Duration) -> Option<Fence> {
    if let Some(f) = fence {
        match app.bus.renew(&f, ttl).await {
            Ok(true) => return Some(f),
            Ok(false) => tracing::info!("another replica took over the room sweeper"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the room sweeper lease");
                return None;
            }
        }
    }
    match app.bus.acquire(LEASE, holder, ttl).await {
        Ok(Some(f)) => {
            tracing::info!(epoch = f.epoch, "this replica sweeps idle rooms");
            Some(f)
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot take the room sweeper lease");
            None
        }
    }
}

/// One pass; returns how soon the next one is due (the earliest warning running out).
async fn sweep(app: &AppState, fence: &Fence) -> Result<Duration, WebError> {
    let settings = &app.settings;
    let idle_ms = u64::try_from(settings.room_idle_timeout.as_millis()).unwrap_or(u64::MAX);
    let warning_ms = u64::try_from(settings.room_close_warning.as_millis()).unwrap_or(u64::MAX);
    let snapshot = app.bus.snapshot().await?;
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
                app.bus
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
                rooms::close_room(app, *id, room.role_id, Some(fence)).await?;
                tracing::info!(channel = %id, "idle room closed");
            }
            Some(at) => next = next.min(Duration::from_millis(at - now)),
        }
    }
    Ok(next)
}
