//! `coven gateway` as a process against the simulator and a private Redis: the events it
//! writes, failover to a standby, and a fatal refusal.

use std::time::{Duration, Instant};

use fred::prelude::*;
use serde_json::{Value, json};

use crate::harness::{CovenProcess, RedisServer, TestSim, metrics_page, wait_for};

const PREFIX: &str = "coven";

struct Setup {
    sim: TestSim,
    redis: RedisServer,
    client: Client,
    category: u64,
}

impl Setup {
    async fn start() -> Self {
        Self::start_with(RedisServer::start()).await
    }

    async fn start_with(redis: RedisServer) -> Self {
        let sim = TestSim::start().await;
        let policy = ReconnectPolicy::new_constant(0, 50);
        let client = Client::new(
            Config::from_url(&redis.url()).unwrap(),
            None,
            None,
            Some(policy),
        );
        client.init().await.expect("redis");
        let category = sim.id_of("room_category_id").await;
        Self {
            sim,
            redis,
            client,
            category,
        }
    }

    fn gateway(&self, token: &str) -> CovenProcess {
        self.gateway_with(token, &[])
    }

    fn gateway_with(&self, token: &str, extra: &[(&str, &str)]) -> CovenProcess {
        let guild = self.sim.guild_id().to_string();
        let category = self.category.to_string();
        let redis_url = self.redis.url();
        let gateway_url = self.sim.gateway_url();
        let api_url = self.sim.url("/api");
        let mut env = vec![
            ("BIND", "127.0.0.1:0"),
            ("METRICS_BIND", "127.0.0.1:0"),
            ("REDIS_URL", &redis_url),
            ("DISCORD_GUILD_ID", &guild),
            ("DISCORD_BOT_TOKEN", token),
            ("DISCORD_GATEWAY_URL", &gateway_url),
            ("DISCORD_API_URL", &api_url),
            ("DISCORD_ROOM_CATEGORY_ID", &category),
            ("GATEWAY_LEASE_TTL", "2s"),
            ("RUST_LOG", "coven=debug"),
        ];
        env.extend_from_slice(extra);
        // An empty value unsets: `DISCORD_GUILD_ID=""` serves every guild.
        let env: Vec<_> = env
            .into_iter()
            .filter(|(name, _)| !extra.iter().any(|(n, v)| n == name && v.is_empty()))
            .collect();
        let mut p = CovenProcess::spawn(&["gateway"], &env);
        p.wait_for_stdout("health listening on");
        p
    }

    /// A gateway serving every guild the bot is in (every voice channel a room).
    fn gateway_of_every_guild(&self) -> CovenProcess {
        self.gateway_with(
            &self.sim.token(),
            &[("DISCORD_GUILD_ID", ""), ("DISCORD_ROOM_CATEGORY_ID", "")],
        )
    }

    /// `P:guilds`: guild id → entry.
    async fn registry(&self) -> std::collections::BTreeMap<u64, Value> {
        let all: std::collections::HashMap<String, String> = self
            .client
            .hgetall(format!("{PREFIX}:guilds"))
            .await
            .unwrap_or_default();
        all.into_iter()
            .map(|(id, json)| {
                (
                    id.parse().expect("a guild id"),
                    serde_json::from_str(&json).expect("entry JSON"),
                )
            })
            .collect()
    }

    async fn wait_registry(
        &self,
        what: &str,
        ok: impl Fn(&std::collections::BTreeMap<u64, Value>) -> bool,
    ) -> std::collections::BTreeMap<u64, Value> {
        wait_for(what, || async {
            let r = self.registry().await;
            ok(&r).then_some(r)
        })
        .await
    }

    /// Every envelope in guild `guild`'s stream, in order.
    async fn events_of(&self, guild: u64) -> Vec<Value> {
        let entries: Vec<(String, std::collections::HashMap<String, String>)> = self
            .client
            .xrange(format!("{PREFIX}:{{{guild}}}:events"), "-", "+", None)
            .await
            .unwrap_or_default();
        entries
            .into_iter()
            .map(|(_, fields)| serde_json::from_str(&fields["e"]).expect("envelope JSON"))
            .collect()
    }

    async fn wait_events_of(
        &self,
        guild: u64,
        what: &str,
        ok: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        wait_for(what, || async {
            let events = self.events_of(guild).await;
            ok(&events).then_some(events)
        })
        .await
    }

    /// The shard lease's epoch, from its token (`<epoch>:<holder>`).
    async fn lease_epoch(&self) -> Option<u64> {
        let token: Option<String> = self
            .client
            .get(format!("{PREFIX}:shard:{{0}}:lease"))
            .await
            .ok()
            .flatten();
        token?.split(':').next()?.parse().ok()
    }

    async fn guild_epoch(&self, guild: u64) -> Option<u64> {
        let epoch: Option<String> = self
            .client
            .get(format!("{PREFIX}:{{{guild}}}:epoch"))
            .await
            .ok()
            .flatten();
        epoch?.parse().ok()
    }

