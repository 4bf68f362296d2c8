//! The simulator's Gateway, driven by twilight-gateway unmodified, and by a raw
//! WebSocket for the protocol errors twilight would never make.

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use twilight_gateway::{Event, ShardState};
use twilight_model::channel::ChannelFlags;
use twilight_model::gateway::payload::incoming::GuildCreate;
use twilight_model::guild::Permissions;

use coven::sim::defaults::{DICE_TOWER_GUILD_ID, NIGHT_OWLS_GUILD_ID};

use crate::harness::{TestSim, next_event, shard, shard_with, wait_for, within};

#[tokio::test]
async fn twilight_gets_ready_and_the_guild_with_voice_states() {
    let sim = TestSim::start().await;
    let lobby = sim.id_of("lobby_id").await;
    let ash = sim.user("ash").await;
    sim.join(ash, lobby).await;

    let mut shard = shard(&sim);
    let ready = next_event(&mut shard, |e| matches!(e, Event::Ready(_))).await;
    let Event::Ready(ready) = ready else {
        unreachable!()
    };
    assert_eq!(ready.guilds[0].id.get(), sim.guild_id());
    assert!(ready.resume_gateway_url.starts_with("ws://127.0.0.1:"));

    let guild = next_event(&mut shard, |e| matches!(e, Event::GuildCreate(_))).await;
    let Event::GuildCreate(guild) = guild else {
        unreachable!()
    };
    let GuildCreate::Available(guild) = *guild else {
        panic!("the guild arrived unavailable")
    };
    assert_eq!(guild.id.get(), sim.guild_id());
    assert!(guild.channels.iter().any(|c| c.id.get() == lobby));
    assert_eq!(guild.voice_states.len(), 1);
    assert_eq!(guild.voice_states[0].user_id.get(), ash);
    assert_eq!(
        guild.voice_states[0].channel_id.map(|c| c.get()),
        Some(lobby)
    );
    // Only members Discord must send without GUILD_MEMBERS: the bot and people in voice.
    assert_eq!(guild.members.len(), 2);
}

#[tokio::test]
async fn a_control_api_join_arrives_as_voice_state_update() {
    let sim = TestSim::start().await;
    let mut shard = shard(&sim);
    next_event(&mut shard, |e| matches!(e, Event::GuildCreate(_))).await;

    let (lobby, cinder) = (sim.id_of("lobby_id").await, sim.user("cinder").await);
    let (status, _) = sim
        .control("/voice", json!({"user_id": cinder.to_string(), "channel_id": lobby.to_string(), "self_mute": true}))
        .await;
    assert_eq!(status, 200);
    let Event::VoiceStateUpdate(vs) =
        next_event(&mut shard, |e| matches!(e, Event::VoiceStateUpdate(_))).await
    else {
        unreachable!()
    };
    assert_eq!(vs.0.user_id.get(), cinder);
    assert_eq!(vs.0.channel_id.map(|c| c.get()), Some(lobby));
    assert!(vs.0.self_mute);
    assert_eq!(vs.0.guild_id.map(|g| g.get()), Some(sim.guild_id()));
    assert!(
        vs.0.member.is_some(),
        "VOICE_STATE_UPDATE carries the member"
    );

    let (status, body) = sim
        .control(
            "/voice",
            json!({"user_id": cinder.to_string(), "channel_id": null}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let Event::VoiceStateUpdate(left) =
        next_event(&mut shard, |e| matches!(e, Event::VoiceStateUpdate(_))).await
    else {
        unreachable!()
    };
    assert_eq!(left.0.channel_id, None);
}

#[tokio::test]
async fn op7_reconnect_is_resumed_and_events_keep_flowing() {
    let sim = TestSim::start().await;
    let mut shard = shard(&sim);
    next_event(&mut shard, |e| matches!(e, Event::GuildCreate(_))).await;

    let (status, body) = sim.control("/gateway/reconnect", json!({})).await;
    assert_eq!((status, body["connections"].as_u64()), (200, Some(1)));
    next_event(&mut shard, |e| matches!(e, Event::Resumed)).await;

    let (lobby, dusk) = (sim.id_of("lobby_id").await, sim.user("dusk").await);
    sim.join(dusk, lobby).await;
    next_event(&mut shard, |e| matches!(e, Event::VoiceStateUpdate(_))).await;
    assert_eq!(sim.gateway_counter("identifies").await, 1);
    assert_eq!(sim.gateway_counter("resumes").await, 1);
}

#[tokio::test]
async fn a_new_shard_resumes_a_stored_session_and_gets_the_missed_dispatches() {
    let sim = TestSim::start().await;
    let mut first = shard(&sim);
    next_event(&mut first, |e| matches!(e, Event::GuildCreate(_))).await;
    let session = first
        .session()
        .cloned()
        .expect("identified shard has a session");
    let resume_url = first.resume_url().map(str::to_owned).expect("a resume url");
    // The process dies: its socket goes away without a goodbye.
    drop(first);

    // Changes while nobody is connected are kept for the session.
    let (lobby, ember) = (sim.id_of("lobby_id").await, sim.user("ember").await);
    sim.join(ember, lobby).await;

    let mut second = shard_with(&sim, |c| c.session(session).resume_url(resume_url));
    let replayed = next_event(&mut second, |e| {
        matches!(e, Event::VoiceStateUpdate(_) | Event::Ready(_))
    })
    .await;
    let Event::VoiceStateUpdate(vs) = replayed else {
        panic!("expected the missed VOICE_STATE_UPDATE, got {replayed:?}")
    };
    assert_eq!(vs.0.user_id.get(), ember);
    next_event(&mut second, |e| matches!(e, Event::Resumed)).await;
    assert_eq!(
        sim.gateway_counter("identifies").await,
        1,
        "no new IDENTIFY"
    );
    assert_eq!(sim.gateway_counter("resumes").await, 1);
}

#[tokio::test]
async fn invalid_session_false_makes_twilight_identify_again() {
    let sim = TestSim::start().await;
    // twilight's own queue spaces its IDENTIFYs 5 s apart, as Discord's bucket requires;
    // the harness's instant one would be refused with op 9 until then.
    let mut shard = shard_with(&sim, |c| {
        c.queue(twilight_gateway_queue::InMemoryQueue::default())
    });
    next_event(&mut shard, |e| matches!(e, Event::GuildCreate(_))).await;
    sim.control("/gateway/invalidate", json!({"resumable": false}))
        .await;
    next_event(&mut shard, |e| {
        matches!(e, Event::GatewayInvalidateSession(false))
    })
    .await;
    next_event(&mut shard, |e| matches!(e, Event::Ready(_))).await;
    assert_eq!(sim.gateway_counter("identifies").await, 2);
}

#[tokio::test]
async fn a_zombied_connection_is_detected_and_resumed() {
    let sim =
        TestSim::start_with(|s| s.heartbeat_interval = std::time::Duration::from_millis(300)).await;
    let mut shard = shard(&sim);
    next_event(&mut shard, |e| matches!(e, Event::GuildCreate(_))).await;
    sim.control("/gateway/zombie", json!({})).await;
    // A half-open connection delivers nothing: a change made now reaches the client only
    // after it has noticed, reconnected and resumed, through the replay.
    let (lobby, ash) = (sim.id_of("lobby_id").await, sim.user("ash").await);
    sim.join(ash, lobby).await;
    next_event(
        &mut shard,
        |e| matches!(e, Event::VoiceStateUpdate(v) if v.0.user_id.get() == ash),
    )
    .await;
    // Replayed missed events come before RESUMED ("Resuming"): the join arrived only
    // once the shard had resumed on a new connection.
    assert_eq!(sim.gateway_counter("resumes").await, 1);
    next_event(&mut shard, |e| matches!(e, Event::Resumed)).await;
    assert_eq!(sim.gateway_counter("identifies").await, 1);
    assert!(sim.gateway_counter("connections").await >= 2);
}

#[tokio::test]
async fn a_wrong_token_ends_the_shard_fatally_with_4004() {
    let sim = TestSim::start().await;
    let config = twilight_gateway::ConfigBuilder::new(
        "not-the-token".to_owned(),
        twilight_gateway::Intents::GUILDS,
    )
    .proxy_url(sim.gateway_url())
    .queue(twilight_gateway_queue::InMemoryQueue::new(
        0,
        0,
        std::time::Duration::ZERO,
        0,
    ))
    .build();
    let mut shard = twilight_gateway::Shard::with_config(twilight_gateway::ShardId::ONE, config);
    let closed = next_event(&mut shard, |e| matches!(e, Event::GatewayClose(_))).await;
    let Event::GatewayClose(Some(frame)) = closed else {
        panic!("{closed:?}")
    };
    assert_eq!(frame.code, 4004);
    within("the stream to end", async {
        use twilight_gateway::StreamExt as _;
        while shard
            .next_event(twilight_gateway::EventTypeFlags::all())
            .await
            .is_some()
        {}
    })
    .await;
    assert!(matches!(shard.state(), ShardState::FatallyClosed));
}

#[tokio::test]
async fn a_control_api_4004_is_fatal_too_and_4000_is_resumed() {
    let sim = TestSim::start().await;
    let mut shard = shard(&sim);
    next_event(&mut shard, |e| matches!(e, Event::GuildCreate(_))).await;
    sim.control("/gateway/disconnect", json!({"code": 4000}))
        .await;
    next_event(&mut shard, |e| matches!(e, Event::Resumed)).await;
    sim.control("/gateway/disconnect", json!({"code": 4004}))
        .await;
    within("the stream to end", async {
        use twilight_gateway::StreamExt as _;
        while shard
            .next_event(twilight_gateway::EventTypeFlags::all())
            .await
            .is_some()
        {}
    })
    .await;
    assert!(matches!(shard.state(), ShardState::FatallyClosed));
}

// ---------------------------------------------------------------------------------------
// Raw protocol: Discord's documented answers to bad input.

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(sim: &TestSim, query: &str) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("{}/{query}", sim.gateway_url()))
        .await
        .expect("websocket connects");
    ws
}

