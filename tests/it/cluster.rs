//! Redis Cluster: the bus, `coven publish`, the gateway and web replicas on a
//! `redis-cluster://` URL (sharded Pub/Sub only, each guild's keys in its slot), and
//! topology changes while events flow — a slot migrated to another primary, a primary
//! killed, a replica frozen — that lose and repeat nothing on any stream.
//!
//! Tests that only touch their own keys share one cluster ([`Cluster::shared`], each with
//! a key prefix of its own); tests that kill, freeze or migrate start their own. Nothing
//! here sleeps to synchronise: every wait is on a condition with a deadline.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coven::bus::redis::{Durability, Redis, RedisBus};
use coven::bus::{Bus, BusError, Request, Since, Store};
use coven::event::{Event, EventData, EventId, Viewer};
use serde_json::Value;
use tokio::sync::broadcast;
use twilight_model::id::Id;

use crate::harness::cluster::{Cluster, slot};
use crate::harness::{
    Browser, CovenProcess, GUILD, Sse, TestSim, Web, spawn_gateway_on, spawn_web, wait_for, within,
};

fn ping(seq: u64) -> EventData {
    EventData::Ping { seq, ts: seq }
}

async fn bus_on(url: &str, prefix: &str, guild: u64) -> RedisBus {
    RedisBus::connect(url, prefix, Id::new(guild), 10_000)
        .await
        .expect("connects to the cluster")
}

/// A `coven` process's connections (one subscriber, however many guilds and streams).
async fn process(url: &str, prefix: &str) -> Arc<Redis> {
    Redis::connect(
        url,
        prefix,
        10_000,
        coven::bus::redis::COMMAND_TIMEOUT,
        Durability::OFF,
    )
    .await
    .expect("connects to the cluster")
}

/// The shared cluster (started by the first test that asks; blocks meanwhile).
fn shared() -> &'static Cluster {
    tokio::task::block_in_place(Cluster::shared)
}

/// A cluster of the test's own.
fn private() -> Cluster {
    tokio::task::block_in_place(Cluster::start)
}

/// A live receiver drained into a list of ids, as a stream would: also counts lags (a
/// stream that lagged would have been told to resync).
#[derive(Default)]
struct Seen {
    ids: Vec<EventId>,
    lagged: u64,
}

type Shared = Arc<Mutex<Seen>>;