    /// Who is in voice, per Redis's snapshot: user id → channel id.
    async fn stored_voice(&self) -> std::collections::BTreeMap<String, String> {
        let voice: std::collections::HashMap<String, String> = self
            .client
            .hgetall(self.key("voice"))
            .await
            .unwrap_or_default();
        voice
            .into_iter()
            .map(|(user, json)| {
                let v: Value = serde_json::from_str(&json).expect("voice record JSON");
                (
                    user,
                    v["channel_id"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    /// Who is in voice, per the simulator (Discord's truth).
    async fn sim_voice(&self) -> std::collections::BTreeMap<String, String> {
        self.sim.state().await["voice_states"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["user_id"].as_str().unwrap().to_owned(),
                    v["channel_id"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    fn key(&self, suffix: &str) -> String {
        format!("{PREFIX}:{{{}}}:{suffix}", self.sim.guild_id())
    }

    /// Every envelope in the stream, in order.
    async fn events(&self) -> Vec<Value> {
        let entries: Vec<(String, std::collections::HashMap<String, String>)> = self
            .client
            .xrange(self.key("events"), "-", "+", None)
            .await
            .unwrap_or_default();
        entries
            .into_iter()
            .map(|(id, fields)| {
                let v: Value = serde_json::from_str(&fields["e"]).expect("envelope JSON");
                assert_eq!(v["id"], id, "the envelope carries its stream id");
                v
            })
            .collect()
    }

    /// The stream's events that pages show, other than gateway.status, as (type, user or
    /// channel) pairs: the permission bookkeeping (`guild.updated`, `channel.access`) has
    /// its own test.
    async fn domain(&self) -> Vec<(String, String)> {
        self.events()
            .await
            .into_iter()
            .filter(|e| e["type"] != "gateway.status" && !internal(&e["type"]))
            .map(|e| {
                let who = e["data"]["user_id"]
                    .as_str()
                    .or(e["data"]["user"]["id"].as_str())
                    .or(e["data"]["channel_id"].as_str())
                    .unwrap_or_default()
                    .to_owned();
                (e["type"].as_str().unwrap_or_default().to_owned(), who)
            })
            .collect()
    }

    /// The permission bookkeeping, as (type, channel) pairs.
    async fn access(&self) -> Vec<(String, String)> {
        self.events()
            .await
            .into_iter()
            .filter(|e| internal(&e["type"]) || e["type"] == "room.created")
            .map(|e| {
                (
                    e["type"].as_str().unwrap_or_default().to_owned(),
                    e["data"]["channel_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )
            })
            .collect()
    }

    async fn wait_for_events(&self, n: usize) -> Vec<(String, String)> {
        wait_for(&format!("{n} domain events in the stream"), || async {
            let d = self.domain().await;
            (d.len() >= n).then_some(d)
        })
        .await
    }

    async fn wait_connected(&self) {
        wait_for("the shard's status CONNECTED", || async {
            let status: Option<String> = self
                .client
                .get(format!("{PREFIX}:shard:{{0}}:status"))
                .await
                .ok()
                .flatten();
            status.filter(|s| s.contains("CONNECTED")).map(|_| ())
        })
        .await;
    }

    async fn new_room(&self, name: &str) -> u64 {
        let (status, room) = self
            .sim
            .control(
                "/channels",
                json!({"name": name, "parent_id": self.category.to_string(), "user_limit": 4}),
            )
            .await;
        assert_eq!(status, 201, "{room}");
        room["id"].as_str().unwrap().parse().unwrap()
    }

    async fn voice(&self, user: u64, channel: Option<u64>, mute: bool) {
        let (status, body) = self
            .sim
            .control("/voice", json!({"user_id": user.to_string(), "channel_id": channel.map(|c| c.to_string()), "self_mute": mute}))
            .await;
        assert_eq!(status, 200, "{body}");
    }
}

fn pairs<S: AsRef<str>>(list: &[(S, u64)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(t, id)| (t.as_ref().to_owned(), id.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voice_and_room_changes_become_exactly_the_specified_events() {
    let s = Setup::start().await;
    let _gw = s.gateway(&s.sim.token());
    s.wait_connected().await;

    let room = s.new_room("Table").await;
    let lobby = s.sim.id_of("lobby_id").await;
    let ash = s.sim.user("ash").await;
    s.voice(ash, Some(room), false).await; // join
    s.voice(ash, Some(room), true).await; // flag change
    s.voice(ash, Some(lobby), true).await; // move
    s.voice(ash, None, true).await; // leave
    let res = s
        .sim
        .http
        .delete(s.sim.url(&format!("/_sim/channels/{room}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let want = pairs(&[
        ("room.created", room),
        ("voice.joined", ash),
        ("voice.updated", ash),
        ("voice.left", ash),
        ("voice.joined", ash),
        ("voice.left", ash),
        ("room.deleted", room),
    ]);
    let got = s.wait_for_events(want.len()).await;
    assert_eq!(got, want);
    // Who may see what is recorded first (the guild's roles, every voice channel's
    // overwrites), a room's overwrites before the room, and forgotten after it. The
    // forgetting is appended after `room.deleted` (the same dispatch's next event): wait
    // for it rather than read between the two.
    let text = room.to_string();
    let access = crate::harness::wait_for("the room's overwrites forgotten", || async {
        let access = s.access().await;
        let forgets = access
            .iter()
            .filter(|a| a.0 == "channel.access" && a.1 == text)
            .count();
        (forgets >= 2).then_some(access)
    })
    .await;
    assert_eq!(
        access.first().map(|a| a.0.as_str()),
        Some("guild.updated"),
        "{access:?}"
    );
    assert!(
        access.contains(&("channel.access".to_owned(), lobby.to_string())),
        "{access:?}"
    );
    let at = |kind: &str| {
        access
            .iter()
            .position(|a| a.0 == kind && a.1 == text)
            .unwrap_or_else(|| panic!("{kind} of the room in {access:?}"))
    };
    assert!(at("channel.access") < at("room.created"), "{access:?}");
    let forgotten = access
        .iter()
        .rposition(|a| a.0 == "channel.access" && a.1 == text);
    assert!(forgotten > Some(at("room.created")), "{access:?}");
    let stored: std::collections::HashMap<String, String> =
        s.client.hgetall(s.key("channels")).await.unwrap();
    assert!(
        stored.contains_key(&lobby.to_string()) && !stored.contains_key(&text),
        "{stored:?}"
    );
    let guild_record: Option<String> = s.client.get(s.key("guild")).await.unwrap();
    let guild_record: Value = serde_json::from_str(&guild_record.unwrap()).unwrap();
    assert_eq!(guild_record["name"], "Coven Playgroup", "{guild_record}");
    assert!(
        guild_record["roles"]
            .as_array()
            .is_some_and(|r| r.len() >= 2),
        "{guild_record}"
    );

    // The snapshot says what the sim says: nobody in voice, no rooms, valid at the last id.
    let rooms: std::collections::HashMap<String, String> =
        s.client.hgetall(s.key("rooms")).await.unwrap();
    let voice: std::collections::HashMap<String, String> =
        s.client.hgetall(s.key("voice")).await.unwrap();
    assert!(rooms.is_empty() && voice.is_empty(), "{rooms:?} {voice:?}");
    let applied: String = s.client.get(s.key("applied")).await.unwrap();
    let last = s.events().await.last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(applied, last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_a_killed_gateway_and_resumes_without_losing_an_event() {
    let s = Setup::start().await;
    let first = s.gateway(&s.sim.token());
    s.wait_connected().await;
    let _standby = s.gateway(&s.sim.token());
    let room = s.new_room("Table").await;
    let bramble = s.sim.user("bramble").await;
    s.voice(bramble, Some(room), false).await;
    s.wait_for_events(2).await;

    first.signal("KILL");
    let killed = Instant::now();
    // Changes while nobody holds the session: Discord keeps them for the resume.
    let cinder = s.sim.user("cinder").await;
    s.voice(cinder, Some(room), false).await;
    s.voice(bramble, Some(room), true).await;
    s.voice(bramble, None, true).await;

    let want = pairs(&[
        ("room.created", room),
        ("voice.joined", bramble),
        ("voice.joined", cinder),
        ("voice.updated", bramble),
        ("voice.left", bramble),
    ]);
    let got = s.wait_for_events(want.len()).await;
    let took = killed.elapsed();
    assert_eq!(got, want, "every change exactly once, in order");
    assert!(
        took < Duration::from_secs(2 + 2),
        "standby active after {took:?}"
    );
    assert_eq!(
        s.sim.gateway_counter("identifies").await,
        1,
        "the standby resumed instead of identifying"
    );
    assert!(s.sim.gateway_counter("resumes").await >= 1);
}

/// kill -9 of the active gateway: the standby is active within the lease TTL + 1 s (it
/// wakes when the lease it saw runs out) and nothing is lost.
async fn takeover_within_the_ttl(ttl: u64) {
    let s = Setup::start().await;
    let ttl_text = format!("{ttl}s");
    let env = [("GATEWAY_LEASE_TTL", ttl_text.as_str())];
    let first = s.gateway_with(&s.sim.token(), &env);
    s.wait_connected().await;
    let mut standby = s.gateway_with(&s.sim.token(), &env);
    let standby_url = standby.listening_url();
    let room = s.new_room("Table").await;
    s.wait_for_events(1).await;

    first.signal("KILL");
    let killed = Instant::now();
    let bramble = s.sim.user("bramble").await;
    s.voice(bramble, Some(room), false).await;
    wait_for("the standby to become active", || {
        let url = standby_url.clone();
        async move {
            let body: Value = reqwest::get(format!("{url}/healthz"))
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (body["role"] == "active").then_some(())
        }
    })
    .await;
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(ttl + 1),
        "standby active {took:?} after the kill, with a {ttl} s lease"
    );
    let got = s.wait_for_events(2).await;
    assert_eq!(
        got,
        pairs(&[("room.created", room), ("voice.joined", bramble)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_within_a_3s_lease_of_a_kill() {
    takeover_within_the_ttl(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_within_a_10s_lease_of_a_kill() {
    takeover_within_the_ttl(10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discord_disruptions_are_recovered_without_losing_an_event() {
    let s = Setup::start().await;
    let _gw = s.gateway(&s.sim.token());
    s.wait_connected().await;
    let room = s.new_room("Table").await;
    let mut want = vec![("room.created", room)];
    s.wait_for_events(want.len()).await;
    let disruptions = [
        ("/gateway/reconnect", json!({})),
        ("/gateway/invalidate", json!({"resumable": true})),
        ("/gateway/invalidate", json!({"resumable": false})),
        ("/gateway/zombie", json!({})),
        ("/gateway/disconnect", json!({"code": 4000})),
        ("/gateway/disconnect", json!({"code": 4009})),
    ];
    let people = ["ash", "bramble", "cinder", "dusk", "ember", "fable"];
    let lobby = s.sim.id_of("lobby_id").await;
    for ((path, body), name) in disruptions.into_iter().zip(people) {
        let (status, answer) = s.sim.control(path, body).await;
        assert_eq!(status, 200, "{path}: {answer}");
        // A change right behind the disruption, while the gateway recovers.
        let user = s.sim.user(name).await;
        s.voice(user, Some(lobby), false).await;
        want.push(("voice.joined", user));
        let got = s.wait_for_events(want.len()).await;
        assert_eq!(got, pairs(&want), "after {path}");
    }
    // Nothing arrives twice later either (a slow duplicate would show up here).
    let ash = s.sim.user("ash").await;
    s.voice(ash, Some(room), false).await;
    want.push(("voice.left", ash));
    want.push(("voice.joined", ash));
    assert_eq!(s.wait_for_events(want.len()).await, pairs(&want));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_while_events_flow_loses_and_reorders_nothing() {
    let mut s = Setup::start_with(RedisServer::start_persistent()).await;
    let _gw = s.gateway(&s.sim.token());
    s.wait_connected().await;
    let room = s.new_room("Table").await;
    let (ash, bramble, cinder) = (
        s.sim.user("ash").await,
        s.sim.user("bramble").await,
        s.sim.user("cinder").await,
    );
    s.voice(ash, Some(room), false).await;
    s.wait_for_events(2).await;

    tokio::task::block_in_place(|| s.redis.stop());
    // Discord keeps talking while Redis is away.
    s.voice(bramble, Some(room), false).await;
    s.voice(ash, Some(room), true).await;
    tokio::task::block_in_place(|| s.redis.start_again());
    s.voice(cinder, Some(room), false).await;

    let want = pairs(&[
        ("room.created", room),
        ("voice.joined", ash),
        ("voice.joined", bramble),
        ("voice.updated", ash),
        ("voice.joined", cinder),
    ]);
    assert_eq!(s.wait_for_events(want.len()).await, want);
    assert_eq!(
        s.sim.gateway_counter("identifies").await,
        1,
        "the Discord session survived the outage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflowing_outage_queue_is_reconciled_so_redis_ends_up_right() {
    let mut s = Setup::start_with(RedisServer::start_persistent()).await;
    let mut gw = s.gateway_with(&s.sim.token(), &[("GATEWAY_QUEUE_SIZE", "2")]);
    s.wait_connected().await;
    let room = s.new_room("Table").await;
    s.wait_for_events(1).await;

    tokio::task::block_in_place(|| s.redis.stop());
    let lobby = s.sim.id_of("lobby_id").await;
    for name in ["ash", "bramble", "cinder", "dusk"] {
        s.voice(s.sim.user(name).await, Some(room), false).await;
    }
    s.voice(s.sim.user("ash").await, Some(lobby), true).await;
    s.voice(s.sim.user("ember").await, Some(room), false).await;
    tokio::task::block_in_place(|| s.redis.start_again());

    let truth = s.sim_voice().await;
    assert_eq!(truth.len(), 5);
    wait_for("Redis's snapshot to match Discord", || async {
        (s.stored_voice().await == truth).then_some(())
    })
    .await;
    gw.signal("TERM");
    assert_eq!(gw.wait_exit(), Some(0));
    let log = gw.stderr().join("\n");
    assert!(
        log.contains("outage queue is full"),
        "the overflow is logged"
    );
    assert!(
        log.contains("reconciling Redis after the outage queue overflowed"),
        "the reconcile is logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_tell_active_from_standby() {
    let s = Setup::start().await;
    let mut active = s.gateway(&s.sim.token());
    let active_url = active.listening_url();
    s.wait_connected().await;
    let mut standby = s.gateway(&s.sim.token());
    let standby_url = standby.listening_url();

    let health = |url: String| async move {
        let res = reqwest::get(format!("{url}/healthz")).await.unwrap();
        (res.status().as_u16(), res.json::<Value>().await.unwrap())
    };
    let (status, body) = health(active_url.clone()).await;
    assert_eq!(
        (status, body["role"].as_str(), body["state"].as_str()),
        (200, Some("active"), Some("CONNECTED")),
        "{body}"
    );
    assert_eq!(body["status"], "ok");
    assert!(body["timestamp"].is_string());
    let (status, body) = health(standby_url.clone()).await;
    assert_eq!(
        (status, body["role"].as_str()),
        (200, Some("standby")),
        "{body}"
    );

    s.new_room("Metered").await;
    s.wait_for_events(1).await;
    // Metrics live on METRICS_BIND only, latencies as histograms.
    let public = reqwest::get(format!("{active_url}/metrics")).await.unwrap();
    assert_eq!(public.status(), 404, "no metrics beside health");
    let metrics_url = active.metrics_url();
    assert_ne!(
        metrics_url,
        format!("{active_url}/metrics"),
        "a listener of its own"
    );
    let metrics = metrics_page(&metrics_url).await;
    assert!(
        metrics.contains(r#"coven_gateway_events_total{type="room.created"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"coven_gateway_append_seconds_bucket{le="0.005"}"#)
            && metrics.contains(r#"coven_gateway_append_seconds_bucket{le="+Inf"}"#),
        "{metrics}"
    );
    assert!(
        !metrics.contains("quantile="),
        "histograms, not summaries: {metrics}"
    );

    // A clean stop hands over at once: the standby becomes active and healthy.
    active.signal("TERM");
    assert_eq!(active.wait_exit(), Some(0));
    wait_for("the standby to take over", || {
        let url = standby_url.clone();
        async move {
            let (status, body) = health(url).await;
            (status == 200 && body["role"] == "active" && body["state"] == "CONNECTED")
                .then_some(())
        }
    })
    .await;
    assert_eq!(
        s.sim.gateway_counter("identifies").await,
        1,
        "the standby resumed the session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_failed_with_one_clear_line_and_exit_2() {
    let s = Setup::start().await;
    // Before any shard count is decided: Discord's recommendation is refused.
    let mut gw = s.gateway("not-the-token");
    assert_eq!(gw.wait_exit(), Some(2));
    let errors: Vec<String> = gw
        .stderr()
        .into_iter()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("DISCORD_BOT_TOKEN"), "{errors:?}");
    // With the count decided, a shard is held and told FAILED: the identify queue asks
    // Discord how many session starts are left, and is refused, before any IDENTIFY.
    let mut gw = s.gateway_with("not-the-token", &[("SHARD_COUNT", "1")]);
    assert_eq!(gw.wait_exit(), Some(2));
    let errors: Vec<String> = gw
        .stderr()
        .into_iter()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("DISCORD_BOT_TOKEN") && errors[0].contains("401"),
        "{errors:?}"
    );
    let statuses: Vec<Value> = s
        .events()
        .await
        .into_iter()
        .filter(|e| e["type"] == "gateway.status")
        .collect();
    assert_eq!(statuses.last().unwrap()["data"]["state"], "FAILED");
    assert_eq!(
        s.sim.gateway_counter("identifies").await,
        0,
        "no retry storm"
    );
    assert!(s.sim.gateway_counter("connections").await <= 1);
}

/// The run loop in-process over the memory bus (the demo's configuration): the same
/// events, and a clean stop that stores the session and releases the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_loop_over_the_memory_bus_stores_its_session_and_releases_the_lease() {
    use std::sync::Arc;

    use coven::bus::memory::MemoryDeployment;
    use coven::bus::{Bus, Deployment, Since};
    use coven::gateway::health::Health;
    use coven::gateway::run::{Outcome, run};
    use coven::gateway::shard::ShardOf;
    let shard = ShardOf { id: 0, count: 1 };
    use tokio_util::sync::CancellationToken;
    use twilight_model::id::Id;

    let sim = TestSim::start().await;
    let category = sim.id_of("room_category_id").await;
    let deployment = Arc::new(MemoryDeployment::new(1000));
    let bus = deployment.bus(Id::new(sim.guild_id()));
    let backend: Arc<dyn Deployment> = deployment.clone();
    let settings = coven::gateway::Settings {
        redis_url: None,
        guild_ids: vec![Id::new(sim.guild_id())],
        bot_token: secrecy::SecretString::from(sim.token()),
        tuning: coven::gateway::Tuning {
            gateway_url: url::Url::parse(&sim.gateway_url()).unwrap(),
            api_url: url::Url::parse(&sim.url("/api")).unwrap(),
            room_categories: vec![Id::new(category)],
            lease_ttl: Duration::from_secs(2),
            event_log_max_len: 1000,
            queue_size: 100,
            ..coven::gateway::Tuning::default()
        },
    };
    let shutdown = CancellationToken::new();
    let health = Health::default();
    let task = tokio::spawn(run(settings, backend, health.clone(), shutdown.clone()));

    wait_for("CONNECTED", || async {
        (health.report().1["state"] == "CONNECTED").then_some(())
    })
    .await;
    let (status, room) = sim
        .control(
            "/channels",
            json!({"name": "Table", "parent_id": category.to_string()}),
        )
        .await;
    assert_eq!(status, 201);
    let room: u64 = room["id"].as_str().unwrap().parse().unwrap();
    let gale = sim.user("gale").await;
    sim.join(gale, room).await;
    let kinds = wait_for("room.created and voice.joined", || async {
        let Ok(Since::Events(events)) = bus.since(coven::event::EventId::ZERO, 100).await else {
            return None;
        };
        let kinds: Vec<String> = events
            .iter()
            .map(|e| e.kind().as_str().to_owned())
            .filter(|k| k != "gateway.status" && !internal(&json!(k)))
            .collect();
        (kinds.len() >= 2).then_some(kinds)
    })
    .await;
    assert_eq!(kinds, ["room.created", "voice.joined"]);

    shutdown.cancel();
    let outcome = crate::harness::within("the gateway to stop", task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome, Outcome::Stopped);
    let stored = deployment
        .get(&shard.session_key())
        .await
        .unwrap()
        .expect("a stored session");
    assert!(stored.contains("session_id"));
    assert!(
        deployment
            .acquire(&shard.lease(), "next", Duration::from_secs(1))
            .await
            .unwrap()
            .is_some(),
        "the lease was released for a standby"
    );
}

/// Events that steer Coven (permissions, members, logins) rather than show a change.
fn internal(kind: &Value) -> bool {
    matches!(
        kind.as_str(),
        Some(
            "guild.updated"
                | "channel.access"
                | "member.updated"
                | "member.removed"
                | "session.ended"
        )
    )
}

const NIGHT_OWLS: u64 = coven::sim::defaults::NIGHT_OWLS_GUILD_ID;
const DICE_TOWER: u64 = coven::sim::defaults::DICE_TOWER_GUILD_ID;

fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

/// Unset `DISCORD_GUILD_ID`: every guild the bot is in, each into its own log, each
/// registered as Discord describes it, and a live change goes to its guild's log only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_guild_of_the_session_is_registered_and_logged_apart() {
    let s = Setup::start().await;
    let first = s.sim.guild_id();
    let _gw = s.gateway_of_every_guild();
    s.wait_connected().await;
    let registry = s
        .wait_registry("both guilds of the bot registered", |r| {
            r.contains_key(&first) && r.contains_key(&NIGHT_OWLS)
        })
        .await;
    assert_eq!(registry[&first]["name"], "Coven Playgroup");
    assert_eq!(registry[&NIGHT_OWLS]["name"], "Night Owls");
    for entry in registry.values() {
        assert_eq!(
            (entry["available"].as_bool(), entry["shard"].as_u64()),
            (Some(true), Some(0)),
            "{entry}"
        );
    }
    assert!(
        !registry.contains_key(&DICE_TOWER),
        "the bot is not in Dice Tower"
    );

    for (guild, name) in [(first, "Coven Playgroup"), (NIGHT_OWLS, "Night Owls")] {
        let events = s
            .wait_events_of(guild, "the guild described in its own log", |e| {
                !of_type(e, "guild.updated").is_empty() && !of_type(e, "room.created").is_empty()
            })
            .await;
        assert_eq!(of_type(&events, "guild.updated")[0]["data"]["name"], name);
        assert!(
            events
                .iter()
                .all(|e| e["guild_id"].as_str() == Some(guild.to_string().as_str())),
            "only guild {guild}'s events in its log: {events:?}"
        );
    }

    // A channel made in Night Owls (by the bot, over REST) is a room there only.
    let domain_of = |events: Vec<Value>| -> usize {
        events
            .iter()
            .filter(|e| e["type"] != "gateway.status")
            .count()
    };
    let before = domain_of(s.events_of(first).await);
    let res = s
        .sim
        .http
        .post(s.sim.url(&format!("/api/v10/guilds/{NIGHT_OWLS}/channels")))
        .header("authorization", format!("Bot {}", s.sim.token()))
        .json(&json!({"name": "Owl Den", "type": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let den: Value = res.json().await.unwrap();
    let den = den["id"].as_str().unwrap().to_owned();
    s.wait_events_of(NIGHT_OWLS, "Owl Den in Night Owls' log", |e| {
        e.iter()
            .any(|e| e["type"] == "room.created" && e["data"]["channel_id"] == den)
    })
    .await;
    let first_events = s.events_of(first).await;
    assert!(
        first_events
            .iter()
            .all(|e| e["data"]["channel_id"] != den.as_str()),
        "nothing of Night Owls in the first guild's log"
    );
    assert_eq!(
        domain_of(first_events),
        before,
        "the first guild's log did not move"
    );
}

/// The bot added to a guild while running (Discord's bot authorization) is registered
/// and served without a restart; removed, it is unregistered, its log ends with
/// `guild.removed` and its data expires; an outage marks a guild unavailable and back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guilds_come_and_go_as_discord_says_without_a_restart() {
    let s = Setup::start().await;
    let mut gw = s.gateway_of_every_guild();
    let health_url = gw.listening_url();
    s.wait_connected().await;
    s.wait_registry("the bot's guilds registered", |r| r.len() == 2)
        .await;
    let ember = s.sim.user("ember").await;
    let res = s
        .sim
        .http
        .get(s.sim.url("/oauth2/authorize"))
        .query(&[
            ("client_id", s.sim.sim.shared.settings.client_id.to_string()),
            ("scope", "bot".to_owned()),
            (
                "permissions",
                ((1u64 << 4) | (1 << 10) | (1 << 20)).to_string(),
            ),
            ("guild_id", DICE_TOWER.to_string()),
            ("sim_user", ember.to_string()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let registry = s
        .wait_registry("Dice Tower registered", |r| r.contains_key(&DICE_TOWER))
        .await;
    assert_eq!(registry[&DICE_TOWER]["name"], "Dice Tower");
    assert_eq!(registry[&DICE_TOWER]["available"], true);
    s.wait_events_of(DICE_TOWER, "Dice Tower described in its log", |e| {
        of_type(e, "guild.updated")
            .iter()
            .any(|g| g["data"]["name"] == "Dice Tower")
            && !of_type(e, "room.created").is_empty()
    })
    .await;
    let health: Value = reqwest::get(format!("{health_url}/healthz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (health["role"].as_str(), health["guilds"].as_u64()),
        (Some("active"), Some(3)),
        "{health}"
    );

    // Removed: unregistered, marked in its log, its data expiring.
    let res = s
        .sim
        .http
        .delete(s.sim.url(&format!("/_sim/guilds/{DICE_TOWER}/bot")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16() / 100, 2);
    s.wait_registry("Dice Tower unregistered", |r| !r.contains_key(&DICE_TOWER))
        .await;
    let events = s
        .wait_events_of(DICE_TOWER, "guild.removed in Dice Tower's log", |e| {
            e.last().is_some_and(|e| e["type"] == "guild.removed")
        })
        .await;
    assert_eq!(of_type(&events, "guild.removed").len(), 1);
    // The expiry is set after the guild is unregistered (the event, the registry, then
    // the expiry): wait for it rather than read between the two.
    let grace = 24 * 3600 * 1000;
    let ttl = wait_for("Dice Tower's log to expire", || async {
        let ttl: i64 = s
            .client
            .pttl(format!("{PREFIX}:{{{DICE_TOWER}}}:events"))
            .await
            .unwrap();
        (ttl >= 0).then_some(ttl)
    })
    .await;
    assert!(
        ttl > grace - 60_000 && ttl <= grace,
        "expires after the grace period: {ttl} ms"
    );

    // An outage: kept, unavailable; back: available.
    let outage = |down: bool| {
        s.sim
            .http
            .post(s.sim.url(&format!("/_sim/guilds/{NIGHT_OWLS}/outage")))
            .json(&json!({"unavailable": down}))
            .send()
    };
    assert!(outage(true).await.unwrap().status().is_success());
    s.wait_registry("Night Owls unavailable", |r| {
        r.get(&NIGHT_OWLS).is_some_and(|e| e["available"] == false)
    })
    .await;
    assert!(outage(false).await.unwrap().status().is_success());
    let registry = s
        .wait_registry("Night Owls available again", |r| {
            r.get(&NIGHT_OWLS).is_some_and(|e| e["available"] == true)
        })
        .await;
    assert_eq!(registry[&NIGHT_OWLS]["name"], "Night Owls");
    assert!(
        of_type(&s.events_of(NIGHT_OWLS).await, "guild.removed").is_empty(),
        "an outage removes nothing"
    );
}

/// Two listed guilds (the category, the first guild's, keeps Night Owls roomless).
fn two_guilds(s: &Setup) -> String {
    format!("{},{NIGHT_OWLS}", s.sim.guild_id())
}

async fn role_of(url: &str) -> Option<String> {
    let body: Value = reqwest::get(format!("{url}/healthz"))
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    body["role"].as_str().map(str::to_owned)
}

/// A standby taking over raises every guild's epoch to its lease's, then RESUMEs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_raises_every_guild_s_epoch_and_resumes() {
    let s = Setup::start().await;
    let guilds = two_guilds(&s);
    let env = [("DISCORD_GUILD_ID", guilds.as_str())];
    let first = s.gateway_with(&s.sim.token(), &env);
    s.wait_connected().await;
    s.wait_registry("the listed guilds registered", |r| r.len() == 2)
        .await;
    let old_epoch = s.lease_epoch().await.expect("a lease");
    let _standby = s.gateway_with(&s.sim.token(), &env);
    let room = s.new_room("Table").await;
    s.wait_for_events(1).await;

    first.signal("KILL");
    let bramble = s.sim.user("bramble").await;
    s.voice(bramble, Some(room), false).await;
    let want = pairs(&[("room.created", room), ("voice.joined", bramble)]);
    assert_eq!(s.wait_for_events(want.len()).await, want);
    let new_epoch = s.lease_epoch().await.expect("the new lease");
    assert!(new_epoch > old_epoch);
    for guild in [s.sim.guild_id(), NIGHT_OWLS] {
        assert_eq!(
            s.guild_epoch(guild).await,
            Some(new_epoch),
            "guild {guild}'s epoch raised to the new holder's"
        );
    }
    assert_eq!(
        s.sim.gateway_counter("identifies").await,
        1,
        "the standby resumed instead of identifying"
    );
    assert!(s.sim.gateway_counter("resumes").await >= 1);
}

/// The old holder paused (SIGSTOP) through a takeover writes nothing when it wakes: it
/// finds its epoch below every guild's and stands by. (Paused past Discord's heartbeat,
/// its session may be gone: the standby then IDENTIFYs and reconciles, so the changes are
/// each there once, in the order a reconcile gives.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_old_holder_writes_nothing_after_a_takeover() {
    let s = Setup::start().await;
    let guilds = two_guilds(&s);
    let env = [("DISCORD_GUILD_ID", guilds.as_str())];
    let mut first = s.gateway_with(&s.sim.token(), &env);
    let first_url = first.listening_url();
    s.wait_connected().await;
    let mut standby = s.gateway_with(&s.sim.token(), &env);
    let standby_url = standby.listening_url();
    let room = s.new_room("Table").await;
    let bramble = s.sim.user("bramble").await;
    s.voice(bramble, Some(room), false).await;
    s.wait_for_events(2).await;

    first.signal("STOP");
    let appended = |p: &CovenProcess| {
        p.stderr()
            .iter()
            .filter(|l| l.contains("appended id="))
            .count()
    };
    wait_for("the standby to take over", || async {
        (role_of(&standby_url).await.as_deref() == Some("active")).then_some(())
    })
    .await;
    let cinder = s.sim.user("cinder").await;
    s.voice(cinder, Some(room), false).await;
    s.voice(bramble, None, false).await;
    let mut want = pairs(&[
        ("room.created", room),
        ("voice.joined", bramble),
        ("voice.joined", cinder),
        ("voice.left", bramble),
    ]);
    s.wait_for_events(want.len()).await;
    let paused_at = appended(&first);

    first.signal("CONT");
    wait_for("the old holder to stand by", || async {
        (role_of(&first_url).await.as_deref() == Some("standby")).then_some(())
    })
    .await;
    s.voice(cinder, None, false).await;
    want.push(("voice.left".to_owned(), cinder.to_string()));
    let mut got = s.wait_for_events(want.len()).await;
    let late: Vec<String> = first
        .stderr()
        .into_iter()
        .filter(|l| l.contains("appended id="))
        .skip(paused_at)
        .collect();
    assert!(
        late.is_empty(),
        "the old holder appended nothing after waking: {late:?}"
    );
    got.sort();
    want.sort();
    assert_eq!(got, want, "every change exactly once");
    assert_eq!(s.stored_voice().await, s.sim_voice().await);
    drop(standby);
}

/// Upgrading from one guild: a live one-guild lease stops the new gateway with one line;
/// once it is gone, the new gateway resumes the session the old one stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_guild_gateway_s_lease_is_refused_and_its_session_taken_over() {
    let s = Setup::start().await;
    // A session to take over: one a gateway stored, moved to where one guild's gateway
    // kept it.
    let mut gw = s.gateway(&s.sim.token());
    s.wait_connected().await;
    let room = s.new_room("Before").await;
    s.wait_for_events(1).await;
    gw.signal("KILL");
    gw.wait_exit();
    let session_key = format!("{PREFIX}:shard:{{0}}:session");
    let session: String = s.client.get(&session_key).await.unwrap();
    let _: i64 = s.client.del(&session_key).await.unwrap();
    let _: i64 = s
        .client
        .del(format!("{PREFIX}:shard:{{0}}:lease"))
        .await
        .unwrap();
    let _: () = s
        .client
        .set(
            s.key("gateway:session"),
            session.as_str(),
            None,
            None,
            false,
        )
        .await
        .unwrap();
    let _: () = s
        .client
        .set(
            s.key("gateway:leader"),
            "7:old-gateway",
            Some(Expiration::PX(60_000)),
            None,
            false,
        )
        .await
        .unwrap();

    let mut refused = s.gateway(&s.sim.token());
    assert_eq!(refused.wait_exit(), Some(1));
    let errors: Vec<String> = refused
        .stderr()
        .into_iter()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("gateway:leader") && errors[0].contains("docs/operations.md"),
        "{errors:?}"
    );

    // Also with nothing to go on: no DISCORD_GUILD_ID and an empty registry (the old
    // lease is found in the keyspace).
    let _: i64 = s.client.del(format!("{PREFIX}:guilds")).await.unwrap();
    let mut refused = s.gateway_of_every_guild();
    assert_eq!(
        refused.wait_exit(),
        Some(1),
        "refused beside the old gateway"
    );

    let _: i64 = s.client.del(s.key("gateway:leader")).await.unwrap();
    let _gw = s.gateway(&s.sim.token());
    s.wait_connected().await;
    let bramble = s.sim.user("bramble").await;
    s.voice(bramble, Some(room), false).await;
    assert_eq!(
        s.wait_for_events(2).await,
        pairs(&[("room.created", room), ("voice.joined", bramble)])
    );
    assert_eq!(
        s.sim.gateway_counter("identifies").await,
        1,
        "the old session was resumed"
    );
}
