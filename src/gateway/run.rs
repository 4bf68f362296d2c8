//! The gateway's life: wait as a standby until the lease of the bot's one shard (shard
//! 0 of 1) is ours, then hold the Discord session — resuming the stored one when there is one —
//! and append what each dispatch means to its guild's bus (one [`Deriver`] and one log
//! per guild), fenced by the lease's epoch, storing the session after each dispatch; and
//! keep the registry (`P:guilds`) as Discord describes the guilds.
//!
//! The session is stored only after the dispatch's events are appended, so a successor
//! that resumes from it may replay a dispatch we already handled, never skip one. Appends
//! are named by (session, sequence, index in the dispatch), so a replayed dispatch's
//! events reach each log once; and the deriver compares with the snapshot anyway.
//!
//! Owns the shard's keys (`P:shard:{0}:lease`, `:session`, `:status`), the registry's
//! entries and the served guilds' appends. Must not register a guild from anything but
//! Discord's dispatches, nor write to a guild it does not serve.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use twilight_gateway::{
    CloseFrame, ConfigBuilder, Event, EventTypeFlags, Intents, Session, Shard, ShardId,
    StreamExt as _,
};
use twilight_model::gateway::payload::incoming::GuildCreate;
use twilight_model::id::Id;
use twilight_model::id::marker::{ChannelMarker, GuildMarker, UserMarker};

use super::Settings;
use super::derive::{Deriver, Registration, Route};
use super::health::{Health, Role};
use crate::bus::{
    Backend, BusError, Deployment, Fence, GuildEntry, Request, SHARD_COUNT, Snapshot,
};
use crate::event::{EventData, GatewayState};

/// The shard this process holds, of how many: one process holds the bot's only shard.
pub const SHARD: u32 = 0;
pub const SHARDS: u32 = 1;
/// The shard's lease (`P:shard:{0}:lease`, its epoch at `...:lease:epoch`).
pub const LEASE: &str = "shard:{0}:lease";
/// Where the shard's holder keeps its Discord session for a successor.
pub const SESSION_KEY: &str = "shard:{0}:session";
/// The shard's last published status, expiring when no gateway refreshes it.
pub const STATUS_KEY: &str = "shard:{0}:status";
/// One guild's gateway's lease (`P:{G}:gateway:leader`): while one is live, a new gateway
/// does not start (two would hold the bot's session).
pub const OLD_LEASE: &str = "gateway:leader";
/// One guild's gateway's stored session (`P:{G}:gateway:session`), taken over when there
/// is no session of the shard yet.
pub const OLD_SESSION_KEY: &str = "gateway:session";

/// What `P:shard:{0}:session` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSession {
    pub session_id: String,
    pub sequence: u64,
    pub resume_url: Option<String>,
    /// One guild's gateway stored no count: its session was of one shard.
    #[serde(default = "one")]
    pub shard_count: u32,
}

fn one() -> u32 {
    1
}

/// How the gateway stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Asked to stop; the session was stored and the lease released.
    Stopped,
    /// Discord refused us for good (a fatal close code); retrying would not help.
    Fatal { code: u16, cause: &'static str },
}

enum Ended {
    Shutdown,
    LostLease,
    Fatal(u16),
}