/// Reads frames until a text frame (returned as JSON) or a close (returned as its code).
async fn recv(ws: &mut Ws) -> Result<Value, u16> {
    within("a gateway frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    return Ok(serde_json::from_str(&t).expect("json frame"));
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(frame.map(|f| u16::from(f.code)).unwrap_or(1005));
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("socket error: {e}"),
                None => return Err(1006),
            }
        }
    })
    .await
}

async fn send(ws: &mut Ws, payload: &str) {
    ws.send(Message::text(payload)).await.expect("send");
}

fn identify(token: &str, intents: u64) -> String {
    json!({"op": 2, "d": {"token": token, "intents": intents, "properties": {"os": "linux", "browser": "t", "device": "t"}}}).to_string()
}

/// Connects, expects HELLO, sends `payloads`, and returns the close code the sim ends with.
async fn close_code_after(sim: &TestSim, payloads: &[String]) -> u16 {
    let mut ws = connect(sim, "?v=10&encoding=json").await;
    let hello = recv(&mut ws).await.expect("hello");
    assert_eq!(hello["op"], 10);
    assert!(hello["d"]["heartbeat_interval"].as_u64().is_some());
    for p in payloads {
        send(&mut ws, p).await;
    }
    loop {
        match recv(&mut ws).await {
            Ok(_) => continue,
            Err(code) => return code,
        }
    }
}

#[tokio::test]
async fn bad_gateway_input_gets_discords_close_codes() {
    let sim = TestSim::start().await;
    let token = sim.token();
    let cases: Vec<(&str, Vec<String>, u16)> = vec![
        ("wrong token", vec![identify("nope", 129)], 4004),
        (
            "undefined intent bit",
            vec![identify(&token, 1 << 18)],
            4013,
        ),
        ("privileged intent", vec![identify(&token, 1 << 1)], 4014),
        (
            "second identify",
            vec![identify(&token, 129), identify(&token, 129)],
            4005,
        ),
        (
            "payload before identify",
            vec![json!({"op": 3, "d": {}}).to_string()],
            4003,
        ),
        ("malformed json", vec!["{not json".to_owned()], 4002),
        (
            "unknown opcode",
            vec![json!({"op": 42, "d": null}).to_string()],
            4001,
        ),
        (
            "identify missing fields",
            vec![json!({"op": 2, "d": {"token": token}}).to_string()],
            4001,
        ),
        (
            "resume missing fields",
            vec![json!({"op": 6, "d": {"token": token}}).to_string()],
            4001,
        ),
        ("no opcode", vec![json!({"d": null}).to_string()], 4002),
        (
            "a payload over 4096 bytes",
            vec![json!({"op": 1, "d": null, "pad": "x".repeat(4096)}).to_string()],
            4002,
        ),
    ];
    for (what, payloads, want) in cases {
        assert_eq!(close_code_after(&sim, &payloads).await, want, "{what}");
    }
    // The simulator is still fine afterwards (once bucket 0 may identify again).
    bucket_free(&sim).await;
    let mut shard = shard(&sim);
    next_event(&mut shard, |e| matches!(e, Event::Ready(_))).await;
}

#[tokio::test]
async fn wrong_api_version_is_4012() {
    let sim = TestSim::start().await;
    let mut ws = connect(&sim, "?v=6&encoding=json").await;
    assert_eq!(recv(&mut ws).await.err(), Some(4012));
}

#[tokio::test]
async fn heartbeats_are_acked_and_unknown_sessions_are_invalid() {
    let sim = TestSim::start().await;
    let mut ws = connect(&sim, "?v=10&encoding=json").await;
    recv(&mut ws).await.expect("hello");
    send(&mut ws, r#"{"op":1,"d":null}"#).await;
    assert_eq!(recv(&mut ws).await.expect("ack")["op"], 11);
    let resume = json!({"op": 6, "d": {"token": sim.token(), "session_id": "nope", "seq": 3}});
    send(&mut ws, &resume.to_string()).await;
    let answer = recv(&mut ws).await.expect("invalid session");
    assert_eq!(
        (answer["op"].as_u64(), answer["d"].as_bool()),
        (Some(9), Some(false))
    );
    // The same connection may still identify.
    send(&mut ws, &identify(&sim.token(), 129)).await;
    let ready = recv(&mut ws).await.expect("ready");
    assert_eq!(
        (ready["t"].as_str(), ready["s"].as_u64()),
        (Some("READY"), Some(1))
    );
    let guild = recv(&mut ws).await.expect("guild create");
    assert_eq!(
        (guild["t"].as_str(), guild["s"].as_u64()),
        (Some("GUILD_CREATE"), Some(2))
    );
    let parsed: GuildCreate =
        serde_json::from_value(guild["d"].clone()).expect("twilight-model reads GUILD_CREATE");
    assert!(matches!(parsed, GuildCreate::Available(_)));
    let _ = ws
        .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        }))
        .await;
}

#[tokio::test]
async fn without_the_voice_intent_there_are_no_voice_states() {
    let sim = TestSim::start().await;
    let (lobby, fable) = (sim.id_of("lobby_id").await, sim.user("fable").await);
    sim.join(fable, lobby).await;
    let mut ws = connect(&sim, "?v=10&encoding=json").await;
    recv(&mut ws).await.expect("hello");
    send(&mut ws, &identify(&sim.token(), 1)).await;
    recv(&mut ws).await.expect("ready");
    let guild = recv(&mut ws).await.expect("guild create");
    assert_eq!(guild["d"]["voice_states"], json!([]));
    let owls = recv(&mut ws).await.expect("the second guild's create");
    assert_eq!(owls["d"]["id"], NIGHT_OWLS_GUILD_ID.to_string());
    // And voice changes are not dispatched to this session, but channel changes are.
    sim.control(
        "/voice",
        json!({"user_id": fable.to_string(), "channel_id": null}),
    )
    .await;
    sim.control("/channels", json!({"name": "Later"})).await;
    let next = recv(&mut ws).await.expect("dispatch");
    assert_eq!(next["t"], "CHANNEL_CREATE");
    assert_eq!(next["s"], 4);
}

