//! High availability: appends that wait for a replica (`REDIS_MIN_REPLICAS`), and the whole
//! stack on a Sentinel URL over TLS riding out failovers longer than five seconds.
//! Redis is real `redis-server` processes (primary, replicas, three sentinels); nothing
//! here sleeps to synchronise: every wait is on a condition with a deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use coven::bus::redis::{Durability, RedisBus};
use coven::bus::{Bus, BusError, Request, Since};
use coven::event::{EventData, EventId};
use fred::prelude::*;
use serde_json::{Value, json};
use twilight_model::id::Id;

use crate::harness::sentinel::{Sentinels, plain_node};
use crate::harness::{
    Browser, CovenProcess, Sse, TestSim, Web, spawn_gateway_on, spawn_web, wait_for, within,
};
use crate::harness::{GUILD, g};

fn ping(seq: u64) -> EventData {
    EventData::Ping { seq, ts: seq }
}

async fn client(url: &str) -> Client {
    let client = Client::new(Config::from_url(url).expect("URL"), None, None, None);
    client.init().await.expect("Redis answers");
    client
}

/// Retries the same request while it falls short of its replicas, as the gateway does.
async fn until_durable(
    what: &str,
    writer: &RedisBus,
    data: EventData,
    request: &Request,
) -> std::sync::Arc<coven::event::Event> {
    within(what, async {
        loop {
            match writer.append_once(data.clone(), None, request).await {
                Ok(event) => return event,
                Err(BusError::NotDurable { .. } | BusError::Unproven) => continue,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
}

/// A plain-text primary and a replica of it, in `dir`, once the replica has linked; the
/// primary's URL.
async fn linked_pair(
    dir: &std::path::Path,
) -> (
    crate::harness::sentinel::Node,
    crate::harness::sentinel::Node,
    String,
) {
    let primary = plain_node(dir, "primary", None);
    let replica = plain_node(dir, "replica", Some(primary.port));
    let replica_client = client(&format!("redis://127.0.0.1:{}", replica.port)).await;
    crate::harness::wait_for("the replica to link", || linked(&replica_client)).await;
    let url = format!("redis://127.0.0.1:{}", primary.port);
    (primary, replica, url)
}

/// Whether the replica at `url` is linked to its primary.
async fn linked(replica: &Client) -> Option<()> {
    let info: String = replica
        .info(Some(fred::types::InfoKind::Replication))
        .await
        .ok()?;
    info.contains("master_link_status:up").then_some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_is_done_published_and_replayed_only_once_a_replica_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_primary, replica, url) = linked_pair(dir.path()).await;
    let durability = Durability {
        min_replicas: 1,
        timeout: Duration::from_millis(300),
    };
    let connect = || {
        RedisBus::connect_durable(
            &url,
            "test",
            Id::new(GUILD),
            1_000,
            Duration::from_secs(5),
            durability,
        )
    };
    let writer = connect().await.unwrap();
    let reader = connect().await.unwrap();
    let raw = client(&url).await;
    let events = format!("test:{{{GUILD}}}:events");
    let mut live = reader.subscribe().await.unwrap();
    let request = |seq| Request {
        writer: "test-writer".to_owned(),
        seq,
        part: 0,
    };

    // A healthy replica can still miss one 300 ms WAIT on a loaded machine: the same
    // request is retried until it is durable, as the gateway does.
    let first = until_durable("the first append", &writer, ping(1), &request(1)).await;
    let heard = within("the first event live", live.recv()).await.unwrap();
    assert_eq!(heard.id, first.id, "a durable append is published");

    // The replica stops acknowledging: the append is in the primary's log but not done.
    replica.freeze();
    let short = writer.append_once(ping(2), None, &request(2)).await;
    assert!(
        matches!(
            short,
            Err(BusError::NotDurable {
                acked: 0,
                wanted: 1
            })
        ),
        "{short:?}"
    );
    let len: u64 = raw.xlen(&events).await.unwrap();
    assert_eq!(len, 2, "the primary holds the withheld event");
    assert_eq!(
        reader.since(first.id, 100).await.unwrap(),
        Since::Events(Vec::new()),
        "replay stops at the durable id"
    );
    assert!(
        matches!(reader.snapshot().await, Err(BusError::NotDurable { .. })),
        "a snapshot valid at a withheld event is not handed out"
    );
    assert!(
        matches!(
            live.try_recv(),
            Err(tokio::sync::broadcast::error::TryRecvError::Empty)
        ),
        "nothing withheld was published"
    );
    let again = writer.append_once(ping(2), None, &request(2)).await;
    assert!(
        matches!(again, Err(BusError::NotDurable { .. })),
        "{again:?}"
    );
    let len: u64 = raw.xlen(&events).await.unwrap();
    assert_eq!(len, 2, "a retried request appends nothing twice");

    replica.thaw();
    let second = until_durable("the retried append", &writer, ping(2), &request(2)).await;
    let len: u64 = raw.xlen(&events).await.unwrap();
    assert_eq!(len, 2, "the retry that succeeded appended nothing either");
    let heard = within("the second event live", live.recv()).await.unwrap();
    assert_eq!(heard.id, second.id, "published once durable");
    assert!(second.id > first.id);
    match reader.since(first.id, 100).await.unwrap() {
        Since::Events(events) => {
            assert_eq!(
                events.iter().map(|e| e.id).collect::<Vec<EventId>>(),
                [second.id]
            );
        }
        Since::Gap => panic!("no gap"),
    }
    assert_eq!(reader.snapshot().await.unwrap().at, second.id);

    // An unnamed append (a web replica's) is withheld the same way, and published by the
    // next append that is durable, in id order.
    replica.freeze();
    let withheld = writer.append(ping(3), None).await;
    assert!(
        matches!(withheld, Err(BusError::NotDurable { .. })),
        "{withheld:?}"
    );
    replica.thaw();
    let fourth = until_durable("an append after the thaw", &writer, ping(4), &request(4)).await;
    let third = within("the withheld event live", live.recv())
        .await
        .unwrap();
    assert!(
        matches!(third.data, EventData::Ping { seq: 3, .. }),
        "{third:?}"
    );
    let heard = within("the fourth event live", live.recv()).await.unwrap();
    assert_eq!(heard.id, fourth.id);
}

// ---------------------------------------------------------------------------------------
// The stack on Sentinel over TLS.

/// What one reconnecting stream saw: every event's id, type and envelope, in arrival
/// order, how often it (re)opened, and resyncs (which these tests never expect).
#[derive(Default)]
struct Seen {
    events: Vec<(EventId, String, Value)>,
    opens: usize,
    resyncs: usize,
}

type Shared = Arc<Mutex<Seen>>;

/// A browser's stream on `url` that reconnects from its last id whenever it is cut or
/// refused, as EventSource does, until `stop`.
fn follow(browser: Browser, url: String, from: EventId, stop: Arc<AtomicBool>) -> Shared {
    let seen = Shared::default();
    let out = seen.clone();
    tokio::spawn(async move {
        let mut last = from.to_string();
        while !stop.load(Ordering::Relaxed) {
            let res = browser
                .http
                .get(&url)
                .header("Last-Event-ID", &last)
                .send()
                .await;
            if let Ok(res) = res
                && res.status() == 200
            {
                seen.lock().unwrap().opens += 1;
                let mut sse = Sse::new(res);
                loop {
                    match sse.next_within(Duration::from_millis(200)).await {
                        Ok(Some(msg)) if msg.event == "resync" => seen.lock().unwrap().resyncs += 1,
                        Ok(Some(msg)) => {
                            if let Some(id) = msg.id.as_deref().and_then(|i| i.parse().ok()) {
                                seen.lock().unwrap().events.push((
                                    id,
                                    msg.event.clone(),
                                    msg.json(),
                                ));
                                last = id.to_string();
                            }
                        }
                        Ok(None) => break,
                        Err(()) if stop.load(Ordering::Relaxed) => return,
                        Err(()) => {}
                    }
                }
            }
            // The reconnect delay a browser keeps (shorter than the stream's `retry:`).
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    out
}

/// The log as the current primary holds it: (id, envelope) in id order.
fn log(set: &Sentinels, guild: u64) -> Vec<(EventId, Value)> {
    let port = set.primary_port().expect("a primary");
    let out = set
        .cli(
            port,
            false,
            &["XRANGE", &format!("coven:{{{guild}}}:events"), "-", "+"],
        )
        .unwrap_or_default();
    let lines: Vec<&str> = out.lines().collect();
    lines
        .chunks(3)
        .filter_map(|entry| {
            let id = entry.first()?.parse().ok()?;
            let envelope = serde_json::from_str(entry.get(2)?).ok()?;
            Some((id, envelope))
        })
        .collect()
}

/// `P:{G}:durable` on the node on `port`.
fn durable_on(set: &Sentinels, port: u16, guild: u64) -> Option<EventId> {
    set.cli(port, false, &["GET", &format!("coven:{{{guild}}}:durable")])?
        .parse()
        .ok()
}

/// Pings and voice events: what every stream of a member who sees the lobby gets.
fn followed(kind: &str) -> bool {
    kind == "ping" || kind.starts_with("voice.")
}

async fn ready(web: &Web) -> Option<()> {
    let r = reqwest::get(web.url("/readyz")).await.ok()?;
    (r.status() == 200).then_some(())
}

async fn ready_with_gateway(web: &Web) -> Option<()> {
    let r = reqwest::get(web.url("/readyz")).await.ok()?;
    let body: Value = r.json().await.ok()?;
    (body["gateway"]["fresh"] == true && body["gateway"]["state"] == "CONNECTED").then_some(())
}

/// A change "in Discord": `user` in the lobby with `flags`.
async fn voice(sim: &TestSim, user: u64, lobby: u64, flags: Value) {
    let mut body = json!({"user_id": user.to_string(), "channel_id": lobby.to_string()});
    if let (Some(b), Some(f)) = (body.as_object_mut(), flags.as_object()) {
        b.extend(f.clone());
    }
    let (status, answer) = sim.control("/voice", body).await;
    assert_eq!(status, 200, "voice change refused: {answer}");
}

/// `user`'s `voice.updated` mute flags in `log` after `from`, in order.
fn mutes(log: &[(EventId, Value)], from: EventId, user: u64) -> Vec<bool> {
    let user = user.to_string();
    log.iter()
        .filter(|(id, e)| {
            *id > from && e["type"] == "voice.updated" && e["data"]["user_id"] == user.as_str()
        })
        .map(|(_, e)| e["data"]["self_mute"] == true)
        .collect()
}

/// Waits up to `limit` for `check`, polling; the time it took.
async fn within_for<F, Fut>(what: &str, limit: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

/// Sentinels, a sim, a gateway and `replicas` web replicas on the Sentinel URL with
/// durable appends, and a browser logged in as ash, who sits in the lobby.
struct Ha {
    set: Sentinels,
    sim: TestSim,
    /// Held so the gateway runs as long as the test.
    _gateway: CovenProcess,
    webs: Vec<Web>,
    env: Vec<(String, String)>,
    browser: Browser,
    ash: u64,
    lobby: u64,
    guild: u64,
}

impl Ha {
    async fn start(data_replicas: usize, web_replicas: usize) -> Self {
        // Starting and waiting for the Sentinels blocks (processes, redis-cli).
        let set = tokio::task::block_in_place(|| Sentinels::start(data_replicas));
        let env: Vec<(String, String)> = vec![
            ("SSL_CERT_FILE".into(), set.ca().display().to_string()),
            ("REDIS_MIN_REPLICAS".into(), "1".into()),
            ("REDIS_REPLICA_TIMEOUT".into(), "300ms".into()),
        ];
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let sim = TestSim::start().await;
        let lobby = sim.id_of("lobby_id").await;
        let guild = sim.guild_id();
        let url = set.url();
        let (gateway, _) = spawn_gateway_on(&sim, &url, &pairs);
        let webs: Vec<Web> = (0..web_replicas)
            .map(|_| spawn_web(&sim, &url, None, &pairs))
            .collect();
        for web in &webs {
            wait_for("a replica ready with a connected gateway", || {
                ready_with_gateway(web)
            })
            .await;
        }
        let ash = sim.user("ash").await;
        let browser = Browser::new();
        browser.login(&webs[0], &sim, ash).await;
        voice(&sim, ash, lobby, json!({"self_mute": false})).await;
        let ha = Ha {
            set,
            sim,
            _gateway: gateway,
            webs,
            env,
            browser,
            ash,
            lobby,
            guild,
        };
        wait_for("ash's join to be durable", || async {
            let log = log(&ha.set, guild);
            let (id, _) = log
                .iter()
                .rev()
                .find(|(_, e)| e["type"] == "voice.joined")?;
            let durable = durable_on(&ha.set, ha.set.primary_port()?, guild)?;
            (durable >= *id).then_some(())
        })
        .await;
        ha
    }

    /// The durable id now: streams follow from here.
    fn baseline(&self) -> EventId {
        let port = self.set.primary_port().expect("a primary");
        durable_on(&self.set, port, self.guild).expect("a durable id")
    }

    fn env(&self) -> Vec<(&str, &str)> {
        self.env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }
}

/// Every stream's events of the followed kinds, after `from`, exactly as the log has
/// them: each once, in order, nothing the log lacks.
fn assert_streams_match_log(streams: &[Shared], log: &[(EventId, Value)], from: EventId) {
    let want: Vec<EventId> = log
        .iter()
        .filter(|(id, e)| *id > from && followed(e["type"].as_str().unwrap_or_default()))
        .map(|(id, _)| *id)
        .collect();
    let by_id: std::collections::HashMap<EventId, &Value> =
        log.iter().map(|(id, e)| (*id, e)).collect();
    for (i, stream) in streams.iter().enumerate() {
        let seen = stream.lock().unwrap();
        assert_eq!(seen.resyncs, 0, "stream {i} was told to resync");
        let ids: Vec<EventId> = seen.events.iter().map(|(id, _, _)| *id).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "stream {i}: ids in order, none twice: {ids:?}"
        );
        for (id, _, envelope) in &seen.events {
            assert_eq!(
                by_id.get(id).copied(),
                Some(envelope),
                "stream {i} saw {id}, which the log lacks or holds otherwise"
            );
        }
        let got: Vec<EventId> = seen
            .events
            .iter()
            .filter(|(_, kind, _)| followed(kind))
            .map(|(id, _, _)| *id)
            .collect();
        assert_eq!(got, want, "stream {i}: every logged event once, in order");
    }
}

/// fred sends a `WAIT` again on a new connection after its own dropped, and a connection
/// that wrote nothing has every replica "in sync" at once. An append held only by the
/// primary (its replica frozen) must not be acknowledged that way: the `WAIT` whose
/// connection was cut proves nothing, and the same request, retried once the replica is
/// back, is acknowledged with the one event the primary holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_sent_again_on_a_new_connection_acknowledges_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_primary, replica, url) = linked_pair(dir.path()).await;
    let writer = Arc::new(
        RedisBus::connect_durable(
            &url,
            "test",
            Id::new(GUILD),
            1_000,
            Duration::from_secs(5),
            Durability {
                min_replicas: 1,
                timeout: Duration::from_secs(10),
            },
        )
        .await
        .unwrap(),
    );
    let raw = client(&url).await;
    let events = format!("test:{{{GUILD}}}:events");
    let request = |seq| Request {
        writer: "test-writer".to_owned(),
        seq,
        part: 0,
    };
    until_durable("the first append", &writer, ping(1), &request(1)).await;

    replica.freeze();
    let appending = tokio::spawn({
        let writer = writer.clone();
        async move { writer.append_once(ping(2), None, &request(2)).await }
    });
    // The append is on the primary and its WAIT blocks, for want of the frozen replica.
    let blocked: String = wait_for("the append's WAIT to block", || async {
        let list: String = raw
            .custom(
                fred::types::CustomCommand::new_static(
                    "CLIENT LIST",
                    fred::types::ClusterHash::FirstKey,
                    false,
                ),
                Vec::<String>::new(),
            )
            .await
            .ok()?;
        list.lines()
            .find(|l| l.contains("cmd=wait"))
            .map(str::to_owned)
    })
    .await;
    let id = blocked
        .split_whitespace()
        .find_map(|f| f.strip_prefix("id="))
        .expect("CLIENT LIST names the connection")
        .to_owned();
    let _: fred::types::Value = raw
        .custom(
            fred::types::CustomCommand::new_static(
                "CLIENT KILL",
                fred::types::ClusterHash::FirstKey,
                false,
            ),
            vec!["ID".to_owned(), id],
        )
        .await
        .unwrap();
    let answered = within("the cut append to answer", appending).await.unwrap();
    assert!(
        matches!(
            answered,
            Err(BusError::Unproven | BusError::NotDurable { .. } | BusError::Redis(_))
        ),
        "an append only the primary holds was acknowledged: {answered:?}"
    );
    let durable: Option<String> = raw.get(format!("test:{{{GUILD}}}:durable")).await.unwrap();
    let len: u64 = raw.xlen(&events).await.unwrap();
    assert_eq!(len, 2, "the primary holds the append");
    let log: Vec<(String, std::collections::HashMap<String, String>)> =
        raw.xrange(&events, "-", "+", None).await.unwrap();
    let withheld: EventId = log[1].0.parse().unwrap();
    assert!(
        durable.and_then(|d| d.parse::<EventId>().ok()) < Some(withheld),
        "the withheld event {withheld} is not durable"
    );

    replica.thaw();
    let done = until_durable("the same request, retried", &writer, ping(2), &request(2)).await;
    assert_eq!(
        done.id.to_string(),
        log[1].0,
        "acknowledged with the event appended once"
    );
    let len: u64 = raw.xlen(&events).await.unwrap();
    assert_eq!(len, 2, "nothing appended twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_longer_than_five_seconds_is_ridden_out_by_every_part() {
    let mut ha = Ha::start(2, 2).await;
    let from = ha.baseline();
    let stop = Arc::new(AtomicBool::new(false));
    let streams: Vec<Shared> = (0..50)
        .map(|i| {
            let web = &ha.webs[i % 2];
            follow(
                ha.browser.clone(),
                web.url("/api/stream"),
                from,
                stop.clone(),
            )
        })
        .collect();
    wait_for("50 open streams", || async {
        streams
            .iter()
            .all(|s| s.lock().unwrap().opens > 0)
            .then_some(())
    })
    .await;

    let guild = ha.guild.to_string();
    let url = ha.set.url();
    let mut env = ha.env();
    env.extend([
        ("REDIS_URL", url.as_str()),
        ("DISCORD_GUILD_ID", guild.as_str()),
    ]);
    const PINGS: u64 = 100;
    let publish = CovenProcess::spawn(
        &[
            "publish",
            "--ping",
            "--count",
            &PINGS.to_string(),
            "--rate",
            "10",
        ],
        &env,
    );

    // Voice changes in Discord all along: ash toggles mute.
    let toggling = Arc::new(AtomicBool::new(true));
    let made = Arc::new(Mutex::new(Vec::<bool>::new()));
    let toggler = {
        let (sim, ash, lobby) = (ha.sim.url(""), ha.ash, ha.lobby);
        let (toggling, made) = (toggling.clone(), made.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut mute = false;
            while toggling.load(Ordering::Relaxed) {
                mute = !mute;
                let body = json!({"user_id": ash.to_string(), "channel_id": lobby.to_string(), "self_mute": mute});
                let res = http
                    .post(format!("{}/_sim/voice", sim.trim_end_matches('/')))
                    .json(&body)
                    .send()
                    .await;
                assert!(
                    res.is_ok_and(|r| r.status() == 200),
                    "the sim takes a voice change"
                );
                made.lock().unwrap().push(mute);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    wait_for("pings and voice changes on the streams", || async {
        let seen = streams[0].lock().unwrap();
        let pings = seen.events.iter().filter(|e| e.1 == "ping").count();
        let voice = seen
            .events
            .iter()
            .filter(|e| e.1 == "voice.updated")
            .count();
        (pings >= 10 && voice >= 3).then_some(())
    })
    .await;

    let old = ha.set.primary.port;
    ha.set.primary.kill();
    let failover = within_for(
        "a replica to be promoted",
        Duration::from_secs(40),
        || async { ha.set.primary_port().is_some_and(|p| p != old) },
    )
    .await;
    let promoted = Instant::now();
    let mut ready_after = Vec::new();
    for web in &ha.webs {
        within_for(
            "/readyz after the promotion",
            Duration::from_secs(15),
            || async { ready(web).await.is_some() },
        )
        .await;
        ready_after.push(promoted.elapsed());
    }

    // After the promotion: one more change, which must reach every stream.
    toggling.store(false, Ordering::Relaxed);
    toggler.await.unwrap();
    let changed = Instant::now();
    voice(
        &ha.sim,
        ha.ash,
        ha.lobby,
        json!({"self_mute": false, "self_video": true}),
    )
    .await;
    made.lock().unwrap().push(false);
    within(
        "every stream to get the change made after the promotion",
        async {
            loop {
                let all = streams.iter().all(|s| {
                    s.lock().unwrap().events.iter().any(|(_, kind, e)| {
                        kind == "voice.updated" && e["data"]["self_video"] == true
                    })
                });
                if all {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
    let voice_latency = changed.elapsed();

    within_for(
        "coven publish to finish",
        Duration::from_secs(60),
        || async {
            publish
                .stdout()
                .iter()
                .any(|l| l.contains(&format!("published {PINGS} pings")))
        },
    )
    .await;
    let log = log(&ha.set, ha.guild);
    let last = log
        .iter()
        .rev()
        .find(|(_, e)| followed(e["type"].as_str().unwrap_or_default()))
        .map(|(id, _)| *id);
    wait_for("every stream to catch up with the log", || async {
        streams
            .iter()
            .all(|s| s.lock().unwrap().events.iter().map(|e| e.0).max() >= last)
            .then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);

    // Every ping reported as published is in the log once; every Discord change too.
    let seqs: Vec<u64> = log
        .iter()
        .filter(|(id, e)| *id > from && e["type"] == "ping")
        .filter_map(|(_, e)| e["data"]["seq"].as_u64())
        .collect();
    let mut sorted = seqs.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), seqs.len(), "no ping twice in the log");
    assert_eq!(
        sorted,
        (1..=PINGS).collect::<Vec<_>>(),
        "every ping in the log"
    );
    let made = made.lock().unwrap().clone();
    assert_eq!(
        mutes(&log, from, ha.ash),
        made,
        "every voice change in the log, once, in order"
    );
    assert_streams_match_log(&streams, &log, from);

    // The session made before the failover still works, on either replica.
    for web in &ha.webs {
        let rooms = ha.browser.get(&web.url(&g("/rooms"))).await;
        assert_eq!(rooms.status(), 200, "the session cookie still works");
    }
    let opens: usize = streams.iter().map(|s| s.lock().unwrap().opens).sum();
    let events: usize = streams.iter().map(|s| s.lock().unwrap().events.len()).sum();
    eprintln!(
        "failover: primary killed -> replica promoted in {failover:?}; replicas ready {ready_after:?} \
         after the promotion; a voice change after it reached all 50 streams in {voice_latency:?}; \
         log: {} events after the baseline ({} pings, {} voice changes); streams: {events} events \
         delivered in all, {opens} opens ({} reconnects)",
        log.iter().filter(|(id, _)| *id > from).count(),
        seqs.len(),
        made.len(),
        opens - streams.len(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_replica_promoted_after_the_primary_dies_lacks_nothing_a_stream_saw() {
    let mut ha = Ha::start(1, 1).await;
    let from = ha.baseline();
    let stop = Arc::new(AtomicBool::new(false));
    let stream = follow(
        ha.browser.clone(),
        ha.webs[0].url("/api/stream"),
        from,
        stop.clone(),
    );
    wait_for("the stream to open", || async {
        (stream.lock().unwrap().opens > 0).then_some(())
    })
    .await;
    voice(&ha.sim, ha.ash, ha.lobby, json!({"self_mute": true})).await;
    wait_for("a change on the stream", || async {
        let seen = stream.lock().unwrap();
        seen.events
            .iter()
            .any(|e| e.1 == "voice.updated")
            .then_some(())
    })
    .await;

    // The replica freezes; the gateway appends to the primary, which cannot get them
    // onto a replica.
    let old = ha.set.primary.port;
    ha.set.replicas[0].freeze();
    let frozen = Instant::now();
    let withheld = [false, true, false];
    for mute in withheld {
        voice(&ha.sim, ha.ash, ha.lobby, json!({"self_mute": mute})).await;
    }
    // The writer appends one event at a time: the first withheld change waits at the
    // head of its queue (retried), the others behind it.
    wait_for("the gateway to append a change to the primary", || async {
        (mutes(&log(&ha.set, ha.guild), from, ha.ash).len() >= 2).then_some(())
    })
    .await;
    let before = log(&ha.set, ha.guild);
    let durable = durable_on(&ha.set, old, ha.guild).expect("a durable id");
    let appended: Vec<EventId> = before
        .iter()
        .filter(|(id, e)| *id > durable && e["type"] == "voice.updated")
        .map(|(id, _)| *id)
        .collect();
    assert!(!appended.is_empty(), "the primary holds a withheld change");
    {
        let seen = stream.lock().unwrap();
        assert!(
            seen.events.iter().all(|(id, _, _)| *id <= durable),
            "the stream saw nothing past the durable id {durable}"
        );
    }

    // The primary dies; the replica, thawed, is promoted without what it never got.
    ha.set.primary.kill();
    ha.set.replicas[0].thaw();
    let frozen_for = frozen.elapsed();
    let replica = ha.set.replicas[0].port;
    let failover = within_for(
        "the replica to be promoted",
        Duration::from_secs(40),
        || async { ha.set.primary_port() == Some(replica) },
    )
    .await;
    // The old primary comes back empty; the sentinels make it the new primary's replica,
    // which appends need again.
    ha.set.primary.start_again();
    let rejoined = within_for(
        "the old primary to rejoin as a replica",
        Duration::from_secs(40),
        || async {
            ha.set
                .cli(replica, false, &["INFO", "replication"])
                .is_some_and(|i| i.contains("connected_slaves:1"))
        },
    )
    .await;

    // Every change made in Discord reaches the log exactly once, and the stream.
    let mut made = vec![true];
    made.extend(withheld);
    within_for(
        "every change in the new primary's log",
        Duration::from_secs(30),
        || async { mutes(&log(&ha.set, ha.guild), from, ha.ash).len() >= made.len() },
    )
    .await;
    let log = log(&ha.set, ha.guild);
    assert_eq!(
        mutes(&log, from, ha.ash),
        made,
        "every Discord change in the log once, in order"
    );
    let last = log
        .iter()
        .rev()
        .find(|(_, e)| followed(e["type"].as_str().unwrap_or_default()))
        .map(|(id, _)| *id);
    wait_for("the stream to catch up with the new log", || async {
        (stream.lock().unwrap().events.iter().map(|e| e.0).max() >= last).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    assert_streams_match_log(std::slice::from_ref(&stream), &log, from);
    let seen = stream.lock().unwrap();
    eprintln!(
        "frozen replica: {} change(s) withheld while frozen {:?}; replica promoted {failover:?} \
         after the primary was killed; the old primary rejoined as its replica {rejoined:?} \
         after restarting; new log: {} events after the baseline; the stream saw {} events \
         over {} opens",
        appended.len(),
        frozen_for,
        log.iter().filter(|(id, _)| *id > from).count(),
        seen.events.len(),
        seen.opens,
    );
}

/// A lossy failover under `coven publish` with `REDIS_MIN_REPLICAS=1`: the only replica
/// freezes while pings flow, the primary dies with pings only it held, the replica is
/// promoted without them and a fresh node joins it. Every ping `coven publish` reports
/// published is in the new primary's log, once: an append proven nowhere that survived
/// is appended again under its name and proven on the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossy_failover_acknowledges_only_what_the_new_primary_holds() {
    let mut set = Sentinels::start(1);
    let guild = GUILD.to_string();
    let ca = set.ca().display().to_string();
    let url = set.url();
    let mut publish = CovenProcess::spawn(
        &["publish", "--ping", "--count", "100", "--rate", "20"],
        &[
            ("REDIS_URL", &url),
            ("SSL_CERT_FILE", &ca),
            ("DISCORD_GUILD_ID", &guild),
            ("REDIS_MIN_REPLICAS", "1"),
            // A WAIT longer than the failover: it is still out when the primary dies.
            ("REDIS_REPLICA_TIMEOUT", "10s"),
            ("REDIS_RETRY_FOR", "120s"),
        ],
    );
    let pings = |log: &[(EventId, Value)]| -> Vec<u64> {
        log.iter()
            .filter(|(_, e)| e["type"] == "ping")
            .filter_map(|(_, e)| e["data"]["seq"].as_u64())
            .collect()
    };
    within_for(
        "some pings to be appended",
        Duration::from_secs(30),
        || async { pings(&log(&set, GUILD)).len() >= 10 },
    )
    .await;

    // The replica freezes: pings reach the primary and wait there, unproven.
    let old = set.primary.port;
    set.replicas[0].freeze();
    within_for(
        "a ping only the primary holds",
        Duration::from_secs(30),
        || async {
            let durable = durable_on(&set, old, GUILD);
            log(&set, GUILD)
                .iter()
                .any(|(id, e)| e["type"] == "ping" && Some(*id) > durable)
        },
    )
    .await;
    let held_by_old = pings(&log(&set, GUILD));

    // The primary dies with them; the replica, thawed, is promoted without them.
    // A fresh node joins it before the sentinels promote it, so the new primary has a
    // replica at once: a WAIT sent there on a connection that wrote nothing would count it.
    set.primary.kill();
    set.replicas[0].thaw();
    let replica = set.replicas[0].port;
    set.attach_fresh("fresh", replica);
    within_for(
        "the replica to be promoted",
        Duration::from_secs(40),
        || async { set.primary_port() == Some(replica) },
    )
    .await;

    let code = tokio::task::block_in_place(|| publish.wait_exit());
    assert_eq!(code, Some(0), "{:?}", publish.stderr());
    assert!(
        publish
            .stdout()
            .iter()
            .chain(publish.stderr().iter())
            .any(|l| l.contains("published 100 pings")),
        "{:?}",
        publish.stderr()
    );
    let log = log(&set, GUILD);
    let mut seqs = pings(&log);
    let appended = seqs.len();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(appended, seqs.len(), "no ping appended twice");
    assert_eq!(
        seqs,
        (1..=100).collect::<Vec<u64>>(),
        "every ping acknowledged is in the new primary's log (the old one held {} before it died)",
        held_by_old.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coven_publish_without_a_replica_retries_the_same_append_then_gives_up_with_one_line() {
    let redis = crate::harness::RedisServer::start();
    let url = redis.url();
    let guild = GUILD.to_string();
    let started = Instant::now();
    let mut publish = CovenProcess::spawn(
        &[
            "publish",
            "--type",
            "room.closing",
            "--data",
            r#"{"channel_id":"5","reason":"idle","closes_at":1}"#,
        ],
        &[
            ("REDIS_URL", &url),
            ("DISCORD_GUILD_ID", &guild),
            ("REDIS_MIN_REPLICAS", "1"),
            ("REDIS_REPLICA_TIMEOUT", "100ms"),
            ("REDIS_RETRY_FOR", "2s"),
        ],
    );
    let code = tokio::task::block_in_place(|| publish.wait_exit());
    let took = started.elapsed();
    assert_eq!(code, Some(1), "{:?}", publish.stderr());
    let errors: Vec<String> = publish
        .stderr()
        .into_iter()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert!(
        errors.len() == 1 && errors[0].contains("only 0 of the 1 replicas required"),
        "one line saying why: {errors:?}"
    );
    assert!(
        took >= Duration::from_secs(2),
        "retried for REDIS_RETRY_FOR ({took:?})"
    );
    // Retried under one name: the log holds the event once, withheld (never published).
    let raw = client(&url).await;
    let events = format!("coven:{{{GUILD}}}:events");
    let len: u64 = raw.xlen(&events).await.unwrap();
    assert_eq!(len, 1, "every retry answered with the one event appended");
    let durable: Option<String> = raw.get(format!("coven:{{{GUILD}}}:durable")).await.unwrap();
    assert_eq!(
        durable.as_deref(),
        Some("0-0"),
        "nothing durable, so nothing readable"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_durable_appends_on_over_an_older_log_publishes_only_new_events() {
    let dir = tempfile::tempdir().unwrap();
    let (_primary, _replica, url) = linked_pair(dir.path()).await;
    let connect = |durability| {
        RedisBus::connect_durable(
            &url,
            "test",
            Id::new(GUILD),
            1_000,
            Duration::from_secs(5),
            durability,
        )
    };
    let old = connect(Durability::OFF).await.unwrap();
    for seq in 1..=3 {
        old.append(ping(seq), None).await.unwrap();
    }
    // A log written before durable appends existed has no durable id (and here, as after
    // a partial loss, no applied id either: the stream's newest id is what was published).
    let raw = client(&url).await;
    let _: i64 = raw
        .del(vec![
            format!("test:{{{GUILD}}}:durable"),
            format!("test:{{{GUILD}}}:applied"),
        ])
        .await
        .unwrap();

    let durable = Durability {
        min_replicas: 1,
        timeout: Duration::from_secs(1),
    };
    let reader = connect(durable).await.unwrap();
    let mut live = reader.subscribe().await.unwrap();
    let writer = connect(durable).await.unwrap();
    let new = writer.append(ping(4), None).await.unwrap();
    let heard = within("the new event live", live.recv()).await.unwrap();
    assert_eq!(heard.id, new.id, "the old events are not published again");
    let at: String = raw.get(format!("test:{{{GUILD}}}:durable")).await.unwrap();
    assert_eq!(at, new.id.to_string());
}
