//! Several `coven gateway` processes sharing the bot's shards against the simulator and a
//! private Redis: fair shares, takeovers that RESUME, graceful hand-overs with 4000, the
//! identify queue, and what goes wrong (kill -9, SIGSTOP, expired sessions, a different
//! SHARD_COUNT, Redis away during a hand-over).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use fred::prelude::*;
use serde_json::{Value, json};

use coven::sim::Settings as SimSettings;

use crate::harness::{CovenProcess, RedisServer, TestSim, wait_for};

const PREFIX: &str = "coven";
/// Generated guilds beside the two seeded ones the bot is in: eight guilds over four
/// shards, two per shard (generated ids take consecutive shards).
const GENERATED: u32 = 6;

struct Fleet {
    sim: TestSim,
    redis: RedisServer,
    client: Client,
}

struct Gateway {
    process: CovenProcess,
    health: String,
}

impl Fleet {
    async fn start() -> Self {
        Self::start_with(RedisServer::start()).await
    }

    async fn start_with(redis: RedisServer) -> Self {
        Self::start_with_sim(redis, |_| {}).await
    }

    /// A fleet whose simulator `tweak` changes further.
    async fn start_with_sim(redis: RedisServer, tweak: impl FnOnce(&mut SimSettings)) -> Self {
        // Discord's heartbeat is 41.25 s, four times the default lease TTL: a process
        // paused past its lease keeps its Discord sessions, which the others RESUME. The
        // harness's 1 s would end them (4009) before the 2 s TTL runs out.
        let sim = TestSim::start_with(|s| {
            s.guilds = GENERATED;
            s.heartbeat_interval = Duration::from_secs(10);
            tweak(s);
        })
        .await;
        let policy = ReconnectPolicy::new_constant(0, 50);
        let client = Client::new(
            Config::from_url(&redis.url()).unwrap(),
            None,
            None,
            Some(policy),
        );
        client.init().await.expect("redis");
        Self { sim, redis, client }
    }

    fn gateway(&self, extra: &[(&str, &str)]) -> Gateway {
        let redis_url = self.redis.url();
        let gateway_url = self.sim.gateway_url();
        let api_url = self.sim.url("/api");
        let token = self.sim.token();
        let mut env = vec![
            ("BIND", "127.0.0.1:0"),
            ("METRICS_BIND", "127.0.0.1:0"),
            ("REDIS_URL", redis_url.as_str()),
            ("DISCORD_BOT_TOKEN", token.as_str()),
            ("DISCORD_GATEWAY_URL", gateway_url.as_str()),
            ("DISCORD_API_URL", api_url.as_str()),
            ("SHARD_COUNT", "4"),
            ("GATEWAY_LEASE_TTL", "2s"),
            ("REDIS_RETRY_FOR", "2s"),
            ("RUST_LOG", "coven=debug"),
        ];
        env.retain(|(n, _)| !extra.iter().any(|(m, _)| m == n));
        env.extend(extra.iter().filter(|(_, v)| !v.is_empty()));
        let mut process = CovenProcess::spawn(&["gateway"], &env);
        let health = process.listening_url();
        Gateway { process, health }
    }

    /// Every guild the bot is in, with its lobby and two of its members.
    async fn guilds(&self) -> Vec<(u64, u64, [u64; 2])> {
        let state = self.sim.state().await;
        let mut out = Vec::new();
        for g in state["guilds"].as_array().unwrap() {
            if g["bot"] != true {
                continue;
            }
            let id: u64 = g["id"].as_str().unwrap().parse().unwrap();
            let gs = self.sim.guild_state(id).await;
            let lobby: u64 = gs["lobby_id"].as_str().unwrap().parse().unwrap();
            let bot = gs["bot_id"].as_str().unwrap().to_owned();
            let people: Vec<u64> = gs["members"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["user_id"].as_str().unwrap().to_owned())
                .filter(|u| *u != bot)
                .map(|u| u.parse().unwrap())
                .take(2)
                .collect();
            out.push((id, lobby, [people[0], people[1]]));
        }
        out
    }

