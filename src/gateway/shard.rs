//! One shard's life in a process that holds its lease: raise the epochs of the shard's
//! guilds, then hold its Discord session — resuming the stored one when there is one —
//! and append what each dispatch means to its guild's bus (one [`Deriver`] and one log
//! per guild), fenced by the lease's epoch, storing the session after each dispatch; and
//! keep the registry (`P:guilds`) as Discord describes the shard's guilds. Ends when
//! asked (a hand-over or shutdown: closed with 4000, so the next holder RESUMEs), when
//! the lease is lost, or on a fatal close code.
//!
//! The session is stored only after the dispatch's events are appended, so a successor
//! that resumes from it may replay a dispatch we already handled, never skip one. Appends
//! are named by (session, sequence, index in the dispatch), so a replayed dispatch's
//! events reach each log once; and the deriver compares with the snapshot anyway.
//!
//! Owns the shard's keys (`P:shard:{i}:lease`, `:session`, `:status`), the registry's
//! entries of its guilds and their appends. Must not register a guild from anything but
//! Discord's dispatches, nor write to a guild it does not serve; which shards this
//! process holds is [`super::run`]'s to decide.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use twilight_gateway::{
    CloseFrame, ConfigBuilder, Event, EventTypeFlags, Intents, Session, Shard, ShardId,
    StreamExt as _,
};
use twilight_model::gateway::payload::incoming::GuildCreate;
use twilight_model::id::Id;
use twilight_model::id::marker::{ChannelMarker, GuildMarker, UserMarker};

use super::Settings;
use super::derive::{Deriver, Registration, Route};
use super::health::ShardReport;
use super::identify::IdentifyQueue;
use crate::bus::{
    Backend, BusError, Deployment, Fence, GuildEntry, Request, Snapshot, shard_key, shard_of,
};
use crate::event::{EventData, GatewayState};

/// One guild's gateway's lease (`P:{G}:gateway:leader`): while one is live, a new gateway
/// does not start (two would hold the bot's session).
pub const OLD_LEASE: &str = "gateway:leader";
/// One guild's gateway's stored session (`P:{G}:gateway:session`), taken over when there
/// is no session of shard 0 of 1 yet.
pub const OLD_SESSION_KEY: &str = "gateway:session";

/// A shard of the bot's session: its id, of how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardOf {
    pub id: u32,
    pub count: u32,
}

impl ShardOf {
    /// Its lease (`P:shard:{i}:lease`, the epoch at `...:lease:epoch`).
    pub fn lease(self) -> String {
        shard_key(self.id, "lease")
    }
    /// Where its holder keeps its Discord session for a successor.
    pub fn session_key(self) -> String {
        shard_key(self.id, "session")
    }
    /// Its last published status, expiring when no holder refreshes it.
    pub fn status_key(self) -> String {
        shard_key(self.id, "status")
    }
    /// Whether `guild` is this shard's, by Discord's formula.
    pub fn has(self, guild: Id<GuildMarker>) -> bool {
        shard_of(guild, self.count) == self.id
    }
}

/// What `P:shard:{i}:session` holds.
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

/// How a shard's holding ended.
#[derive(Debug)]
pub enum Ended {
    /// Asked to stop (hand-over or shutdown): closed with 4000, lease released.
    Stopped,
    /// The lease was lost (paused past it, or Redis said so): someone else holds it.
    LostLease,
    /// Discord refused the shard for good.
    Fatal(u16),
    /// Something else went wrong (Redis away at the start); the lease was released.
    Failed(anyhow::Error),
}

/// What a shard's task needs from its process.
pub struct Holding {
    pub settings: Settings,
    pub deployment: Arc<dyn Deployment>,
    pub queue: IdentifyQueue,
    /// Set when the process stops for good: each shard tells its guilds FAILED.
    pub failed: Mutex<Option<String>>,
}

