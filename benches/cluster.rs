//! Redis Cluster benchmark: the figures of issue [4/6], on a real local cluster.
//!
//! Every figure starts its own cluster: six release `redis-server --cluster-enabled yes`
//! processes on free ports (three primaries with a replica each, `cluster-node-timeout
//! 2000`), joined with `redis-cli --cluster create`. Coven's side is the library a `coven
//! web` or `coven gateway` process runs: a "replica" here is one `coven::bus::redis::Redis`
//! (the connections one web process holds: a command client, an appender, one sharded
//! Pub/Sub subscriber), in this process; the writer is another, appending as the gateway
//! and `coven publish` do (each append named, retried under its name until done).
//!
//! `cargo bench --bench cluster` runs every figure; `-- placement`, `-- failover`,
//! `-- migration` or `-- load` runs one.
//!   placement  1,000 guilds, one event each, and streams on 10 of them from 2 replicas:
//!              `cmdstat_publish` on every node (target 0), `cmdstat_spublish` per node
//!              against the events appended to that node's guilds, `PUBSUB SHARDNUMSUB`
//!              of each watched guild on its owner (target: the replicas watching) and
//!              subscribed connections per node (target: one per replica).
//!   failover   pings at `--rate` (default 200/s) to a watched guild; its primary is
//!              killed (-9) after 3 s: the time until appends are acknowledged again and
//!              until live delivery resumes (target under 5 s), and, against the new
//!              owner's log, events lost or repeated on the streams (target 0 and 0).
//!   migration  the same with the guild's slot moved to another primary
//!              (`CLUSTER SETSLOT … MIGRATING/IMPORTING`, `MIGRATE`, `SETSLOT … NODE`).
//!   load       appends as fast as `--workers` (default 32) writers go for `--seconds`
//!              (default 10) over 30 guilds, ten per primary, the first primary's guilds
//!              drawing three times the traffic, with 2 replicas subscribed to all 30:
//!              commands and CPU per node against the events its guilds got (each node
//!              carries its own guilds' load only).

// A benchmark that cannot set itself up has nothing to measure: it may stop there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coven::bus::redis::{Durability, Redis};
use coven::bus::{Bus, Request};
use coven::event::{EventData, EventId};
use twilight_model::id::Id;

const PREFIX: &str = "coven";
/// The first of the generated guild ids (snowflake-sized, as Discord's are).
const FIRST_GUILD: u64 = 1_200_000_000_000_000_000;

/// The test suite's local cluster: six nodes on free ports, started and administered
/// the same way (`tests/it/harness/cluster.rs`).
#[allow(dead_code)]
#[path = "../tests/it/harness"]
mod harness {
    pub mod cluster;
    pub mod redis;
    pub mod sentinel;
}

use harness::cluster::{Cluster, owner_in};

/// `redis-cli` against one node: its output, or nothing when it could not answer.
fn cli(cluster: &Cluster, port: u16, args: &[&str]) -> String {
    cluster.cli(port, args).unwrap_or_default()
}