/// Runs until shutdown or a fatal Discord error.
pub async fn run(
    settings: Settings,
    deployment: Arc<dyn Deployment>,
    health: Health,
    shutdown: CancellationToken,
) -> anyhow::Result<Outcome> {
    refuse_beside_an_old_gateway(&settings, &*deployment).await?;
    let count = deployment
        .put_first(SHARD_COUNT, &SHARDS.to_string())
        .await?;
    if count.trim() != SHARDS.to_string() {
        anyhow::bail!(
            "{}:{SHARD_COUNT} is {count}, but this gateway holds the bot's one shard \
             (several are not supported yet): reset it to {SHARDS} to run this version",
            settings.key_prefix
        );
    }
    let holder = format!("{}-{}", hostname(), std::process::id());
    let ttl = settings.lease_ttl;
    tokio::spawn(trim_by_age(
        deployment.clone(),
        settings.clone(),
        shutdown.child_token(),
    ));
    loop {
        health.set_role(Role::Standby);
        health.set_guilds(0);
        let fence = tokio::select! {
            () = shutdown.cancelled() => return Ok(Outcome::Stopped),
            fence = wait_for_lease(&*deployment, &holder, ttl, &health) => fence,
        };
        tracing::info!(epoch = fence.epoch, "took the shard's lease; now active");
        metrics::counter!("coven_gateway_lease_changes_total").increment(1);
        health.set_role(Role::Active);
        let ended = active(&settings, &*deployment, &fence, &health, &shutdown).await;
        match ended {
            Ok(Ended::Shutdown) => {
                let _ = deployment.release(&fence).await;
                tracing::info!("stopped; session stored and lease released");
                return Ok(Outcome::Stopped);
            }
            Ok(Ended::LostLease) => {
                tracing::warn!("lost the shard's lease; back to standby");
            }
            Ok(Ended::Fatal(code)) => {
                let cause = fatal_cause(code);
                let status = EventData::GatewayStatus {
                    state: GatewayState::Failed,
                    reason: Some(format!("close code {code}: {cause}")),
                };
                health.set_state(GatewayState::Failed);
                if let Ok(guilds) = guilds_of_shard(&settings, &*deployment).await {
                    for guild in guilds.keys() {
                        let _ = deployment
                            .guild(*guild)
                            .append(status.clone(), Some(&fence))
                            .await;
                    }
                }
                let _ = deployment.release(&fence).await;
                return Ok(Outcome::Fatal { code, cause });
            }
            Err(e) => {
                tracing::warn!(error = %e, "the active gateway stopped; standing by to retry");
                let _ = deployment.release(&fence).await;
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(Outcome::Stopped),
                    () = tokio::time::sleep(ttl / 3) => {}
                }
            }
        }
    }
}

/// The guilds this process serves that the shard holds: the registry's (as Discord last
/// described them) and the configured ones, with their entries when registered.
async fn guilds_of_shard(
    settings: &Settings,
    deployment: &dyn Deployment,
) -> anyhow::Result<BTreeMap<Id<GuildMarker>, Option<GuildEntry>>> {
    let mut guilds: BTreeMap<_, _> = deployment
        .registry()
        .await?
        .into_iter()
        .filter(|(g, e)| e.shard == SHARD && settings.serves(*g))
        .map(|(g, e)| (g, Some(e)))
        .collect();
    for g in &settings.guild_ids {
        guilds.entry(*g).or_insert(None);
    }
    Ok(guilds)
}

/// Upgrading from one guild: a gateway of the old kind holds the bot's session under
/// `P:{G}:gateway:leader`; starting beside it would open a second session and write the
/// guild's log from two places.
async fn refuse_beside_an_old_gateway(
    settings: &Settings,
    deployment: &dyn Deployment,
) -> anyhow::Result<()> {
    // Those registered or configured, and any old lease in the keyspace: a first start
    // with an empty registry and no DISCORD_GUILD_ID must not miss one.
    let mut guilds: std::collections::BTreeSet<Id<GuildMarker>> =
        guilds_of_shard(settings, deployment)
            .await?
            .into_keys()
            .collect();
    guilds.extend(deployment.guilds_with_key(OLD_LEASE).await?);
    for guild in &guilds {
        if let Some(left) = deployment.guild(*guild).lease_left(OLD_LEASE).await? {
            anyhow::bail!(
                "a one-guild gateway still holds {}:{{{guild}}}:{OLD_LEASE} (for {} ms more): \
                 stop every old gateway first (upgrade the web replicas, then the gateways: \
                 see docs/operations.md)",
                settings.key_prefix,
                left.as_millis()
            );
        }
    }
    Ok(())
}

async fn wait_for_lease(
    deployment: &dyn Deployment,
    holder: &str,
    ttl: Duration,
    health: &Health,
) -> Fence {
    // A standby sleeps until the lease it saw would run out, so it takes over at most a
    // few milliseconds after the active gateway's last renewal expires (within the TTL of
    // its death), not on a fixed poll that could add a third of the TTL.
    const MARGIN: Duration = Duration::from_millis(5);
    loop {
        let wait = match deployment.acquire(LEASE, holder, ttl).await {
            Ok(Some(fence)) => return fence,
            Ok(None) => {
                health.set_backend_ok(true);
                match deployment.lease_left(LEASE).await {
                    Ok(left) => left.unwrap_or_default().min(ttl) + MARGIN,
                    Err(_) => ttl / 3,
                }
            }
            Err(e) => {
                health.set_backend_ok(false);
                tracing::warn!(error = %e, "cannot reach the bus to take the lease");
                (ttl / 3).min(Duration::from_secs(1))
            }
        };
        tokio::time::sleep(wait).await;
    }
}

fn parse_session(json: &str) -> Option<StoredSession> {
    serde_json::from_str(json)
        .inspect_err(|e| tracing::warn!(error = %e, "ignoring an unreadable stored session"))
        .ok()
}

