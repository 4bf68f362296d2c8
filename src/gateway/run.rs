//! The gateway's life: wait as a standby until the leader lease is ours, then hold the
//! Discord session — resuming the stored one when there is one — and append what it
//! means to the bus, fenced by the lease, storing the session after each dispatch.
//!
//! The session is stored only after the dispatch's events are appended, so a successor
//! that resumes from it may replay a dispatch we already handled, never skip one; replays
//! are harmless because the deriver compares with the snapshot and finds nothing new.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use twilight_gateway::{
    CloseFrame, ConfigBuilder, Event, EventTypeFlags, Intents, Session, Shard, ShardId,
    StreamExt as _,
};

use super::Settings;
use super::derive::Deriver;
use super::health::{Health, Role};
use crate::bus::{Backend, BusError, Fence, Request};
use crate::event::{EventData, GatewayState};
use twilight_model::id::Id;
use twilight_model::id::marker::ChannelMarker;

/// The lease the active gateway holds.
pub const LEASE: &str = "gateway:leader";
/// Where the active gateway keeps its Discord session for a successor.
pub const SESSION_KEY: &str = "gateway:session";
/// The last published gateway status, expiring when no gateway refreshes it.
pub const STATUS_KEY: &str = crate::bus::GATEWAY_STATUS;

/// What `P:{G}:gateway:session` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSession {
    pub session_id: String,
    pub sequence: u64,
    pub resume_url: Option<String>,
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
    backend: Arc<dyn Backend>,
    health: Health,
    shutdown: CancellationToken,
) -> anyhow::Result<Outcome> {
    let holder = format!("{}-{}", hostname(), std::process::id());
    let ttl = settings.lease_ttl;
    tokio::spawn(trim_by_age(
        backend.clone(),
        settings.event_log_max_age,
        shutdown.child_token(),
    ));
    loop {
        health.set_role(Role::Standby);
        let fence = tokio::select! {
            () = shutdown.cancelled() => return Ok(Outcome::Stopped),
            fence = wait_for_lease(&*backend, &holder, ttl, &health) => fence,
        };
        tracing::info!(epoch = fence.epoch, "took the gateway lease; now active");
        metrics::counter!("coven_gateway_lease_changes_total").increment(1);
        health.set_role(Role::Active);
        let ended = active(&settings, &*backend, &fence, &health, &shutdown).await;
        match ended {
            Ok(Ended::Shutdown) => {
                let _ = backend.release(&fence).await;
                tracing::info!("stopped; session stored and lease released");
                return Ok(Outcome::Stopped);
            }
            Ok(Ended::LostLease) => {
                tracing::warn!("lost the gateway lease; back to standby");
            }
            Ok(Ended::Fatal(code)) => {
                let cause = fatal_cause(code);
                let status = EventData::GatewayStatus {
                    state: GatewayState::Failed,
                    reason: Some(format!("close code {code}: {cause}")),
                };
                health.set_state(GatewayState::Failed);
                let _ = backend.append(status, Some(&fence)).await;
                let _ = backend.release(&fence).await;
                return Ok(Outcome::Fatal { code, cause });
            }
            Err(e) => {
                tracing::warn!(error = %e, "the active gateway stopped; standing by to retry");
                let _ = backend.release(&fence).await;
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(Outcome::Stopped),
                    () = tokio::time::sleep(ttl / 3) => {}
                }
            }
        }
    }
}