/// Holds `shard` under `fence` until `stop`, a lost lease or a fatal close; releases the
/// lease unless it was lost.
pub async fn hold(
    ctx: Arc<Holding>,
    shard: ShardOf,
    fence: Fence,
    report: ShardReport,
    stop: CancellationToken,
) -> Ended {
    let deployment = &*ctx.deployment;
    let ended = active(&ctx, shard, &fence, &report, &stop).await;
    let failed = |reason: String| async {
        let status = EventData::GatewayStatus {
            state: GatewayState::Failed,
            reason: Some(reason),
        };
        report.set_state(GatewayState::Failed, false);
        if let Ok(guilds) = guilds_of_shard(&ctx.settings, deployment, shard).await {
            for guild in guilds.keys() {
                let _ = deployment
                    .guild(*guild)
                    .append(status.clone(), Some(&fence))
                    .await;
            }
        }
    };
    let ended = match ended {
        Ok(Inner::Shutdown) => {
            let reason = ctx.failed.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(reason) = reason {
                failed(reason).await;
            }
            Ended::Stopped
        }
        Ok(Inner::LostLease) => return Ended::LostLease,
        Ok(Inner::Fatal(code)) => {
            failed(format!("close code {code}: {}", fatal_cause(code))).await;
            Ended::Fatal(code)
        }
        Err(e) => Ended::Failed(e),
    };
    // Redis may be away: a release that cannot be made expires with the TTL anyway.
    let _ = tokio::time::timeout(Duration::from_secs(3), deployment.release(&fence)).await;
    ended
}