/// Work for the writer, in the order the shard loop produced it.
enum Work {
    /// One event of a guild; named after its dispatch when it came from one.
    Event {
        bus: Arc<dyn Backend>,
        data: EventData,
        request: Option<Request>,
    },
    /// The shard's `gateway.status`, into every served guild's log.
    Status(EventData),
    /// A guild first seen in this session (its GUILD_CREATE is in its deriver's view):
    /// Redis is brought in line with the view.
    Sync(Id<GuildMarker>),
    Register(Id<GuildMarker>, GuildEntry),
    /// The bot was removed from the guild; `mark` when its `guild.removed` is still to
    /// be appended (its deriver's output was not).
    Removed {
        guild: Id<GuildMarker>,
        bus: Arc<dyn Backend>,
        mark: bool,
    },
    Session(StoredSession),
}

/// A guild this holder serves.
struct Served {
    bus: Arc<dyn Backend>,
    deriver: Deriver,
    /// Its events are not queued until [`Work::Sync`] has compared its view with Redis.
    syncing: bool,
}

/// Every served guild, shared by the shard loop (deriving) and the writer (syncing and
/// recovering): deriving and enqueueing happen under its lock, so a sync or recovery sees
/// either all of a dispatch or none of it.
#[derive(Default)]
struct Guilds {
    served: BTreeMap<Id<GuildMarker>, Served>,
    /// The registry as this holder knows it (written again after an overflow).
    entries: BTreeMap<Id<GuildMarker>, GuildEntry>,
    /// Removals whose work the full queue dropped.
    removed: Vec<(Id<GuildMarker>, Arc<dyn Backend>)>,
    /// The bot's user id, from READY, for derivers made later.
    bot: Option<Id<UserMarker>>,
}

fn lock(guilds: &Mutex<Guilds>) -> MutexGuard<'_, Guilds> {
    guilds.lock().unwrap_or_else(|e| e.into_inner())
}

/// The shard loop's side of the outage queue. Pushing never waits, so the shard keeps
/// being polled (and keeps heartbeating) however long Redis is away.
struct Queue {
    tx: mpsc::Sender<Work>,
    overflowed: Arc<AtomicBool>,
    wake: Arc<Notify>,
}

