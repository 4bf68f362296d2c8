//! A gateway process's life: decide the shard count once for the deployment, say every
//! round that this process is alive (`P:gateways`), and take or hand over shards by the
//! fair-share rule ([`super::spread`]), each held shard a task of its own
//! ([`super::shard::hold`]). A process holding none is spare capacity (`standby`).
//!
//! Owns `P:shards:count` and `P:gateways`, and the decision to start or stop a shard's
//! task. Must not touch a shard's session or a guild's log (that is the shard's task).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use twilight_model::id::Id;
use twilight_model::id::marker::GuildMarker;

use super::Settings;
use super::health::Health;
use super::identify::IdentifyQueue;
use super::shard::{Ended, Holding, OLD_LEASE, ShardOf, hold};
use super::spread;
use crate::bus::{Deployment, SHARD_COUNT};

/// How the gateway stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Asked to stop; every shard's session was stored and its lease released.
    Stopped,
    /// Discord refused us for good (a fatal close code); retrying would not help.
    Fatal { code: u16, cause: &'static str },
    /// Starting a session would have spent the session starts kept in reserve.
    Refused(String),
}

/// A shard this process holds: its task and the token that stops it.
struct Running {
    task: JoinHandle<Ended>,
    stop: CancellationToken,
}

/// Runs until shutdown, a fatal Discord error or the identify reserve.
pub async fn run(
    settings: Settings,
    deployment: Arc<dyn Deployment>,
    health: Health,
    shutdown: CancellationToken,
) -> anyhow::Result<Outcome> {
    let discord = crate::discord::bot_client(&settings.bot_token_value(), &settings.api_url)?;
    let queue = IdentifyQueue::new(deployment.clone(), discord, settings.identify_reserve);
    refuse_beside_an_old_gateway(&settings, &*deployment).await?;
    let count = match shard_count(&settings, &*deployment, &queue).await? {
        Ok(count) => count,
        Err(line) => {
            health.set_failed();
            tracing::error!("{line}");
            return Ok(Outcome::Refused(line));
        }
    };
    health.set_count(count);
    let process = process_name();
    tracing::info!(%process, shards = count, "gateway process started");
    tokio::spawn(trim_by_age(
        deployment.clone(),
        settings.clone(),
        count,
        health.clone(),
        shutdown.child_token(),
    ));
    let ttl = settings.lease_ttl;
    let ctx = Arc::new(Holding {
        settings,
        deployment: deployment.clone(),
        queue: queue.clone(),
        failed: std::sync::Mutex::new(None),
    });
    // A round a quarter of the TTL (between 0.25 s and 1 s): a dead process's shards are
    // taken at most that long after its leases run out, a released one about as soon.
    let every = (ttl / 4).clamp(Duration::from_millis(250), Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let refused = queue.refused();
    let mut running: BTreeMap<u32, Running> = BTreeMap::new();
    let outcome = loop {
        tokio::select! {
            () = shutdown.cancelled() => break Outcome::Stopped,
            () = refused.cancelled() => {
                let line = queue.refusal().map(|r| r.0).unwrap_or_default();
                break Outcome::Refused(line);
            }
            _ = tick.tick() => {}
        }
        if let Some(outcome) = reap(&mut running, &health).await {
            break outcome;
        }
        let live = match deployment.beat(&process, ttl).await {
            Ok(live) => {
                health.set_backend_ok(true);
                live
            }
            Err(e) => {
                health.set_backend_ok(false);
                tracing::warn!(error = %e, "cannot reach Redis to share the shards; the held ones go on");
                continue;
            }
        };
        let Ok(holders) = holders(&*deployment, count).await else {
            continue;
        };
        let mine: BTreeSet<u32> = running.keys().copied().collect();
        let plan = spread::plan(&process, count, &live, &holders, &mine);
        if let Some(id) = plan.give
            && let Some(r) = running.get(&id)
            && !r.stop.is_cancelled()
        {
            tracing::info!(
                shard = id,
                held = mine.len(),
                live = live.len(),
                "handing over a shard to even the load: closing with 4000, releasing its lease"
            );
            metrics::counter!("coven_gateway_handovers_total").increment(1);
            r.stop.cancel();
        }
        let mut room = plan.room;
        for id in plan.take {
            if room == 0 {
                break;
            }
            let shard = ShardOf { id, count };
            match deployment.acquire(&shard.lease(), &process, ttl).await {
                Ok(Some(fence)) => {
                    room -= 1;
                    tracing::info!(
                        shard = id,
                        epoch = fence.epoch,
                        held = running.len() + 1,
                        live = live.len(),
                        "took a shard's lease"
                    );
                    metrics::counter!("coven_gateway_lease_changes_total").increment(1);
                    metrics::counter!("coven_gateway_takeovers_total").increment(1);
                    let report = health.hold(id);
                    let stop = shutdown.child_token();
                    let task = tokio::spawn(hold(ctx.clone(), shard, fence, report, stop.clone()));
                    running.insert(id, Running { task, stop });
                }
                Ok(None) => {} // someone was quicker
                Err(e) => {
                    tracing::warn!(shard = id, error = %e, "cannot take a shard's lease");
                    break;
                }
            }
        }
    };
    // Every shard closes with 4000 and releases its lease, all at once: the others take
    // them within a round. Stopping for good, each first tells its guilds why.
    let failure = match &outcome {
        Outcome::Stopped => None,
        Outcome::Fatal { code, cause } => Some(format!("close code {code}: {cause}")),
        Outcome::Refused(line) => Some(line.clone()),
    };
    if let Some(failure) = failure {
        queue.refuse(failure.clone());
        *ctx.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(failure);
    }
    for r in running.values() {
        r.stop.cancel();
    }
    for (id, r) in std::mem::take(&mut running) {
        let _ = r.task.await;
        health.drop_shard(id);
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), deployment.leave(&process)).await;
    match &outcome {
        Outcome::Stopped => tracing::info!("stopped; sessions stored and leases released"),
        Outcome::Fatal { code, cause } => tracing::error!(code, "{cause}"),
        Outcome::Refused(line) => {
            health.set_failed();
            tracing::error!("{line}");
        }
    }
    if matches!(outcome, Outcome::Fatal { .. }) {
        health.set_failed();
    }
    Ok(outcome)
}

