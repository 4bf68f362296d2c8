//! The communities a replica serves: which guilds the registry (`P:guilds`, written by
//! the gateway from what Discord says) holds, narrowed by `DISCORD_GUILD_ID` when it is
//! set, and the bus of the guild a request names.
//!
//! Owns reading the registry. Must not write it (only the gateway does, and never from
//! anything a browser sends) nor keep anything of a guild nobody asks about: entries
//! read for a request are kept a second, so a page's few lookups ask Redis once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use twilight_model::id::Id;
use twilight_model::id::marker::GuildMarker;

use crate::bus::{Backend, BusResult, Deployment, GuildEntry};

/// How long a registry entry read for a request is trusted.
const KEPT: Duration = Duration::from_secs(1);
/// Entries kept at most; past it the old ones are dropped (a scan of ids cannot grow it).
const KEPT_MAX: usize = 4096;

/// A guild a request named, registered and served: its id, its bus and what the
/// registry says of it.
#[derive(Clone)]
pub struct Guild {
    pub id: Id<GuildMarker>,
    pub bus: Arc<dyn Backend>,
    pub entry: GuildEntry,
    /// Past `MAX_GUILDS`: told so, served nothing.
    pub past_limit: bool,
}

impl Guild {
    /// The banner of a guild Discord reports in an outage.
    pub fn unavailable(&self) -> Option<String> {
        (!self.entry.available).then(|| {
            "Discord reports this server unavailable; what you see may be out of date.".to_owned()
        })
    }
}

type Kept = HashMap<Id<GuildMarker>, (Instant, Option<GuildEntry>)>;

pub struct Guilds {
    deployment: Arc<dyn Deployment>,
    /// `DISCORD_GUILD_ID`: only these, when set.
    configured: Vec<Id<GuildMarker>>,
    /// `MAX_GUILDS`.
    max: usize,
    kept: Mutex<Kept>,
    /// While the registry is past `max`, the guilds served (the `max` oldest by id):
    /// read at most every [`LIMIT_KEPT`].
    limit: Mutex<Option<Limit>>,
    /// Set while one request reads [`Limit`] again.
    reading_limit: AtomicBool,
}

/// Clears the flag it holds when dropped.
struct Reading<'a>(&'a AtomicBool);

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

struct Limit {
    read_at: Instant,
    /// `None` while the registry is within the limit.
    served: Option<std::collections::BTreeSet<Id<GuildMarker>>>,
}

/// How long the registry's size (and the served set past the limit) is trusted.
const LIMIT_KEPT: Duration = Duration::from_secs(5);

impl Guilds {
    pub fn new(
        deployment: Arc<dyn Deployment>,
        configured: Vec<Id<GuildMarker>>,
        max: usize,
    ) -> Self {
        Self {
            deployment,
            configured,
            max,
            kept: Mutex::default(),
            limit: Mutex::new(None),
            reading_limit: AtomicBool::new(false),
        }
    }

    /// Whether `guild` is past `MAX_GUILDS`: with more guilds registered than that, the
    /// oldest servers (the smallest ids: Discord's ids grow with time) are served, so a
    /// new server cannot push out a community that has long had Coven. Below the limit
    /// this costs one `HLEN` every few seconds, whatever the traffic.
    async fn past_limit(&self, guild: Id<GuildMarker>) -> BusResult<bool> {
        let now = Instant::now();
        let read_at = self.limit_now().as_ref().map(|l| l.read_at);
        let stale = read_at.is_some_and(|at| now.duration_since(at) >= LIMIT_KEPT);
        if read_at.is_none() {
            // Nothing known yet: every request asks rather than guess.
            let read = self.read_limit(now).await?;
            *self.limit_now() = Some(read);
        } else if stale && !self.reading_limit.swap(true, Ordering::AcqRel) {
            // One request reads it again; the others go on with what is known (the stream
            // openers of a wave must not queue behind Redis for a figure seconds old).
            // Cleared however this ends (a request dropped mid-read included).
            let _reading = Reading(&self.reading_limit);
            *self.limit_now() = Some(self.read_limit(now).await?);
        }
        Ok(self
            .limit_now()
            .as_ref()
            .and_then(|l| l.served.as_ref())
            .is_some_and(|served| !served.contains(&guild)))
    }