impl Queue {
    /// `false` when the work was dropped (the queue overflowed): recovery makes up for it.
    fn push(&self, work: Work) -> bool {
        if self.overflowed.load(Ordering::Acquire) {
            return false; // the writer will reconcile from the view instead
        }
        match self.tx.try_send(work) {
            Ok(()) => {
                metrics::gauge!("coven_gateway_queue_depth").increment(1.0);
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.overflowed.store(true, Ordering::Release);
                metrics::counter!("coven_gateway_queue_overflows_total").increment(1);
                tracing::error!(
                    "the outage queue is full: dropping events; Redis will be reconciled from the gateway's own state when it is back"
                );
                self.wake.notify_one();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// Serves the guilds known before connecting: raises their epochs (a paused predecessor
/// is refused in each from now on), then reads their snapshots and the stored session,
/// so both include whatever the predecessor wrote before.
async fn prepare(
    settings: &Settings,
    deployment: &dyn Deployment,
    fence: &Fence,
) -> anyhow::Result<(Guilds, Option<StoredSession>)> {
    let known = guilds_of_shard(settings, deployment).await?;
    let ids: Vec<_> = known.keys().copied().collect();
    deployment.raise_epochs(&ids, fence.epoch).await?;
    let mut stored = match deployment.get(SESSION_KEY).await? {
        Some(json) => parse_session(&json),
        None => None,
    };
    if stored.is_none() {
        // Upgrading: the session one guild's gateway left is this shard's (of one).
        for guild in &ids {
            if let Some(json) = deployment.guild(*guild).get(OLD_SESSION_KEY).await?
                && let Some(old) = parse_session(&json)
                && old.shard_count == SHARDS
            {
                tracing::info!(%guild, "taking over the session of a one-guild gateway");
                stored = Some(old);
                break;
            }
        }
    }
    let snapshots: Vec<(Id<GuildMarker>, Arc<dyn Backend>, Snapshot)> =
        futures_util::stream::iter(ids.iter().copied())
            .map(|guild| async move {
                let bus = deployment.guild(guild);
                let snapshot = bus.snapshot().await?;
                Ok::<_, BusError>((guild, bus, snapshot))
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
    let mut guilds = Guilds::default();
    for (guild, bus, snapshot) in snapshots {
        guilds.served.insert(
            guild,
            Served {
                bus,
                deriver: Deriver::new(guild, settings.room_categories.clone(), snapshot),
                syncing: false,
            },
        );
    }
    guilds.entries = known
        .into_iter()
        .filter_map(|(g, e)| Some((g, e?)))
        .collect();
    Ok((guilds, stored))
}

/// Routes one dispatch to its guild: its deriver's events, and what it means for the
/// registry. A guild first seen in a full GUILD_CREATE is served from then on.
#[allow(clippy::too_many_arguments)]
fn on_guild_dispatch(
    guilds: &mut Guilds,
    guild: Id<GuildMarker>,
    event: &Event,
    session: Option<&(String, u64)>,
    queue: &Queue,
    deployment: &dyn Deployment,
    settings: &Settings,
    epoch: u64,
) {
    let full = matches!(event, Event::GuildCreate(g) if matches!(**g, GuildCreate::Available(_)));
    if full && !guilds.served.contains_key(&guild) {
        tracing::info!(%guild, "serving a guild");
        let deriver = Deriver::new(guild, settings.room_categories.clone(), Snapshot::default())
            .with_bot(guilds.bot);
        guilds.served.insert(
            guild,
            Served {
                bus: deployment.guild(guild),
                deriver,
                syncing: true,
            },
        );
        queue.push(Work::Sync(guild));
    }
    let mut marked = false;
    match guilds.served.get_mut(&guild) {
        Some(served) => {
            let out = served.deriver.on_dispatch(event);
            if !served.syncing {
                marked = out
                    .iter()
                    .any(|e| matches!(e, EventData::GuildRemoved { .. }));
                for (index, data) in out.into_iter().enumerate() {
                    let request = session.map(|(id, sequence)| {
                        Request::dispatch(id, *sequence, u32::try_from(index).unwrap_or(u32::MAX))
                    });
                    queue.push(Work::Event {
                        bus: served.bus.clone(),
                        data,
                        request,
                    });
                }
            }
        }
        None => {
            tracing::debug!(%guild, "a dispatch of a guild not described yet; waiting for its GUILD_CREATE");
        }
    }
    let Some((_, registration)) = super::derive::registration(event) else {
        return;
    };
    match registration {
        Registration::Available { name, icon } => {
            let entry = GuildEntry {
                name,
                icon,
                shard: SHARD,
                available: true,
                epoch,
            };
            guilds.entries.insert(guild, entry.clone());
            queue.push(Work::Register(guild, entry));
        }
        Registration::Unavailable => {
            let name = guilds
                .served
                .get(&guild)
                .and_then(|s| s.deriver.view().access.guild.as_ref())
                .map(|g| g.name.clone());
            // Known only from its snapshot (listed, not yet registered): what Redis knows
            // of its name will do until its GUILD_CREATE.
            let entry = guilds.entries.entry(guild).or_insert_with(|| GuildEntry {
                name: name.unwrap_or_default(),
                icon: None,
                shard: SHARD,
                available: false,
                epoch,
            });
            entry.available = false;
            entry.epoch = epoch;
            let entry = entry.clone();
            queue.push(Work::Register(guild, entry));
        }
        Registration::Removed => {
            tracing::info!(%guild, "the bot was removed from a guild");
            guilds.entries.remove(&guild);
            let bus = guilds
                .served
                .remove(&guild)
                .map_or_else(|| deployment.guild(guild), |s| s.bus);
            if !queue.push(Work::Removed {
                guild,
                bus: bus.clone(),
                mark: !marked,
            }) {
                guilds.removed.push((guild, bus));
            }
        }
    }
}

async fn active(
    settings: &Settings,
    deployment: &dyn Deployment,
    fence: &Fence,
    health: &Health,
    shutdown: &CancellationToken,
) -> anyhow::Result<Ended> {
    let ttl = settings.lease_ttl;
    let (guilds, stored) = prepare(settings, deployment, fence).await?;
    health.set_guilds(guilds.served.len());
    let guilds = Mutex::new(guilds);
    let mut config = ConfigBuilder::new(
        settings.bot_token_value(),
        Intents::GUILDS | Intents::GUILD_VOICE_STATES,
    )
    .proxy_url(
        settings
            .gateway_url
            .as_str()
            .trim_end_matches('/')
            .to_owned(),
    );
    if let Some(s) = &stored {
        tracing::info!(sequence = s.sequence, "resuming the stored Discord session");
        config = config.session(Session::new(s.sequence, s.session_id.clone()));
        if let Some(url) = &s.resume_url {
            config = config.resume_url(url.clone());
        }
    }
    let mut shard = Shard::with_config(ShardId::new(SHARD, SHARDS), config.build());

    let (tx, rx) = mpsc::channel(settings.queue_size.max(1));
    let queue = Queue {
        tx,
        overflowed: Arc::new(AtomicBool::new(false)),
        wake: Arc::new(Notify::new()),
    };
    let lost = CancellationToken::new();
    let writer = Writer {
        deployment,
        fence,
        guilds: &guilds,
        overflowed: &queue.overflowed,
        wake: &queue.wake,
        lost: &lost,
        stop: shutdown,
        grace: settings.guild_removed_grace,
        recorded: Mutex::new(None),
        appends: std::sync::atomic::AtomicU64::new(0),
    };
    let status = Status::new(health);
    let mut saved_sequence = stored.as_ref().map(|s| s.sequence);
    status.set(
        &queue,
        if stored.is_some() {
            GatewayState::Reconnecting
        } else {
            GatewayState::Connecting
        },
        None,
    );
    let mut last_close: Option<u16> = None;
    // Renewing runs beside the shard loop, never inside it: a renewal waits up to
    // REDIS_RETRY_FOR through a failover, and a shard not polled that long sends no
    // heartbeats, so Discord would end the session a successor must resume.
    let renewer = async {
        let mut renew = tokio::time::interval(ttl / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        renew.tick().await;
        loop {
            renew.tick().await;
            match deployment.renew(fence, ttl).await {
                Ok(true) => {
                    if let Err(e) = status.refresh(deployment, fence, ttl).await {
                        tracing::warn!(error = %e, "cannot refresh the shard's status");
                    }
                }
                // The shard loop closes the shard (resumable) and hands over.
                Ok(false) => {
                    lost.cancel();
                    return std::future::pending::<()>().await;
                }
                // Redis is away: keep the Discord session; fencing stops our writes if
                // someone else holds the lease when it is back.
                Err(e) => tracing::warn!(error = %e, "cannot renew the shard's lease"),
            }
        }
    };

    let shard_loop = async {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    // 4000 keeps the Discord session resumable for the standby taking over.
                    shard.close(CloseFrame::RESUME);
                    return Ok(Ended::Shutdown);
                }
                () = lost.cancelled() => {
                    shard.close(CloseFrame::RESUME);
                    return Ok(Ended::LostLease);
                }
                item = shard.next_event(EventTypeFlags::all()) => {
                    let event = match item {
                        None => return Ok(Ended::Fatal(last_close.unwrap_or(0))),
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "gateway receive error");
                            metrics::counter!("coven_gateway_reconnects_total").increment(1);
                            status.set(&queue, GatewayState::Reconnecting, Some(e.to_string()));
                            continue;
                        }
                        Some(Ok(event)) => event,
                    };
                    match &event {
                        Event::GatewayHello(_) => status.set(&queue, GatewayState::Identifying, None),
                        Event::Ready(_) | Event::Resumed => status.set(&queue, GatewayState::Connected, None),
                        Event::GatewayClose(frame) => {
                            last_close = frame.as_ref().map(|f| f.code);
                            let reason = frame.as_ref().map(|f| format!("closed with {}", f.code));
                            status.set(&queue, GatewayState::Reconnecting, reason);
                        }
                        Event::GatewayReconnect | Event::GatewayInvalidateSession(_) => {
                            status.set(&queue, GatewayState::Reconnecting, None);
                        }
                        _ => {}
                    }
                    let session = shard
                        .session()
                        .map(|s| (s.id().to_owned(), s.sequence()));
                    tracing::debug!(kind = ?event.kind(), sequence = ?session.as_ref().map(|s| s.1), "dispatch");
                    {
                        let mut g = lock(&guilds);
                        let served_before = g.served.len();
                        match super::derive::route(&event) {
                            Route::Every => {
                                if let Event::Ready(ready) = &event {
                                    g.bot = Some(ready.user.id);
                                }
                                for served in g.served.values_mut() {
                                    served.deriver.on_dispatch(&event);
                                }
                            }
                            Route::Guild(guild) if settings.serves(guild) => on_guild_dispatch(
                                &mut g,
                                guild,
                                &event,
                                session.as_ref(),
                                &queue,
                                deployment,
                                settings,
                                fence.epoch,
                            ),
                            Route::Guild(_) | Route::Nowhere => {}
                        }
                        // Only GUILD_CREATE/DELETE change it: set when it did.
                        if g.served.len() != served_before {
                            health.set_guilds(g.served.len());
                        }
                    }
                    if let Some(session) = shard.session()
                        && saved_sequence != Some(session.sequence())
                    {
                        saved_sequence = Some(session.sequence());
                        queue.push(Work::Session(StoredSession {
                            session_id: session.id().to_owned(),
                            sequence: session.sequence(),
                            resume_url: shard.resume_url().map(str::to_owned),
                            shard_count: SHARDS,
                        }));
                    }
                }
            }
        }
    };
    let ended: anyhow::Result<Ended> = tokio::select! {
        ended = shard_loop => ended,
        () = writer.run(rx) => Ok(Ended::LostLease),
        () = renewer => Ok(Ended::LostLease),
    };
    ended
}

/// Appends queued work in order, waiting out Redis trouble; after an overflow, makes
/// Redis match the gateway's view. Losing the lease cancels `lost`.
struct Writer<'a> {
    deployment: &'a dyn Deployment,
    fence: &'a Fence,
    guilds: &'a Mutex<Guilds>,
    overflowed: &'a AtomicBool,
    wake: &'a Notify,
    lost: &'a CancellationToken,
    stop: &'a CancellationToken,
    /// How long a removed guild's data is kept.
    grace: Duration,
    /// The room of the last `room.created` naming an owner, and whether Redis already
    /// held that room's creator before it was appended.
    recorded: Mutex<Option<(Id<ChannelMarker>, bool)>>,
    /// Appends made under this fence that no dispatch names: with the fence token, names
    /// each one, so a retry (a lost answer, a failover, a write not yet on
    /// `REDIS_MIN_REPLICAS` replicas) appends nothing twice.
    appends: std::sync::atomic::AtomicU64,
}

impl Writer<'_> {
    async fn run(&self, mut rx: mpsc::Receiver<Work>) {
        loop {
            let work = tokio::select! {
                work = rx.recv() => work,
                () = self.wake.notified() => None,
            };
            if work.is_some() {
                metrics::gauge!("coven_gateway_queue_depth").decrement(1.0);
            }
            let result = match work {
                Some(Work::Event { bus, data, request }) => self.append(&*bus, data, request).await,
                Some(Work::Status(data)) => self.status(data).await,
                Some(Work::Sync(guild)) => self.sync(guild).await,
                Some(Work::Register(guild, entry)) => self.register(guild, &entry).await,
                Some(Work::Removed { guild, bus, mark }) => self.removed(guild, &*bus, mark).await,
                Some(Work::Session(session)) => self.save(&session).await,
                None => Ok(()),
            };
            if result.is_err() {
                self.lost.cancel();
                return;
            }
            if self.overflowed.load(Ordering::Acquire)
                && rx.is_empty()
                && self.recover().await.is_err()
            {
                self.lost.cancel();
                return;
            }
        }
    }

