//! The guilds this replica streams: a hub and a presence per guild someone here watches,
//! started with the first stream of it and stopped a while after its last stream ended
//! (its Redis subscription goes a little later, by the bus's own rule). A replica's cost
//! follows what its people watch, never how many guilds the deployment serves.
//!
//! Owns the per-guild live state and what `P:control` says to it. Must not decide who may
//! watch a guild (the stream endpoints do, before asking for it here).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use twilight_model::id::Id;
use twilight_model::id::marker::GuildMarker;

use super::hub::Hub;
use super::presence::Presence;
use crate::bus::{Backend, BusError, Deployment};
use crate::event::EventData;
use crate::web::App;
use crate::web::guard::parse_id;
use crate::web::guilds::Guild;
use crate::web::http::error::WebError;
use crate::web::members;
use crate::web::session::{SessionCache, SessionUser};

/// How long a guild nobody here streams keeps its hub: a page reload (stream closed,
/// stream opened) must not rebuild it.
pub const IDLE_AFTER: Duration = Duration::from_secs(30);

/// One guild as this replica streams it.
pub struct Community {
    pub id: Id<GuildMarker>,
    pub bus: Arc<dyn Backend>,
    pub hub: Hub,
    pub presence: Presence,
    stop: CancellationToken,
    /// Since when no stream of it is open here.
    idle_since: Mutex<Option<Instant>>,
}

