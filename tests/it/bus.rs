//! The Redis bus against a private Redis: order and replay, the snapshot script against
//! `Snapshot::apply`, fencing, trimmed-log gaps, and the live subscription across a Redis
//! restart.

use std::time::Duration;

use coven::bus::redis::RedisBus;
use coven::bus::{Bus, BusError, Since, Snapshot, Store};
use coven::event::{EventData, EventId, GatewayState, Person, Viewer, VoiceFlags};
use fred::prelude::*;
use twilight_model::channel::permission_overwrite::{PermissionOverwrite, PermissionOverwriteType};
use twilight_model::guild::Permissions;
use twilight_model::id::Id;

use crate::harness::{RedisServer, wait_for, within};

const GUILD: u64 = 77;

async fn bus(redis: &RedisServer, max_len: u64) -> RedisBus {
    RedisBus::connect(&redis.url(), "test", Id::new(GUILD), max_len)
        .await
        .expect("connects")
}

fn person(id: u64) -> Person {
    Person {
        id: Id::new(id),
        username: format!("u{id}"),
        global_name: Some(format!("U {id}")),
        avatar_url: None,
    }
}

fn flags(mute: bool) -> VoiceFlags {
    VoiceFlags {
        self_mute: mute,
        ..VoiceFlags::default()
    }
}

fn room(id: u64, by: Option<u64>) -> EventData {
    EventData::RoomCreated {
        channel_id: Id::new(id),
        name: format!("Room {id}"),
        user_limit: 4,
        created_by: by.map(Id::new),
        role_id: by.map(|b| Id::new(b + 1)),
    }
}