    /// Retries until Redis takes the write; only a lost lease (or shutdown) ends it.
    async fn retry<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, BusError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, BusError>>,
    {
        let mut backoff = Duration::from_millis(50);
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e @ BusError::Fenced(_)) => {
                    tracing::warn!("{what}: the lease was lost");
                    return Err(e);
                }
                Err(e) if self.stop.is_cancelled() => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "{what} failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn append(
        &self,
        bus: &dyn Backend,
        data: EventData,
        request: Option<Request>,
    ) -> Result<(), BusError> {
        match &data {
            EventData::RoomCreated {
                channel_id,
                created_by: Some(_),
                ..
            } => {
                let stored = self
                    .retry("reading the snapshot", || bus.snapshot())
                    .await?;
                let known = stored
                    .rooms
                    .get(channel_id)
                    .is_some_and(|r| r.creator_id.is_some());
                *self.recorded.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((*channel_id, known));
            }
            // The deriver retires a rebuilt room's invite links (only the gateway's
            // rebuilds make `invite.renewed` here) when its view had no owner for it; but
            // the web may have recorded the room, and handed out links, while the gateway
            // was connecting. What Redis held just before the rebuilt `room.created`
            // decides: a creator there means nothing was lost.
            EventData::InviteRenewed { channel_id, .. }
                if *self.recorded.lock().unwrap_or_else(|e| e.into_inner())
                    == Some((*channel_id, true)) =>
            {
                tracing::info!(channel = %channel_id, "the room was recorded after all; its invite links stay valid");
                return Ok(());
            }
            _ => {}
        }
        let kind = data.kind();
        let started = std::time::Instant::now();
        let request = request.unwrap_or_else(|| Request {
            writer: self.fence.token.clone(),
            seq: self.appends.fetch_add(1, Ordering::Relaxed),
            part: 0,
        });
        // Until this returns, the event stays at the head of the outage queue and no
        // Discord sequence after it is stored: a successor resumes before it.
        let event = self
            .retry("append", || {
                bus.append_once(data.clone(), Some(self.fence), &request)
            })
            .await?;
        metrics::histogram!("coven_gateway_append_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("coven_gateway_events_total", "type" => kind.as_str()).increment(1);
        tracing::debug!(id = %event.id, %kind, guild = %bus.guild_id(), "appended");
        Ok(())
    }

    fn buses(&self) -> Vec<Arc<dyn Backend>> {
        lock(self.guilds)
            .served
            .values()
            .map(|s| s.bus.clone())
            .collect()
    }

    async fn status(&self, data: EventData) -> Result<(), BusError> {
        for bus in self.buses() {
            self.append(&*bus, data.clone(), None).await?;
        }
        Ok(())
    }

    /// A guild first seen in this session: Redis is made to match the view its
    /// GUILD_CREATE gave (what Redis holds of it stays where it matches).
    async fn sync(&self, guild: Id<GuildMarker>) -> Result<(), BusError> {
        let Some(bus) = lock(self.guilds).served.get(&guild).map(|s| s.bus.clone()) else {
            return Ok(()); // removed meanwhile
        };
        // Back within the grace period of a removal: its data is kept again.
        self.retry("keeping the guild's data", || bus.expire(None))
            .await?;
        let stored = self
            .retry("reading the snapshot", || bus.snapshot())
            .await?;
        let diff = match lock(self.guilds).served.get_mut(&guild) {
            Some(served) => {
                served.syncing = false;
                served.deriver.diff_from(&stored)
            }
            None => Vec::new(),
        };
        tracing::info!(%guild, events = diff.len(), "brought a guild's log in line with Discord");
        for data in diff {
            self.append(&*bus, data, None).await?;
        }
        Ok(())
    }

    async fn register(&self, guild: Id<GuildMarker>, entry: &GuildEntry) -> Result<(), BusError> {
        let written = self
            .retry("registering a guild", || {
                self.deployment.register(guild, entry)
            })
            .await?;
        if written {
            Ok(())
        } else {
            Err(BusError::Fenced(LEASE.to_owned()))
        }
    }

    async fn removed(
        &self,
        guild: Id<GuildMarker>,
        bus: &dyn Backend,
        mark: bool,
    ) -> Result<(), BusError> {
        if mark {
            self.append(bus, EventData::GuildRemoved { id: guild }, None)
                .await?;
        }
        let written = self
            .retry("unregistering a guild", || {
                self.deployment.unregister(guild, self.fence.epoch)
            })
            .await?;
        if !written {
            return Err(BusError::Fenced(LEASE.to_owned()));
        }
        self.retry("expiring a removed guild's data", || {
            bus.expire(Some(self.grace))
        })
        .await
    }

    async fn save(&self, session: &StoredSession) -> Result<(), BusError> {
        let json = serde_json::to_string(session)?;
        self.retry("storing the session", || {
            self.deployment
                .put(Some(self.fence), SESSION_KEY, &json, None)
        })
        .await
    }

    /// Brings Redis in line with the gateway's view after work was dropped: every served
    /// guild's log, the registry, and removals.
    async fn recover(&self) -> Result<(), BusError> {
        let buses: Vec<(Id<GuildMarker>, Arc<dyn Backend>)> = lock(self.guilds)
            .served
            .iter()
            .map(|(g, s)| (*g, s.bus.clone()))
            .collect();
        let mut stored = BTreeMap::new();
        for (guild, bus) in &buses {
            let snapshot = self
                .retry("reading the snapshot", || bus.snapshot())
                .await?;
            stored.insert(*guild, snapshot);
        }
        let (diffs, joined, entries, removed) = {
            let mut g = lock(self.guilds);
            self.overflowed.store(false, Ordering::Release);
            let mut diffs = Vec::new();
            let mut joined = Vec::new();
            for (guild, served) in &mut g.served {
                match stored.get(guild) {
                    Some(snapshot) => {
                        served.syncing = false;
                        diffs.push((served.bus.clone(), served.deriver.diff_from(snapshot)));
                    }
                    // Joined during the overflow: its sync was dropped with the rest of
                    // the queue, so it is made below (no later recovery may come).
                    None if served.syncing => joined.push(*guild),
                    None => {}
                }
            }
            (
                diffs,
                joined,
                g.entries.clone(),
                std::mem::take(&mut g.removed),
            )
        };
        tracing::warn!(
            events = diffs.iter().map(|(_, d)| d.len()).sum::<usize>(),
            guilds = diffs.len(),
            "reconciling Redis after the outage queue overflowed"
        );
        metrics::counter!("coven_gateway_overflow_reconciles_total").increment(1);
        for (bus, diff) in diffs {
            for data in diff {
                self.append(&*bus, data, None).await?;
            }
        }
        for guild in joined {
            self.sync(guild).await?;
        }
        for (guild, entry) in &entries {
            self.register(*guild, entry).await?;
        }
        for (guild, bus) in removed {
            self.removed(guild, &*bus, true).await?;
        }
        Ok(())
    }
}