impl Drop for Community {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The community a stream asks for (`guild=`), served and started here: without
/// `guild`, the only one when there is one (else 400); a guild that is not served, or is
/// no guild id, answers like a room that does not exist.
pub async fn for_stream(
    app: &App,
    raw: Option<&str>,
    who: &SessionUser,
) -> Result<(Guild, Arc<Community>), WebError> {
    let id = match raw.filter(|r| !r.is_empty()) {
        Some(raw) => parse_id(raw).ok_or_else(WebError::no_such_room)?,
        None => app.guilds.only().await?.ok_or_else(|| {
            WebError::BadRequest(
                "Which community? This Coven serves several: add guild=<server id>.".to_owned(),
            )
        })?,
    };
    let guild = app
        .guilds
        .get(id)
        .await?
        .ok_or_else(WebError::no_such_room)?;
    // Membership first: someone who is not in the guild must not make this replica
    // watch it (nor learn anything from the time a hub takes to start).
    let user = who.person.id;
    let watched = app.communities.find(id);
    let known = match &watched {
        Some(c) => c.hub.roles.roles(&*guild.bus, user).await?.is_some(),
        None => guild.bus.member(user).await?.is_some(),
    };
    if !known {
        // Never asked here (a stream opened before any page of the community): asked now,
        // with their own token.
        match members::current(app, &guild, who).await {
            Ok(Some(_)) => {}
            Ok(None) => return Err(WebError::no_such_room()),
            Err(WebError::Discord(crate::discord::DiscordError::Unauthorized)) => {
                return Err(WebError::NotLoggedIn {
                    return_to: "/".to_owned(),
                    api: true,
                });
            }
            Err(e) => return Err(e),
        }
    }
    if guild.past_limit {
        return Err(WebError::PastLimit(app.settings.max_guilds));
    }
    let community = match watched {
        Some(c) => c,
        None => app.communities.watch(id, guild.bus.clone()).await?,
    };
    Ok((guild, community))
}

/// What a hub is started with, the same for every guild.
#[derive(Clone)]
pub struct HubSettings {
    pub buffer: usize,
    pub max_behind: usize,
    pub keepalive: Duration,
    pub viewer_ttl: Duration,
}

pub struct Communities {
    started: Mutex<HashMap<Id<GuildMarker>, Arc<Community>>>,
    /// Held while a guild's hub starts, so it starts once.
    starting: tokio::sync::Mutex<()>,
    sessions: Arc<SessionCache>,
    settings: HubSettings,
    shutdown: CancellationToken,
    gauge: metrics::Gauge,
}

impl Communities {
    pub fn new(
        sessions: Arc<SessionCache>,
        settings: HubSettings,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            started: Mutex::default(),
            starting: tokio::sync::Mutex::new(()),
            sessions,
            settings,
            shutdown,
            gauge: metrics::gauge!("coven_web_guilds_watched"),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Id<GuildMarker>, Arc<Community>>> {
        self.started.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The replica's session cache, which every guild's streams share.
    pub fn sessions(&self) -> &Arc<SessionCache> {
        &self.sessions
    }

    /// Guild `id`'s live state, started now if nobody here watched it.
    pub async fn watch(
        &self,
        id: Id<GuildMarker>,
        bus: Arc<dyn Backend>,
    ) -> Result<Arc<Community>, BusError> {
        if let Some(c) = self.find(id) {
            return Ok(c);
        }
        let _once = self.starting.lock().await;
        if let Some(c) = self.find(id) {
            return Ok(c);
        }
        // Not a child of the shutdown: during the drain the hub keeps feeding the streams
        // not closed yet.
        let stop = CancellationToken::new();
        let s = &self.settings;
        let hub = Hub::start(
            bus.clone(),
            self.sessions.clone(),
            id,
            s.buffer,
            s.max_behind,
            s.keepalive,
            stop.clone(),
        )
        .await?;
        let presence = Presence::start(bus.clone(), s.viewer_ttl, stop.clone());
        let community = Arc::new(Community {
            id,
            bus,
            hub,
            presence,
            stop,
            idle_since: Mutex::new(None),
        });
        let mut started = self.lock();
        started.insert(id, community.clone());
        self.gauge.set(started.len() as f64);
        tracing::debug!(guild = %id, "watching");
        Ok(community)
    }

    /// Guild `id`'s live state if someone here watches it.
    pub fn find(&self, id: Id<GuildMarker>) -> Option<Arc<Community>> {
        self.lock().get(&id).cloned()
    }

    /// Every guild watched here.
    pub fn all(&self) -> Vec<Arc<Community>> {
        self.lock().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What `P:control` said, passed to every guild's streams here.
    pub fn control(&self, data: &EventData) {
        if let EventData::SessionEnded { user_id, login } = data {
            self.sessions.revoke_login(*user_id, login);
            for c in self.all() {
                c.hub.logged_out(*user_id, login);
            }
        }
    }

    /// Stops the guilds nobody here has streamed for [`IDLE_AFTER`].
    pub fn reap(&self, now: Instant) {
        let mut started = self.lock();
        started.retain(|id, c| {
            let mut idle = c.idle_since.lock().unwrap_or_else(|e| e.into_inner());
            if c.hub.streams() > 0 {
                *idle = None;
                return true;
            }
            match *idle {
                None => {
                    *idle = Some(now);
                    true
                }
                Some(since) if now.duration_since(since) < IDLE_AFTER => true,
                Some(_) => {
                    tracing::debug!(guild = %id, "nobody watches here; stopped");
                    false
                }
            }
        });
        self.gauge.set(started.len() as f64);
    }

    /// Closes every open stream of every guild, a slice at a time over `over`.
    pub async fn drain(&self, over: Duration) {
        let all = self.all();
        futures_util::future::join_all(all.iter().map(|c| c.hub.drain(over))).await;
    }

    /// Reaps idle guilds and listens to `P:control`, until `shutdown`.
    pub fn start(self: &Arc<Self>, deployment: Arc<dyn Deployment>) {
        let me = self.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(IDLE_AFTER / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut control = None;
            loop {
                if control.is_none() {
                    control = match deployment.control().await {
                        Ok(rx) => Some(rx),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot listen to the control channel yet");
                            None
                        }
                    };
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = tick.tick() => me.reap(Instant::now()),
                    heard = async {
                        match control.as_mut() {
                            Some(rx) => rx.recv().await,
                            None => std::future::pending().await,
                        }
                    } => match heard {
                        Ok(data) => me.control(&data),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(missed = n, "fell behind the control channel");
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => control = None,
                    },
                }
            }
        });
    }
}