/// `INFO <section>` of the node on `port` as fields.
fn info(cluster: &Cluster, port: u16, section: &str) -> HashMap<String, String> {
    cli(cluster, port, &["INFO", section])
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

/// The primary owning `g`'s slot, in one read of the topology.
fn owner_of(topology: &[harness::cluster::NodeInfo], g: u64) -> u16 {
    owner_in(topology, slot_of(guild(g)))
        .expect("an owner for every slot")
        .0
}

fn reset_stats(cluster: &Cluster) {
    for port in cluster.live_ports() {
        cli(cluster, port, &["CONFIG", "RESETSTAT"]);
    }
}

/// `calls` of one command in `INFO commandstats`.
fn calls(stats: &HashMap<String, String>, command: &str) -> u64 {
    stats
        .get(&format!("cmdstat_{command}"))
        .and_then(|v| {
            v.split(',')
                .find_map(|f| f.strip_prefix("calls="))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

fn guild(i: u64) -> Id<twilight_model::id::marker::GuildMarker> {
    Id::new(FIRST_GUILD + i)
}

fn slot_of(g: Id<twilight_model::id::marker::GuildMarker>) -> u16 {
    fred::util::redis_keyslot(format!("{PREFIX}:{{{g}}}:events").as_bytes())
}

async fn connect(url: &str) -> Arc<Redis> {
    Redis::connect(
        url,
        PREFIX,
        100_000,
        Duration::from_secs(10),
        Durability::OFF,
    )
    .await
    .expect("the cluster answers")
}

fn ping(seq: u64) -> EventData {
    EventData::Ping { seq, ts: seq }
}

/// Appends `data` as `request`, retrying (a failover, a moved slot) until it is done, as
/// the gateway's writer does.
async fn append_until_done(bus: &dyn Bus, data: EventData, request: &Request) -> EventId {
    let mut said = None;
    loop {
        match bus.append_once(data.clone(), None, request).await {
            Ok(event) => return event.id,
            Err(e) => {
                let e = e.to_string();
                if said.as_ref() != Some(&e) {
                    eprintln!("  (append {} retried: {e})", request.seq);
                    said = Some(e);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn placement() {
    println!("\n## placement: 1,000 guilds, streams on 10 from 2 replicas");
    let cluster = Cluster::start();
    let url = cluster.url();
    let writer = connect(&url).await;
    let replicas = [connect(&url).await, connect(&url).await];
    let watched: Vec<u64> = (0..10).map(|i| i * 100).collect();
    let heard = Arc::new(AtomicU64::new(0));
    let mut receivers = Vec::new();
    for r in &replicas {
        for &g in &watched {
            let mut rx = r.guild(guild(g)).subscribe().await.unwrap();
            let heard = heard.clone();
            receivers.push(tokio::spawn(async move {
                while rx.recv().await.is_ok() {
                    heard.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    reset_stats(&cluster);
    let mut per_node: BTreeMap<u16, u64> = BTreeMap::new();
    let primaries = cluster.primaries();
    let topology = cluster.topology();
    let node_of = |g: u64| owner_of(&topology, g);
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = Vec::new();
    for g in 0..1_000u64 {
        *per_node.entry(node_of(g)).or_default() += 1;
        let bus = writer.guild(guild(g));
        let permit = sem.clone().acquire_owned().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            bus.append(ping(g), None).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let want = (watched.len() * replicas.len()) as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while heard.load(Ordering::Relaxed) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "  appended 1,000 events in {:.2} s; the streams heard {} of {want}",
        started.elapsed().as_secs_f64(),
        heard.load(Ordering::Relaxed)
    );
    println!(
        "  | node | guilds' events appended | cmdstat_publish | cmdstat_spublish | connections subscribed (ssub) | subscriptions |"
    );
    println!("  |---|---|---|---|---|---|");
    for &p in &primaries {
        let stats = info(&cluster, p, "commandstats");
        let clients = cli(&cluster, p, &["CLIENT", "LIST"]);
        let ssubs: Vec<u64> = clients
            .lines()
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|f| f.strip_prefix("ssub="))
                    .and_then(|n| n.parse().ok())
            })
            .filter(|n| *n > 0)
            .collect();
        println!(
            "  | {} | {} | {} | {} | {} | {} |",
            p,
            per_node.get(&p).copied().unwrap_or(0),
            calls(&stats, "publish"),
            calls(&stats, "spublish"),
            ssubs.len(),
            ssubs.iter().sum::<u64>(),
        );
    }
    println!(
        "  | guild (watched) | owner | PUBSUB SHARDNUMSUB on its owner | on the other primaries |"
    );
    println!("  |---|---|---|---|");
    for &g in &watched {
        let channel = format!("{PREFIX}:{{{}}}:events", guild(g));
        let owner = node_of(g);
        let count = |port: u16| -> String {
            let out = cli(&cluster, port, &["PUBSUB", "SHARDNUMSUB", &channel]);
            out.lines().nth(1).unwrap_or("?").to_owned()
        };
        let others: Vec<String> = primaries
            .iter()
            .filter(|p| **p != owner)
            .map(|p| count(*p))
            .collect();
        println!(
            "  | {} | {owner} | {} | {} |",
            guild(g),
            count(owner),
            others.join(", ")
        );
    }
    for r in receivers {
        r.abort();
    }
}

/// What one stream heard, and when.
type Heard = Arc<Mutex<Vec<(EventId, Instant)>>>;

/// What a run of pings through a fault gives.
struct Run {
    acked: Vec<(u64, EventId, Instant)>,
    heard: Vec<Vec<(EventId, Instant)>>,
    /// When the run stopped waiting for the streams to catch up.
    ended_at: Instant,
}

/// Pings to guild 0 at `rate` for `seconds`, heard by `streams` receivers on 2 replicas;
/// `fault` is done 3 s in.
async fn through_fault(
    cluster: &Cluster,
    rate: f64,
    seconds: u64,
    streams: usize,
    fault: impl FnOnce(&Cluster),
) -> Run {
    let url = cluster.url();
    let writer = connect(&url).await;
    let replicas = [connect(&url).await, connect(&url).await];
    let heard: Vec<Heard> = (0..streams).map(|_| Arc::default()).collect();
    let mut listeners = Vec::new();
    for (i, h) in heard.iter().enumerate() {
        let mut rx = replicas[i % 2].guild(guild(0)).subscribe().await.unwrap();
        let h = h.clone();
        listeners.push(tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(e) => h.lock().unwrap().push((e.id, Instant::now())),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                }
            }
        }));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writing = tokio::spawn({
        let bus = writer.guild(guild(0));
        let stop = stop.clone();
        let acked = acked.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                seq += 1;
                let request = Request {
                    writer: "bench".to_owned(),
                    seq,
                    part: 0,
                };
                let id = append_until_done(&bus, ping(seq), &request).await;
                acked.lock().unwrap().push((seq, id, Instant::now()));
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    fault(cluster);
    tokio::time::sleep(Duration::from_secs(seconds.saturating_sub(3))).await;
    stop.store(true, Ordering::Relaxed);
    writing.await.unwrap();
    // Everything acknowledged reaches the streams (or never will).
    let last = acked.lock().unwrap().last().map(|a| a.1);
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline
        && heard
            .iter()
            .any(|h| h.lock().unwrap().last().map(|e| e.0) < last)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for l in listeners {
        l.abort();
    }
    let acked = acked.lock().unwrap().clone();
    Run {
        acked,
        heard: heard.iter().map(|h| h.lock().unwrap().clone()).collect(),
        ended_at: Instant::now(),
    }
}

fn report(cluster: &Cluster, run: &Run) {
    let events = format!("{PREFIX}:{{{}}}:events", guild(0));
    let (owner, _) = cluster.owner_of_slot(slot_of(guild(0)));
    let log: Vec<EventId> = cli(cluster, owner, &["XRANGE", &events, "-", "+"])
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    let acked_lost = run
        .acked
        .iter()
        .filter(|(_, id, _)| log.binary_search(id).is_err())
        .count();
    // With pings every few ms, the longest silence is how long the fault stopped them:
    // between two acknowledgements, and between two events heard on a stream.
    let longest = |times: &mut dyn Iterator<Item = Instant>| -> Duration {
        let mut last: Option<Instant> = None;
        let mut worst = Duration::ZERO;
        for t in times {
            if let Some(l) = last {
                worst = worst.max(t.saturating_duration_since(l));
            }
            last = Some(t);
        }
        worst
    };
    let appends_paused = longest(&mut run.acked.iter().map(|a| a.2));
    let mut resumed_live: Vec<Duration> = run
        .heard
        .iter()
        .map(|stream| {
            // A stream that never got the last event was silent until the run ended.
            let complete = stream.last().map(|e| e.0) >= run.acked.last().map(|a| a.1);
            let tail = (!complete).then_some(run.ended_at);
            longest(&mut stream.iter().map(|e| e.1).chain(tail))
        })
        .collect();
    let (mut lost, mut repeated, mut disordered) = (0, 0, 0);
    for stream in &run.heard {
        let ids: Vec<EventId> = stream.iter().map(|e| e.0).collect();
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        if sorted != ids {
            disordered += 1;
        }
        let mut unique = sorted.clone();
        unique.dedup();
        repeated += sorted.len() - unique.len();
        let from = ids.first().copied().unwrap_or(EventId::ZERO);
        lost += log
            .iter()
            .filter(|id| **id >= from && unique.binary_search(id).is_err())
            .count();
    }
    resumed_live.sort_unstable();
    let median = resumed_live.get(resumed_live.len() / 2).copied();
    let worst = resumed_live.last().copied();
    println!(
        "  pings acknowledged: {} ({} missing from the log); appends paused for {:.2} s at most",
        run.acked.len(),
        acked_lost,
        appends_paused.as_secs_f64()
    );
    println!(
        "  live delivery paused for {} (median of {} streams; longest {}): target under 5 s",
        median.map_or("?".to_owned(), |d| format!("{:.2} s", d.as_secs_f64())),
        run.heard.len(),
        worst.map_or("?".to_owned(), |d| format!("{:.2} s", d.as_secs_f64())),
    );
    println!(
        "  against the new owner's log ({} events): {lost} lost, {repeated} repeated, {disordered} streams out of order (target 0, 0, 0)",
        log.len()
    );
}

async fn failover(rate: f64) {
    println!(
        "\n## failover: kill -9 of the primary holding a watched guild, pings at {rate}/s, 50 streams on 2 replicas"
    );
    let cluster = Cluster::start();
    let slot = slot_of(guild(0));
    let (old, _) = cluster.owner_of_slot(slot);
    let run = through_fault(&cluster, rate, 15, 50, |c| c.kill(old)).await;
    cluster.wait_new_owner(slot, old);
    report(&cluster, &run);
}

async fn migration(rate: f64) {
    println!(
        "\n## migration: a watched guild's slot moved to another primary, pings at {rate}/s, 50 streams on 2 replicas"
    );
    let cluster = Cluster::start();
    let run = through_fault(&cluster, rate, 12, 50, |c| {
        let slot = slot_of(guild(0));
        let (from, _) = c.owner_of_slot(slot);
        let to = c.primaries().into_iter().find(|p| *p != from).unwrap();
        c.migrate(slot, to);
    })
    .await;
    report(&cluster, &run);
}

async fn load(seconds: u64, workers: usize) {
    println!(
        "\n## load: {workers} writers for {seconds} s over 30 guilds, ten per primary, the first primary's at 3x"
    );
    let cluster = Cluster::start();
    let url = cluster.url();
    let primaries = cluster.primaries();
    let topology = cluster.topology();
    let node_of = |g: u64| {
        let owner = owner_of(&topology, g);
        primaries.iter().position(|p| *p == owner).unwrap()
    };
    // Ten guilds on each primary.
    let mut chosen: Vec<Vec<u64>> = vec![Vec::new(); primaries.len()];
    let mut g = 0;
    while chosen.iter().any(|c| c.len() < 10) {
        let n = node_of(g);
        if chosen[n].len() < 10 {
            chosen[n].push(g);
        }
        g += 1;
    }
    // The first primary's guilds three times in the draw.
    let mut draw: Vec<u64> = Vec::new();
    for (n, gs) in chosen.iter().enumerate() {
        for _ in 0..if n == 0 { 3 } else { 1 } {
            draw.extend(gs);
        }
    }
    let writer = connect(&url).await;
    // Two replicas watch every guild, as streams on them would: each event also goes out
    // once per replica from its primary (sharded Pub/Sub), which the figures include.
    let replicas = [connect(&url).await, connect(&url).await];
    let delivered = Arc::new(AtomicU64::new(0));
    let mut listeners = Vec::new();
    for r in &replicas {
        for g in chosen.iter().flatten() {
            let mut rx = r.guild(guild(*g)).subscribe().await.unwrap();
            let delivered = delivered.clone();
            listeners.push(tokio::spawn(async move {
                loop {
                    match rx.recv().await {
                        Ok(_) => {
                            delivered.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(_) => return,
                    }
                }
            }));
        }
    }
    let before: Vec<(HashMap<String, String>, HashMap<String, String>)> = primaries
        .iter()
        .map(|p| (info(&cluster, *p, "stats"), info(&cluster, *p, "cpu")))
        .collect();
    let counts: Arc<Vec<AtomicU64>> =
        Arc::new((0..primaries.len()).map(|_| AtomicU64::new(0)).collect());
    let node_by_guild: Arc<HashMap<u64, usize>> =
        Arc::new(draw.iter().map(|g| (*g, node_of(*g))).collect());
    let draw = Arc::new(draw);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let writer = writer.clone();
        let counts = counts.clone();
        let draw = draw.clone();
        let node_by_guild = node_by_guild.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while Instant::now() < deadline {
                let g = draw[i % draw.len()];
                i += workers;
                if writer
                    .guild(guild(g))
                    .append(ping(i as u64), None)
                    .await
                    .is_ok()
                {
                    counts[node_by_guild[&g]].fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let num = |m: &HashMap<String, String>, k: &str| -> f64 {
        m.get(k).and_then(|v| v.parse().ok()).unwrap_or(0.0)
    };
    let total: u64 = counts.iter().map(|c| c.load(Ordering::Relaxed)).sum();
    // The streams catch up (or the deliveries say they did not).
    let want = total * replicas.len() as u64;
    let settle = Instant::now() + Duration::from_secs(15);
    while delivered.load(Ordering::Relaxed) < want && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for l in listeners {
        l.abort();
    }
    println!(
        "  {total} events appended ({:.0}/s in all); {} of {want} delivered to the 2 replicas' subscriptions",
        total as f64 / seconds as f64,
        delivered.load(Ordering::Relaxed)
    );
    println!(
        "  | primary | guilds' events | share | commands processed | commands per event | CPU (user+sys) | CPU per 1,000 events |"
    );
    println!("  |---|---|---|---|---|---|---|");
    for (n, p) in primaries.iter().enumerate() {
        let (stats, cpu) = (info(&cluster, *p, "stats"), info(&cluster, *p, "cpu"));
        let commands =
            num(&stats, "total_commands_processed") - num(&before[n].0, "total_commands_processed");
        let used = |m: &HashMap<String, String>| {
            num(m, "used_cpu_user_main_thread") + num(m, "used_cpu_sys_main_thread")
        };
        let cpu_s = used(&cpu) - used(&before[n].1);
        let events = counts[n].load(Ordering::Relaxed);
        println!(
            "  | {} | {events} | {:.0}% | {commands:.0} | {:.2} | {:.2} s | {:.1} ms |",
            p,
            100.0 * events as f64 / total.max(1) as f64,
            commands / events.max(1) as f64,
            cpu_s,
            1_000_000.0 * cpu_s / events.max(1) as f64,
        );
    }
}

fn flag<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .skip_while(|a| *a != name)
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Ok(filter) = std::env::var("RUST_LOG") {
        let _ = coven::telemetry::init(
            &coven::config::LogSettings {
                filter,
                format: coven::config::LogFormat::Pretty,
            },
            None,
            "test",
        );
    }
    let only: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| matches!(*a, "placement" | "failover" | "migration" | "load"))
        .collect();
    let runs = |name: &str| only.is_empty() || only.contains(&name);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "cluster benchmark: six redis-server processes (three primaries, a replica each) and this process, on one machine ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    runtime.block_on(async {
        if runs("placement") {
            placement().await;
        }
        if runs("failover") {
            failover(flag(&args, "--rate", 200.0)).await;
        }
        if runs("migration") {
            migration(flag(&args, "--rate", 200.0)).await;
        }
        if runs("load") {
            load(flag(&args, "--seconds", 10), flag(&args, "--workers", 32)).await;
        }
    });
}