/// Forgets the shards whose tasks ended; a fatal end stops the process.
async fn reap(running: &mut BTreeMap<u32, Running>, health: &Health) -> Option<Outcome> {
    let done: Vec<u32> = running
        .iter()
        .filter(|(_, r)| r.task.is_finished())
        .map(|(id, _)| *id)
        .collect();
    let mut outcome = None;
    for id in done {
        let Some(r) = running.remove(&id) else {
            continue;
        };
        health.drop_shard(id);
        match r.task.await {
            Ok(Ended::Stopped) => tracing::info!(shard = id, "handed the shard over"),
            Ok(Ended::LostLease) => {
                tracing::warn!(
                    shard = id,
                    "lost the shard's lease (another process holds it now)"
                )
            }
            Ok(Ended::Fatal(code)) => {
                outcome = Some(Outcome::Fatal {
                    code,
                    cause: super::shard::fatal_cause(code),
                });
            }
            Ok(Ended::Failed(e)) => {
                tracing::warn!(shard = id, error = %e, "the shard stopped; its lease is free for any process")
            }
            Err(e) => tracing::error!(shard = id, error = %e, "the shard's task failed"),
        }
    }
    outcome
}

/// Who holds each shard's lease now (`None`: nobody).
async fn holders(
    deployment: &dyn Deployment,
    count: u32,
) -> Result<Vec<Option<String>>, crate::bus::BusError> {
    let reads = (0..count).map(|id| {
        let lease = ShardOf { id, count }.lease();
        async move { deployment.get(&lease).await }
    });
    let tokens = futures_util::future::try_join_all(reads).await?;
    Ok(tokens
        .into_iter()
        .map(|t| t.map(|t| spread::holder_of(&t).to_owned()))
        .collect())
}

