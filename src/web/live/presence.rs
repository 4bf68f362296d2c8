//! Who is viewing which room page, across replicas.
//!
//! A room page's open stream counts its user as a viewer (a user with two tabs counts
//! once). This replica tells the bus when someone starts or stops viewing, and vouches
//! for its viewers every third of `VIEWER_TTL`, so a replica that dies has its viewers
//! fade out of `P:{G}:viewers:{channel}` within the TTL; the bus announces each change as
//! `room.viewers`. One task per replica does all of it, so a change is never sent twice.
//!
//! Owns the local viewer counts. Must not decide what the page shows about them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use twilight_model::id::Id;
use twilight_model::id::marker::{ChannelMarker, UserMarker};

use crate::bus::Backend;
use crate::event::Viewer;

type Local = HashMap<Id<ChannelMarker>, HashMap<Id<UserMarker>, (Viewer, usize)>>;

enum Change {
    Present(Id<ChannelMarker>, Viewer),
    Gone(Id<ChannelMarker>, Viewer),
}

#[derive(Clone)]
pub struct Presence {
    local: Arc<Mutex<Local>>,
    changes: mpsc::UnboundedSender<Change>,
}

/// Held by a room stream: the user stops viewing when the last of theirs is dropped.
pub struct Viewing {
    presence: Presence,
    channel: Id<ChannelMarker>,
    user: Id<UserMarker>,
}

impl Drop for Viewing {
    fn drop(&mut self) {
        let mut local = self.presence.lock();
        let Some(room) = local.get_mut(&self.channel) else {
            return;
        };
        let gone = match room.get_mut(&self.user) {
            Some((viewer, n)) if *n <= 1 => Some(viewer.clone()),
            Some((_, n)) => {
                *n -= 1;
                None
            }
            None => None,
        };
        if let Some(viewer) = gone {
            room.remove(&self.user);
            if room.is_empty() {
                local.remove(&self.channel);
            }
            let _ = self
                .presence
                .changes
                .send(Change::Gone(self.channel, viewer));
        }
    }
}

impl Presence {
    /// Starts the replica's presence task; it lives as long as the process.
    pub fn start(bus: Arc<dyn Backend>, ttl: Duration, stop: CancellationToken) -> Self {
        let (changes, rx) = mpsc::unbounded_channel();
        let presence = Presence {
            local: Arc::default(),
            changes,
        };
        tokio::spawn(presence.clone().run(bus, ttl, rx, stop));
        presence
    }

    fn lock(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `viewer` opened `channel`'s page (one more of their streams).
    pub fn enter(&self, channel: Id<ChannelMarker>, viewer: Viewer) -> Viewing {
        let user = viewer.id;
        let mut local = self.lock();
        let entry = local
            .entry(channel)
            .or_default()
            .entry(user)
            .or_insert_with(|| (viewer.clone(), 0));
        entry.1 += 1;
        if entry.1 == 1 {
            let _ = self.changes.send(Change::Present(channel, viewer));
        }
        Viewing {
            presence: self.clone(),
            channel,
            user,
        }
    }

    async fn run(
        self,
        bus: Arc<dyn Backend>,
        ttl: Duration,
        mut changes: mpsc::UnboundedReceiver<Change>,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(ttl / 3);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                change = changes.recv() => {
                    let Some(change) = change else { return };
                    let (channel, present, gone) = match change {
                        Change::Present(c, v) => (c, vec![v], vec![]),
                        Change::Gone(c, v) => (c, vec![], vec![v]),
                    };
                    if let Err(e) = bus.viewers(channel, &present, &gone, ttl).await {
                        tracing::warn!(error = %e, %channel, "cannot update viewers; the next refresh will");
                    }
                }
                _ = tick.tick() => self.refresh(&*bus, ttl).await,
            }
        }
    }

    /// Vouches for this replica's viewers, and lets the bus drop any that nobody vouches
    /// for any more (in every room, not only those viewed here).
    async fn refresh(&self, bus: &dyn crate::bus::Backend, ttl: Duration) {
        let local: Vec<(Id<ChannelMarker>, Vec<Viewer>)> = self
            .lock()
            .iter()
            .map(|(c, vs)| (*c, vs.values().map(|(v, _)| v.clone()).collect()))
            .collect();
        let mut rooms: Vec<Id<ChannelMarker>> = match bus.snapshot().await {
            Ok(s) => s
                .rooms
                .iter()
                .filter(|(_, r)| !r.viewers.is_empty())
                .map(|(c, _)| *c)
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot refresh viewers");
                return;
            }
        };
        for (channel, viewers) in &local {
            rooms.retain(|c| c != channel);
            if let Err(e) = bus.viewers(*channel, viewers, &[], ttl).await {
                tracing::warn!(error = %e, %channel, "cannot refresh viewers");
            }
        }
        for channel in rooms {
            if let Err(e) = bus.viewers(channel, &[], &[], ttl).await {
                tracing::warn!(error = %e, %channel, "cannot expire viewers");
            }
        }
    }
}