/// The guilds this process serves that the shard holds: the registry's (as Discord last
/// described them) and the configured ones, with their entries when registered.
pub async fn guilds_of_shard(
    settings: &Settings,
    deployment: &dyn Deployment,
    shard: ShardOf,
) -> anyhow::Result<BTreeMap<Id<GuildMarker>, Option<GuildEntry>>> {
    let mut guilds: BTreeMap<_, _> = deployment
        .registry()
        .await?
        .into_iter()
        .filter(|(g, _)| shard.has(*g) && settings.serves(*g))
        .map(|(g, e)| (g, Some(e)))
        .collect();
    for g in settings.guild_ids.iter().filter(|g| shard.has(**g)) {
        guilds.entry(*g).or_insert(None);
    }
    Ok(guilds)
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
        /// The dispatch's span while traces are on (else none): the append is its child.
        dispatch: tracing::Span,
        /// When the dispatch arrived: its events' Discord-to-log time is measured from it.
        received: std::time::Instant,
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
    shard: ShardOf,
    fence: &Fence,
) -> anyhow::Result<(Guilds, Option<StoredSession>)> {
    let known = guilds_of_shard(settings, deployment, shard).await?;
    let ids: Vec<_> = known.keys().copied().collect();
    deployment.raise_epochs(&ids, fence.epoch).await?;
    let mut stored = match deployment.get(&shard.session_key()).await? {
        Some(json) => parse_session(&json),
        None => None,
    };
    // Discord's session of another shard count holds other guilds: resuming it would
    // serve the wrong ones (and Discord would refuse it after a reshard anyway).
    if let Some(s) = stored.as_ref().filter(|s| s.shard_count != shard.count) {
        tracing::warn!(
            shard = shard.id,
            stored = s.shard_count,
            count = shard.count,
            "not resuming a session of another shard count; identifying"
        );
        stored = None;
    }
    if stored.is_none() && shard.count == 1 {
        // Upgrading: the session one guild's gateway left is this shard's (of one).
        for guild in &ids {
            if let Some(json) = deployment.guild(*guild).get(OLD_SESSION_KEY).await?
                && let Some(old) = parse_session(&json)
                && old.shard_count == 1
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
    shard: ShardOf,
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
            // The root of each of this dispatch's events' traces.
            let dispatch = if crate::telemetry::enabled() {
                let span = tracing::info_span!(
                    "discord.dispatch",
                    shard = shard.id,
                    %guild,
                    kind = ?event.kind(),
                    sequence = session.map(|s| s.1),
                    trace_id = tracing::field::Empty,
                );
                crate::telemetry::record_trace_id(&span);
                span
            } else {
                tracing::Span::none()
            };
            let received = std::time::Instant::now();
            let out = dispatch.in_scope(|| served.deriver.on_dispatch(event));
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
                        dispatch: dispatch.clone(),
                        received,
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
                shard: shard.id,
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
                shard: shard.id,
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

/// How [`active`] ended, before [`hold`] releases the lease.
enum Inner {
    Shutdown,
    LostLease,
    Fatal(u16),
}

async fn active(
    ctx: &Holding,
    at: ShardOf,
    fence: &Fence,
    health: &ShardReport,
    shutdown: &CancellationToken,
) -> anyhow::Result<Inner> {
    let settings = &ctx.settings;
    let deployment = &*ctx.deployment;
    let ttl = settings.lease_ttl;
    let (guilds, stored) = prepare(settings, deployment, at, fence).await?;
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
        tracing::info!(
            shard = at.id,
            sequence = s.sequence,
            "resuming the shard's stored Discord session"
        );
        config = config.session(Session::new(s.sequence, s.session_id.clone()));
        // A dead resume URL is dropped by twilight after one failed connection, which
        // then connects to DISCORD_GATEWAY_URL with the same session.
        if let Some(url) = &s.resume_url {
            config = config.resume_url(url.clone());
        }
    } else {
        tracing::info!(
            shard = at.id,
            "no session to resume; identifying through the queue"
        );
    }
    let mut shard = Shard::with_config(
        ShardId::new(at.id, at.count),
        config.queue(ctx.queue.clone()).build(),
    );
    // Registered once: the shard loop counts every dispatch, and a labelled `counter!`
    // looks its series up (and allocates its label) each time.
    let label = at.id.to_string();
    let reconnects = metrics::counter!("coven_gateway_reconnects_total", "shard" => label.clone());
    let resumes = metrics::counter!("coven_gateway_resumes_total", "shard" => label.clone());
    let latency = metrics::gauge!("coven_gateway_latency_seconds", "shard" => label.clone());
    let dispatches = metrics::counter!("coven_gateway_dispatches_total", "shard" => label);

    let (tx, rx) = mpsc::channel(settings.queue_size.max(1));
    let queue = Queue {
        tx,
        overflowed: Arc::new(AtomicBool::new(false)),
        wake: Arc::new(Notify::new()),
    };
    let lost = CancellationToken::new();
    let writer = Writer {
        deployment,
        shard: at,
        fence,
        guilds: &guilds,
        overflowed: &queue.overflowed,
        wake: &queue.wake,
        lost: &lost,
        stop: shutdown,
        draining: CancellationToken::new(),
        grace: settings.guild_removed_grace,
        recorded: Mutex::default(),
        appends: std::sync::atomic::AtomicU64::new(0),
    };
    let status = Status::new(health, at);
    let mut saved_sequence = stored.as_ref().map(|s| s.sequence);
    status.set(
        &queue,
        if stored.is_some() {
            GatewayState::Reconnecting
        } else {
            GatewayState::Connecting
        },
        stored.is_some(),
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
                        tracing::warn!(shard = at.id, error = %e, "cannot refresh the shard's status");
                    }
                }
                // The shard loop closes the shard (resumable) and hands over.
                Ok(false) => {
                    lost.cancel();
                    return std::future::pending::<()>().await;
                }
                // Redis is away: keep the Discord session; fencing stops our writes if
                // someone else holds the lease when it is back.
                Err(e) => {
                    tracing::warn!(shard = at.id, error = %e, "cannot renew the shard's lease")
                }
            }
        }
    };

    let shard_loop = async {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    // 4000 keeps the Discord session resumable for the holder taking over.
                    close_resumable(&mut shard).await;
                    return Ok(Inner::Shutdown);
                }
                () = lost.cancelled() => {
                    close_resumable(&mut shard).await;
                    return Ok(Inner::LostLease);
                }
                item = shard.next_event(EventTypeFlags::all()) => {
                    let event = match item {
                        None => return Ok(Inner::Fatal(last_close.unwrap_or(0))),
                        Some(Err(e)) => {
                            tracing::warn!(shard = at.id, error = %e, "gateway receive error");
                            reconnects.increment(1);
                            status.set(&queue, GatewayState::Reconnecting, shard.session().is_some(), Some(e.to_string()));
                            continue;
                        }
                        Some(Ok(event)) => event,
                    };
                    match &event {
                        Event::GatewayHello(_) => {
                            let resuming = shard.session().is_some();
                            status.set(&queue, if resuming { GatewayState::Reconnecting } else { GatewayState::Identifying }, resuming, None);
                        }
                        Event::Ready(_) => status.set(&queue, GatewayState::Connected, false, None),
                        Event::Resumed => {
                            resumes.increment(1);
                            status.set(&queue, GatewayState::Connected, false, None);
                        }
                        Event::GatewayHeartbeatAck => {
                            if let Some(recent) = shard.latency().recent().first() {
                                latency.set(recent.as_secs_f64());
                            }
                        }
                        Event::GatewayClose(frame) => {
                            last_close = frame.as_ref().map(|f| f.code);
                            let reason = frame.as_ref().map(|f| format!("closed with {}", f.code));
                            status.set(&queue, GatewayState::Reconnecting, shard.session().is_some(), reason);
                        }
                        Event::GatewayReconnect | Event::GatewayInvalidateSession(_) => {
                            status.set(&queue, GatewayState::Reconnecting, shard.session().is_some(), None);
                        }
                        _ => {
                            dispatches.increment(1);
                        }
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
                                at,
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
                            shard_count: at.count,
                        }));
                    }
                }
            }
        }
    };
    let writing = writer.run(rx);
    tokio::pin!(writing);
    let ended: anyhow::Result<Inner> = tokio::select! {
        ended = shard_loop => ended,
        () = &mut writing => Ok(Inner::LostLease),
        () = renewer => Ok(Inner::LostLease),
    };
    if let Ok(Inner::Shutdown) = ended {
        // Closed with 4000: what the last dispatches queued (their events, then the
        // session naming their sequence) goes to Redis before the lease is released, so
        // the successor resumes where this holder stopped instead of having Discord
        // replay it. The writer is never cut mid-item (an event popped and dropped would
        // be skipped by a session stored after it); it is told to return once empty.
        writer.draining.cancel();
        if tokio::time::timeout(DRAIN_FOR.min(ttl), &mut writing)
            .await
            .is_err()
        {
            tracing::warn!(
                shard = at.id,
                "queued work not flushed before the hand-over; the successor's resume replays it"
            );
        }
    }
    ended
}