#[tokio::test]
async fn the_simulator_serves_the_gateway_at_any_path() {
    let sim = TestSim::start().await;
    let mut ws = connect(&sim, "some/path?v=10&encoding=json").await;
    assert_eq!(recv(&mut ws).await.expect("hello")["op"], 10);
    wait_for("connections counted", || async {
        (sim.gateway_counter("connections").await == 1).then_some(())
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Channel obfuscation: what Discord sends a bot about channels it cannot view.

/// Control-API body for a voice channel only `allowed` (a role) may view, or nobody.
fn hidden_voice(name: &str, guild: u64, allowed: Option<u64>) -> Value {
    let view = Permissions::VIEW_CHANNEL.bits().to_string();
    let mut overwrites = vec![json!({"id": guild.to_string(), "type": 0, "deny": view})];
    if let Some(role) = allowed {
        overwrites.push(json!({"id": role.to_string(), "type": 0, "allow": view}));
    }
    json!({"name": name, "type": 2, "user_limit": 4, "permission_overwrites": overwrites})
}

fn channel_event(e: &Event, id: u64) -> Option<twilight_model::channel::Channel> {
    match e {
        Event::ChannelCreate(c) if c.0.id.get() == id => Some(c.0.clone()),
        Event::ChannelUpdate(c) if c.0.id.get() == id => Some(c.0.clone()),
        _ => None,
    }
}

async fn next_channel_event(
    shard: &mut twilight_gateway::Shard,
    id: u64,
) -> twilight_model::channel::Channel {
    let event = next_event(shard, |e| channel_event(e, id).is_some()).await;
    channel_event(&event, id).expect("matched above")
}

fn assert_obfuscated(c: &twilight_model::channel::Channel, guild: u64) {
    assert_eq!(c.name.as_deref(), Some("___hidden___"));
    assert_eq!(c.user_limit, Some(0));
    let overwrites = c.permission_overwrites.as_deref().unwrap_or_default();
    assert_eq!(overwrites.len(), 1);
    assert_eq!(overwrites[0].id.get(), guild);
    assert_eq!(overwrites[0].deny.bits(), Permissions::VIEW_CHANNEL.bits());
    assert!(overwrites[0].allow.is_empty());
}

#[tokio::test]
async fn hidden_channels_are_obfuscated_and_an_overwrite_reveals_them() {
    let sim = TestSim::start().await;
    let guild = sim.guild_id();
    let bot = sim.id_of("bot_id").await;
    let before = sim
        .create_channel(hidden_voice("Before", guild, None))
        .await;
    // The owner may go anywhere; voice states in hidden channels are still sent.
    let ash = sim.user("ash").await;
    sim.join(ash, before).await;

    let mut shard = shard(&sim);
    let Event::GuildCreate(created) =
        next_event(&mut shard, |e| matches!(e, Event::GuildCreate(_))).await
    else {
        unreachable!()
    };
    let GuildCreate::Available(g) = *created else {
        panic!("the guild arrived unavailable")
    };
    let listed = g
        .channels
        .iter()
        .find(|c| c.id.get() == before)
        .expect("a hidden channel is still in GUILD_CREATE");
    assert_obfuscated(listed, guild);
    assert_eq!(
        g.voice_states[0].channel_id.map(|c| c.get()),
        Some(before),
        "voice states are not withheld"
    );

    let after = sim.create_channel(hidden_voice("After", guild, None)).await;
    let created = next_channel_event(&mut shard, after).await;
    assert_obfuscated(&created, guild);
    assert_eq!(
        created.kind,
        twilight_model::channel::ChannelType::GuildVoice
    );

    // An overwrite for the bot: the update carries the real channel.
    sim.set_overwrite(
        after,
        bot,
        1,
        (Permissions::VIEW_CHANNEL | Permissions::CONNECT).bits(),
        0,
    )
    .await;
    let revealed = next_channel_event(&mut shard, after).await;
    assert_eq!(revealed.name.as_deref(), Some("After"));
    assert_eq!(revealed.user_limit, Some(4));
    assert_eq!(revealed.permission_overwrites.map(|o| o.len()), Some(2));
    // Taking it away hides the channel again.
    sim.delete_overwrite(after, bot).await;
    assert_obfuscated(&next_channel_event(&mut shard, after).await, guild);

    let bramble = sim.user("bramble").await;
    sim.set_overwrite(
        before,
        bramble,
        1,
        (Permissions::VIEW_CHANNEL | Permissions::CONNECT).bits(),
        0,
    )
    .await;
    assert_obfuscated(&next_channel_event(&mut shard, before).await, guild);
    sim.join(bramble, before).await;
    let Event::VoiceStateUpdate(vs) =
        next_event(&mut shard, |e| matches!(e, Event::VoiceStateUpdate(_))).await
    else {
        unreachable!()
    };
    assert_eq!(vs.0.channel_id.map(|c| c.get()), Some(before));
}

#[tokio::test]
async fn role_changes_that_flip_the_bots_view_send_channel_updates() {
    let sim = TestSim::start().await;
    let guild = sim.guild_id();
    let bot = sim.id_of("bot_id").await;
    let mut shard = shard(&sim);
    next_event(&mut shard, |e| matches!(e, Event::GuildCreate(_))).await;

    let seer = sim.create_role("Seer", 0).await;
    let Event::RoleCreate(created) =
        next_event(&mut shard, |e| matches!(e, Event::RoleCreate(_))).await
    else {
        unreachable!()
    };
    assert_eq!(created.role.id.get(), seer);
    let vault = sim
        .create_channel(hidden_voice("Vault", guild, Some(seer)))
        .await;
    assert_obfuscated(&next_channel_event(&mut shard, vault).await, guild);

    // The bot gets the role: GUILD_MEMBER_UPDATE needs GUILD_MEMBERS, but the vault's
    // CHANNEL_UPDATE reaches it with the real data.
    sim.grant_role(bot, seer).await;
    let seen = next_channel_event(&mut shard, vault).await;
    assert_eq!(seen.name.as_deref(), Some("Vault"));

    // Taking the role away hides it again.
    sim.revoke_role(bot, seer).await;
    assert_obfuscated(&next_channel_event(&mut shard, vault).await, guild);

    // Role permissions: the lobby has no overwrites, so the bot sees it through
    // @everyone and through its own role. Taking View from @everyone alone flips
    // nothing (only GUILD_ROLE_UPDATE); taking it from the bot's role too hides it.
    let lobby = sim.id_of("lobby_id").await;
    let state = sim.state().await;
    let role = |pick: &dyn Fn(&Value) -> bool| -> (u64, u64) {
        let r = state["roles"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| pick(r))
            .expect("the role");
        let num = |v: &Value| v.as_str().and_then(|s| s.parse().ok()).unwrap();
        (num(&r["id"]), num(&r["permissions"]))
    };
    let (bot_role, bot_perms) = role(&|r| r["managed"] == true);
    let everyone_perms = role(&|r| is_id(&r["id"], guild)).1;
    sim.set_role_permissions(guild, everyone_perms & !Permissions::VIEW_CHANNEL.bits())
        .await;
    let Event::RoleUpdate(updated) =
        next_event(&mut shard, |e| matches!(e, Event::RoleUpdate(_))).await
    else {
        unreachable!()
    };
    assert_eq!(updated.role.id.get(), guild);
    assert_eq!(
        updated.role.permissions.bits(),
        everyone_perms & !Permissions::VIEW_CHANNEL.bits()
    );
    sim.set_role_permissions(bot_role, bot_perms & !Permissions::VIEW_CHANNEL.bits())
        .await;
    // The role update comes first, then the channels it hid; none came in between.
    let next = next_event(&mut shard, |e| {
        matches!(e, Event::RoleUpdate(_) | Event::ChannelUpdate(_))
    })
    .await;
    assert!(
        matches!(&next, Event::RoleUpdate(r) if r.role.id.get() == bot_role),
        "{next:?}"
    );
    assert_obfuscated(&next_channel_event(&mut shard, lobby).await, guild);
    sim.set_role_permissions(bot_role, bot_perms).await;
    let back = next_channel_event(&mut shard, lobby).await;
    assert_eq!(back.name.as_deref(), Some("Lobby"));
}

#[tokio::test]
async fn obfuscated_channels_have_discords_json_shape() {
    let sim = TestSim::start().await;
    let guild = sim.guild_id();
    let hidden = sim
        .create_channel(hidden_voice("Secret", guild, None))
        .await;
    let mut ws = connect(&sim, "?v=10&encoding=json").await;
    recv(&mut ws).await.expect("hello");
    send(&mut ws, &identify(&sim.token(), 129)).await;
    recv(&mut ws).await.expect("ready");
    let frame = recv(&mut ws).await.expect("guild create");
    assert_eq!(frame["t"], "GUILD_CREATE");
    let channel = frame["d"]["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| is_id(&c["id"], hidden))
        .cloned()
        .expect("the hidden channel is listed");
    assert_eq!(channel["name"], "___hidden___");
    assert_eq!(
        channel["flags"].as_u64().unwrap() & ChannelFlags::CHANNEL_OBFUSCATED.bits(),
        ChannelFlags::CHANNEL_OBFUSCATED.bits()
    );
    assert_eq!(
        channel["permission_overwrites"],
        json!([{"id": guild.to_string(), "type": 0, "allow": "0", "deny": Permissions::VIEW_CHANNEL.bits().to_string()}])
    );
    for field in ["bitrate", "rtc_region"] {
        assert_eq!(channel[field], Value::Null, "{field}");
    }
    assert_eq!(channel["user_limit"], 0);
    assert_eq!(channel["type"], 2);
    assert!(channel["position"].is_i64());
    // twilight-model reads both the channel and the GUILD_CREATE that holds it (it drops
    // the unknown flag bit, which is why Coven recognises the name).
    let parsed: twilight_model::channel::Channel =
        serde_json::from_value(channel).expect("twilight-model reads the channel");
    assert_eq!(parsed.id.get(), hidden);
    let parsed: GuildCreate =
        serde_json::from_value(frame["d"].clone()).expect("twilight-model reads GUILD_CREATE");
    assert!(matches!(parsed, GuildCreate::Available(_)));
    let owls = recv(&mut ws).await.expect("the second guild's create");
    assert_eq!(owls["d"]["id"], NIGHT_OWLS_GUILD_ID.to_string());

    // CHANNEL_CREATE of another hidden channel, raw.
    let other = sim.create_channel(hidden_voice("Other", guild, None)).await;
    let frame = recv(&mut ws).await.expect("channel create");
    assert_eq!(frame["t"], "CHANNEL_CREATE");
    assert_eq!(frame["d"]["id"], other.to_string());
    assert_eq!(frame["d"]["name"], "___hidden___");
    assert_eq!(frame["d"]["guild_id"], guild.to_string());
    let _: twilight_model::gateway::payload::incoming::ChannelCreate =
        serde_json::from_value(frame["d"].clone()).expect("twilight-model reads CHANNEL_CREATE");
}

/// Waits until the identify bucket of unsharded sessions (0) may start a session again:
/// Discord allows one IDENTIFY per bucket per 5 s, and these tests start a second session
/// of the one bucket, as a client pacing itself by `max_concurrency` would.
async fn bucket_free(sim: &TestSim) {
    let state = sim.state().await;
    let last = state["gateway"]["sessions"]
        .as_array()
        .expect("gateway lists sessions")
        .iter()
        .filter_map(|s| s["identified_at_ms"].as_array())
        .flatten()
        .filter_map(Value::as_u64)
        .max();
    let Some(last) = last else { return };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // A little over 5 s: the sim measures the interval on its own clock.
    let free_at = last + coven::sim::gateway::IDENTIFY_INTERVAL.as_millis() as u64 + 100;
    tokio::time::sleep(std::time::Duration::from_millis(
        free_at.saturating_sub(now),
    ))
    .await;
}

/// Whether a JSON value is this snowflake, written as Discord writes ids (a string).
fn is_id(v: &Value, id: u64) -> bool {
    v.as_str() == Some(id.to_string().as_str())
}

/// Connects, identifies with these intents (and `shard`, if any), and returns the socket
/// and the READY payload.
async fn identified(sim: &TestSim, intents: u64, shard: Option<[u64; 2]>) -> (Ws, Value) {
    let mut ws = connect(sim, "?v=10&encoding=json").await;
    recv(&mut ws).await.expect("hello");
    let mut payload: Value = serde_json::from_str(&identify(&sim.token(), intents)).unwrap();
    if let Some(shard) = shard {
        payload["d"]["shard"] = json!(shard);
    }
    send(&mut ws, &payload.to_string()).await;
    let ready = recv(&mut ws).await.expect("ready");
    assert_eq!(ready["t"], "READY");
    (ws, ready)
}

/// The ids of READY's guilds, each checked to be listed unavailable.
fn ready_guilds(ready: &Value) -> Vec<String> {
    ready["d"]["guilds"]
        .as_array()
        .expect("READY lists guilds")
        .iter()
        .map(|g| {
            assert_eq!(
                g["unavailable"], true,
                "READY's guilds are unavailable: {g}"
            );
            g["id"].as_str().expect("an id").to_owned()
        })
        .collect()
}

/// The next `n` frames, which must be dispatches of `name`; their guild ids.
async fn next_creates(ws: &mut Ws, name: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let frame = recv(ws).await.expect("a dispatch");
        assert_eq!(frame["t"], name, "{frame}");
        ids.push(frame["d"]["id"].as_str().expect("an id").to_owned());
    }
    ids
}

#[tokio::test]
async fn ready_lists_every_guild_of_the_bot_and_a_guild_create_follows_for_each() {
    let sim = TestSim::start_with(|s| s.guilds = 3).await;
    let (mut ws, ready) = identified(&sim, 129, None).await;
    let mut want: Vec<String> = [sim.guild_id(), NIGHT_OWLS_GUILD_ID]
        .into_iter()
        .chain((0..3).map(coven::sim::defaults::generated_guild_id))
        .map(|g| g.to_string())
        .collect();
    let listed = ready_guilds(&ready);
    assert_eq!(
        listed[0],
        sim.guild_id().to_string(),
        "the first guild first"
    );
    assert!(
        !listed.contains(&DICE_TOWER_GUILD_ID.to_string()),
        "the bot is not in Dice Tower"
    );
    let mut sorted = listed.clone();
    sorted.sort();
    want.sort();
    assert_eq!(sorted, want);
    assert_eq!(next_creates(&mut ws, "GUILD_CREATE", 5).await, listed);

    // twilight reads each of them.
    bucket_free(&sim).await;
    let mut shard = shard(&sim);
    let mut seen = Vec::new();
    while seen.len() < 5 {
        if let Event::GuildCreate(g) =
            next_event(&mut shard, |e| matches!(e, Event::GuildCreate(_))).await
        {
            let GuildCreate::Available(g) = *g else {
                panic!("a guild arrived unavailable")
            };
            seen.push(g.id.get());
        }
    }
    assert!(seen.contains(&NIGHT_OWLS_GUILD_ID));
}

#[tokio::test]
async fn a_sharded_session_gets_only_the_guilds_discords_formula_gives_it() {
    // Two identify buckets, so shards 0 and 1 may start together.
    let sim = TestSim::start_with(|s| {
        s.rate_limit = 1_000;
        s.max_concurrency = 2;
    })
    .await;
    // (guild_id >> 22) % 2: the first guild is on shard 0, Night Owls on shard 1.
    let (mut zero, ready) = identified(&sim, 129, Some([0, 2])).await;
    assert_eq!(ready_guilds(&ready), [sim.guild_id().to_string()]);
    assert_eq!(ready["d"]["shard"], json!([0, 2]));
    assert_eq!(
        next_creates(&mut zero, "GUILD_CREATE", 1).await,
        [sim.guild_id().to_string()]
    );
    let (mut one, ready) = identified(&sim, 129, Some([1, 2])).await;
    assert_eq!(ready_guilds(&ready), [NIGHT_OWLS_GUILD_ID.to_string()]);
    assert_eq!(
        next_creates(&mut one, "GUILD_CREATE", 1).await,
        [NIGHT_OWLS_GUILD_ID.to_string()]
    );

    // A channel made in Night Owls reaches shard 1 only; one in the first guild, shard 0.
    let res = sim
        .http
        .post(sim.url(&format!("/api/v10/guilds/{NIGHT_OWLS_GUILD_ID}/channels")))
        .header("authorization", format!("Bot {}", sim.token()))
        .json(&json!({"name": "Owl table", "type": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    sim.create_channel(json!({"name": "Playgroup table"})).await;
    let frame = recv(&mut one).await.expect("a dispatch");
    assert_eq!(
        (frame["t"].clone(), frame["d"]["guild_id"].clone()),
        (
            json!("CHANNEL_CREATE"),
            json!(NIGHT_OWLS_GUILD_ID.to_string())
        )
    );
    let frame = recv(&mut zero).await.expect("a dispatch");
    assert_eq!(
        frame["d"]["name"], "Playgroup table",
        "shard 0 never saw Night Owls' channel"
    );
    assert_eq!(frame["d"]["guild_id"], sim.guild_id().to_string());
}

#[tokio::test]
async fn removing_the_bot_sends_guild_delete_and_the_guild_is_gone_for_it() {
    // The raw sockets send no heartbeats, and outlive a 5 s wait for the identify bucket.
    let sim = TestSim::start_with(|s| {
        s.rate_limit = 1_000;
        s.heartbeat_interval = std::time::Duration::from_secs(60);
    })
    .await;
    let (mut ws, _) = identified(&sim, 129, None).await;
    next_creates(&mut ws, "GUILD_CREATE", 2).await;

    let (status, _) = sim
        .control_with(
            reqwest::Method::DELETE,
            &format!("/guilds/{NIGHT_OWLS_GUILD_ID}/bot"),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let gone = recv(&mut ws).await.expect("GUILD_DELETE");
    assert_eq!(gone["t"], "GUILD_DELETE");
    // Removed, not an outage: no `unavailable` field.
    assert_eq!(gone["d"], json!({"id": NIGHT_OWLS_GUILD_ID.to_string()}));
    let parsed: twilight_model::gateway::payload::incoming::GuildDelete =
        serde_json::from_value(gone["d"].clone()).expect("twilight-model reads GUILD_DELETE");
    assert!(!parsed.unavailable.unwrap_or(false));

    let state = sim.state().await;
    let owls = state["guilds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| is_id(&g["id"], NIGHT_OWLS_GUILD_ID))
        .cloned()
        .unwrap();
    assert_eq!(owls["bot"], false);
    let res = sim
        .http
        .get(sim.url(&format!("/api/v10/guilds/{NIGHT_OWLS_GUILD_ID}/channels")))
        .header("authorization", format!("Bot {}", sim.token()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    // Twice is refused; an unknown guild is 404.
    let (status, _) = sim
        .control_with(
            reqwest::Method::DELETE,
            &format!("/guilds/{NIGHT_OWLS_GUILD_ID}/bot"),
            None,
        )
        .await;
    assert_eq!(status, 409);
    let (status, _) = sim
        .control_with(reqwest::Method::DELETE, "/guilds/1/bot", None)
        .await;
    assert_eq!(status, 404);

    // A new session hears of the first guild only; the old one gets the first guild's
    // changes and nothing of Night Owls.
    bucket_free(&sim).await;
    let (_, ready) = identified(&sim, 129, None).await;
    assert_eq!(ready_guilds(&ready), [sim.guild_id().to_string()]);
    sim.create_channel(json!({"name": "After"})).await;
    let next = recv(&mut ws).await.expect("a dispatch");
    assert_eq!(next["t"], "CHANNEL_CREATE");
}

#[tokio::test]
async fn an_outage_takes_a_guild_down_and_brings_it_back_whole() {
    // The raw sockets send no heartbeats, and outlive a 5 s wait for the identify bucket.
    let sim =
        TestSim::start_with(|s| s.heartbeat_interval = std::time::Duration::from_secs(60)).await;
    let (mut ws, _) = identified(&sim, 129, None).await;
    next_creates(&mut ws, "GUILD_CREATE", 2).await;
    let first = sim.guild_id();

    let (status, _) = sim
        .control(
            &format!("/guilds/{first}/outage"),
            json!({"unavailable": true}),
        )
        .await;
    assert_eq!(status, 204);
    let down = recv(&mut ws).await.expect("GUILD_DELETE");
    assert_eq!(down["t"], "GUILD_DELETE");
    assert_eq!(
        down["d"],
        json!({"id": first.to_string(), "unavailable": true})
    );
    let entry = sim.state().await["guilds"][0].clone();
    assert_eq!(
        (entry["unavailable"].clone(), entry["bot"].clone()),
        (json!(true), json!(true))
    );

    // While it is down, a new session sees it in READY but gets no GUILD_CREATE for it,
    // and its changes are not dispatched.
    bucket_free(&sim).await;
    let (mut late, ready) = identified(&sim, 129, None).await;
    assert!(ready_guilds(&ready).contains(&first.to_string()));
    assert_eq!(
        next_creates(&mut late, "GUILD_CREATE", 1).await,
        [NIGHT_OWLS_GUILD_ID.to_string()]
    );
    let (lobby, ash) = (sim.id_of("lobby_id").await, sim.user("ash").await);
    sim.join(ash, lobby).await;

    // Back: GUILD_CREATE with everything, the join made meanwhile included.
    let (status, _) = sim
        .control(
            &format!("/guilds/{first}/outage"),
            json!({"unavailable": false}),
        )
        .await;
    assert_eq!(status, 204);
    for socket in [&mut ws, &mut late] {
        let back = recv(socket).await.expect("GUILD_CREATE");
        assert_eq!(back["t"], "GUILD_CREATE", "{back}");
        assert_eq!(back["d"]["id"], first.to_string());
        assert_eq!(back["d"]["unavailable"], false);
        let voice = back["d"]["voice_states"].as_array().unwrap();
        assert!(voice.iter().any(|v| is_id(&v["user_id"], ash)), "{voice:?}");
    }
    let (status, _) = sim
        .control("/guilds/1/outage", json!({"unavailable": true}))
        .await;
    assert_eq!(status, 404);
    let (status, _) = sim
        .control(&format!("/guilds/{first}/outage"), json!({}))
        .await;
    assert_eq!(status, 400, "unavailable is required");
}

#[tokio::test]
async fn sim_guilds_generates_guilds_the_bot_is_in_and_each_arrives() {
    let n = 1_000;
    let sim = TestSim::start_with(|s| s.guilds = n).await;
    let (mut ws, ready) = identified(&sim, 1, None).await;
    let listed = ready_guilds(&ready);
    assert_eq!(
        listed.len(),
        n as usize + 2,
        "generated, the first and Night Owls"
    );
    let creates = next_creates(&mut ws, "GUILD_CREATE", listed.len()).await;
    assert_eq!(creates, listed);
    let bot_guilds = sim
        .http
        .get(sim.url("/api/v10/users/@me/guilds?limit=200"))
        .header("authorization", format!("Bot {}", sim.token()))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(bot_guilds.as_array().unwrap().len(), 200, "a page of 200");
}

// ---------------------------------------------------------------------------------------
// Sharding, session start limits and identify buckets, as Discord documents them.

/// GET /gateway/bot with the bot's token.
async fn gateway_bot(sim: &TestSim) -> Value {
    let res = sim
        .http
        .get(sim.url("/api/v10/gateway/bot"))
        .header("authorization", format!("Bot {}", sim.token()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

/// Connects and sends IDENTIFY with `shard`; the first answer after HELLO: a frame, or the
/// close code.
async fn identify_answer(sim: &TestSim, shard: Option<[u64; 2]>) -> (Ws, Result<Value, u16>) {
    let mut ws = connect(sim, "?v=10&encoding=json").await;
    recv(&mut ws).await.expect("hello");
    let mut payload: Value = serde_json::from_str(&identify(&sim.token(), 129)).unwrap();
    if let Some(shard) = shard {
        payload["d"]["shard"] = json!(shard);
    }
    send(&mut ws, &payload.to_string()).await;
    let answer = recv(&mut ws).await;
    (ws, answer)
}

fn is_invalid_session_false(answer: &Result<Value, u16>) -> bool {
    matches!(answer, Ok(f) if f["op"] == 9 && f["d"] == false)
}

/// `/_sim/state`'s `gateway.sessions` entry for `shard` (`null` for unsharded).
async fn shard_entry(sim: &TestSim, shard: Value) -> Option<Value> {
    sim.state().await["gateway"]["sessions"]
        .as_array()
        .expect("gateway lists sessions")
        .iter()
        .find(|s| s["shard"] == shard)
        .cloned()
}

#[tokio::test]
async fn sim_gateway_bot_counts_session_starts_down_with_identify_but_not_resume() {
    let sim = TestSim::start_with(|s| s.session_start_remaining = 10).await;
    let before = gateway_bot(&sim).await;
    assert_eq!(before["url"], sim.gateway_url());
    // The bot is in two guilds: one shard (one per 1,000 guilds).
    assert_eq!(before["shards"], 1);
    let limit = &before["session_start_limit"];
    assert_eq!(
        (limit["total"].clone(), limit["remaining"].clone()),
        (json!(1000), json!(10))
    );
    assert_eq!(limit["max_concurrency"], 1);
    assert_eq!(limit["reset_after"], 86_400_000, "no session started yet");

    let mut shard = shard(&sim);
    next_event(&mut shard, |e| matches!(e, Event::GuildCreate(_))).await;
    let after = gateway_bot(&sim).await["session_start_limit"].clone();
    assert_eq!(after["remaining"], 9);
    assert!(after["reset_after"].as_u64().unwrap() <= 86_400_000);

    sim.control("/gateway/reconnect", json!({})).await;
    next_event(&mut shard, |e| matches!(e, Event::Resumed)).await;
    assert_eq!(
        gateway_bot(&sim).await["session_start_limit"]["remaining"],
        9,
        "RESUME starts no session"
    );
}

#[tokio::test]
async fn sim_shards_sets_the_recommended_count_and_each_guilds_shard() {
    let sim = TestSim::start_with(|s| {
        s.shards = Some(3);
        s.max_concurrency = 16;
    })
    .await;
    assert_eq!(gateway_bot(&sim).await["shards"], 3);
    for g in sim.state().await["guilds"].as_array().unwrap() {
        let id: u64 = g["id"].as_str().unwrap().parse().unwrap();
        assert_eq!(g["shard"], (id >> 22) % 3, "{g}");
    }
    // Any num_shards is allowed, not only the recommended one (Discord routes by it).
    let (_ws, ready) = identify_answer(&sim, Some([1, 2])).await;
    assert_eq!(ready.expect("ready")["t"], "READY");
}

#[tokio::test]
async fn sim_two_identifies_of_one_bucket_within_5s_get_op9_other_buckets_do_not() {
    let sim = TestSim::start().await;
    let (_zero, ready) = identified(&sim, 129, Some([0, 2])).await;
    assert_eq!(ready["t"], "READY");
    // max_concurrency 1: shard 1 is in bucket 1 % 1 = 0, just used.
    let (_one, answer) = identify_answer(&sim, Some([1, 2])).await;
    assert!(is_invalid_session_false(&answer), "{answer:?}");
    // Unsharded is bucket 0 too.
    let (_none, answer) = identify_answer(&sim, None).await;
    assert!(is_invalid_session_false(&answer), "{answer:?}");
    assert_eq!(sim.gateway_counter("identify_rejected").await, 2);
    assert_eq!(sim.gateway_counter("identifies").await, 1);

    let sim = TestSim::start_with(|s| s.max_concurrency = 2).await;
    let (_zero, ready) = identified(&sim, 129, Some([0, 2])).await;
    assert_eq!(ready["t"], "READY");
    let (_one, ready) = identified(&sim, 129, Some([1, 2])).await;
    assert_eq!(ready["t"], "READY");
    assert_eq!(sim.gateway_counter("identify_rejected").await, 0);
    assert_eq!(
        gateway_bot(&sim).await["session_start_limit"]["max_concurrency"],
        2
    );
}

#[tokio::test]
async fn sim_an_identify_with_no_session_starts_left_is_refused() {
    let sim = TestSim::start_with(|s| {
        s.session_start_remaining = 1;
        s.max_concurrency = 2;
    })
    .await;
    let (_first, ready) = identified(&sim, 129, Some([0, 2])).await;
    assert_eq!(ready["t"], "READY");
    assert_eq!(
        gateway_bot(&sim).await["session_start_limit"]["remaining"],
        0
    );
    // Another bucket, so only the day's limit can refuse it.
    let (_second, answer) = identify_answer(&sim, Some([1, 2])).await;
    assert!(is_invalid_session_false(&answer), "{answer:?}");
    assert_eq!(sim.gateway_counter("identify_rejected").await, 1);
    assert_eq!(sim.gateway_counter("identifies").await, 1);
}

#[tokio::test]
async fn sim_a_shard_out_of_range_is_4010_and_too_many_guilds_is_4011() {
    let sim = TestSim::start_with(|s| s.max_guilds_per_shard = 1).await;
    for shard in [[2, 2], [0, 0], [5, 1]] {
        let (_ws, answer) = identify_answer(&sim, Some(shard)).await;
        assert_eq!(answer.err(), Some(4010), "{shard:?}");
    }
    // Unsharded, the session would hold both of the bot's guilds.
    let (_ws, answer) = identify_answer(&sim, None).await;
    assert_eq!(answer.err(), Some(4011));
    let (_ws, answer) = identify_answer(&sim, Some([0, 1])).await;
    assert_eq!(answer.err(), Some(4011));
    // One guild each: accepted (refusals used no bucket).
    let (_ws, ready) = identify_answer(&sim, Some([0, 2])).await;
    assert_eq!(ready.expect("ready")["t"], "READY");
    let unsharded = wait_for("the unsharded refusal recorded", || async {
        shard_entry(&sim, Value::Null)
            .await
            .filter(|s| s["closes"] == json!([4011]))
    })
    .await;
    assert_eq!(unsharded["identifies"], 0);
}

#[tokio::test]
async fn sim_sessions_list_each_shards_identifies_resumes_and_closes() {
    let sim = TestSim::start_with(|s| s.max_concurrency = 4).await;
    // twilight is shard [0, 1]: the sim closes it with 4000 and it resumes.
    let mut shard = shard(&sim);
    next_event(&mut shard, |e| matches!(e, Event::GuildCreate(_))).await;
    sim.control("/gateway/disconnect", json!({"code": 4000}))
        .await;
    next_event(&mut shard, |e| matches!(e, Event::Resumed)).await;

    // [1, 2] closes with 4000 itself; [3, 4]'s socket just goes away.
    let (mut one, _) = identified(&sim, 129, Some([1, 2])).await;
    one.close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: CloseCode::Library(4000),
        reason: "".into(),
    }))
    .await
    .unwrap();
    let (dropped, _) = identified(&sim, 129, Some([3, 4])).await;
    drop(dropped);

    let sessions = wait_for("both ends recorded", || async {
        let state = sim.state().await;
        let sessions = state["gateway"]["sessions"].clone();
        (sessions[1]["closes"] == json!([4000]) && sessions[2]["closes"] == json!([1006]))
            .then_some(sessions)
    })
    .await;
    let shards: Vec<Value> = sessions
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["shard"].clone())
        .collect();
    assert_eq!(shards, [json!([0, 1]), json!([1, 2]), json!([3, 4])]);
    let twilight = &sessions[0];
    assert_eq!(twilight["connected"], true);
    assert_eq!(
        (twilight["identifies"].clone(), twilight["resumes"].clone()),
        (json!(1), json!(1))
    );
    assert_eq!(twilight["closes"], json!([4000]), "the sim's close");
    assert!(twilight["last_sequence"].as_u64().unwrap() >= 3);
    assert_eq!(twilight["identified_at_ms"].as_array().unwrap().len(), 1);
    for s in &sessions.as_array().unwrap()[1..] {
        assert_eq!(s["connected"], false, "{s}");
        assert_eq!(s["identifies"], 1, "{s}");
        assert_eq!(s["last_sequence"], 2, "READY and one GUILD_CREATE: {s}");
    }
    // The counters keep their meaning: every shard's sessions together.
    let gateway = sim.state().await["gateway"].clone();
    assert_eq!(
        (gateway["identifies"].clone(), gateway["resumes"].clone()),
        (json!(3), json!(1))
    );
}

#[tokio::test]
async fn sim_expired_sessions_cannot_be_resumed() {
    let sim = TestSim::start().await;
    let (ws, ready) = identified(&sim, 129, None).await;
    let session = ready["d"]["session_id"].as_str().unwrap().to_owned();
    drop(ws);
    wait_for("the session detached", || async {
        shard_entry(&sim, Value::Null)
            .await
            .filter(|s| s["connected"] == false && s["closes"] == json!([1006]))
    })
    .await;
    let (status, body) = sim.control("/gateway/expire", json!({})).await;
    assert_eq!((status, body["sessions"].clone()), (200, json!(1)));

    let mut ws = connect(&sim, "?v=10&encoding=json").await;
    recv(&mut ws).await.expect("hello");
    let resume = json!({"op": 6, "d": {"token": sim.token(), "session_id": session, "seq": 1}});
    send(&mut ws, &resume.to_string()).await;
    let answer = recv(&mut ws).await;
    assert!(is_invalid_session_false(&answer), "{answer:?}");
    assert_eq!(sim.gateway_counter("resumes").await, 0);
}

#[tokio::test]
async fn sim_twilights_own_queue_starts_two_shards_of_one_bucket_without_a_refusal() {
    let sim = TestSim::start().await;
    // twilight's default queue is Discord's default limits: max_concurrency 1, so shards
    // 0 and 1 share bucket 0 and it spaces their IDENTIFYs 5 s apart.
    let queue = twilight_gateway_queue::InMemoryQueue::default();
    for id in [0, 1] {
        let config = twilight_gateway::ConfigBuilder::new(
            sim.token(),
            twilight_gateway::Intents::GUILDS | twilight_gateway::Intents::GUILD_VOICE_STATES,
        )
        .proxy_url(sim.gateway_url())
        .queue(queue.clone())
        .build();
        let mut shard =
            twilight_gateway::Shard::with_config(twilight_gateway::ShardId::new(id, 2), config);
        next_event(&mut shard, |e| matches!(e, Event::Ready(_))).await;
        // Kept running, so its session stays connected.
        tokio::spawn(async move {
            use twilight_gateway::StreamExt as _;
            while shard
                .next_event(twilight_gateway::EventTypeFlags::all())
                .await
                .is_some()
            {}
        });
    }
    let gateway = sim.state().await["gateway"].clone();
    assert_eq!(
        (
            gateway["identifies"].clone(),
            gateway["identify_rejected"].clone()
        ),
        (json!(2), json!(0))
    );
    let at: Vec<u64> = gateway["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["identified_at_ms"][0].as_u64().unwrap())
        .collect();
    let spacing = coven::sim::gateway::IDENTIFY_INTERVAL - coven::sim::gateway::IDENTIFY_TOLERANCE;
    assert!(at[1] >= at[0] + spacing.as_millis() as u64, "{at:?}");
}

/// Every frame carries `s` and `t` ("Payload Structure": null when `op` is not 0);
/// clients such as discord.py read them from every frame, op 7 and op 9 included.
#[tokio::test]
async fn reconnect_and_invalid_session_frames_carry_null_s_and_t() {
    let sim = TestSim::start().await;
    let mut ws = connect(&sim, "?v=10&encoding=json").await;
    let hello = recv(&mut ws).await.expect("hello");
    assert_eq!((&hello["s"], &hello["t"]), (&Value::Null, &Value::Null));
    send(&mut ws, &identify(&sim.token(), 129)).await;
    while recv(&mut ws).await.expect("a frame")["t"] != "READY" {}
    let shape = |f: &Value| {
        let o = f.as_object().expect("an object").clone();
        (
            o.get("s").cloned(),
            o.get("t").cloned(),
            o.get("d").cloned(),
        )
    };

    sim.control("/gateway/reconnect", json!({})).await;
    let reconnect = loop {
        let frame = recv(&mut ws).await.expect("a frame");
        if frame["op"] == 7 {
            break frame;
        }
    };
    assert_eq!(
        shape(&reconnect),
        (Some(Value::Null), Some(Value::Null), Some(Value::Null))
    );
    // The same session: op 7 leaves it to the client to close.
    sim.control("/gateway/invalidate", json!({"resumable": true}))
        .await;
    let invalid = loop {
        let frame = recv(&mut ws).await.expect("a frame");
        if frame["op"] == 9 {
            break frame;
        }
    };
    assert_eq!(
        shape(&invalid),
        (Some(Value::Null), Some(Value::Null), Some(json!(true)))
    );
}

/// The bot's managed role names the bot in `tags.bot_id` ("Role Tags Structure"), which
/// libraries use to find the bot's own role; other roles carry no tags.
#[tokio::test]
async fn the_bots_managed_role_names_the_bot_in_its_tags() {
    let sim = TestSim::start().await;
    let mut shard = shard(&sim);
    let event = next_event(&mut shard, |e| matches!(e, Event::GuildCreate(_))).await;
    let Event::GuildCreate(created) = event else {
        unreachable!()
    };
    let GuildCreate::Available(guild) = *created else {
        panic!("the guild is available")
    };
    let bot = guild
        .members
        .iter()
        .find(|m| m.user.bot)
        .expect("the bot is a member")
        .user
        .id;
    let managed: Vec<_> = guild.roles.iter().filter(|r| r.managed).collect();
    assert_eq!(managed.len(), 1, "{:?}", guild.roles);
    let tags = managed[0].tags.as_ref().expect("a managed role has tags");
    assert_eq!(tags.bot_id, Some(bot));
    assert!(
        guild
            .roles
            .iter()
            .filter(|r| !r.managed)
            .all(|r| r.tags.is_none())
    );
}

// ---------------------------------------------------------------------------------------
// Encoding and compression ("Encoding and Compression"), close codes, op 9 on the socket.

/// The next binary frame; panics on a text frame or a close.
async fn recv_binary(ws: &mut Ws) -> Vec<u8> {
    within("a binary frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => return b.to_vec(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a binary frame, got {other:?}"),
            }
        }
    })
    .await
}

/// Inflates one zlib-stream message through the connection's shared context.
fn inflate(z: &mut flate2::Decompress, mut input: &[u8]) -> Result<String, String> {
    let mut out = Vec::with_capacity(input.len() * 4 + 64);
    loop {
        if out.len() == out.capacity() {
            out.reserve(out.capacity());
        }
        let before = z.total_in();
        z.decompress_vec(input, &mut out, flate2::FlushDecompress::Sync)
            .map_err(|e| e.to_string())?;
        input = &input[(z.total_in() - before) as usize..];
        if input.is_empty() && out.len() < out.capacity() {
            return String::from_utf8(out).map_err(|e| e.to_string());
        }
    }
}

const SYNC_FLUSH: [u8; 4] = [0, 0, 0xff, 0xff];

/// `compress=zlib-stream` with IDENTIFY's `compress: true`, as discord.py connects: every
/// frame is binary, ends in Z_SYNC_FLUSH, and inflates through one context shared by the
/// whole connection; the IDENTIFY flag adds no second layer ("Payload compression will be
/// disabled if you use transport compression").
#[tokio::test]
async fn zlib_stream_sends_every_frame_through_one_shared_context() {
    let sim = TestSim::start().await;
    let mut ws = connect(&sim, "?v=10&encoding=json&compress=zlib-stream").await;
    let mut z = flate2::Decompress::new(true);

    let hello = recv_binary(&mut ws).await;
    assert!(hello.ends_with(&SYNC_FLUSH), "{hello:?}");
    let hello: Value = serde_json::from_str(&inflate(&mut z, &hello).expect("inflates")).unwrap();
    assert_eq!(hello["op"], 10);

    let mut payload: Value = serde_json::from_str(&identify(&sim.token(), 129)).unwrap();
    payload["d"]["compress"] = json!(true);
    send(&mut ws, &payload.to_string()).await;
    let ready = recv_binary(&mut ws).await;
    assert!(ready.ends_with(&SYNC_FLUSH));
    // Not a stream of its own: a fresh context cannot read it (no zlib header, and its
    // back-references point into HELLO).
    assert!(inflate(&mut flate2::Decompress::new(true), &ready).is_err());
    let ready: Value =
        serde_json::from_str(&inflate(&mut z, &ready).expect("inflates")).expect("plain JSON");
    assert_eq!(
        (ready["t"].as_str(), ready["s"].as_u64()),
        (Some("READY"), Some(1))
    );
    let guild = recv_binary(&mut ws).await;
    let guild: Value = serde_json::from_str(&inflate(&mut z, &guild).unwrap()).unwrap();
    assert_eq!(guild["t"], "GUILD_CREATE");

    send(&mut ws, r#"{"op":1,"d":2}"#).await;
    loop {
        let frame = recv_binary(&mut ws).await;
        assert!(frame.ends_with(&SYNC_FLUSH));
        let frame: Value = serde_json::from_str(&inflate(&mut z, &frame).unwrap()).unwrap();
        if frame["op"] == 11 {
            break;
        }
    }
}

/// IDENTIFY's `compress: true` without transport compression: dispatches come as binary
/// frames, each a whole zlib stream ("the gateway does not implement a shared compression
/// context between events sent"); other frames stay text.
#[tokio::test]
async fn identify_compress_sends_dispatches_as_zlib_payloads() {
    use std::io::Read;
    let sim = TestSim::start().await;
    let mut ws = connect(&sim, "?v=10&encoding=json").await;
    recv(&mut ws).await.expect("hello as text");
    let mut payload: Value = serde_json::from_str(&identify(&sim.token(), 129)).unwrap();
    payload["d"]["compress"] = json!(true);
    send(&mut ws, &payload.to_string()).await;
    for want in ["READY", "GUILD_CREATE"] {
        let bytes = recv_binary(&mut ws).await;
        let mut text = String::new();
        flate2::read::ZlibDecoder::new(&bytes[..])
            .read_to_string(&mut text)
            .expect("a complete zlib stream");
        let frame: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(frame["t"], want);
    }
    send(&mut ws, r#"{"op":1,"d":2}"#).await;
    let ack = within("the ack", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return serde_json::from_str::<Value>(&t).unwrap(),
                Some(Ok(Message::Binary(_))) => continue,
                other => panic!("{other:?}"),
            }
        }
    })
    .await;
    assert_eq!(ack["op"], 11);

    // Under zstd-stream the flag adds no zlib either, as discord.py with zstd connects:
    // READY comes out of the zstd stream as plain JSON.
    let sim = TestSim::start().await;
    let mut ws = connect(&sim, "?v=10&encoding=json&compress=zstd-stream").await;
    let mut z = zstd::stream::raw::Decoder::new().unwrap();
    let hello = recv_binary(&mut ws).await;
    unzstd(&mut z, &hello);
    let mut payload: Value = serde_json::from_str(&identify(&sim.token(), 129)).unwrap();
    payload["d"]["compress"] = json!(true);
    send(&mut ws, &payload.to_string()).await;
    let ready: Value = serde_json::from_str(&unzstd(&mut z, &recv_binary(&mut ws).await))
        .expect("plain JSON inside the zstd stream");
    assert_eq!(ready["t"], "READY");
}

/// Decompresses one message of a zstd-stream connection through its context; each
/// message holds all of one gateway message, the frame left open.
fn unzstd(z: &mut zstd::stream::raw::Decoder<'static>, input: &[u8]) -> String {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
    let mut out: Vec<u8> = Vec::with_capacity(input.len() * 8 + 1024);
    let mut src = InBuffer::around(input);
    loop {
        if out.len() == out.capacity() {
            out.reserve(out.capacity());
        }
        let at = out.len();
        let mut dst = OutBuffer::around_pos(&mut out, at);
        z.run(&mut src, &mut dst).expect("a zstd stream");
        let wrote_to = dst.pos();
        if src.pos == input.len() && wrote_to < out.capacity() {
            return String::from_utf8(out).expect("UTF-8 JSON");
        }
    }
}

/// zstd-stream ("zstd-stream" in Gateway): every frame, HELLO included, is a binary
/// message of one zstd stream that lasts the connection; a message decompresses whole
/// with the context that read the ones before it, and not with a fresh one.
#[tokio::test]
async fn zstd_stream_sends_every_frame_through_one_context() {
    let sim = TestSim::start().await;
    let mut ws = connect(&sim, "?v=10&encoding=json&compress=zstd-stream").await;
    let mut z = zstd::stream::raw::Decoder::new().unwrap();
    let hello: Value = serde_json::from_str(&unzstd(&mut z, &recv_binary(&mut ws).await)).unwrap();
    assert_eq!(hello["op"], 10);
    send(&mut ws, &identify(&sim.token(), 129)).await;
    let ready = recv_binary(&mut ws).await;
    // Not a frame of its own: no zstd frame header (magic 28 b5 2f fd) opens it.
    assert_ne!(ready.get(..4), Some(&[0x28, 0xb5, 0x2f, 0xfd][..]));
    let ready: Value = serde_json::from_str(&unzstd(&mut z, &ready)).unwrap();
    assert_eq!(
        (ready["t"].as_str(), ready["s"].as_u64()),
        (Some("READY"), Some(1))
    );
    let guild: Value = serde_json::from_str(&unzstd(&mut z, &recv_binary(&mut ws).await)).unwrap();
    assert_eq!(guild["t"], "GUILD_CREATE");
    // Every later frame (the other guild's GUILD_CREATE, the ACK) goes through it too.
    send(&mut ws, r#"{"op":1,"d":2}"#).await;
    loop {
        let frame: Value =
            serde_json::from_str(&unzstd(&mut z, &recv_binary(&mut ws).await)).unwrap();
        if frame["op"] == 11 {
            break;
        }
    }
}

/// The close frame the sim ends with: its code and reason.
async fn close_of(ws: &mut Ws) -> (u16, String) {
    within("a close frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(f)))) => {
                    return (u16::from(f.code), f.reason.to_string());
                }
                Some(Ok(Message::Close(None))) | None => return (1005, String::new()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("socket error: {e}"),
            }
        }
    })
    .await
}

/// The URL's query, as "Gateway URL Query String Params" lists it: JSON works in v10 and
/// v9; ETF, which the sim does not speak, an encoding or compression Discord does not
/// offer, and a version it does not serve are closed before HELLO, each with a reason that
/// names what was wrong.
#[tokio::test]
async fn the_gateway_urls_query_is_answered_as_discord_documents() {
    let sim = TestSim::start().await;
    for query in ["?v=10&encoding=json", "?v=10"] {
        let mut ws = connect(&sim, query).await;
        assert_eq!(recv(&mut ws).await.expect(query)["op"], 10, "{query}");
    }
    // READY tells the version back.
    let mut ws = connect(&sim, "?v=9&encoding=json").await;
    recv(&mut ws).await.expect("hello");
    send(&mut ws, &identify(&sim.token(), 129)).await;
    assert_eq!(recv(&mut ws).await.expect("ready")["d"]["v"], 9);
    for (query, code, says) in [
        ("?v=10&encoding=etf", 4002, "etf"),
        ("?v=10&encoding=xml", 4002, "encoding"),
        ("?v=10&encoding=json&compress=zlib", 4002, "compress"),
        ("?v=6&encoding=json", 4012, "version"),
        ("?encoding=json", 4012, "version"),
        ("?v=abc&encoding=json", 4012, "version"),
    ] {
        let mut ws = connect(&sim, query).await;
        let (got, reason) = close_of(&mut ws).await;
        assert_eq!(got, code, "{query}");
        assert!(reason.contains(says), "{query}: {reason}");
    }
}

/// RFC 6455 §5.5.1: an endpoint that receives a Close frame sends one back; the sim
/// echoes the client's code, and records how the connection ended.
#[tokio::test]
async fn a_clients_close_frame_is_answered_with_one() {
    let sim = TestSim::start().await;
    let (mut ws, ready) = identified(&sim, 129, None).await;
    ws.send(Message::Close(Some(
        tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        },
    )))
    .await
    .expect("close sent");
    let answer = within("the close answer", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                other => panic!("no close frame came back: {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(answer.map(|f| u16::from(f.code)), Some(1000));
    wait_for("the close recorded", || async {
        let state = sim.state().await;
        (state["gateway"]["sessions"][0]["closes"] == json!([1000])).then_some(())
    })
    .await;
    // "When you close the connection to the gateway with close code 1000 or 1001, your
    // session will be invalidated" (Gateway, "Initiating a Disconnect").
    let resume = json!({"op": 6, "d": {"token": sim.token(), "session_id": ready["d"]["session_id"], "seq": 1}});
    let mut ws = connect(&sim, "?v=10&encoding=json").await;
    recv(&mut ws).await.expect("hello");
    send(&mut ws, &resume.to_string()).await;
    let answer = recv(&mut ws).await.expect("op 9");
    assert_eq!(
        (answer["op"].as_u64(), answer["d"].as_bool()),
        (Some(9), Some(false))
    );
}

/// Reads frames until op `op`, returning it and the highest dispatch sequence seen.
async fn until_op(ws: &mut Ws, op: u64, mut seq: u64) -> (Value, u64) {
    loop {
        let frame = recv(ws).await.expect("a frame");
        if let Some(s) = frame["s"].as_u64() {
            seq = seq.max(s);
        }
        if frame["op"] == op {
            return (frame, seq);
        }
    }
}

/// After op 9 `d: true` the session may be resumed on the same socket ("Resuming", case
/// 4): the dispatches sent meanwhile are replayed, then RESUMED.
#[tokio::test]
async fn op9_resumable_is_resumed_on_the_same_socket() {
    let sim = TestSim::start().await;
    let (mut ws, ready) = identified(&sim, 129, None).await;
    let session = ready["d"]["session_id"].as_str().unwrap().to_owned();
    sim.control("/gateway/invalidate", json!({"resumable": true}))
        .await;
    let (invalid, seq) = until_op(&mut ws, 9, 1).await;
    assert_eq!(invalid["d"], true);
    // Made while the session waits for its RESUME.
    let channel = sim.create_channel(json!({"name": "meanwhile"})).await;
    let resume = json!({"op": 6, "d": {"token": sim.token(), "session_id": session, "seq": seq}});
    send(&mut ws, &resume.to_string()).await;
    let replayed = recv(&mut ws)
        .await
        .expect("the replayed dispatch, not a close");
    assert_eq!(replayed["t"], "CHANNEL_CREATE", "{replayed}");
    assert!(is_id(&replayed["d"]["id"], channel));
    assert_eq!(replayed["s"], seq + 1);
    assert_eq!(recv(&mut ws).await.expect("resumed")["t"], "RESUMED");
    assert_eq!(sim.gateway_counter("resumes").await, 1);
}

/// After op 9 `d: false` the session is gone: a payload that needs one is 4003 ("this
/// session has been invalidated"), and a new IDENTIFY on the same socket starts a new one.
#[tokio::test]
async fn op9_not_resumable_ends_the_session_and_identify_starts_another() {
    // The socket waits out the identify bucket's 5 s: heartbeats must not be due meanwhile.
    let sim =
        TestSim::start_with(|s| s.heartbeat_interval = std::time::Duration::from_secs(30)).await;
    let (mut ws, ready) = identified(&sim, 129, None).await;
    sim.control("/gateway/invalidate", json!({"resumable": false}))
        .await;
    let (invalid, _) = until_op(&mut ws, 9, 1).await;
    assert_eq!(invalid["d"], false);
    bucket_free(&sim).await;
    send(&mut ws, &identify(&sim.token(), 129)).await;
    let (again, _) = loop {
        let (frame, seq) = until_op(&mut ws, 0, 0).await;
        if frame["t"] == "READY" {
            break (frame, seq);
        }
    };
    assert_ne!(again["d"]["session_id"], ready["d"]["session_id"]);
    assert_eq!(again["s"], 1);

    sim.control("/gateway/invalidate", json!({"resumable": false}))
        .await;
    until_op(&mut ws, 9, 0).await;
    send(
        &mut ws,
        &json!({"op": 3, "d": {"since": null, "activities": [], "status": "online", "afk": false}})
            .to_string(),
    )
    .await;
    assert_eq!(close_of(&mut ws).await.0, 4003);
}

/// A RESUME with a sequence the session never sent is 4007, and the session is over.
#[tokio::test]
async fn a_resume_with_a_future_seq_is_4007() {
    let sim = TestSim::start().await;
    let (first, ready) = identified(&sim, 129, None).await;
    let session = ready["d"]["session_id"].as_str().unwrap().to_owned();
    drop(first);
    let resume = json!({"op": 6, "d": {"token": sim.token(), "session_id": session, "seq": 999}});
    assert_eq!(close_code_after(&sim, &[resume.to_string()]).await, 4007);
    let again = json!({"op": 6, "d": {"token": sim.token(), "session_id": session, "seq": 1}});
    let mut ws = connect(&sim, "?v=10&encoding=json").await;
    recv(&mut ws).await.expect("hello");
    send(&mut ws, &again.to_string()).await;
    let answer = recv(&mut ws).await.expect("op 9");
    assert_eq!(
        (answer["op"].as_u64(), answer["d"].as_bool()),
        (Some(9), Some(false))
    );
}

/// "Apps can send 120 gateway events per connection every 60 seconds ... Apps that
/// surpass the limit are immediately disconnected" (Gateway, "Rate Limiting"): 4008, a
/// code after which a client should resume ("Resuming", case 2), and can.
#[tokio::test]
async fn the_121st_payload_in_a_minute_is_closed_with_4008_and_the_session_resumes() {
    let sim = TestSim::start().await;
    // IDENTIFY is the first of the 120.
    let (mut ws, ready) = identified(&sim, 129, None).await;
    for _ in 0..119 {
        send(&mut ws, r#"{"op":1,"d":null}"#).await;
    }
    let mut seq = 1;
    for _ in 0..119 {
        seq = until_op(&mut ws, 11, seq).await.1;
    }
    send(&mut ws, r#"{"op":1,"d":null}"#).await;
    assert_eq!(close_of(&mut ws).await.0, 4008);

    let mut ws = connect(&sim, "?v=10&encoding=json").await;
    recv(&mut ws).await.expect("hello");
    let resume = json!({"op": 6, "d": {"token": sim.token(), "session_id": ready["d"]["session_id"], "seq": seq}});
    send(&mut ws, &resume.to_string()).await;
    assert_eq!(recv(&mut ws).await.expect("resumed")["t"], "RESUMED");
}

/// Every frame that is not a dispatch carries `s` and `t`, null ("Payload Structure"):
/// HELLO, HEARTBEAT_ACK, a heartbeat request, RECONNECT and INVALID_SESSION.
#[tokio::test]
async fn every_frame_that_is_not_a_dispatch_has_null_s_and_t() {
    let sim = TestSim::start().await;
    let mut ws = connect(&sim, "?v=10&encoding=json").await;
    let mut frames = vec![recv(&mut ws).await.expect("hello")];
    send(&mut ws, &identify(&sim.token(), 129)).await;
    send(&mut ws, r#"{"op":1,"d":null}"#).await;
    frames.push(until_op(&mut ws, 11, 0).await.0);
    let (status, body) = sim.control("/gateway/heartbeat", json!({})).await;
    assert_eq!((status, body["connections"].as_u64()), (200, Some(1)));
    frames.push(until_op(&mut ws, 1, 0).await.0);
    sim.control("/gateway/reconnect", json!({})).await;
    frames.push(until_op(&mut ws, 7, 0).await.0);
    sim.control("/gateway/invalidate", json!({"resumable": false}))
        .await;
    frames.push(until_op(&mut ws, 9, 0).await.0);
    let ops: Vec<_> = frames.iter().map(|f| f["op"].as_u64()).collect();
    assert_eq!(ops, [Some(10), Some(11), Some(1), Some(7), Some(9)]);
    for frame in &frames {
        let o = frame.as_object().expect("an object");
        assert_eq!(
            (o.get("s"), o.get("t")),
            (Some(&Value::Null), Some(&Value::Null)),
            "{frame}"
        );
    }
}

/// "Guild Member Update is sent for current-user updates regardless of whether the
/// GUILD_MEMBERS intent is set" (Gateway, "Gateway Intents"): the bot's own role change
/// reaches a session without GUILD_MEMBERS, another member's does not.
#[tokio::test]
async fn the_bots_own_member_update_comes_without_guild_members() {
    use twilight_model::id::Id;
    let sim = TestSim::start().await;
    let (mut ws, ready) = identified(&sim, 129, None).await;
    let bot: u64 = ready["d"]["user"]["id"].as_str().unwrap().parse().unwrap();
    let http = sim.twilight_http();
    let guild = Id::new(sim.guild_id());
    let role = http
        .create_role(guild)
        .name("table")
        .await
        .expect("the bot makes a role")
        .model()
        .await
        .expect("a role");
    http.add_guild_member_role(guild, Id::new(sim.user("gale").await), role.id)
        .await
        .expect("gale gets the role");
    http.add_guild_member_role(guild, Id::new(bot), role.id)
        .await
        .expect("the bot gives itself the role");
    let update = within("the bot's GUILD_MEMBER_UPDATE", async {
        loop {
            let frame = recv(&mut ws).await.expect("a frame");
            if frame["t"] == "GUILD_MEMBER_UPDATE" {
                return frame;
            }
        }
    })
    .await;
    assert!(is_id(&update["d"]["user"]["id"], bot), "{update}");
    assert!(
        update["d"]["roles"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| is_id(r, role.id.get())))
    );
    let _: twilight_model::gateway::payload::incoming::MemberUpdate =
        serde_json::from_value(update["d"].clone()).expect("twilight-model reads it");
}

/// A send event whose `d` lacks a field "Gateway Events" lists is 4001 ("an invalid
/// payload for an opcode"); with every field it is taken.
#[tokio::test]
async fn send_events_missing_a_documented_field_are_4001() {
    // One identify bucket per case, so none waits out another's 5 s.
    let sim = TestSim::start_with(|s| s.max_concurrency = 16).await;
    let guild = sim.guild_id().to_string();
    let presence = json!({"since": null, "activities": [], "status": "online", "afk": false});
    let voice =
        json!({"guild_id": guild, "channel_id": null, "self_mute": false, "self_deaf": false});
    let members = json!({"guild_id": guild, "query": "", "limit": 0});
    let without = |d: &Value, key: &str| {
        let mut d = d.clone();
        d.as_object_mut().expect("an object").remove(key);
        d
    };
    let cases = [
        (3, without(&presence, "since")),
        (3, without(&presence, "afk")),
        (4, without(&voice, "self_deaf")),
        (
            4,
            json!({"guild_id": "x", "channel_id": null, "self_mute": false, "self_deaf": false}),
        ),
        (8, without(&members, "limit")),
        (31, json!({})),
        (1, json!("seven")),
    ];
    for (i, (op, d)) in (0..).zip(cases) {
        let (mut ws, _) = identified(&sim, 129, Some([i, 16])).await;
        send(&mut ws, &json!({"op": op, "d": d}).to_string()).await;
        assert_eq!(close_of(&mut ws).await.0, 4001, "op {op} with {d}");
    }
    let (mut ws, _) = identified(&sim, 129, Some([15, 16])).await;
    for (op, d) in [
        (3, presence),
        (4, voice),
        (8, members),
        (8, json!({"guild_id": guild, "user_ids": [guild]})),
        (31, json!({"guild_ids": [guild]})),
        (1, json!(2)),
    ] {
        send(&mut ws, &json!({"op": op, "d": d}).to_string()).await;
    }
    until_op(&mut ws, 11, 0).await;
}

/// A payload that earns a close is the last one read: IDENTIFYs sent right behind it
/// start no session (several, since which of a read and the close goes first is up to
/// the scheduler).
#[tokio::test]
async fn nothing_after_a_payload_that_earns_a_close_is_acted_on() {
    let sim = TestSim::start().await;
    let token = sim.token();
    let mut ws = connect(&sim, "?v=10&encoding=json").await;
    recv(&mut ws).await.expect("hello");
    // In one write, so all are there to be read as soon as the first has been.
    ws.feed(Message::text(
        json!({"op": 2, "d": {"token": token}}).to_string(),
    ))
    .await
    .expect("queued");
    for _ in 0..8 {
        ws.feed(Message::text(identify(&token, 129)))
            .await
            .expect("queued");
    }
    ws.flush().await.expect("sent");
    assert_eq!(close_of(&mut ws).await.0, 4001);
    assert_eq!(sim.gateway_counter("identifies").await, 0);
}

#[tokio::test]
async fn the_bot_joins_voice_and_asks_for_members_over_the_gateway() {
    use twilight_model::gateway::payload::outgoing::{RequestGuildMembers, UpdateVoiceState};
    use twilight_model::id::Id;
    let sim = TestSim::start().await;
    let mut shard = shard(&sim);
    next_event(&mut shard, |e| matches!(e, Event::GuildCreate(_))).await;
    let guild = Id::new(sim.guild_id());
    let (lobby, bot) = (sim.id_of("lobby_id").await, sim.id_of("bot_id").await);

    // Update Voice State: the bot is in the lobby for every session, as a user would be.
    shard.command(&UpdateVoiceState::new(
        guild,
        Some(Id::new(lobby)),
        true,
        false,
    ));
    let Event::VoiceStateUpdate(v) = next_event(
        &mut shard,
        |e| matches!(e, Event::VoiceStateUpdate(v) if v.0.user_id.get() == bot),
    )
    .await
    else {
        unreachable!()
    };
    assert_eq!(v.0.channel_id.map(|c| c.get()), Some(lobby));
    assert!(v.0.self_deaf && !v.0.self_mute);

    // Request Guild Members by id: the members found, the rest in not_found, the nonce.
    let bramble = sim.user("bramble").await;
    let by_id = RequestGuildMembers::builder(guild)
        .nonce("by-id")
        .user_ids(vec![Id::new(bramble), Id::new(42)])
        .expect("two ids");
    shard.command(&by_id);
    let Event::MemberChunk(chunk) =
        next_event(&mut shard, |e| matches!(e, Event::MemberChunk(_))).await
    else {
        unreachable!()
    };
    assert_eq!(chunk.nonce.as_deref(), Some("by-id"));
    assert_eq!(
        chunk
            .members
            .iter()
            .map(|m| m.user.id.get())
            .collect::<Vec<_>>(),
        [bramble]
    );
    assert_eq!(
        chunk.not_found.iter().map(|u| u.get()).collect::<Vec<_>>(),
        [42]
    );
    assert_eq!((chunk.chunk_index, chunk.chunk_count), (0, 1));

    // By a username prefix.
    shard.command(
        &RequestGuildMembers::builder(guild)
            .nonce("q")
            .query("BR", Some(10)),
    );
    let Event::MemberChunk(chunk) =
        next_event(&mut shard, |e| matches!(e, Event::MemberChunk(_))).await
    else {
        unreachable!()
    };
    assert_eq!(chunk.nonce.as_deref(), Some("q"));
    assert!(!chunk.members.is_empty());
    assert!(chunk.members.iter().all(|m| m.user.name.starts_with("br")));

    // The whole list needs GUILD_MEMBERS, which the application is not granted: 4014.
    shard.command(&RequestGuildMembers::builder(guild).query("", None));
    // A shard sends commands as it is polled.
    tokio::spawn(async move {
        use twilight_gateway::StreamExt as _;
        while shard
            .next_event(twilight_gateway::EventTypeFlags::all())
            .await
            .is_some()
        {}
    });
    wait_for("the whole-list request closed with 4014", || async {
        shard_entry(&sim, json!([0, 1])).await.filter(|s| {
            s["closes"]
                .as_array()
                .is_some_and(|c| c.contains(&json!(4014)))
        })
    })
    .await;
}