/// The deployment's shard count: the stored one; else `SHARD_COUNT`; else Discord's
/// recommendation. Stored by the first process; a different `SHARD_COUNT` later is
/// refused (resharding is an operator's act: docs/operations.md).
async fn shard_count(
    settings: &Settings,
    deployment: &dyn Deployment,
    queue: &IdentifyQueue,
) -> anyhow::Result<Result<u32, String>> {
    let key = format!("{}:{SHARD_COUNT}", settings.key_prefix);
    let stored = match deployment.get(SHARD_COUNT).await? {
        Some(stored) => stored,
        None => {
            let wanted = match settings.shard_count {
                Some(n) => n,
                None => {
                    let info = match queue.limits().await {
                        Ok(info) => info,
                        Err(e) => {
                            if let Some(line) = super::identify::token_refused(&e) {
                                return Ok(Err(line));
                            }
                            anyhow::bail!(
                                "SHARD_COUNT is not set and Discord's recommendation (GET \
                                 /gateway/bot) is not available: {e}"
                            );
                        }
                    };
                    tracing::info!(
                        shards = info.shards,
                        "using Discord's recommended shard count"
                    );
                    info.shards
                }
            };
            deployment
                .put_first(SHARD_COUNT, &wanted.to_string())
                .await?
        }
    };
    let count: Option<u32> = stored
        .trim()
        .parse()
        .ok()
        .filter(|n| (1..=super::MAX_SHARDS).contains(n));
    let Some(count) = count else {
        return Ok(Err(format!(
            "{key} holds {stored:?}, which is no shard count from 1 to {}: delete it (see \
             docs/operations.md, resharding)",
            super::MAX_SHARDS
        )));
    };
    if let Some(wanted) = settings.shard_count
        && wanted != count
    {
        // A setting at odds with the deployment: refused like a bad setting (exit 2).
        return Ok(Err(format!(
            "SHARD_COUNT is {wanted}, but this deployment runs {count} shards ({key}): unset \
             SHARD_COUNT to join them, or reshard as docs/operations.md says"
        )));
    }
    Ok(Ok(count))
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
    let mut guilds: BTreeSet<Id<GuildMarker>> = deployment
        .registry()
        .await?
        .into_keys()
        .filter(|g| settings.serves(*g))
        .collect();
    guilds.extend(settings.guild_ids.iter().copied());
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

/// Unique per process run, even for a restarted container that keeps its host name and
/// pid 1: a successor must not pass for its predecessor in the leases.
fn process_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".to_owned());
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// Trims the logs of the held shards' guilds of events older than `max_age`, every 24th
/// of it (at most hourly, at least every 10 s), until `stop`. Trimming twice is trimming
/// once, so a shard changing hands meanwhile costs nothing.
async fn trim_by_age(
    deployment: Arc<dyn Deployment>,
    settings: Settings,
    count: u32,
    health: Health,
    stop: CancellationToken,
) {
    let max_age = settings.event_log_max_age;
    let every = (max_age / 24).clamp(Duration::from_secs(10), Duration::from_secs(3600));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let before = crate::event::now_ms().saturating_sub(max_age.as_millis() as u64);
        // The registry once a round, whatever the number of shards held.
        let held: BTreeSet<u32> = health.held().into_iter().collect();
        let registry = match deployment.registry().await {
            Ok(registry) => registry,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the registry to trim logs; trying again later");
                continue;
            }
        };
        let guilds: BTreeSet<Id<GuildMarker>> = registry
            .into_keys()
            .chain(settings.guild_ids.iter().copied())
            .filter(|g| settings.serves(*g) && held.contains(&crate::bus::shard_of(*g, count)))
            .collect();
        for guild in &guilds {
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