/// Guilds whose work is appended at once: enough that a failing Redis node holds up only
/// its own guilds, few enough that an outage of every node is not a storm of retries.
const LANES_AT_ONCE: usize = 64;

/// How long a stopping shard waits for its queued work to reach Redis.
const DRAIN_FOR: Duration = Duration::from_secs(5);

/// Appends queued work in order, waiting out Redis trouble; after an overflow, makes
/// Redis match the gateway's view. Losing the lease cancels `lost`.
struct Writer<'a> {
    deployment: &'a dyn Deployment,
    shard: ShardOf,
    fence: &'a Fence,
    guilds: &'a Mutex<Guilds>,
    overflowed: &'a AtomicBool,
    wake: &'a Notify,
    lost: &'a CancellationToken,
    stop: &'a CancellationToken,
    /// Set after a hand-over's close: return once the queue is empty.
    draining: CancellationToken,
    /// How long a removed guild's data is kept.
    grace: Duration,
    /// The room of the last `room.created` naming an owner, and whether Redis already
    /// held that room's creator before it was appended.
    recorded: Mutex<HashMap<Id<ChannelMarker>, bool>>,
    /// Appends made under this fence that no dispatch names: with the fence token, names
    /// each one, so a retry (a lost answer, a failover, a write not yet on
    /// `REDIS_MIN_REPLICAS` replicas) appends nothing twice.
    appends: std::sync::atomic::AtomicU64,
}