/// Publishes `gateway.status` on changes (through the queue, in order with the events,
/// into every served guild's log) and keeps `P:shard:{0}:status` fresh.
struct Status<'a> {
    health: &'a Health,
    /// Set by the shard loop, read by the renewer beside it.
    current: Mutex<Option<(GatewayState, Option<String>)>>,
}

impl<'a> Status<'a> {
    fn new(health: &'a Health) -> Self {
        Self {
            health,
            current: Mutex::new(None),
        }
    }

    fn set(&self, queue: &Queue, state: GatewayState, reason: Option<String>) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.as_ref().is_some_and(|(s, _)| *s == state) {
            return;
        }
        tracing::info!(
            state = state.as_str(),
            reason = reason.as_deref().unwrap_or(""),
            "gateway status"
        );
        self.health.set_state(state);
        *current = Some((state, reason.clone()));
        queue.push(Work::Status(EventData::GatewayStatus { state, reason }));
    }

    async fn refresh(
        &self,
        deployment: &dyn Deployment,
        fence: &Fence,
        ttl: Duration,
    ) -> Result<(), BusError> {
        let Some((state, reason)) = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            return Ok(());
        };
        let report = crate::bus::GatewayReport {
            state,
            reason,
            ts: crate::event::now_ms(),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        };
        let value = serde_json::to_string(&report)?;
        deployment
            .put(Some(fence), STATUS_KEY, &value, Some(ttl * 3))
            .await
    }
}