fn follow(mut live: broadcast::Receiver<Arc<Event>>) -> Shared {
    let seen = Shared::default();
    let out = seen.clone();
    tokio::spawn(async move {
        loop {
            match live.recv().await {
                Ok(event) => seen.lock().unwrap().ids.push(event.id),
                Err(broadcast::error::RecvError::Lagged(_)) => seen.lock().unwrap().lagged += 1,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    out
}

/// Appends pings one after another as the gateway does: each retried under its own
/// request name until Redis acknowledges it (so a retry whose first try ran is answered
/// with the same event), until `stop`; what was acknowledged, in order, and the task (done
/// once nothing more can be appended).
fn writer(
    bus: RedisBus,
    name: &str,
    stop: Arc<AtomicBool>,
    pace: Duration,
) -> (Arc<Mutex<Vec<EventId>>>, tokio::task::JoinHandle<()>) {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let out = acked.clone();
    let name = name.to_owned();
    let task = tokio::spawn(async move {
        let mut seq = 0;
        while !stop.load(Ordering::Relaxed) {
            seq += 1;
            let request = Request {
                writer: name.clone(),
                seq,
                part: 0,
            };
            loop {
                match bus.append_once(ping(seq), None, &request).await {
                    Ok(event) => {
                        acked.lock().unwrap().push(event.id);
                        break;
                    }
                    Err(_) if stop.load(Ordering::Relaxed) => return,
                    Err(e) => {
                        // Shown when the test fails: what the retries were about.
                        eprintln!("append {seq} failed, retrying: {e}");
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                }
            }
            tokio::time::sleep(pace).await;
        }
    });
    (out, task)
}

/// The guild's log after `from`, read through the bus (ids only).
async fn log_after(bus: &RedisBus, from: EventId) -> Vec<EventId> {
    let mut out = Vec::new();
    let mut after = from;
    loop {
        let page = within("the log", async {
            loop {
                match bus.since(after, 1_000).await {
                    Ok(Since::Events(events)) => return events,
                    Ok(Since::Gap) => panic!("the log does not continue from {after}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
        .await;
        let done = page.len() < 1_000;
        out.extend(page.iter().map(|e| e.id));
        if let Some(last) = page.last() {
            after = last.id;
        }
        if done {
            return out;
        }
    }
}

/// Every stream saw exactly the log after `from`: each event once, in order, nothing
/// the log lacks; and the log holds every acknowledged append, in order.
async fn assert_exactly_the_log(
    bus: &RedisBus,
    from: EventId,
    acked: &[EventId],
    streams: &[Shared],
) {
    let log = log_after(bus, from).await;
    let logged: std::collections::HashSet<EventId> = log.iter().copied().collect();
    assert!(
        acked.iter().all(|id| logged.contains(id)),
        "every acknowledged append is in the log"
    );
    assert!(
        acked.windows(2).all(|w| w[0] < w[1]),
        "acknowledged in order"
    );
    let last = *log.last().expect("events were appended");
    wait_for("every stream to reach the end of the log", || async {
        streams
            .iter()
            .all(|s| s.lock().unwrap().ids.last() >= Some(&last))
            .then_some(())
    })
    .await;
    for (i, stream) in streams.iter().enumerate() {
        let seen = stream.lock().unwrap();
        assert_eq!(seen.lagged, 0, "stream {i} lagged");
        let got: Vec<EventId> = seen.ids.iter().copied().filter(|id| *id > from).collect();
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "stream {i}: in order, none twice"
        );
        assert_eq!(got, log, "stream {i}: every logged event once, in order");
    }
}

/// The last id of the guild's log (or zero): streams followed from here.
async fn baseline(bus: &RedisBus) -> EventId {
    log_after(bus, EventId::ZERO)
        .await
        .last()
        .copied()
        .unwrap_or(EventId::ZERO)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_appends_replays_and_streams_on_a_cluster() {
    let cluster = shared();
    let url = cluster.url();
    let bus = bus_on(&url, "clbus", 4242).await;
    let reader = bus_on(&url, "clbus", 4242).await;
    let stream = follow(reader.subscribe().await.unwrap());
    let from = baseline(&bus).await;
    let mut ids = Vec::new();
    for seq in 1..=20 {
        ids.push(bus.append(ping(seq), None).await.unwrap().id);
    }
    assert_exactly_the_log(&bus, from, &ids, &[stream]).await;
    let Since::Events(replayed) = reader.since(ids[9], 100).await.unwrap() else {
        panic!("a gap")
    };
    assert_eq!(
        replayed.iter().map(|e| e.id).collect::<Vec<_>>(),
        ids[10..],
        "replay by id"
    );
    assert_eq!(reader.snapshot().await.unwrap().at, ids[19]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_a_guild_touches_is_in_its_slot_on_the_one_node_that_owns_it() {
    let cluster = shared();
    let url = cluster.url();
    const G: u64 = 5150;
    let bus = bus_on(&url, "clkeys", G).await;
    let _live = bus.subscribe().await.unwrap();
    // Every kind of write a guild's bus makes; on a cluster a key outside the slot is a
    // CROSSSLOT (or fred's refusal) and fails here.
    let room = EventData::RoomCreated {
        channel_id: Id::new(10),
        name: "Room".into(),
        user_limit: 4,
        created_by: Some(Id::new(1)),
        role_id: Some(Id::new(2)),
    };
    bus.append(room, None).await.unwrap();
    let request = Request::dispatch("session", 1, 0);
    bus.append_once(ping(1), None, &request).await.unwrap();
    bus.append_once(ping(1), None, &request).await.unwrap();
    let viewer = Viewer {
        id: Id::new(1),
        username: "u1".into(),
        avatar_url: None,
    };
    bus.viewers(
        Id::new(10),
        std::slice::from_ref(&viewer),
        &[],
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    bus.viewers(Id::new(10), &[], &[viewer], Duration::from_secs(60))
        .await
        .unwrap();
    bus.snapshot().await.unwrap();
    bus.since(EventId::ZERO, 10).await.unwrap();
    bus.holds(EventId::ZERO).await.unwrap();
    bus.has_room(Id::new(10)).await.unwrap();
    bus.member(Id::new(1)).await.unwrap();
    bus.trim_before(1).await.unwrap();
    assert!(
        bus.claim("members:recheck:1", Duration::from_secs(60))
            .await
            .unwrap()
    );
    let fence = bus
        .acquire("rooms:sweeper", "me", Duration::from_secs(60))
        .await
        .unwrap()
        .expect("the lease");
    assert!(bus.renew(&fence, Duration::from_secs(60)).await.unwrap());
    bus.lease_left("rooms:sweeper").await.unwrap();
    bus.append(ping(2), Some(&fence)).await.unwrap();
    bus.put(
        Some(&fence),
        "gateway:status",
        "{}",
        Some(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    bus.get("gateway:status").await.unwrap();
    bus.release(&fence).await.unwrap();
    bus.expire(Some(Duration::from_secs(3600))).await.unwrap();
    bus.expire(None).await.unwrap();

    let want = slot(&G.to_string());
    let (owner, _) = cluster.owner_of_slot(want);
    let mut found = 0;
    for port in cluster.primaries() {
        let keys = cluster
            .cli(port, &["--scan", "--pattern", "clkeys:*"])
            .unwrap_or_default();
        for key in keys.lines().filter(|k| !k.is_empty()) {
            found += 1;
            assert_eq!(slot(key), want, "{key} is in the guild's slot");
            assert_eq!(port, owner, "{key} is on the slot's owner");
        }
    }
    assert!(found >= 10, "the guild's keys were found ({found})");
}

async fn ready_with_gateway(web: &Web) -> Option<()> {
    let r = reqwest::get(web.url("/readyz")).await.ok()?;
    let body: Value = r.json().await.ok()?;
    (body["gateway"]["fresh"] == true && body["gateway"]["state"] == "CONNECTED").then_some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_gateway_and_web_run_on_a_cluster_with_sharded_pubsub_only() {
    let cluster = shared();
    let url = cluster.url();
    const PREFIX: &str = "clstack";
    let extra = [("COVEN_KEY_PREFIX", PREFIX)];
    let sim = TestSim::start().await;
    let (_gateway, _) = spawn_gateway_on(&sim, &url, &extra);
    let webs: Vec<Web> = (0..2)
        .map(|_| spawn_web(&sim, &url, None, &extra))
        .collect();
    for web in &webs {
        wait_for("a replica ready with a connected gateway", || {
            ready_with_gateway(web)
        })
        .await;
    }
    let browser = Browser::new();
    browser.login(&webs[0], &sim, sim.user("ash").await).await;
    let path = format!("/api/stream?guild={GUILD}");
    let mut streams: Vec<Sse> = Vec::new();
    for web in &webs {
        streams.push(browser.stream(&web.url(&path), None).await);
    }

    let guild = GUILD.to_string();
    let env = [
        ("REDIS_URL", url.as_str()),
        ("DISCORD_GUILD_ID", guild.as_str()),
        ("COVEN_KEY_PREFIX", PREFIX),
    ];
    let pings = CovenProcess::run_ok(
        &["publish", "--ping", "--count", "5", "--rate", "1000"],
        &env,
    );
    assert!(pings.stdout().join("\n").contains("published 5 pings"));
    for stream in &mut streams {
        let seen = stream
            .until(|m| m.event == "ping" && m.json()["data"]["seq"] == 5)
            .await;
        let seqs: Vec<u64> = seen
            .iter()
            .filter(|m| m.event == "ping")
            .filter_map(|m| m.json()["data"]["seq"].as_u64())
            .collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5], "every ping once, in order");
    }

    // Each web replica watching the guild is one subscriber on the node that owns its
    // slot, and none anywhere else.
    let channel = format!("{PREFIX}:{{{GUILD}}}:events");
    let (owner, _) = cluster.owner(&channel);
    tokio::task::block_in_place(|| {
        for port in cluster.live_ports() {
            let want = if port == owner { webs.len() as u64 } else { 0 };
            assert_eq!(
                cluster.shard_subscribers(port, &channel),
                Some(want),
                "PUBSUB SHARDNUMSUB on {port} (the owner is {owner})"
            );
            let calls = cluster.command_calls(port);
            assert!(
                !calls.iter().any(|(name, _)| name == "publish"),
                "no PUBLISH on {port}: {calls:?}"
            );
        }
        assert!(
            cluster
                .command_calls(owner)
                .iter()
                .any(|(name, n)| name == "spublish" && *n > 0),
            "the events were SPUBLISHed on their owner"
        );
    });
}

/// Guild ids whose slots `cluster` serves from different primaries: (a, b).
fn guilds_on_two_primaries(cluster: &Cluster, prefix: &str) -> (u64, u64) {
    let owner = |g: u64| cluster.owner(&format!("{prefix}:{{{g}}}:events")).0;
    let a = 1001;
    let b = (1002..2000)
        .find(|g| owner(*g) != owner(a))
        .expect("a guild on another primary");
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_migrated_while_events_flow_loses_and_repeats_nothing_on_any_stream() {
    let cluster = private();
    let url = cluster.url();
    const G: u64 = 777;
    let channel = format!("mig:{{{G}}}:events");
    let writer_bus = bus_on(&url, "mig", G).await;
    let from = baseline(&writer_bus).await;
    // Three processes, one with two streams.
    let mut streams = Vec::new();
    let mut processes = Vec::new();
    for i in 0..3 {
        let p = process(&url, "mig").await;
        let bus = p.guild(Id::new(G));
        streams.push(follow(bus.subscribe().await.unwrap()));
        if i == 0 {
            streams.push(follow(bus.subscribe().await.unwrap()));
        }
        processes.push(p);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (acked, writing) = writer(
        writer_bus.clone(),
        "mig-writer",
        stop.clone(),
        Duration::from_millis(10),
    );
    let delivered = |n: usize| {
        let streams = &streams;
        move || async move {
            streams
                .iter()
                .all(|s| s.lock().unwrap().ids.len() >= n)
                .then_some(())
        }
    };
    wait_for("events on every stream", delivered(10)).await;

    let (old, _) = tokio::task::block_in_place(|| cluster.owner(&channel));
    let to = tokio::task::block_in_place(|| cluster.primaries())
        .into_iter()
        .find(|p| *p != old)
        .expect("another primary");
    tokio::task::block_in_place(|| cluster.migrate(slot(&channel), to));
    assert_eq!(
        tokio::task::block_in_place(|| cluster.owner(&channel)).0,
        to
    );

    // Live delivery resumes from the new owner.
    let moved_at = acked.lock().unwrap().len();
    wait_for("appends acknowledged after the migration", || async {
        (acked.lock().unwrap().len() >= moved_at + 20).then_some(())
    })
    .await;
    let last = *acked.lock().unwrap().last().unwrap();
    wait_for(
        "every stream to get an event appended after the migration",
        || async {
            streams
                .iter()
                .all(|s| s.lock().unwrap().ids.last() >= Some(&last))
                .then_some(())
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    within("the writer to stop", writing).await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert_exactly_the_log(&writer_bus, from, &acked, &streams).await;
    // Each process is now subscribed on the new owner, and on it only.
    tokio::task::block_in_place(|| {
        for port in cluster.live_ports() {
            let want = if port == to {
                processes.len() as u64
            } else {
                0
            };
            assert_eq!(
                cluster.shard_subscribers(port, &channel),
                Some(want),
                "PUBSUB SHARDNUMSUB on {port} after the migration to {to}"
            );
        }
    });
}

/// Without `REDIS_MIN_REPLICAS` a primary acknowledges an append before its replica has
/// it, so a `kill -9` can lose the last acknowledged appends (and what streams heard of
/// them): the contract is then that no stream repeats, reorders or misses anything the
/// new primary's log holds, and that nothing it heard was never appended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_repeats_and_skips_nothing_on_fifty_streams() {
    let (log, acked, streams) = kill_the_primary_under_load("kill", Durability::OFF).await;
    let logged: std::collections::HashSet<EventId> = log.iter().copied().collect();
    // What the killed primary had not handed to its replica, acknowledged or heard on a
    // stream: one run of consecutive appends (the last before the kill), nothing else.
    let heard: Vec<EventId> = streams
        .iter()
        .flat_map(|s| s.lock().unwrap().ids.clone())
        .collect();
    let mut missing: Vec<EventId> = acked
        .iter()
        .chain(&heard)
        .copied()
        .filter(|id| !logged.contains(id))
        .collect();
    missing.sort_unstable();
    missing.dedup();
    let mut merged: Vec<EventId> = log.iter().chain(&missing).copied().collect();
    merged.sort_unstable();
    let at: Vec<usize> = missing
        .iter()
        .map(|id| merged.binary_search(id).unwrap())
        .collect();
    assert!(
        at.windows(2).all(|w| w[1] == w[0] + 1),
        "only one run of appends, the last before the kill, is missing from the log: {missing:?}"
    );
    eprintln!(
        "appends lost with the killed primary: {} ({} of them acknowledged)",
        missing.len(),
        acked.iter().filter(|id| !logged.contains(id)).count()
    );
    let lost = |id: &EventId| missing.binary_search(id).is_ok();
    for (i, stream) in streams.iter().enumerate() {
        let seen = stream.lock().unwrap();
        assert_eq!(seen.lagged, 0, "stream {i} lagged");
        assert!(
            seen.ids.windows(2).all(|w| w[0] < w[1]),
            "stream {i}: in order, none twice"
        );
        assert!(
            seen.ids.iter().all(|id| logged.contains(id) || lost(id)),
            "stream {i}: nothing but the log, and what the killed primary alone held"
        );
        let first = *seen.ids.first().expect("events");
        let got: Vec<EventId> = seen
            .ids
            .iter()
            .copied()
            .filter(|id| logged.contains(id))
            .collect();
        let want: Vec<EventId> = log.iter().copied().filter(|id| *id >= first).collect();
        assert_eq!(
            got, want,
            "stream {i}: every logged event from its first, once, in order"
        );
    }
}

/// With `REDIS_MIN_REPLICAS=1` an append is acknowledged only once a replica holds it, so
/// the failover loses none: every stream gets every acknowledged append, once, in order.
/// (The killed node is started again, as an operator would, and rejoins as the replica
/// without which nothing more could be acknowledged.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_loses_nothing_acknowledged_on_fifty_streams_with_min_replicas() {
    let durability = Durability {
        min_replicas: 1,
        timeout: Duration::from_millis(300),
    };
    let (log, acked, streams) = kill_the_primary_under_load("killdur", durability).await;
    let logged: std::collections::HashSet<EventId> = log.iter().copied().collect();
    assert!(
        acked.iter().all(|id| logged.contains(id)),
        "every acknowledged append is in the log"
    );
    for (i, stream) in streams.iter().enumerate() {
        let seen = stream.lock().unwrap();
        assert_eq!(seen.lagged, 0, "stream {i} lagged");
        let first = *seen.ids.first().expect("events");
        let want: Vec<EventId> = log.iter().copied().filter(|id| *id >= first).collect();
        assert_eq!(
            seen.ids, want,
            "stream {i}: every logged event once, in order"
        );
    }
}

/// A private cluster; 50 live receivers of one guild over two processes while a writer
/// appends pings; `kill -9` of the guild's primary; appends go on after its replica takes
/// over (with `durability`, once the killed node is back as a replica). The log after the
/// start, the acknowledged ids, and the streams once each has the last acknowledged id.
async fn kill_the_primary_under_load(
    prefix: &str,
    durability: Durability,
) -> (Vec<EventId>, Vec<EventId>, Vec<Shared>) {
    const G: u64 = 31337;
    let cluster = private();
    let url = cluster.url();
    let channel = format!("{prefix}:{{{G}}}:events");
    let writer_process = Redis::connect(
        &url,
        prefix,
        10_000,
        coven::bus::redis::COMMAND_TIMEOUT,
        durability,
    )
    .await
    .unwrap();
    let writer_bus = writer_process.guild(Id::new(G));
    let from = baseline(&writer_bus).await;
    // Two processes with 25 streams each.
    let mut streams = Vec::new();
    let mut processes = Vec::new();
    for _ in 0..2 {
        let p = process(&url, prefix).await;
        let bus = p.guild(Id::new(G));
        for _ in 0..25 {
            streams.push(follow(bus.subscribe().await.unwrap()));
        }
        processes.push(p);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (acked, writing) = writer(
        writer_bus.clone(),
        &format!("{prefix}-writer"),
        stop.clone(),
        Duration::from_millis(10),
    );
    wait_for("pings on every stream", || async {
        streams
            .iter()
            .all(|s| s.lock().unwrap().ids.len() >= 10)
            .then_some(())
    })
    .await;

    let (old, replicas) = tokio::task::block_in_place(|| cluster.owner(&channel));
    assert_eq!(replicas.len(), 1, "the primary has its replica");
    cluster.kill(old);
    let promoted = tokio::task::block_in_place(|| cluster.wait_new_owner(slot(&channel), old));
    assert_eq!(promoted, replicas[0], "its replica took over");
    if durability.min_replicas > 0 {
        tokio::task::block_in_place(|| {
            cluster.restart(old);
            cluster.wait_healthy();
        });
    }

    // Appends go on (retried through the failover) and reach every stream live.
    let at = acked.lock().unwrap().len();
    within("appends after the failover", async {
        while acked.lock().unwrap().len() < at + 20 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    within("the writer to stop", writing).await.unwrap();
    let acked = acked.lock().unwrap().clone();
    let last = *acked.last().unwrap();
    wait_for("every stream to get the last ping", || async {
        streams
            .iter()
            .all(|s| s.lock().unwrap().ids.last() >= Some(&last))
            .then_some(())
    })
    .await;
    // Each process is subscribed on the promoted primary, once, and nowhere else.
    tokio::task::block_in_place(|| {
        for port in cluster.live_ports() {
            let want = if port == promoted {
                processes.len() as u64
            } else {
                0
            };
            assert_eq!(
                cluster.shard_subscribers(port, &channel),
                Some(want),
                "PUBSUB SHARDNUMSUB on {port} after the failover to {promoted}"
            );
        }
    });
    let log = log_after(&writer_bus, from).await;
    assert_eq!(
        log.last(),
        Some(&last),
        "the last acknowledged append ends the log"
    );
    drop(processes);
    (log, acked, streams)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_replica_of_one_primary_holds_up_no_other_guilds_appends() {
    let cluster = private();
    let url = cluster.url();
    let (a, b) = tokio::task::block_in_place(|| guilds_on_two_primaries(&cluster, "frz"));
    let durability = Durability {
        min_replicas: 1,
        timeout: Duration::from_millis(300),
    };
    // One process appends for both guilds, as a gateway does.
    let redis = Redis::connect(
        &url,
        "frz",
        10_000,
        coven::bus::redis::COMMAND_TIMEOUT,
        durability,
    )
    .await
    .unwrap();
    let (bus_a, bus_b) = (redis.guild(Id::new(a)), redis.guild(Id::new(b)));
    let mut live_b = redis.guild(Id::new(b)).subscribe().await.unwrap();
    // Both guilds append while every replica is up.
    for (bus, name) in [(&bus_a, "a"), (&bus_b, "b")] {
        let request = Request {
            writer: name.into(),
            seq: 1,
            part: 0,
        };
        within("a durable append", async {
            loop {
                match bus.append_once(ping(1), None, &request).await {
                    Ok(_) => return,
                    Err(BusError::NotDurable { .. }) => continue,
                    Err(e) => panic!("{e}"),
                }
            }
        })
        .await;
    }
    let (_, replicas_a) =
        tokio::task::block_in_place(|| cluster.owner(&format!("frz:{{{a}}}:events")));
    assert_eq!(replicas_a.len(), 1, "a's primary has one replica");
    cluster.freeze(replicas_a[0]);

    // a's appends cannot be proven; b's go on, each published.
    let stuck = {
        let bus_a = bus_a.clone();
        tokio::spawn(async move {
            let request = Request {
                writer: "a".into(),
                seq: 2,
                part: 0,
            };
            loop {
                if bus_a.append_once(ping(2), None, &request).await.is_ok() {
                    return;
                }
            }
        })
    };
    let mut published: HashMap<u64, EventId> = HashMap::new();
    for seq in 2..=11 {
        let request = Request {
            writer: "b".into(),
            seq,
            part: 0,
        };
        let event = within("guild b's append while a's replica is frozen", async {
            loop {
                let started = std::time::Instant::now();
                match bus_b.append_once(ping(seq), None, &request).await {
                    Ok(event) => return event,
                    Err(e @ BusError::NotDurable { .. }) => {
                        // Shown when the test fails.
                        eprintln!("b's append {seq}: {e} after {:?}", started.elapsed());
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        })
        .await;
        published.insert(seq, event.id);
    }
    let mut heard = Vec::new();
    while heard.len() < 10 {
        let event = within("b's events live", live_b.recv()).await.unwrap();
        if let EventData::Ping { seq, .. } = event.data
            && seq >= 2
        {
            assert_eq!(published.get(&seq), Some(&event.id));
            heard.push(seq);
        }
    }
    assert_eq!(heard, (2..=11).collect::<Vec<_>>(), "b's events, in order");
    // All the while a's append was retried and never acknowledged: its primary's only
    // replica lacks it (a WAIT sent to another node would have said otherwise).
    assert!(
        !stuck.is_finished(),
        "a's append was acknowledged while its primary's only replica was frozen"
    );
    cluster.thaw(replicas_a[0]);
    within("a's append once its replica is back", stuck)
        .await
        .unwrap();
}

/// fred 10.1 sent the command after `ASKING` back to the node that said ASK (and read
/// `ASKING`'s answer inline, taking another command's): every append during a migration's
/// ASK window failed with "Max attempts reached" and reset the client's connections. The
/// vendored fred (docs/fred-ask-redirection.md) follows ASK; this holds it to that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_follow_ask_redirections_while_a_slot_is_migrating() {
    let cluster = private();
    let url = cluster.url();
    const G: u64 = 4711;
    let bus = bus_on(&url, "ask", G).await;
    let first = bus.append(ping(1), None).await.unwrap();
    let channel = format!("ask:{{{G}}}:events");
    let (old, _) = tokio::task::block_in_place(|| cluster.owner(&channel));
    let to = tokio::task::block_in_place(|| cluster.primaries())
        .into_iter()
        .find(|p| *p != old)
        .expect("another primary");
    // The keys are on `to`; the slot is still `old`'s, which answers ASK.
    tokio::task::block_in_place(|| cluster.move_keys(slot(&channel), to));
    // Several at once, so other commands are in flight on the connection to `to`.
    let appends = futures_util::future::join_all((2..=6).map(|seq| {
        let bus = bus.clone();
        async move { bus.append(ping(seq), None).await }
    }));
    let reads = futures_util::future::join_all((0..5).map(|_| bus.since(first.id, 100)));
    let (appended, read) = within("commands during the ASK window", async {
        tokio::join!(appends, reads)
    })
    .await;
    // A script whose keys are not all on the importing node yet (a new request name) is
    // refused with TRYAGAIN, which the gateway retries; it is never sent back and forth.
    for a in &appended {
        assert!(
            a.as_ref()
                .map_or_else(|e| e.to_string().contains("TRYAGAIN"), |_| true),
            "an append during the ASK window: {a:?}"
        );
    }
    for r in &read {
        assert!(
            matches!(r, Ok(Since::Events(_))),
            "a read during the ASK window: {r:?}"
        );
    }
    tokio::task::block_in_place(|| cluster.assign(slot(&channel), old, to));
    let done = appended.iter().filter(|a| a.is_ok()).count();
    let last = within(
        "an append once the slot is assigned",
        bus.append(ping(7), None),
    )
    .await
    .unwrap();
    let log = log_after(&bus, EventId::ZERO).await;
    assert_eq!(
        log.len(),
        done + 2,
        "every acknowledged append once: {log:?}"
    );
    assert_eq!(log.last(), Some(&last.id));
}

/// `rediss-cluster://` with an ACL user: every node speaks TLS only (clients, the
/// cluster bus, replication), verified against the CA in `SSL_CERT_FILE`, and `coven
/// publish` appends durably as that user on the guild's primary; a wrong password is
/// refused at start with one line naming the credentials, not TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_with_an_acl_user_takes_durable_appends_and_refuses_a_wrong_password() {
    use crate::harness::cluster::ACL_PASSWORD;
    let cluster = tokio::task::block_in_place(Cluster::start_secure);
    let ca = cluster.ca().display().to_string();
    let guild = "4712";
    let url = cluster.secure_url(ACL_PASSWORD);
    CovenProcess::run_ok(
        &["publish", "--ping", "--count", "5", "--rate", "50"],
        &[
            ("REDIS_URL", &url),
            ("SSL_CERT_FILE", &ca),
            ("DISCORD_GUILD_ID", guild),
            ("REDIS_MIN_REPLICAS", "1"),
        ],
    );
    let key = format!("coven:{{{guild}}}:events");
    let (owner, _) = tokio::task::block_in_place(|| cluster.owner(&key));
    assert_eq!(
        cluster.cli(owner, &["XLEN", &key]).as_deref(),
        Some("5"),
        "the pings are on the guild's primary"
    );

    let wrong = cluster.secure_url("not-the-password");
    let mut refused = CovenProcess::spawn(
        &["publish", "--ping", "--count", "1"],
        &[
            ("REDIS_URL", &wrong),
            ("SSL_CERT_FILE", &ca),
            ("DISCORD_GUILD_ID", guild),
        ],
    );
    let code = tokio::task::block_in_place(|| refused.wait_exit());
    assert_ne!(code, Some(0));
    let errors: Vec<String> = refused
        .stderr()
        .into_iter()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert!(
        errors.len() == 1 && errors[0].contains("refused the credentials"),
        "one line about the credentials: {errors:?}"
    );
}

/// The demo with `REDIS_URL` on a cluster: its gateway, web and simulated players run on
/// the cluster's shared state, the sim guild's log on that guild's primary, its sessions
/// stored there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_on_a_cluster_url() {
    // Its own cluster: the demo's keys are the default prefix's, with the sim's guilds.
    let cluster = tokio::task::block_in_place(Cluster::start);
    let url = cluster.url();
    let demo = tokio::task::block_in_place(|| {
        crate::harness::demo::Demo::start(
            &["--quiet"],
            &[
                ("REDIS_URL", url.as_str()),
                ("DEMO_PLAYER_INTERVAL", "100ms"),
            ],
        )
    });
    let key = format!("coven:{{{GUILD}}}:events");
    let (owner, _) = tokio::task::block_in_place(|| cluster.owner(&key));
    wait_for(
        "the demo's players to reach the guild's log on its primary",
        || async {
            let len: u64 = cluster.cli(owner, &["XLEN", &key])?.parse().ok()?;
            (len > 0).then_some(())
        },
    )
    .await;
    let health = reqwest::get(format!("{}/healthz", demo.web)).await.unwrap();
    assert_eq!(
        health.status(),
        200,
        "the demo's web answers on the cluster"
    );
}

/// A primary that stops answering without closing its sockets (SIGSTOP: a hung process, a
/// partition) is failed over like a dead one, and a writer's appends go on on the
/// promoted replica while the old primary still sleeps: the writer's connection to it is
/// found unresponsive and dropped, not waited on for as long as it sleeps (fred kept it,
/// and every append timed out, until the node woke).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_is_failed_over_and_appends_go_on_while_it_sleeps() {
    const G: u64 = 31338;
    let cluster = private();
    let url = cluster.url();
    let prefix = "frozen";
    let channel = format!("{prefix}:{{{G}}}:events");
    let writer_process = Redis::connect(
        &url,
        prefix,
        10_000,
        coven::bus::redis::COMMAND_TIMEOUT,
        Durability::OFF,
    )
    .await
    .unwrap();
    let bus = writer_process.guild(Id::new(G));
    let from = baseline(&bus).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (acked, writing) = writer(
        bus.clone(),
        "frozen-writer",
        stop.clone(),
        Duration::from_millis(10),
    );
    wait_for("appends before the freeze", || async {
        (acked.lock().unwrap().len() >= 10).then_some(())
    })
    .await;

    let (old, replicas) = tokio::task::block_in_place(|| cluster.owner(&channel));
    cluster.freeze(old);
    let promoted = tokio::task::block_in_place(|| cluster.wait_new_owner(slot(&channel), old));
    assert_eq!(promoted, replicas[0], "its replica took over");
    let at = acked.lock().unwrap().len();
    within(
        "appends on the promoted replica while the old primary sleeps",
        async {
            while acked.lock().unwrap().len() < at + 20 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    within("the writer to stop", writing).await.unwrap();
    tokio::task::block_in_place(|| cluster.thaw(old));

    // What was acknowledged after the failover is in the new primary's log, once.
    let log = log_after(&bus, from).await;
    let after: Vec<EventId> = acked.lock().unwrap()[at..].to_vec();
    assert!(
        after.iter().all(|id| log.contains(id)),
        "every append acknowledged by the promoted replica is in its log"
    );
    assert!(
        log.windows(2).all(|w| w[0] < w[1]),
        "the log in order, none twice"
    );
}

/// A gateway appends each guild's events in order, but guilds side by side: while the
/// primary of one guild sleeps (and before its replica takes over), a voice change in a
/// guild of the same shard on another primary reaches that guild's log. One queue for the
/// whole shard held every guild up behind the sleeping one (the scale run's pause of 5 s
/// on every primary when one was killed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_primary_holds_up_only_its_own_guilds_events_in_a_gateway() {
    use coven::sim::defaults::NIGHT_OWLS_GUILD_ID as OWLS;
    let cluster = private();
    let url = cluster.url();
    let events = |prefix: &str, g: u64| format!("{prefix}:{{{g}}}:events");
    // A key prefix that puts the two guilds on different primaries.
    let prefix = tokio::task::block_in_place(|| {
        (0..100)
            .map(|i| format!("lanes{i}"))
            .find(|p| cluster.owner(&events(p, GUILD)).0 != cluster.owner(&events(p, OWLS)).0)
            .expect("a prefix that splits the two guilds")
    });
    let sim = TestSim::start().await;
    let (_gateway, _) = spawn_gateway_on(
        &sim,
        &url,
        &[
            ("COVEN_KEY_PREFIX", prefix.as_str()),
            ("DISCORD_GUILD_ID", ""),
        ],
    );
    let redis = Redis::connect(
        &url,
        &prefix,
        10_000,
        coven::bus::redis::COMMAND_TIMEOUT,
        Durability::OFF,
    )
    .await
    .unwrap();
    let (playgroup, owls) = (redis.guild(Id::new(GUILD)), redis.guild(Id::new(OWLS)));
    let ash = sim.user("ash").await;
    let voice = |user: u64, channel: u64| {
        let sim = &sim;
        async move {
            let (status, answer) = sim
                .control(
                    "/voice",
                    serde_json::json!({"user_id": user.to_string(), "channel_id": channel.to_string()}),
                )
                .await;
            assert_eq!(status, 200, "{answer}");
        }
    };
    // Both guilds served: a change in each reaches its log.
    let (lobby, owls_lobby) = (
        sim.id_of("lobby_id").await,
        sim.id_in(OWLS, "lobby_id").await,
    );
    let joined = |bus: RedisBus, user: u64| async move {
        let Ok(Since::Events(events)) = bus.since(EventId::ZERO, 10_000).await else {
            return None;
        };
        events
            .iter()
            .rev()
            .find(
                |e| matches!(&e.data, EventData::VoiceJoined { user: u, .. } if u.id.get() == user),
            )
            .map(|e| e.id)
    };
    let (nyx, moth) = (
        sim.user_of(OWLS, "nyx").await,
        sim.user_of(OWLS, "moth").await,
    );
    voice(ash, lobby).await;
    voice(nyx, owls_lobby).await;
    wait_for("both guilds' first changes in their logs", || async {
        joined(playgroup.clone(), ash).await?;
        joined(owls.clone(), nyx).await
    })
    .await;

    // Coven Playgroup's primary sleeps; a change there, then one in Night Owls.
    let slot_of_playgroup = slot(&events(&prefix, GUILD));
    let (sleeping, _) = tokio::task::block_in_place(|| cluster.owner_of_slot(slot_of_playgroup));
    cluster.freeze(sleeping);
    let bramble = sim.user("bramble").await;
    voice(bramble, lobby).await;
    voice(moth, owls_lobby).await;
    wait_for(
        "Night Owls' change in its log while Coven Playgroup's primary sleeps",
        || joined(owls.clone(), moth),
    )
    .await;
    // Coven Playgroup's primary still serves its slot (no failover yet: the cluster's
    // node timeout is 2 s), so its change could not have gone in: Night Owls' did not
    // wait for it.
    let owner_now = tokio::task::block_in_place(|| {
        crate::harness::cluster::owner_in(&cluster.topology(), slot_of_playgroup)
    });
    assert_eq!(
        owner_now.map(|(p, _)| p),
        Some(sleeping),
        "the failover came first: this run proves nothing"
    );
    tokio::task::block_in_place(|| cluster.thaw(sleeping));
    wait_for("Coven Playgroup's change once its primary is back", || {
        joined(playgroup.clone(), bramble)
    })
    .await;
}