impl Writer<'_> {
    /// Takes work off the queue into one lane per guild and appends the lanes side by side:
    /// each guild's events in order, but a guild whose Redis node is failing over holds up
    /// only its own lane, not the shard's other guilds (on other primaries of a Cluster).
    /// The Discord session is stored at the newest sequence all of whose events are in
    /// Redis, so a successor resumes before anything not yet appended (and the appends'
    /// names make what it replays of other guilds a no-op). A shard status goes to every
    /// guild, so it waits for the lanes to empty, as recovering after an overflow does.
    async fn run(&self, mut rx: mpsc::Receiver<Work>) {
        let mut lanes: HashMap<Id<GuildMarker>, VecDeque<Work>> = HashMap::new();
        let mut flying = FuturesUnordered::new();
        let mut busy: HashSet<Id<GuildMarker>> = HashSet::new();
        // Dispatch sequences with events not yet in Redis (how many events each).
        let mut unfinished: BTreeMap<u64, usize> = BTreeMap::new();
        let mut session: Option<StoredSession> = None;
        let mut saved: Option<u64> = None;
        let mut saving = false;
        // A status (or a recovery) waiting for the lanes to empty; nothing is taken off
        // the queue meanwhile.
        let mut held: Option<Work> = None;
        let mut closed = false;
        loop {
            for (guild, lane) in &mut lanes {
                if flying.len() >= LANES_AT_ONCE {
                    break;
                }
                if busy.contains(guild) {
                    continue;
                }
                if let Some(work) = lane.pop_front() {
                    busy.insert(*guild);
                    let guild = *guild;
                    // The dispatch it counts against, to count it done with the answer.
                    let seq = match &work {
                        Work::Event { request, .. } => request.as_ref().map(|r| r.seq),
                        _ => None,
                    };
                    flying.push(
                        Box::pin(async move { (Some(guild), seq, self.work(work).await) })
                            as Pin<Box<dyn Future<Output = _> + Send + '_>>,
                    );
                }
            }
            lanes.retain(|_, lane| !lane.is_empty());
            // The newest session whose events are all in Redis, one write at a time.
            if !saving && let Some(latest) = &session {
                let safe = unfinished.keys().next().map_or(latest.sequence, |oldest| {
                    oldest.saturating_sub(1).min(latest.sequence)
                });
                if saved.is_none_or(|s| safe > s) {
                    let stored = StoredSession {
                        sequence: safe,
                        ..latest.clone()
                    };
                    saving = true;
                    saved = Some(safe);
                    flying.push(Box::pin(
                        async move { (None, None, self.save(&stored).await) },
                    ));
                }
            }
            let quiet = flying.is_empty() && lanes.is_empty();
            if quiet {
                if let Some(work) = held.take()
                    && self.work(work).await.is_err()
                {
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
                if closed || (self.draining.is_cancelled() && rx.is_empty()) {
                    return;
                }
            }
            tokio::select! {
                biased;
                Some((guild, seq, result)) = flying.next(), if !flying.is_empty() => {
                    match guild {
                        Some(guild) => drop(busy.remove(&guild)),
                        None => saving = false,
                    }
                    if result.is_err() {
                        self.lost.cancel();
                        return;
                    }
                    // Its dispatch has one event fewer not yet in Redis.
                    if let Some(seq) = seq
                        && let Some(n) = unfinished.get_mut(&seq)
                    {
                        *n -= 1;
                        if *n == 0 {
                            unfinished.remove(&seq);
                        }
                    }
                }
                work = rx.recv(), if held.is_none() && !closed => {
                    let Some(work) = work else {
                        // The shard loop is gone: finish what was taken.
                        if quiet {
                            return;
                        }
                        closed = true;
                        continue;
                    };
                    metrics::gauge!("coven_gateway_queue_depth").decrement(1.0);
                    match work {
                        Work::Session(latest) => session = Some(latest),
                        Work::Status(_) => held = Some(work),
                        Work::Event { ref bus, ref request, .. } => {
                            if let Some(request) = request {
                                *unfinished.entry(request.seq).or_default() += 1;
                            }
                            lanes.entry(bus.guild_id()).or_default().push_back(work);
                        }
                        Work::Sync(guild)
                        | Work::Register(guild, _)
                        | Work::Removed { guild, .. } => {
                            lanes.entry(guild).or_default().push_back(work);
                        }
                    }
                }
                () = self.wake.notified() => {}
                () = self.draining.cancelled(), if !self.draining.is_cancelled() => {}
            }
        }
    }

    /// One item of a lane (or a held status).
    async fn work(&self, work: Work) -> Result<(), BusError> {
        match work {
            Work::Event {
                bus,
                data,
                request,
                dispatch,
                received,
            } => {
                let span = if dispatch.is_none() {
                    dispatch
                } else {
                    tracing::info_span!(parent: &dispatch, "bus.append", kind = %data.kind(), guild = %bus.guild_id())
                };
                let guild = bus.guild_id();
                self.append(&*bus, data, request).instrument(span).await?;
                metrics::histogram!("coven_gateway_dispatch_to_log_seconds", "guild_bucket" => crate::prometheus::guild_bucket(guild))
                    .record(received.elapsed().as_secs_f64());
                Ok(())
            }
            Work::Status(data) => self.status(data).await,
            Work::Sync(guild) => self.sync(guild).await,
            Work::Register(guild, entry) => self.register(guild, &entry).await,
            Work::Removed { guild, bus, mark } => self.removed(guild, &*bus, mark).await,
            Work::Session(session) => self.save(&session).await,
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
                    // Short: a Cluster failover is over within seconds, and a retry made
                    // up to 2 s after it (the old cap) was most of a guild's pause.
                    backoff = (backoff * 2).min(crate::bus::RETRY_AT_MOST);
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
                let mut recorded = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
                // Rooms whose invite.renewed never came are not kept for ever.
                if recorded.len() >= 1024 {
                    recorded.clear();
                }
                recorded.insert(*channel_id, known);
            }
            // The deriver retires a rebuilt room's invite links (only the gateway's
            // rebuilds make `invite.renewed` here) when its view had no owner for it; but
            // the web may have recorded the room, and handed out links, while the gateway
            // was connecting. What Redis held just before the rebuilt `room.created`
            // decides: a creator there means nothing was lost.
            EventData::InviteRenewed { channel_id, .. }
                if self
                    .recorded
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(channel_id)
                    == Some(&true) =>
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
            Err(BusError::Fenced(self.shard.lease()))
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
            return Err(BusError::Fenced(self.shard.lease()));
        }
        self.retry("expiring a removed guild's data", || {
            bus.expire(Some(self.grace))
        })
        .await
    }

    async fn save(&self, session: &StoredSession) -> Result<(), BusError> {
        let json = serde_json::to_string(session)?;
        let key = self.shard.session_key();
        self.retry("storing the session", || {
            self.deployment.put(Some(self.fence), &key, &json, None)
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
/// into every served guild's log) and keeps `P:shard:{i}:status` fresh.
struct Status<'a> {
    health: &'a ShardReport,
    shard: ShardOf,
    /// Set by the shard loop, read by the renewer beside it.
    current: Mutex<Option<(GatewayState, Option<String>)>>,
}

impl<'a> Status<'a> {
    fn new(health: &'a ShardReport, shard: ShardOf) -> Self {
        Self {
            health,
            shard,
            current: Mutex::new(None),
        }
    }

    /// `resuming`: reconnecting with a session to resume (health shows it RESUMING).
    fn set(&self, queue: &Queue, state: GatewayState, resuming: bool, reason: Option<String>) {
        self.health.set_state(state, resuming);
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.as_ref().is_some_and(|(s, _)| *s == state) {
            return;
        }
        tracing::info!(
            shard = self.shard.id,
            state = state.as_str(),
            reason = reason.as_deref().unwrap_or(""),
            "gateway status"
        );
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
            .put(Some(fence), &self.shard.status_key(), &value, Some(ttl * 3))
            .await
    }
}

/// Closes with 4000 (the session stays resumable for the next holder) and lets the
/// close frame go out: dropping the shard at once would look like a dropped connection.
async fn close_resumable<Q: twilight_gateway::queue::Queue + Unpin>(shard: &mut Shard<Q>) {
    shard.close(CloseFrame::RESUME);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(item) = shard.next_event(EventTypeFlags::empty()).await {
            if matches!(item, Ok(Event::GatewayClose(_))) {
                break;
            }
        }
    })
    .await;
}