/// What a fatal close code most likely means, for the one line an operator reads.
pub fn fatal_cause(code: u16) -> &'static str {
    match code {
        4004 => "Discord refused DISCORD_BOT_TOKEN (authentication failed)",
        4010 => "invalid shard",
        4011 => "sharding required: the bot is in too many guilds for one shard",
        4012 => "invalid Gateway API version (check DISCORD_GATEWAY_URL)",
        4013 => "invalid intents",
        4014 => "disallowed intents: enable them for the bot in the Discord Developer Portal",
        _ => "the Gateway closed the session for good",
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".to_owned())
}

/// Trims the logs of the shard's guilds of events older than `max_age`, every 24th of it
/// (at most hourly, at least every 10 s), until `stop`. Any gateway process may: trimming
/// twice is trimming once.
async fn trim_by_age(deployment: Arc<dyn Deployment>, settings: Settings, stop: CancellationToken) {
    let max_age = settings.event_log_max_age;
    let every = (max_age / 24).clamp(Duration::from_secs(10), Duration::from_secs(3600));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let guilds = match guilds_of_shard(&settings, &*deployment).await {
            Ok(guilds) => guilds,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the registry to trim logs; trying again later");
                continue;
            }
        };
        let before = crate::event::now_ms().saturating_sub(max_age.as_millis() as u64);
        for guild in guilds.keys() {
            match deployment.guild(*guild).trim_before(before).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::debug!(%guild, trimmed = n, "trimmed the log by age");
                    metrics::counter!("coven_gateway_log_trimmed_total").increment(n);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot trim the log by age; trying again later")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shard_keys_are_the_spec_s() {
        assert_eq!(LEASE, crate::bus::shard_key(SHARD, "lease"));
        assert_eq!(SESSION_KEY, crate::bus::shard_key(SHARD, "session"));
        assert_eq!(STATUS_KEY, crate::bus::shard_key(SHARD, "status"));
    }

    #[test]
    fn a_one_guild_gateway_s_session_reads_as_a_session_of_one_shard() {
        let old = r#"{"session_id":"s","sequence":7,"resume_url":null}"#;
        assert_eq!(
            parse_session(old),
            Some(StoredSession {
                session_id: "s".to_owned(),
                sequence: 7,
                resume_url: None,
                shard_count: 1
            })
        );
    }
}