async fn wait_for_lease(
    backend: &dyn Backend,
    holder: &str,
    ttl: Duration,
    health: &Health,
) -> Fence {
    // A standby sleeps until the lease it saw would run out, so it takes over at most a
    // few milliseconds after the active gateway's last renewal expires (within the TTL of
    // its death), not on a fixed poll that could add a third of the TTL.
    const MARGIN: Duration = Duration::from_millis(5);
    loop {
        let wait = match backend.acquire(LEASE, holder, ttl).await {
            Ok(Some(fence)) => return fence,
            Ok(None) => {
                health.set_backend_ok(true);
                match backend.lease_left(LEASE).await {
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

/// Work for the writer, in the order the shard loop produced it.
enum Work {
    Event(EventData),
    Session(StoredSession),
}

/// The shard loop's side of the outage queue. Pushing never waits, so the shard keeps
/// being polled (and keeps heartbeating) however long Redis is away.
struct Queue {
    tx: mpsc::Sender<Work>,
    overflowed: Arc<AtomicBool>,
    wake: Arc<Notify>,
}

impl Queue {
    fn push(&self, work: Work) {
        if self.overflowed.load(Ordering::Acquire) {
            return; // the writer will reconcile from the view instead
        }
        match self.tx.try_send(work) {
            Ok(()) => metrics::gauge!("coven_gateway_queue_depth").increment(1.0),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.overflowed.store(true, Ordering::Release);
                metrics::counter!("coven_gateway_queue_overflows_total").increment(1);
                tracing::error!(
                    "the outage queue is full: dropping events; Redis will be reconciled from the gateway's own state when it is back"
                );
                self.wake.notify_one();
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

async fn active(
    settings: &Settings,
    backend: &dyn Backend,
    fence: &Fence,
    health: &Health,
    shutdown: &CancellationToken,
) -> anyhow::Result<Ended> {
    let ttl = settings.lease_ttl;
    let snapshot = backend.snapshot().await?;
    let stored: Option<StoredSession> = match backend.get(SESSION_KEY).await? {
        Some(json) => serde_json::from_str(&json)
            .inspect_err(|e| tracing::warn!(error = %e, "ignoring an unreadable stored session"))
            .ok(),
        None => None,
    };
    let deriver = Mutex::new(Deriver::new(
        settings.guild_id,
        settings.room_category,
        snapshot,
    ));
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
    let mut shard = Shard::with_config(ShardId::ONE, config.build());

    let (tx, rx) = mpsc::channel(settings.queue_size.max(1));
    let queue = Queue {
        tx,
        overflowed: Arc::new(AtomicBool::new(false)),
        wake: Arc::new(Notify::new()),
    };
    let lost = CancellationToken::new();
    let writer = Writer {
        backend,
        fence,
        deriver: &deriver,
        overflowed: &queue.overflowed,
        wake: &queue.wake,
        lost: &lost,
        stop: shutdown,
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
            match backend.renew(fence, ttl).await {
                Ok(true) => {
                    if let Err(e) = status.refresh(backend, fence, ttl).await {
                        tracing::warn!(error = %e, "cannot refresh the gateway status");
                    }
                }
                // The shard loop closes the shard (resumable) and hands over.
                Ok(false) => {
                    lost.cancel();
                    return std::future::pending::<()>().await;
                }
                // Redis is away: keep the Discord session; fencing stops our writes if
                // someone else holds the lease when it is back.
                Err(e) => tracing::warn!(error = %e, "cannot renew the gateway lease"),
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
                    {
                        // Derive and enqueue under the view's lock, so an overflow
                        // recovery sees either all of a dispatch or none of it.
                        let mut d = deriver.lock().unwrap_or_else(|e| e.into_inner());
                        for data in d.on_dispatch(&event) {
                            queue.push(Work::Event(data));
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
    backend: &'a dyn Backend,
    fence: &'a Fence,
    deriver: &'a Mutex<Deriver>,
    overflowed: &'a AtomicBool,
    wake: &'a Notify,
    lost: &'a CancellationToken,
    stop: &'a CancellationToken,
    /// The room of the last `room.created` naming an owner, and whether Redis already
    /// held that room's creator before it was appended.
    recorded: Mutex<Option<(Id<ChannelMarker>, bool)>>,
    /// Appends made under this fence: with the fence token, names each one, so a retry
    /// (a lost answer, a failover, a write not yet on `REDIS_MIN_REPLICAS` replicas)
    /// appends nothing twice.
    appends: std::sync::atomic::AtomicU64,
}

impl Writer<'_> {
    async fn run(&self, mut rx: mpsc::Receiver<Work>) {
        loop {
            let work = tokio::select! {
                work = rx.recv() => work,
                () = self.wake.notified() => None,
            };
            let result = match work {
                Some(Work::Event(data)) => {
                    metrics::gauge!("coven_gateway_queue_depth").decrement(1.0);
                    self.append(data).await
                }
                Some(Work::Session(session)) => {
                    metrics::gauge!("coven_gateway_queue_depth").decrement(1.0);
                    self.save(&session).await
                }
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

    async fn append(&self, data: EventData) -> Result<(), BusError> {
        match &data {
            EventData::RoomCreated {
                channel_id,
                created_by: Some(_),
                ..
            } => {
                let stored = self
                    .retry("reading the snapshot", || self.backend.snapshot())
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
        let request = Request {
            writer: self.fence.token.clone(),
            seq: self.appends.fetch_add(1, Ordering::Relaxed),
        };
        // Until this returns, the event stays at the head of the outage queue and no
        // Discord sequence after it is stored: a successor resumes before it.
        let event = self
            .retry("append", || {
                self.backend
                    .append_once(data.clone(), Some(self.fence), &request)
            })
            .await?;
        metrics::histogram!("coven_gateway_append_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("coven_gateway_events_total", "type" => kind.as_str()).increment(1);
        tracing::debug!(id = %event.id, %kind, "appended");
        Ok(())
    }

    async fn save(&self, session: &StoredSession) -> Result<(), BusError> {
        let json = serde_json::to_string(session)?;
        self.retry("storing the session", || {
            self.backend.put(Some(self.fence), SESSION_KEY, &json, None)
        })
        .await
    }

    /// Brings Redis in line with the gateway's view after events were dropped.
    async fn recover(&self) -> Result<(), BusError> {
        let stored = self
            .retry("reading the snapshot", || self.backend.snapshot())
            .await?;
        let diff = {
            let d = self.deriver.lock().unwrap_or_else(|e| e.into_inner());
            self.overflowed.store(false, Ordering::Release);
            d.diff_from(&stored)
        };
        tracing::warn!(
            events = diff.len(),
            "reconciling Redis after the outage queue overflowed"
        );
        metrics::counter!("coven_gateway_overflow_reconciles_total").increment(1);
        for data in diff {
            self.append(data).await?;
        }
        Ok(())
    }
}

/// Publishes `gateway.status` on changes (through the queue, in order with the events)
/// and keeps `P:{G}:gateway:status` fresh.
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
        queue.push(Work::Event(EventData::GatewayStatus { state, reason }));
    }

    async fn refresh(
        &self,
        backend: &dyn Backend,
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
        backend
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

/// Trims the log of events older than `max_age`, every 24th of it (at most hourly, at
/// least every 10 s), until `stop`. Any gateway process may: trimming twice is trimming
/// once.
async fn trim_by_age(backend: Arc<dyn Backend>, max_age: Duration, stop: CancellationToken) {
    let every = (max_age / 24).clamp(Duration::from_secs(10), Duration::from_secs(3600));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let before = crate::event::now_ms().saturating_sub(max_age.as_millis() as u64);
        match backend.trim_before(before).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::debug!(trimmed = n, "trimmed the log by age");
                metrics::counter!("coven_gateway_log_trimmed_total").increment(n);
            }
            Err(e) => tracing::warn!(error = %e, "cannot trim the log by age; trying again later"),
        }
    }
}