/// What a fatal close code most likely means, for the one line an operator reads.
pub fn fatal_cause(code: u16) -> &'static str {
    match code {
        4004 => "Discord refused DISCORD_BOT_TOKEN (authentication failed)",
        4010 => {
            "invalid shard: Discord refused SHARD_COUNT's split (see docs/operations.md, resharding)"
        }
        4011 => {
            "sharding required: a shard would hold too many guilds; raise SHARD_COUNT (see docs/operations.md, resharding)"
        }
        4012 => "invalid Gateway API version (check DISCORD_GATEWAY_URL)",
        4013 => "invalid intents",
        4014 => "disallowed intents: enable them for the bot in the Discord Developer Portal",
        _ => "the Gateway closed the session for good",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shard_keys_are_the_spec_s() {
        let shard = ShardOf { id: 3, count: 4 };
        assert_eq!(shard.lease(), "shard:{3}:lease");
        assert_eq!(shard.session_key(), "shard:{3}:session");
        assert_eq!(shard.status_key(), "shard:{3}:status");
    }

    #[test]
    fn a_guild_is_on_the_shard_discord_s_formula_gives() {
        // (guild_id >> 22) % num_shards
        let guild = Id::new((7 << 22) | 5);
        assert!(ShardOf { id: 3, count: 4 }.has(guild));
        assert!(!ShardOf { id: 2, count: 4 }.has(guild));
        assert!(ShardOf { id: 0, count: 1 }.has(guild));
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