#[tokio::test]
async fn appends_are_ordered_replayable_and_stored_as_envelopes() {
    let redis = RedisServer::start();
    let bus = bus(&redis, 1000).await;
    let mut ids = Vec::new();
    for i in 1..=5 {
        ids.push(bus.append(room(i, None), None).await.unwrap().id);
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    let Since::Events(after) = bus.since(ids[1], 100).await.unwrap() else {
        panic!("gap")
    };
    assert_eq!(after.iter().map(|e| e.id).collect::<Vec<_>>(), ids[2..]);
    assert_eq!(bus.snapshot().await.unwrap().at, ids[4]);

    let client = Client::new(Config::from_url(&redis.url()).unwrap(), None, None, None);
    client.init().await.unwrap();
    let entries: Vec<(String, std::collections::HashMap<String, String>)> = client
        .xrange(bus.key("events"), "-", "+", None)
        .await
        .unwrap();
    assert_eq!(entries.len(), 5);
    let first: serde_json::Value = serde_json::from_str(&entries[0].1["e"]).unwrap();
    assert_eq!(first["id"], entries[0].0);
    assert_eq!(first["type"], "room.created");
    assert_eq!(first["guild_id"], GUILD.to_string());
}

#[tokio::test]
async fn the_script_changes_the_snapshot_exactly_as_snapshot_apply_does() {
    let redis = RedisServer::start();
    let bus = bus(&redis, 1000).await;
    let (a, b) = (10, 11);
    let script = vec![
        room(a, Some(1)),
        room(b, None),
        EventData::VoiceJoined {
            channel_id: Id::new(a),
            user: person(1),
            flags: flags(false),
        },
        EventData::VoiceJoined {
            channel_id: Id::new(a),
            user: person(2),
            flags: flags(true),
        },
        EventData::VoiceUpdated {
            channel_id: Id::new(a),
            user_id: Id::new(1),
            flags: flags(true),
        },
        EventData::RoomClosing {
            channel_id: Id::new(b),
            reason: "idle".into(),
            closes_at: 1_800_000_000_123,
        },
        EventData::VoiceLeft {
            channel_id: Id::new(a),
            user_id: Id::new(2),
        },
        EventData::VoiceJoined {
            channel_id: Id::new(b),
            user: person(2),
            flags: flags(false),
        },
        EventData::RoomUpdated {
            channel_id: Id::new(a),
            name: "Renamed".into(),
            user_limit: 3,
        },
        EventData::RoomUpdated {
            channel_id: Id::new(99),
            name: "ghost".into(),
            user_limit: 1,
        },
        room(a, None),
        // The gateway fills in an owner Redis lost, and never replaces a recorded one.
        room(12, None),
        room(12, Some(3)),
        room(12, Some(5)),
        room(a, Some(5)),
        EventData::RoomViewers {
            channel_id: Id::new(a),
            viewers: vec![Viewer {
                id: Id::new(1),
                username: "u1".into(),
                avatar_url: None,
            }],
        },
        EventData::Ping { seq: 1, ts: 1 },
        EventData::GatewayStatus {
            state: GatewayState::Connected,
            reason: None,
        },
        EventData::RoomDeleted {
            channel_id: Id::new(b),
        },
        EventData::VoiceLeft {
            channel_id: Id::new(b),
            user_id: Id::new(3),
        },
        EventData::GuildUpdated {
            id: Id::new(1),
            name: "g".into(),
            owner_id: Id::new(5),
            roles: vec![coven::event::RoleAccess {
                id: Id::new(1),
                permissions: Permissions::VIEW_CHANNEL,
            }],
        },
        EventData::ChannelAccess {
            channel_id: Id::new(a),
            overwrites: Some(vec![PermissionOverwrite {
                id: Id::new(1),
                kind: PermissionOverwriteType::Role,
                allow: Permissions::empty(),
                deny: Permissions::VIEW_CHANNEL,
            }]),
        },
        // An empty list must stay a list (Lua's cjson would write `{}`).
        EventData::ChannelAccess {
            channel_id: Id::new(b),
            overwrites: Some(vec![]),
        },
        EventData::ChannelAccess {
            channel_id: Id::new(77),
            overwrites: Some(vec![]),
        },
        EventData::ChannelAccess {
            channel_id: Id::new(77),
            overwrites: None,
        },
        EventData::InviteRenewed {
            channel_id: Id::new(a),
            generation: 3,
        },
        EventData::MemberUpdated {
            user_id: Id::new(1),
            roles: vec![Id::new(40)],
        },
        EventData::MemberUpdated {
            user_id: Id::new(2),
            roles: vec![],
        },
        EventData::MemberRemoved {
            user_id: Id::new(2),
        },
    ];
    let mut expected = Snapshot::default();
    for data in script {
        let event = bus.append(data, None).await.unwrap();
        expected.apply(&event);
    }
    let stored = bus.snapshot().await.unwrap();
    expected.guild = Some(bus.guild_id());
    assert_eq!(stored, expected);
    assert_eq!(
        stored.rooms[&Id::new(a)].creator_id,
        Some(Id::new(1)),
        "a later room.created keeps the creator"
    );
    assert_eq!(
        (
            stored.rooms[&Id::new(12)].creator_id,
            stored.rooms[&Id::new(12)].role_id
        ),
        (Some(Id::new(3)), Some(Id::new(4))),
        "a missing owner is filled in once"
    );
    assert!(
        stored.voice.values().all(|v| v.channel_id == Id::new(a)),
        "deleting room b removed its voice states"
    );
    assert_eq!(stored.rooms[&Id::new(a)].invite_gen, 3);
    assert_eq!(stored.access.channels.len(), 2, "{:?}", stored.access);
    assert!(stored.access.guild.is_some());
    let member = bus.member(Id::new(1)).await.unwrap().expect("a member");
    assert_eq!(member.roles, [Id::new(40)]);
    assert!(bus.member(Id::new(2)).await.unwrap().is_none(), "removed");
    assert!(
        bus.member(Id::new(3)).await.unwrap().is_none(),
        "never recorded"
    );
    // The memory bus agrees.
    let memory = coven::bus::memory::MemoryBus::new(Id::new(1), 1000);
    for data in [
        EventData::MemberUpdated {
            user_id: Id::new(1),
            roles: vec![Id::new(40)],
        },
        EventData::MemberRemoved {
            user_id: Id::new(1),
        },
    ] {
        memory.append(data, None).await.unwrap();
    }
    assert!(memory.member(Id::new(1)).await.unwrap().is_none());
    // A claim is had once per ttl.
    assert!(
        bus.claim("member-check:1", Duration::from_secs(60))
            .await
            .unwrap()
    );
    assert!(
        !bus.claim("member-check:1", Duration::from_secs(60))
            .await
            .unwrap()
    );
    assert!(memory.claim("x", Duration::from_secs(60)).await.unwrap());
    assert!(!memory.claim("x", Duration::from_secs(60)).await.unwrap());
}

#[tokio::test]
async fn a_lost_lease_fences_its_old_holder_out() {
    let redis = RedisServer::start();
    let bus = bus(&redis, 1000).await;
    let ttl = Duration::from_millis(300);
    let old = bus
        .acquire("gateway:leader", "a", ttl)
        .await
        .unwrap()
        .expect("free lease");
    assert!(
        bus.acquire("gateway:leader", "b", ttl)
            .await
            .unwrap()
            .is_none()
    );
    bus.append(room(1, None), Some(&old)).await.unwrap();
    bus.put(Some(&old), "gateway:session", "{}", None)
        .await
        .unwrap();
    // The old holder pauses past its lease; another takes over.
    let new = wait_for("the lease to expire and pass to b", || async {
        bus.acquire("gateway:leader", "b", ttl).await.unwrap()
    })
    .await;
    assert!(new.epoch > old.epoch);
    assert!(matches!(
        bus.append(room(2, None), Some(&old)).await,
        Err(BusError::Fenced(_))
    ));
    assert!(matches!(
        bus.put(Some(&old), "gateway:session", "{}", None).await,
        Err(BusError::Fenced(_))
    ));
    assert!(!bus.renew(&old, ttl).await.unwrap());
    bus.release(&old).await.unwrap();
    assert!(
        bus.renew(&new, Duration::from_secs(5)).await.unwrap(),
        "releasing a lost lease does not touch the new one"
    );
    bus.append(room(2, None), Some(&new)).await.unwrap();
    bus.release(&new).await.unwrap();
    assert!(
        bus.acquire("gateway:leader", "c", ttl)
            .await
            .unwrap()
            .is_some(),
        "released at once"
    );
    assert_eq!(
        bus.snapshot().await.unwrap().rooms.len(),
        2,
        "the fenced append changed nothing"
    );
}

#[tokio::test]
async fn a_reader_behind_the_trimmed_log_is_told_to_resync() {
    let redis = RedisServer::start();
    let bus = bus(&redis, 10).await;
    let first = bus.append(room(1, None), None).await.unwrap().id;
    let mut last = first;
    for i in 0..300 {
        last = bus
            .append(EventData::Ping { seq: i, ts: 0 }, None)
            .await
            .unwrap()
            .id;
    }
    assert_eq!(bus.since(first, 10).await.unwrap(), Since::Gap);
    assert_eq!(bus.since(EventId::ZERO, 10).await.unwrap(), Since::Gap);
    let Since::Events(recent) = bus.since(last, 10).await.unwrap() else {
        panic!("recent ids are kept")
    };
    assert!(recent.is_empty());
}

#[tokio::test]
async fn the_log_is_capped_by_age_but_never_past_the_durable_id() {
    let redis = RedisServer::start();
    let bus = bus(&redis, 1000).await;
    let old = bus.append(room(1, None), None).await.unwrap().id;
    // The next append lands in a later millisecond than `old`.
    let cut = wait_for("the clock to move past the first event", || async {
        (coven::event::now_ms() > old.ms).then_some(coven::event::now_ms())
    })
    .await;
    let kept = wait_for("an append after the cut", || async {
        let e = bus.append(room(2, None), None).await.unwrap();
        (e.id.ms >= cut).then_some(e.id)
    })
    .await;
    assert_eq!(
        bus.trim_before(cut).await.unwrap(),
        1,
        "only the older event"
    );
    assert!(!bus.holds(old).await.unwrap());
    assert!(bus.holds(kept).await.unwrap());
    assert_eq!(
        bus.since(old, 10).await.unwrap(),
        Since::Gap,
        "a reader behind it resyncs"
    );
    assert_eq!(
        bus.trim_before(cut).await.unwrap(),
        0,
        "trimming again is a no-op"
    );

    // Events after the durable id are withheld, not yet published: an age cap leaves them.
    // (An append without durability moves the id itself, so it is set back afterwards, as
    // a durable writer whose WAIT is pending would have left it.)
    let withheld = bus.append(room(3, None), None).await.unwrap().id;
    let client = Client::new(Config::from_url(&redis.url()).unwrap(), None, None, None);
    client.init().await.unwrap();
    let _: () = client
        .set(bus.key("durable"), kept.to_string(), None, None, false)
        .await
        .unwrap();
    assert_eq!(
        bus.trim_before(coven::event::now_ms() + 60_000)
            .await
            .unwrap(),
        0,
        "nothing at or after the durable id {kept} goes"
    );
    assert!(bus.holds(kept).await.unwrap() && bus.holds(withheld).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_watches_many_guilds_over_one_subscriber_and_only_while_watched() {
    use coven::bus::redis::{Durability, Redis};
    let redis = RedisServer::start();
    let shared = Redis::connect(
        &redis.url(),
        "test",
        1000,
        Duration::from_secs(5),
        Durability::OFF,
    )
    .await
    .unwrap();
    shared.set_unwatch_after(Duration::from_millis(600));
    let one = shared.guild(Id::new(GUILD));
    let two = shared.guild(Id::new(GUILD + 1));
    let quiet = shared.guild(Id::new(GUILD + 2));
    quiet.append(room(9, None), None).await.unwrap();
    assert_eq!(
        shared.watched(),
        0,
        "nothing is subscribed until someone watches"
    );

    let mut live_one = one.subscribe().await.unwrap();
    let mut live_two = two.subscribe().await.unwrap();
    let a = one.append(room(1, None), None).await.unwrap();
    let b = two.append(room(2, None), None).await.unwrap();
    assert_eq!(
        within("guild one's event", live_one.recv())
            .await
            .unwrap()
            .id,
        a.id
    );
    assert_eq!(
        within("guild two's event", live_two.recv())
            .await
            .unwrap()
            .id,
        b.id
    );
    assert!(live_one.try_recv().is_err(), "no event of another guild");
    assert!(live_two.try_recv().is_err(), "no event of another guild");

    let client = Client::new(Config::from_url(&redis.url()).unwrap(), None, None, None);
    client.init().await.unwrap();
    let subscribed = || async {
        let channels: Vec<String> = client
            .custom(
                fred::types::CustomCommand::new_static("PUBSUB", None, false),
                vec!["SHARDCHANNELS"],
            )
            .await
            .unwrap();
        let mut channels = channels;
        channels.sort();
        channels
    };
    assert_eq!(
        subscribed().await,
        vec![one.key("events"), two.key("events")]
    );
    // One subscriber connection holds both guilds' channels: not one per guild.
    let clients: String = client
        .custom(
            fred::types::CustomCommand::new_static("CLIENT", None, false),
            vec!["LIST"],
        )
        .await
        .unwrap();
    assert_eq!(
        clients
            .lines()
            .filter(|l| l.contains("cmd=ssubscribe"))
            .count(),
        1,
        "{clients}"
    );

    // Nobody watches guild two any more: unsubscribed a little later, guild one goes on.
    drop(live_two);
    wait_for("guild two to be unsubscribed", || async {
        (subscribed().await == vec![one.key("events")]).then_some(())
    })
    .await;
    assert_eq!(shared.watched(), 1);
    let c = one.append(room(3, None), None).await.unwrap();
    assert_eq!(
        within("guild one goes on", live_one.recv())
            .await
            .unwrap()
            .id,
        c.id
    );
    // And watched again: live again, from now on.
    let mut again = two.subscribe().await.unwrap();
    let d = two.append(room(4, None), None).await.unwrap();
    assert_eq!(
        within("guild two again", again.recv()).await.unwrap().id,
        d.id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_subscription_survives_a_redis_restart_in_order_without_duplicates() {
    let mut redis = RedisServer::start();
    let bus = bus(&redis, 1000).await;
    let mut live = bus.subscribe().await.unwrap();
    for i in 1..=3 {
        bus.append(room(i, None), None).await.unwrap();
    }
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(within("a live event", live.recv()).await.unwrap().id);
    }
    tokio::task::block_in_place(|| redis.restart());
    let mut appended = Vec::new();
    for i in 4..=6 {
        let event = wait_for("an append after the restart", || async {
            bus.append(room(i, None), None).await.ok()
        })
        .await;
        appended.push(event.id);
    }
    for _ in 0..3 {
        seen.push(
            within("a live event after the restart", live.recv())
                .await
                .unwrap()
                .id,
        );
    }
    assert_eq!(&seen[3..], &appended[..]);
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "in order, no duplicates: {seen:?}"
    );
}

#[tokio::test]
async fn garbage_on_the_channel_is_skipped_and_the_relay_survives() {
    let redis = RedisServer::start();
    let bus = bus(&redis, 1000).await;
    let mut live = bus.subscribe().await.unwrap();
    let client = Client::new(Config::from_url(&redis.url()).unwrap(), None, None, None);
    client.init().await.unwrap();
    // Sharded, as the append script publishes: a plain PUBLISH would never reach the
    // relay, and this test would pass without testing anything.
    let _: i64 = client
        .spublish(bus.key("events"), "{not an envelope")
        .await
        .unwrap();
    let event = bus.append(room(1, None), None).await.unwrap();
    assert_eq!(
        within("the next real event", live.recv()).await.unwrap().id,
        event.id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coven_publish_appends_through_the_same_path() {
    use crate::harness::CovenProcess;
    let redis = RedisServer::start();
    let env = [
        ("REDIS_URL", redis.url()),
        ("DISCORD_GUILD_ID", GUILD.to_string()),
        ("COVEN_KEY_PREFIX", "test".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let one = CovenProcess::run_ok(
        &[
            "publish",
            "--type",
            "room.closing",
            "--data",
            r#"{"channel_id":"5","reason":"idle","closes_at":1}"#,
        ],
        &env,
    );
    let printed: EventId = one.stdout()[0].parse().expect("prints the new event id");
    let pings = CovenProcess::run_ok(
        &["publish", "--ping", "--count", "5", "--rate", "1000"],
        &env,
    );
    assert!(pings.stdout().join("\n").contains("published 5 pings"));

    let bus = bus(&redis, 1000).await;
    let Since::Events(events) = bus.since(EventId::ZERO, 100).await.unwrap() else {
        panic!("gap")
    };
    assert_eq!(events.len(), 6);
    assert_eq!(events[0].id, printed);
    let seqs: Vec<u64> = events[1..]
        .iter()
        .map(|e| match e.data {
            EventData::Ping { seq, ts } => {
                assert!(ts > 1_700_000_000_000_000_000, "ts is unix nanoseconds");
                seq
            }
            _ => panic!("not a ping"),
        })
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
}

fn viewer(id: u64) -> Viewer {
    Viewer {
        id: Id::new(id),
        username: format!("u{id}"),
        avatar_url: id
            .is_multiple_of(2)
            .then(|| format!("https://cdn.example/{id}.png")),
    }
}

fn listed(event: Option<std::sync::Arc<coven::event::Event>>) -> Option<Vec<u64>> {
    event.map(|e| match &e.data {
        EventData::RoomViewers { viewers, .. } => viewers.iter().map(|v| v.id.get()).collect(),
        other => panic!("expected room.viewers, got {other:?}"),
    })
}

/// Presence behaves the same on both buses: an event only when the set changes, in the
/// snapshot at once, and viewers nobody refreshes fade out.
async fn presence_rules(bus: &dyn Bus) {
    let a = Id::new(10);
    let long = Duration::from_secs(60);
    bus.append(room(10, None), None).await.unwrap();
    let first = bus.viewers(a, &[viewer(1)], &[], long).await.unwrap();
    assert_eq!(listed(first.clone()), Some(vec![1]));
    let snapshot = bus.snapshot().await.unwrap();
    assert_eq!(snapshot.rooms[&a].viewers, vec![viewer(1)]);
    assert_eq!(snapshot.at, first.unwrap().id);
    assert_eq!(
        listed(bus.viewers(a, &[viewer(1)], &[], long).await.unwrap()),
        None,
        "a refresh that changes nothing appends nothing"
    );
    assert_eq!(
        listed(
            bus.viewers(a, &[viewer(2)], &[], Duration::from_millis(300))
                .await
                .unwrap()
        ),
        Some(vec![1, 2])
    );
    // Nobody refreshes viewer 2 (its replica died): the next touch of the room drops it.
    let faded = wait_for("viewer 2 to fade out", || async {
        listed(bus.viewers(a, &[], &[], long).await.unwrap())
    })
    .await;
    assert_eq!(faded, vec![1]);
    assert_eq!(
        listed(bus.viewers(a, &[], &[viewer(1)], long).await.unwrap()),
        Some(vec![])
    );
    assert!(bus.snapshot().await.unwrap().rooms[&a].viewers.is_empty());
}

#[tokio::test]
async fn viewer_presence_on_redis() {
    let redis = RedisServer::start();
    let bus = bus(&redis, 1000).await;
    presence_rules(&bus).await;
}

#[tokio::test]
async fn viewer_presence_in_memory() {
    presence_rules(&coven::bus::memory::MemoryBus::new(Id::new(GUILD), 1000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coven_publish_rides_out_a_redis_outage_longer_than_five_seconds() {
    use crate::harness::CovenProcess;
    let mut redis = RedisServer::start_persistent();
    let env = [
        ("REDIS_URL", redis.url()),
        ("DISCORD_GUILD_ID", GUILD.to_string()),
        ("COVEN_KEY_PREFIX", "ride".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut pings =
        CovenProcess::spawn(&["publish", "--ping", "--count", "20", "--rate", "4"], &env);
    let client = Client::new(Config::from_url(&redis.url()).unwrap(), None, None, None);
    client.init().await.unwrap();
    wait_for("the first pings in the log", || async {
        let n: u64 = client.xlen(format!("ride:{{{GUILD}}}:events")).await.ok()?;
        (n >= 2).then_some(())
    })
    .await;
    drop(client);
    // An outage longer than the old 5 s command timeout (a slow Sentinel failover).
    tokio::task::block_in_place(|| {
        redis.stop();
        std::thread::sleep(Duration::from_secs(7));
        redis.start_again();
    });
    assert_eq!(
        tokio::task::block_in_place(|| pings.wait_exit()),
        Some(0),
        "{:?}",
        pings.stderr()
    );
    assert!(
        pings.stdout().join("\n").contains("published 20 pings"),
        "{:?}",
        pings.stdout()
    );
}

/// A TCP relay to Redis that, once armed, forwards the next `EVALSHA` and then closes
/// that connection as soon as Redis starts answering: the script ran, its answer is lost.
struct AnswerCutter {
    port: u16,
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: std::sync::Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl AnswerCutter {
    async fn start(redis_port: u16) -> Self {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cut = std::sync::Arc::new(tokio::sync::Notify::new());
        let (a, c) = (armed.clone(), cut.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let Ok(mut server) =
                    tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await
                else {
                    continue;
                };
                let (armed, cut) = (a.clone(), c.clone());
                tokio::spawn(async move {
                    let (mut up, mut down) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
                    let mut cutting = false;
                    loop {
                        tokio::select! {
                            n = client.read(&mut up) => {
                                let Ok(n @ 1..) = n else { return };
                                if server.write_all(&up[..n]).await.is_err() {
                                    return;
                                }
                                let sent = up[..n].to_ascii_uppercase();
                                if sent.windows(7).any(|w| w == b"EVALSHA")
                                    && armed.swap(false, Ordering::SeqCst)
                                {
                                    cutting = true;
                                }
                            }
                            n = server.read(&mut down) => {
                                let Ok(n @ 1..) = n else { return };
                                if cutting {
                                    cut.notify_one();
                                    return; // both sockets close with the task
                                }
                                if client.write_all(&down[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        AnswerCutter {
            port,
            armed,
            cut,
            task,
        }
    }
}

impl Drop for AnswerCutter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// fred sends a command again when its connection closes before the answer came
/// (`max_command_attempts`): an append whose answer was lost, from a caller that never
/// retries by itself (a web replica), still reaches the log once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_whose_answer_is_lost_reaches_the_log_once() {
    let redis = RedisServer::start();
    let cutter = AnswerCutter::start(redis.port).await;
    let url = format!("redis://127.0.0.1:{}", cutter.port);
    let bus = RedisBus::connect(&url, "test", Id::new(GUILD), 1000)
        .await
        .expect("connects through the relay");
    // The first append loads the script; the second's answer is cut.
    let first = bus.append(room(1, None), None).await.unwrap();
    cutter
        .armed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let second = within("the append whose answer was cut", async {
        tokio::join!(bus.append(room(2, None), None), cutter.cut.notified()).0
    })
    .await
    .expect("answered on the new connection");
    let Since::Events(log) = bus.since(EventId::ZERO, 100).await.unwrap() else {
        panic!("no gap");
    };
    assert_eq!(
        log.iter().map(|e| e.id).collect::<Vec<_>>(),
        [first.id, second.id],
        "the cut append is in the log once, as answered"
    );
    assert_eq!(bus.snapshot().await.unwrap().at, second.id);
}

/// The gateway's fencing across guilds: a shard lease's epoch fences each guild's
/// appends (a new holder raises every guild's epoch; an old one is refused there), and
/// appends named by (session, sequence, index) reach the log once whoever sends them.
#[tokio::test]
async fn a_shard_lease_fences_every_guild_by_epoch_and_dispatches_are_appended_once() {
    use coven::bus::{Deployment, GuildEntry, Request};
    use std::sync::Arc;

    let redis = RedisServer::start();
    let deployment: Arc<dyn Deployment> = Arc::new(
        coven::bus::redis::Redis::connect(
            &redis.url(),
            "test",
            1000,
            coven::bus::redis::COMMAND_TIMEOUT,
            coven::bus::redis::Durability::OFF,
        )
        .await
        .expect("connects"),
    );
    let (g1, g2) = (Id::new(GUILD), Id::new(GUILD + 1));
    let lease = "shard:{0}:lease";
    let ttl = Duration::from_millis(300);
    let old = deployment
        .acquire(lease, "a", ttl)
        .await
        .unwrap()
        .expect("a free lease");
    assert!(old.by_epoch);
    let (one, two) = (deployment.guild(g1), deployment.guild(g2));
    let first = one
        .append_once(room(1, None), Some(&old), &Request::dispatch("s", 5, 0))
        .await
        .unwrap();
    two.append_once(room(2, None), Some(&old), &Request::dispatch("s", 5, 1))
        .await
        .unwrap();
    let entry = GuildEntry {
        name: "One".into(),
        icon: None,
        shard: 0,
        available: true,
        epoch: old.epoch,
    };
    assert!(deployment.register(g1, &entry).await.unwrap());

    // The old holder pauses past its lease; the next raises every guild's epoch.
    let new = wait_for("the lease to pass to b", || async {
        deployment.acquire(lease, "b", ttl).await.unwrap()
    })
    .await;
    assert!(new.epoch > old.epoch);
    deployment.raise_epochs(&[g1, g2], new.epoch).await.unwrap();
    for bus in [&one, &two] {
        assert!(
            matches!(
                bus.append_once(room(3, None), Some(&old), &Request::dispatch("s", 6, 0))
                    .await,
                Err(BusError::Fenced(_))
            ),
            "the old holder is refused in every guild of the shard"
        );
    }
    assert!(matches!(
        deployment
            .put(Some(&old), "shard:{0}:session", "{}", None)
            .await,
        Err(BusError::Fenced(_))
    ));

    // The new holder replays the dispatch its predecessor appended: nothing new.
    let replayed = one
        .append_once(room(1, None), Some(&new), &Request::dispatch("s", 5, 0))
        .await
        .unwrap();
    assert_eq!(replayed.id, first.id, "a dispatch is appended once");
    let older = one
        .append_once(room(9, None), Some(&new), &Request::dispatch("s", 4, 3))
        .await
        .unwrap();
    assert_eq!(
        older.id, first.id,
        "an older one of the session is done too"
    );
    // The predecessor appended only part 0 of a dispatch; the successor derives the rest
    // from a snapshot that holds it, numbering it from 0 again: appended, not taken for
    // the part already there.
    let rest = one
        .append_once(room(2, None), Some(&new), &Request::dispatch("s", 5, 0))
        .await
        .unwrap();
    assert!(
        rest.id > first.id,
        "the rest of a half-appended dispatch is appended"
    );
    let next = one
        .append_once(room(3, None), Some(&new), &Request::dispatch("s", 6, 0))
        .await
        .unwrap();
    assert!(next.id > rest.id);
    let Since::Events(events) = one.since(EventId::ZERO, 100).await.unwrap() else {
        panic!("a gap")
    };
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(deployment.registry().await.unwrap()[&g1].epoch, old.epoch);
    let unavailable = GuildEntry {
        available: false,
        ..entry.clone()
    };
    assert!(
        deployment
            .register(
                g1,
                &GuildEntry {
                    epoch: new.epoch,
                    ..unavailable.clone()
                }
            )
            .await
            .unwrap()
    );
    assert!(
        !deployment.register(g1, &entry).await.unwrap(),
        "the old holder cannot undo what its successor registered"
    );
    assert!(!deployment.unregister(g1, old.epoch).await.unwrap());
    assert!(deployment.unregister(g1, new.epoch).await.unwrap());
    assert!(deployment.registry().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_asking_whether_the_log_holds_one_id_at_once_share_a_question_never_older_than_theirs()
 {
    let redis = RedisServer::start();
    let bus = bus(&redis, 1000).await;
    let held = bus.append(room(1, None), None).await.unwrap().id;
    let client = Client::new(Config::from_url(&redis.url()).unwrap(), None, None, None);
    client.init().await.unwrap();
    let xranges = || async {
        let stats: String = client
            .info(Some(fred::types::InfoKind::CommandStats))
            .await
            .unwrap();
        stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_xrange:calls="))
            .and_then(|rest| rest.split(',').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };

    // A wave: the first question goes at once, everyone after it shares the next. At
    // most two are out at a time; a wave that straddles an answer (the executor polls
    // 200 futures in batches, and a loaded machine answers in between) lets one more go
    // per answer, so a handful in all. Without sharing it is 200.
    let before = xranges().await;
    let answers = futures_util::future::join_all((0..200).map(|_| bus.holds(held))).await;
    assert!(answers.iter().all(|a| matches!(a, Ok(true))));
    let asked = xranges().await - before;
    // (12 were seen on the 2-core machine under the whole suite; 200 without sharing.)
    assert!(asked <= 25, "200 streams asked Redis {asked} times");

    // Asked after an answer, the question is asked again: nothing is remembered.
    let _: i64 = client
        .xdel(bus.key("events"), held.to_string())
        .await
        .unwrap();
    assert!(!bus.holds(held).await.unwrap(), "gone from the log");
    assert!(!bus.holds(EventId { ms: 1, seq: 0 }).await.unwrap());
}