    async fn voice(&self, guild: u64, user: u64, channel: Option<u64>) {
        let (status, body) = self
            .sim
            .control(
                "/voice",
                json!({
                    "guild_id": guild.to_string(),
                    "user_id": user.to_string(),
                    "channel_id": channel.map(|c| c.to_string()),
                }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    /// The voice events of `user` in `guild`'s log: (type, channel).
    async fn voice_log(&self, guild: u64, user: u64) -> Vec<String> {
        let entries: Vec<(String, std::collections::HashMap<String, String>)> = self
            .client
            .xrange(format!("{PREFIX}:{{{guild}}}:events"), "-", "+", None)
            .await
            .unwrap_or_default();
        entries
            .into_iter()
            .filter_map(|(_, f)| serde_json::from_str::<Value>(&f["e"]).ok())
            .filter(|e| {
                let who = e["data"]["user_id"]
                    .as_str()
                    .or(e["data"]["user"]["id"].as_str());
                who == Some(user.to_string().as_str())
            })
            .filter_map(|e| {
                let kind = e["type"].as_str()?.to_owned();
                kind.starts_with("voice.").then_some(kind)
            })
            .collect()
    }

    /// The state of the last `gateway.status` in `guild`'s log.
    async fn last_status(&self, guild: u64) -> Value {
        let entries: Vec<(String, std::collections::HashMap<String, String>)> = self
            .client
            .xrange(format!("{PREFIX}:{{{guild}}}:events"), "-", "+", None)
            .await
            .unwrap();
        entries
            .iter()
            .filter_map(|(_, f)| serde_json::from_str::<Value>(&f["e"]).ok())
            .rfind(|e| e["type"] == "gateway.status")
            .map_or(Value::Null, |e| e["data"]["state"].clone())
    }

    /// Each shard's (identifies, resumes) as the simulator counts them.
    async fn counts(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for s in 0..4 {
            let session = self.session(s).await;
            out.push((
                identifies(&session),
                session["resumes"].as_u64().unwrap_or(0),
            ));
        }
        out
    }

    async fn sessions(&self) -> Vec<Value> {
        self.sim.state().await["gateway"]["sessions"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    async fn session(&self, shard: u64) -> Value {
        self.sessions()
            .await
            .into_iter()
            .find(|s| s["shard"][0] == shard && s["shard"][1] == 4)
            .unwrap_or(Value::Null)
    }
}

async fn health(url: &str) -> Option<(u16, Value)> {
    let res = reqwest::get(format!("{url}/healthz")).await.ok()?;
    let status = res.status().as_u16();
    Some((status, res.json().await.ok()?))
}

/// The shards a process holds, whatever their state.
async fn held(gw: &Gateway) -> Vec<u64> {
    match health(&gw.health).await {
        Some((_, body)) => body["shards"]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s["shard"][0].as_u64()).collect())
            .unwrap_or_default(),
        None => Vec::new(),
    }
}

/// Waits up to `limit` until the processes hold every one of the four shards between
/// them, each CONNECTED, and their loads differ by at most one; answers the shards of
/// each.
async fn all_connected(gateways: &[&Gateway], limit: Duration) -> Vec<Vec<u64>> {
    let deadline = Instant::now() + limit;
    loop {
        let mut all = Vec::new();
        let mut connected = 0;
        for gw in gateways {
            let mut mine = Vec::new();
            if let Some((_, body)) = health(&gw.health).await {
                for s in body["shards"].as_array().into_iter().flatten() {
                    mine.push(s["shard"][0].as_u64().unwrap());
                    if s["state"] == "CONNECTED" {
                        connected += 1;
                    }
                }
            }
            all.push(mine);
        }
        let distinct: BTreeSet<u64> = all.iter().flatten().copied().collect();
        let loads: Vec<usize> = all.iter().map(Vec::len).collect();
        let even = loads.iter().max().unwrap_or(&0) - loads.iter().min().unwrap_or(&0) <= 1;
        if connected == 4 && distinct.len() == 4 && loads.iter().sum::<usize>() == 4 && even {
            return all;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for 4 connected shards: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn identifies(session: &Value) -> u64 {
    session["identifies"].as_u64().unwrap_or(0)
}

/// Changes made to every guild in turn while `during` runs once, in the middle; then
/// checks every guild's log holds each change exactly once, in order.
async fn changes_across_guilds_survive(fleet: &Fleet, rounds: usize, during: impl AsyncFnOnce()) {
    let wrong = changes_across_guilds(fleet, rounds, during).await;
    assert!(wrong.is_empty(), "each change once, in order: {wrong:#?}");
}

/// What [`changes_across_guilds_survive`] checks: the (guild, user, wanted, got) that
/// differ.
async fn changes_across_guilds(
    fleet: &Fleet,
    rounds: usize,
    during: impl AsyncFnOnce(),
) -> Vec<(u64, u64, Vec<String>, Vec<String>)> {
    let guilds = fleet.guilds().await;
    assert!(guilds.len() >= 8, "{guilds:?}");
    // What the logs held before: only what follows is this call's.
    let mut before: BTreeMap<(u64, u64), usize> = BTreeMap::new();
    for (guild, _, people) in &guilds {
        for user in people {
            before.insert((*guild, *user), fleet.voice_log(*guild, *user).await.len());
        }
    }
    let mut made: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
    let mut during = Some(during);
    for round in 0..rounds {
        if round == rounds / 2
            && let Some(f) = during.take()
        {
            f().await;
        }
        for (guild, lobby, people) in &guilds {
            let user = people[round % 2];
            let joining = (round / 2) % 2 == 0;
            fleet.voice(*guild, user, joining.then_some(*lobby)).await;
            made.entry((*guild, user)).or_default().push(
                if joining {
                    "voice.joined"
                } else {
                    "voice.left"
                }
                .to_owned(),
            );
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mut wrong = Vec::new();
    for ((guild, user), want) in made {
        let skip = before.get(&(guild, user)).copied().unwrap_or(0);
        let got: Vec<String> = wait_for_log(fleet, guild, user, skip + want.len())
            .await
            .into_iter()
            .skip(skip)
            .collect();
        if got != want {
            wrong.push((guild, user, want, got));
        }
    }
    wrong
}

async fn wait_for_log(fleet: &Fleet, guild: u64, user: u64, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = fleet.voice_log(guild, user).await;
        if got.len() >= n || Instant::now() >= deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A process holding two of four shards is killed (-9) while voice changes flow in
/// eight guilds: the other two take its shards within the lease TTL, RESUME each (no
/// new IDENTIFY), and every guild's log holds each change once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_process_s_shards_are_resumed_by_the_others_and_nothing_is_lost() {
    let fleet = Fleet::start().await;
    let a = fleet.gateway(&[]);
    let b = fleet.gateway(&[]);
    let c = fleet.gateway(&[]);
    let shares = all_connected(&[&a, &b, &c], Duration::from_secs(45)).await;
    assert!(shares.iter().all(|s| s.len() <= 2), "{shares:?}");
    let mut gateways = vec![a, b, c];
    let victim_at = shares.iter().position(|s| s.len() == 2).unwrap();
    let victim_shards = shares[victim_at].clone();
    let mut victim = gateways.remove(victim_at);
    let before = fleet.counts().await;
    changes_across_guilds_survive(&fleet, 8, async || {
        victim.process.signal("KILL");
    })
    .await;
    let survivors: Vec<&Gateway> = gateways.iter().collect();
    let shares = all_connected(&survivors, Duration::from_secs(15)).await;
    assert!(shares.iter().all(|s| s.len() == 2), "{shares:?}");
    let after = fleet.counts().await;
    for s in &victim_shards {
        let s = *s as usize;
        assert!(
            after[s].1 > before[s].1,
            "shard {s} RESUMEd: {before:?} → {after:?}"
        );
    }
    for s in 0..4 {
        assert_eq!(
            after[s].0, before[s].0,
            "shard {s}: taken over by RESUME, not IDENTIFY"
        );
    }
    victim.process.kill();
}

/// SIGSTOP past the lease TTL, then SIGCONT: the others took its shards; woken, it
/// writes nothing and holds nothing until the load is evened out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_process_writes_nothing_when_it_wakes_and_gives_up_its_shards() {
    let fleet = Fleet::start().await;
    let a = fleet.gateway(&[]);
    let b = fleet.gateway(&[]);
    let shares = all_connected(&[&a, &b], Duration::from_secs(45)).await;
    assert_eq!(shares.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2]);
    let wrong = changes_across_guilds(&fleet, 8, async || {
        a.process.signal("STOP");
        // Past the TTL (2 s): b holds every shard, connected.
        let deadline = Instant::now() + Duration::from_secs(20);
        while held(&b).await.len() < 4 {
            assert!(Instant::now() < deadline, "b did not take a's shards");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(wrong.is_empty(), "each change once, in order: {wrong:#?}");
    let paused_at = a.process.stderr().len();
    a.process.signal("CONT");
    // Woken, a loses its leases, then gets its share back by hand-over.
    all_connected(&[&a, &b], Duration::from_secs(30)).await;
    wait_for("the load evened out again", || async {
        (held(&a).await.len() == 2 && held(&b).await.len() == 2).then_some(())
    })
    .await;
    // Woken, a appended nothing until it took a shard again by hand-over.
    let woken: Vec<String> = a.process.stderr().into_iter().skip(paused_at).collect();
    let before_taking: Vec<&String> = woken
        .iter()
        .take_while(|l| !l.contains("took a shard's lease"))
        .filter(|l| l.contains("appended id="))
        .collect();
    assert!(before_taking.is_empty(), "{before_taking:?}");
    assert!(
        woken.iter().any(|l| l.contains("lost the shard's lease")),
        "a gave up the shards it had lost: {woken:?}"
    );
    changes_across_guilds_survive(&fleet, 4, async || {}).await;
}

/// SIGTERM hands the process's shards over at once: each closed with 4000 (never 1000
/// or 1001, which would end the session), released, and RESUMEd by the other. The leases
/// here live 30 s, so the other holding them all well before that proves they were
/// released, not left to run out (how fast, on a quiet machine, is the benchmark's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_shards_over_with_4000_and_the_other_resumes_them() {
    let fleet = Fleet::start().await;
    let ttl = [("GATEWAY_LEASE_TTL", "30s")];
    let mut a = fleet.gateway(&ttl);
    let b = fleet.gateway(&ttl);
    let shares = all_connected(&[&a, &b], Duration::from_secs(45)).await;
    let a_shards = shares[0].clone();
    assert_eq!(a_shards.len(), 2);
    let before = fleet.counts().await;
    let closes_of = |session: &Value| -> Vec<u64> {
        session["closes"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default()
    };
    let mut closed_before = Vec::new();
    for s in &a_shards {
        closed_before.push(closes_of(&fleet.session(*s).await).len());
    }
    a.process.signal("TERM");
    assert_eq!(a.process.wait_exit(), Some(0));
    all_connected(&[&b], Duration::from_secs(15)).await;
    for (i, s) in a_shards.iter().enumerate() {
        let session = fleet.session(*s).await;
        // Only what this hand-over closed: a cold start may have handed shards over too.
        let closes: Vec<u64> = closes_of(&session)
            .into_iter()
            .skip(closed_before[i])
            .collect();
        assert!(closes.contains(&4000), "shard {s}: {session}");
        assert!(
            !closes.contains(&1000) && !closes.contains(&1001),
            "shard {s}: {session}"
        );
    }
    let after = fleet.counts().await;
    for s in &a_shards {
        let s = *s as usize;
        assert!(
            after[s].1 > before[s].1,
            "shard {s} RESUMEd: {before:?} → {after:?}"
        );
    }
    for s in 0..4 {
        assert_eq!(after[s].0, before[s].0, "shard {s}: no IDENTIFY");
    }
    let lines = a.process.stderr();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("stopped; sessions stored and leases released")),
        "{lines:?}"
    );
    changes_across_guilds_survive(&fleet, 4, async || {}).await;
}

/// Three processes and four shards started at once, max concurrency 1: no op 9, the
/// IDENTIFYs at least 5 s apart whoever sends them, the shards spread within one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_of_three_processes_identifies_through_one_queue_without_op_9() {
    let fleet = Fleet::start().await;
    let a = fleet.gateway(&[]);
    let b = fleet.gateway(&[]);
    let c = fleet.gateway(&[]);
    // Four IDENTIFYs of one bucket: at least 15 s of spacing.
    let shares = all_connected(&[&a, &b, &c], Duration::from_secs(45)).await;
    let loads: Vec<usize> = shares.iter().map(Vec::len).collect();
    assert!(loads.iter().all(|n| *n <= 2), "{loads:?}");
    let state = fleet.sim.state().await;
    assert_eq!(
        state["gateway"]["identify_rejected"], 0,
        "{}",
        state["gateway"]
    );
    let mut at: Vec<u64> = fleet
        .sessions()
        .await
        .iter()
        .flat_map(|s| {
            s["identified_at_ms"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|v| v.as_u64())
        .collect();
    at.sort_unstable();
    assert_eq!(at.len(), 4, "one IDENTIFY per shard: {at:?}");
    for pair in at.windows(2) {
        assert!(pair[1] - pair[0] >= 5000, "IDENTIFYs {at:?}");
    }
}

/// Every process down long enough for Discord to forget the sessions: started again,
/// each RESUME gets op 9 (not resumable), the shards IDENTIFY through the queue, and
/// what changed meanwhile is reconciled from the snapshots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_expired_while_everything_was_down_are_identified_again_and_reconciled() {
    let fleet = Fleet::start().await;
    let mut a = fleet.gateway(&[]);
    all_connected(&[&a], Duration::from_secs(45)).await;
    let guilds = fleet.guilds().await;
    a.process.signal("TERM");
    assert_eq!(a.process.wait_exit(), Some(0));
    let (status, body) = fleet.sim.control("/gateway/expire", json!({})).await;
    assert_eq!(status, 200, "{body}");
    for (guild, lobby, people) in &guilds {
        fleet.voice(*guild, people[0], Some(*lobby)).await;
    }
    let b = fleet.gateway(&[]);
    all_connected(&[&b], Duration::from_secs(45)).await;
    for (guild, _, people) in &guilds {
        let got = wait_for_log(&fleet, *guild, people[0], 1).await;
        assert_eq!(got, ["voice.joined"], "guild {guild}");
    }
    let state = fleet.sim.state().await;
    assert_eq!(state["gateway"]["identify_rejected"], 0);
    for s in 0..4 {
        assert_eq!(identifies(&fleet.session(s).await), 2, "shard {s}");
    }
}

/// A process started with another SHARD_COUNT than the deployment's stored one is
/// refused with one line, and the running one goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_with_a_different_shard_count_is_refused_with_one_line() {
    let fleet = Fleet::start().await;
    let a = fleet.gateway(&[]);
    all_connected(&[&a], Duration::from_secs(45)).await;
    let mut other = fleet.gateway(&[("SHARD_COUNT", "3")]);
    assert_eq!(other.process.wait_exit(), Some(2));
    let errors: Vec<String> = other
        .process
        .stderr()
        .into_iter()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("SHARD_COUNT is 3") && errors[0].contains("4 shards"),
        "{errors:?}"
    );
    // Unset, it joins with the stored count.
    let b = fleet.gateway(&[("SHARD_COUNT", "")]);
    wait_for("b to take its share", || async {
        (held(&a).await.len() == 2 && held(&b).await.len() == 2).then_some(())
    })
    .await;
    all_connected(&[&a, &b], Duration::from_secs(20)).await;
}

/// Redis goes away while a process hands its shards over (SIGTERM): it still stops, and
/// once Redis is back the other holds every shard, resumed, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_away_during_a_hand_over_loses_nothing() {
    let mut fleet = Fleet::start_with(RedisServer::start_persistent()).await;
    let mut a = fleet.gateway(&[]);
    let b = fleet.gateway(&[]);
    all_connected(&[&a, &b], Duration::from_secs(45)).await;
    let guilds = fleet.guilds().await;
    fleet.redis.stop();
    a.process.signal("TERM");
    let exit = a.process.wait_exit();
    assert_eq!(exit, Some(0), "{:?}", a.process.stderr());
    for (guild, lobby, people) in &guilds {
        fleet.voice(*guild, people[1], Some(*lobby)).await;
    }
    fleet.redis.start_again();
    all_connected(&[&b], Duration::from_secs(30)).await;
    for (guild, _, people) in &guilds {
        let got = wait_for_log(&fleet, *guild, people[1], 1).await;
        assert_eq!(got, ["voice.joined"], "guild {guild}");
    }
}

/// A stored session whose resume URL is dead: the new holder RESUMEs through the main
/// gateway URL instead (and does not IDENTIFY).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_resume_url_falls_back_to_the_main_gateway_url() {
    let fleet = Fleet::start().await;
    let mut a = fleet.gateway(&[("SHARD_COUNT", "1")]);
    wait_for("shard 0 connected", || async {
        let (_, body) = health(&a.health).await?;
        (body["shards"][0]["state"] == "CONNECTED").then_some(())
    })
    .await;
    a.process.signal("TERM");
    assert_eq!(a.process.wait_exit(), Some(0));
    let key = format!("{PREFIX}:shard:{{0}}:session");
    let stored: String = fleet.client.get(&key).await.unwrap();
    let mut session: Value = serde_json::from_str(&stored).unwrap();
    let dead = format!("ws://127.0.0.1:{}", crate::harness::redis::free_port());
    session["resume_url"] = json!(dead);
    let _: () = fleet
        .client
        .set(&key, session.to_string(), None, None, false)
        .await
        .unwrap();
    let identified = fleet.sim.gateway_counter("identifies").await;
    let resumed = fleet.sim.gateway_counter("resumes").await;
    let b = fleet.gateway(&[("SHARD_COUNT", "")]);
    wait_for("shard 0 resumed", || async {
        let (_, body) = health(&b.health).await?;
        (body["shards"][0]["state"] == "CONNECTED").then_some(())
    })
    .await;
    assert_eq!(fleet.sim.gateway_counter("identifies").await, identified);
    assert_eq!(fleet.sim.gateway_counter("resumes").await, resumed + 1);
}

/// With no more session starts left than `IDENTIFY_RESERVE`, a process stops with one
/// line (exit 2) and tells its shards' guilds FAILED, instead of identifying: Discord
/// resets the bot's token when they run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_identify_reserve_a_process_stops_with_one_line_instead_of_identifying() {
    let fleet =
        Fleet::start_with_sim(RedisServer::start(), |s| s.session_start_remaining = 5).await;
    let guild = fleet.sim.guild_id();
    let served = guild.to_string();
    let mut a = fleet.gateway(&[
        ("SHARD_COUNT", "1"),
        ("IDENTIFY_RESERVE", "5"),
        ("DISCORD_GUILD_ID", served.as_str()),
    ]);
    assert_eq!(a.process.wait_exit(), Some(2));
    let errors: Vec<String> = a
        .process
        .stderr()
        .into_iter()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("IDENTIFY_RESERVE") && errors[0].contains("5 more session starts"),
        "{errors:?}"
    );
    let state = fleet.sim.state().await;
    assert_eq!(state["gateway"]["identifies"], 0, "{}", state["gateway"]);
    assert_eq!(fleet.last_status(guild).await, "FAILED");
}

/// Too few shards for the bot's guilds: Discord closes with 4011 (sharding required), and
/// the process stops with one line naming SHARD_COUNT, its guilds told FAILED, instead of
/// reconnecting into the same refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharding_required_stops_the_process_with_one_line_naming_shard_count() {
    let fleet = Fleet::start_with_sim(RedisServer::start(), |s| s.max_guilds_per_shard = 4).await;
    let guild = fleet.sim.guild_id();
    let served = guild.to_string();
    let mut a = fleet.gateway(&[("SHARD_COUNT", "1"), ("DISCORD_GUILD_ID", served.as_str())]);
    assert_eq!(a.process.wait_exit(), Some(2));
    let errors: Vec<String> = a
        .process
        .stderr()
        .into_iter()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("4011") && errors[0].contains("SHARD_COUNT"),
        "{errors:?}"
    );
    assert_eq!(
        fleet.sim.gateway_counter("connections").await,
        1,
        "no retry"
    );
    assert_eq!(fleet.last_status(guild).await, "FAILED");
}

/// `P:shards:count` holding no shard count (0, text, past the bound) stops a process with
/// one line naming the key, as a bad setting (exit 2), whatever SHARD_COUNT says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_shard_count_that_is_no_count_is_refused_with_one_line() {
    let fleet = Fleet::start().await;
    for stored in ["0", "four", "-1", "4097", ""] {
        let _: () = fleet
            .client
            .set(format!("{PREFIX}:shards:count"), stored, None, None, false)
            .await
            .unwrap();
        let mut a = fleet.gateway(&[]);
        assert_eq!(a.process.wait_exit(), Some(2), "{stored:?}");
        let errors: Vec<String> = a
            .process
            .stderr()
            .into_iter()
            .filter(|l| l.starts_with("error:"))
            .collect();
        assert_eq!(errors.len(), 1, "{stored:?}: {errors:?}");
        assert!(errors[0].contains("shards:count"), "{stored:?}: {errors:?}");
    }
    assert_eq!(fleet.sim.gateway_counter("connections").await, 0);
}