    fn limit_now(&self) -> MutexGuard<'_, Option<Limit>> {
        self.limit.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The registry's size and, past `MAX_GUILDS`, the guilds served.
    async fn read_limit(&self, now: Instant) -> BusResult<Limit> {
        let len = self.deployment.registry_len().await?;
        let served = if len > self.max {
            Some(
                self.deployment
                    .registry()
                    .await?
                    .into_keys()
                    .take(self.max)
                    .collect(),
            )
        } else {
            None
        };
        Ok(Limit {
            read_at: now,
            served,
        })
    }

    pub fn deployment(&self) -> &Arc<dyn Deployment> {
        &self.deployment
    }

    /// Whether the deployment was told which guilds to serve (then nobody adds Coven).
    pub fn fixed(&self) -> bool {
        !self.configured.is_empty()
    }

    fn configured(&self, guild: Id<GuildMarker>) -> bool {
        self.configured.is_empty() || self.configured.contains(&guild)
    }

    fn lock(&self) -> MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The guild's bus, whether or not it is served (its data may outlive its entry).
    pub fn bus(&self, guild: Id<GuildMarker>) -> Arc<dyn Backend> {
        self.deployment.guild(guild)
    }

    /// The guild, when it is registered and served here.
    pub async fn get(&self, guild: Id<GuildMarker>) -> BusResult<Option<Guild>> {
        if !self.configured(guild) {
            return Ok(None);
        }
        let now = Instant::now();
        let kept = self
            .lock()
            .get(&guild)
            .filter(|(at, _)| now.duration_since(*at) < KEPT)
            .map(|(_, entry)| entry.clone());
        let entry = match kept {
            Some(entry) => entry,
            None => {
                let entry = self
                    .deployment
                    .entries(&[guild])
                    .await?
                    .into_iter()
                    .next()
                    .flatten();
                let mut kept = self.lock();
                if kept.len() >= KEPT_MAX {
                    kept.retain(|_, (at, _)| now.duration_since(*at) < KEPT);
                    if kept.len() >= KEPT_MAX {
                        kept.clear();
                    }
                }
                kept.insert(guild, (now, entry.clone()));
                entry
            }
        };
        let Some(entry) = entry else {
            return Ok(None);
        };
        Ok(Some(Guild {
            id: guild,
            bus: self.bus(guild),
            entry,
            past_limit: self.past_limit(guild).await?,
        }))
    }

    /// The registry's entries of `guilds` that are served here, in one request.
    pub async fn served_of(
        &self,
        guilds: &[Id<GuildMarker>],
    ) -> BusResult<Vec<(Id<GuildMarker>, GuildEntry)>> {
        let wanted: Vec<Id<GuildMarker>> = guilds
            .iter()
            .copied()
            .filter(|g| self.configured(*g))
            .collect();
        let entries = self.deployment.entries(&wanted).await?;
        Ok(wanted
            .into_iter()
            .zip(entries)
            .filter_map(|(g, e)| Some((g, e?)))
            .collect())
    }

    /// The one guild served, when there is exactly one: where `/rooms` and a stream
    /// without `guild` go.
    pub async fn only(&self) -> BusResult<Option<Id<GuildMarker>>> {
        if let [one] = self.configured[..] {
            return Ok(Some(one));
        }
        if !self.configured.is_empty() {
            let served = self.served_of(&self.configured.clone()).await?;
            return Ok(match served[..] {
                [(one, _)] => Some(one),
                _ => None,
            });
        }
        if self.deployment.registry_len().await? != 1 {
            return Ok(None);
        }
        Ok(self.deployment.registry().await?.into_keys().next())
    }

    /// How many guilds are registered.
    pub async fn count(&self) -> BusResult<usize> {
        self.deployment.registry_len().await
    }
}
