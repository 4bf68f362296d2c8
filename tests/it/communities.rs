//! Many communities in one deployment: what one community's people can reach of
//! another's (nothing), adding Coven to a server (only its managers, only from what
//! Discord says), a server the bot leaves or loses, and a replica's cost with many
//! guilds nobody on it watches.

use std::time::Duration;

use coven::sim::defaults::{DICE_TOWER_GUILD_ID as DICE_TOWER, NIGHT_OWLS_GUILD_ID as OWLS};
use fred::prelude::*;
use serde_json::{Value, json};

use crate::harness::{Browser, GUILD, Stack, Web, form_value, location, wait_for};

/// The page a person gets for a room that does not exist in a community they are in.
async fn no_such_room(browser: &Browser, web: &Web) -> (u16, String) {
    let res = browser
        .get(&web.url(&format!("/g/{GUILD}/rooms/424242")))
        .await;
    (res.status().as_u16(), res.text().await.unwrap())
}

/// Makes a room in `guild` as `browser`'s person; its id.
async fn make_room(browser: &Browser, web: &Web, guild: u64, name: &str) -> u64 {
    let page = browser.page(&web.url(&format!("/g/{guild}/rooms"))).await;
    let token = form_value(&page, "csrf_token").unwrap();
    let made = browser
        .post(
            web,
            &format!("/g/{guild}/rooms"),
            &[("name", name), ("csrf_token", &token)],
        )
        .await;
    assert_eq!(made.status(), 303, "{}", made.text().await.unwrap());
    location(&made)
        .strip_prefix(&format!("/g/{guild}/rooms/"))
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("made in {guild}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_of_one_community_reaches_nothing_of_another() {
    let stack = with_night_owls(&[]).await;
    let web = stack.web(0);
    // Nyx is in Night Owls only and makes a room there; Cinder is in Coven Playgroup only.
    let nyx = stack
        .login_as(web, stack.sim.user_of(OWLS, "nyx").await)
        .await;
    let room = make_room(&nyx, web, OWLS, "Owls only").await;
    let cinder_id = stack.user("cinder").await;
    let cinder = stack.login_as(web, cinder_id).await;
    let token = cinder.csrf(web).await;
    let (status, hidden) = no_such_room(&cinder, web).await;
    assert_eq!(status, 404);

    let pages = [
        format!("/g/{OWLS}"),
        format!("/g/{OWLS}/rooms"),
        format!("/g/{OWLS}/rooms/{room}"),
        format!("/g/{OWLS}/rooms/{room}/close"),
        format!("/g/{OWLS}/rooms/424242"),
        format!("/g/{OWLS}/setting-up"),
        format!("/g/{OWLS}/add"),
        format!("/g/0{OWLS}/rooms"),
        format!("/g/{OWLS}0/rooms"),
        format!("/g/-{OWLS}/rooms"),
        "/g/18446744073709551616/rooms".to_owned(),
        "/g/%31%31/rooms".to_owned(),
    ];
    for path in &pages {
        let res = cinder.get(&web.url(path)).await;
        assert_eq!(res.status(), 404, "{path}");
        assert_eq!(
            res.text().await.unwrap(),
            hidden,
            "{path} reads like no room"
        );
    }
    let posts = [
        format!("/g/{OWLS}/rooms"),
        format!("/g/{OWLS}/rooms/{room}/close"),
        format!("/g/{OWLS}/rooms/{room}/move"),
        format!("/g/{OWLS}/rooms/{room}/invite"),
    ];
    for path in &posts {
        let res = cinder
            .post(web, path, &[("name", "mine now"), ("csrf_token", &token)])
            .await;
        assert_eq!(res.status(), 404, "POST {path}");
        assert_eq!(
            res.text().await.unwrap(),
            hidden,
            "POST {path} reads like no room"
        );
    }
    let streams = [
        format!("/api/stream?guild={OWLS}"),
        format!("/api/stream?guild={OWLS}&room={room}"),
        format!("/api/stream/html?guild={OWLS}"),
        format!("/api/stream/html?guild={OWLS}&view={room}"),
        "/api/stream?guild=not-a-guild".to_owned(),
    ];
    let none = cinder
        .get(&web.url(&format!("/api/stream?guild={GUILD}&room=424242")))
        .await;
    assert_eq!(none.status(), 404);
    let none = none.text().await.unwrap();
    for path in &streams {
        let res = cinder.get(&web.url(path)).await;
        assert_eq!(res.status(), 404, "{path}");
        assert_eq!(res.text().await.unwrap(), none, "{path} reads like no room");
    }
    // Without `guild`, a deployment of several communities cannot guess.
    assert_eq!(cinder.get(&web.url("/api/stream")).await.status(), 400);

    // Counted nowhere: no member record, no viewer, no event of hers in Night Owls, and
    // the replica does not watch Night Owls for her.
    let redis = stack.redis_client().await;
    let member: Option<String> = redis
        .hget(format!("coven:{{{OWLS}}}:members"), cinder_id.to_string())
        .await
        .unwrap();
    assert_eq!(member, None);
    let log: Vec<(String, Vec<(String, String)>)> = redis
        .xrange(format!("coven:{{{OWLS}}}:events"), "-", "+", None)
        .await
        .unwrap();
    assert!(
        !format!("{log:?}").contains(&cinder_id.to_string()),
        "nothing of Cinder in Night Owls' log"
    );
    let channels = shard_channels(&stack).await;
    assert!(
        !channels.iter().any(|c| c.contains(&OWLS.to_string())),
        "the replica does not watch Night Owls for her: {channels:?}"
    );

    // The room is there for its own people all along.
    let res = nyx.get(&web.url(&format!("/g/{OWLS}/rooms/{room}"))).await;
    assert_eq!(res.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_and_invites_are_of_their_routes_community_only() {
    let stack = with_night_owls(&[]).await;
    let web = stack.web(0);
    // Ash is in both; a forged guild in the form changes nothing: the route decides.
    let ash = stack.login_as(web, stack.user("ash").await).await;
    let token = ash.csrf(web).await;
    let made = ash
        .post(
            web,
            &format!("/g/{GUILD}/rooms"),
            &[
                ("name", "Forged"),
                ("csrf_token", &token),
                ("guild_id", &OWLS.to_string()),
                ("guild", &OWLS.to_string()),
            ],
        )
        .await;
    assert_eq!(made.status(), 303);
    let room: u64 = location(&made)
        .strip_prefix(&format!("/g/{GUILD}/rooms/"))
        .and_then(|r| r.parse().ok())
        .expect("made in the route's community");
    let owls = stack.sim.guild_state(OWLS).await;
    assert!(
        !owls.to_string().contains("Forged"),
        "nothing was made in Night Owls"
    );

    // Its invite names Coven Playgroup; replayed under Night Owls' routes it is nothing.
    let page = ash
        .page(&web.url(&format!("/g/{GUILD}/rooms/{room}")))
        .await;
    let link = crate::harness::rooms::invite_link(&page);
    let token_path = link.trim_start_matches(&web.url);
    for path in [
        format!("/g/{OWLS}{token_path}"),
        format!("/g/{GUILD}{token_path}"),
    ] {
        assert_eq!(ash.get(&web.url(&path)).await.status(), 404, "{path}");
    }
    // Followed where it belongs, it leads into Coven Playgroup's room.
    let nyx = stack
        .login_as(web, stack.sim.user_of(OWLS, "nyx").await)
        .await;
    let res = nyx.get(&web.url(token_path)).await;
    assert_eq!(res.status(), 200, "asked before joining the server");
    let confirm = res.text().await.unwrap();
    assert!(confirm.contains("Coven Playgroup"), "{confirm}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_servers_managers_are_offered_coven_and_nothing_registers_from_a_redirect() {
    let stack = Stack::every_community(1, &[]).await;
    let web = stack.web(0);
    let before = registry_len(&stack).await;

    // A plain member of Dice Tower is never offered it, nor can post for it.
    let fable = stack.login_as(web, stack.user("fable").await).await;
    let picker = fable.get(&web.url("/")).await;
    assert_eq!(
        location(&picker),
        format!("/g/{GUILD}/rooms"),
        "one community, nothing to add: straight there"
    );
    let res = fable.get(&web.url(&format!("/g/{DICE_TOWER}/add"))).await;
    assert_eq!(res.status(), 404);

    // Its owner is; the authorization goes to Discord for exactly that server.
    let dusk = stack.login_as(web, stack.user("dusk").await).await;
    let picker = dusk.page(&web.url("/")).await;
    assert!(
        picker.contains(&format!("data-addable=\"{DICE_TOWER}\"")),
        "{picker}"
    );
    let res = dusk.get(&web.url(&format!("/g/{DICE_TOWER}/add"))).await;
    assert_eq!(res.status(), 303);
    let authorize = url::Url::parse(&location(&res)).unwrap();
    let q: std::collections::HashMap<_, _> = authorize.query_pairs().into_owned().collect();
    assert_eq!(q["guild_id"], DICE_TOWER.to_string());
    assert_eq!(q["disable_guild_select"], "true");
    assert_eq!(q["response_type"], "code");
    assert!(q["scope"].split(' ').any(|s| s == "bot"), "{q:?}");
    assert!(q.contains_key("code_challenge") && q.contains_key("state"));
    assert_eq!(q["redirect_uri"], web.url("/auth/added"));

    // A forged return: a guild the bot never joined, a code Discord never gave.
    let state = &q["state"];
    let forged = dusk
        .get(&web.url(&format!(
            "/auth/added?code=forged&state={state}&guild_id=4242424242424242&permissions=8"
        )))
        .await;
    assert_eq!(forged.status(), 400);
    // No state of this session: refused too.
    let stray = dusk
        .get(&web.url("/auth/added?code=x&state=y&guild_id=4242424242424242"))
        .await;
    assert_eq!(stray.status(), 400);
    assert_eq!(registry_len(&stack).await, before, "nothing registered");

    // The real round trip, its redirect's guild_id tampered with: Coven waits for the
    // server it asked for, and registers only what the gateway hears from Discord.
    let res = dusk.get(&web.url(&format!("/g/{DICE_TOWER}/add"))).await;
    let approved = dusk
        .get(&format!(
            "{}&sim_user={}",
            location(&res),
            stack.user("dusk").await
        ))
        .await;
    assert!(approved.status().is_redirection());
    let back = location(&approved).replace(
        &format!("guild_id={DICE_TOWER}"),
        "guild_id=4242424242424242",
    );
    let done = dusk.get(&back).await;
    assert_eq!(
        location(&done),
        format!("/g/{DICE_TOWER}/setting-up"),
        "the server this session asked for"
    );
    wait_for("Dice Tower registered from its GUILD_CREATE", || async {
        registered(&stack, DICE_TOWER).await.then_some(())
    })
    .await;
    assert!(!registered(&stack, 4_242_424_242_424_242).await);
    // "Setting up…" becomes the community (a replica trusts a registry read a second).
    wait_for("Setting up… to lead to the rooms", || async {
        let up = dusk
            .get(&web.url(&format!("/g/{DICE_TOWER}/setting-up")))
            .await;
        (location(&up) == format!("/g/{DICE_TOWER}/rooms")).then_some(())
    })
    .await;
    assert_eq!(
        dusk.get(&web.url(&format!("/g/{DICE_TOWER}/rooms")))
            .await
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_coven_is_offered_to_nobody_when_off_or_when_the_guilds_are_fixed() {
    for stack in [
        Stack::every_community(1, &[("ADD_COVEN", "off")]).await,
        Stack::start(1, &[]).await,
    ] {
        let web = stack.web(0);
        let dusk = stack.login_as(web, stack.user("dusk").await).await;
        let picker = dusk.get(&web.url("/")).await;
        // Fixed to one community with nothing to add: straight there.
        if picker.status() == 303 {
            assert_eq!(location(&picker), format!("/g/{GUILD}/rooms"));
        } else {
            let html = picker.text().await.unwrap();
            assert!(!html.contains("data-addable"), "{html}");
        }
        let res = dusk.get(&web.url(&format!("/g/{DICE_TOWER}/add"))).await;
        assert_eq!(res.status(), 404);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_the_bot_leaves_ends_its_streams_and_an_outage_is_a_banner() {
    let stack = with_night_owls(&[]).await;
    let web = stack.web(0);
    let nyx = stack
        .login_as(web, stack.sim.user_of(OWLS, "nyx").await)
        .await;
    let rooms = web.url(&format!("/g/{OWLS}/rooms"));
    assert_eq!(nyx.get(&rooms).await.status(), 200);

    // An outage: the community stays, with a banner, and comes back.
    let outage = |down: bool| {
        let url = stack.sim.url(&format!("/_sim/guilds/{OWLS}/outage"));
        async move {
            let res = reqwest::Client::new()
                .post(url)
                .json(&json!({ "unavailable": down }))
                .send()
                .await
                .unwrap();
            assert!(res.status().is_success(), "{}", res.status());
        }
    };
    outage(true).await;
    wait_for("the unavailable banner", || async {
        nyx.page(&rooms)
            .await
            .contains("data-unavailable")
            .then_some(())
    })
    .await;
    outage(false).await;
    wait_for("the banner gone", || async {
        (!nyx.page(&rooms).await.contains("data-unavailable")).then_some(())
    })
    .await;

    // The bot removed: the stream ends, former members are told, others learn nothing.
    let mut stream = nyx
        .stream(&web.url(&format!("/api/stream?guild={OWLS}")), None)
        .await;
    let res = reqwest::Client::new()
        .delete(stack.sim.url(&format!("/_sim/guilds/{OWLS}/bot")))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success());
    assert!(
        stream.ends_within(Duration::from_secs(10)).await,
        "the community's stream ended"
    );
    wait_for("Night Owls unregistered", || async {
        (!registered(&stack, OWLS).await).then_some(())
    })
    .await;
    // (A replica trusts a registry read for a second.)
    let gone = wait_for("the removed page", || async {
        let res = nyx.get(&rooms).await;
        (res.status() == 404).then_some(res)
    })
    .await;
    assert!(
        gone.text()
            .await
            .unwrap()
            .contains("no longer in this server")
    );
    let cinder = stack.login_as(web, stack.user("cinder").await).await;
    let (_, hidden) = no_such_room(&cinder, web).await;
    let res = cinder.get(&rooms).await;
    assert_eq!(res.status(), 404);
    assert_eq!(res.text().await.unwrap(), hidden);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_a_thousand_guilds_watches_only_those_it_streams() {
    let sim = crate::harness::TestSim::start_with(|s| s.guilds = 1000).await;
    let stack = Stack::every_community_on(sim, 1, &[]).await;
    let web = stack.web(0);
    wait_for("a thousand guilds registered", || async {
        (registry_len(&stack).await >= 1002).then_some(())
    })
    .await;
    // Streams on three of them: Ash's two, and a generated one's host's.
    let ash = stack.login_as(web, stack.user("ash").await).await;
    let third = coven::sim::defaults::generated_guild_id(499);
    let host = stack
        .login_as(web, stack.sim.user_of(third, "g500.host").await)
        .await;
    let mut streams = Vec::new();
    for (who, guild) in [(&ash, GUILD), (&ash, OWLS), (&host, third)] {
        for _ in 0..3 {
            streams.push(
                who.stream(&web.url(&format!("/api/stream?guild={guild}")), None)
                    .await,
            );
        }
    }
    let health: Value = reqwest::get(web.url("/healthz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["communities_watched"], 3, "{health}");
    let channels = shard_channels(&stack).await;
    let guilds: Vec<&String> = channels.iter().filter(|c| c.ends_with(":events")).collect();
    assert_eq!(
        guilds.len(),
        3,
        "subscribed to the three guilds watched: {channels:?}"
    );
}

/// A stack serving every community, once Night Owls is registered too.
async fn with_night_owls(extra: &[(&str, &str)]) -> Stack {
    let stack = Stack::every_community(1, extra).await;
    wait_for("Night Owls registered", || async {
        registered(&stack, OWLS).await.then_some(())
    })
    .await;
    stack
}

async fn registered(stack: &Stack, guild: u64) -> bool {
    let redis = stack.redis_client().await;
    let entry: Option<String> = redis
        .hget("coven:guilds", guild.to_string())
        .await
        .unwrap_or(None);
    entry.is_some_and(|e| !e.is_empty())
}

async fn registry_len(stack: &Stack) -> usize {
    let redis = stack.redis_client().await;
    redis.hlen("coven:guilds").await.unwrap_or(0)
}

/// The sharded Pub/Sub channels someone is subscribed to.
async fn shard_channels(stack: &Stack) -> Vec<String> {
    let redis = stack.redis_client().await;
    redis
        .custom(
            fred::types::CustomCommand::new_static("PUBSUB", None, false),
            vec!["SHARDCHANNELS"],
        )
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_community_past_max_guilds_is_told_so_and_served_nothing() {
    // Two communities, room for one: the older server (the smaller id) is served.
    let stack = with_night_owls(&[("MAX_GUILDS", "1")]).await;
    let web = stack.web(0);
    let ash = stack.login_as(web, stack.user("ash").await).await;
    let past = wait_for("the limit page", || async {
        let res = ash.get(&web.url(&format!("/g/{OWLS}/rooms"))).await;
        (res.status() == 403).then_some(res)
    })
    .await;
    let html = past.text().await.unwrap();
    assert!(html.contains("MAX_GUILDS"), "{html}");
    assert_eq!(
        ash.get(&web.url(&format!("/api/stream?guild={OWLS}")))
            .await
            .status(),
        403
    );
    assert_eq!(
        ash.get(&web.url(&format!("/g/{GUILD}/rooms")))
            .await
            .status(),
        200,
        "the older community is served"
    );
    // Someone not in it learns nothing of it, limit or not.
    let cinder = stack.login_as(web, stack.user("cinder").await).await;
    assert_eq!(
        cinder
            .get(&web.url(&format!("/g/{OWLS}/rooms")))
            .await
            .status(),
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_out_ends_that_logins_streams_in_every_community_on_every_replica() {
    let stack = Stack::every_community(2, &[]).await;
    wait_for("Night Owls registered", || async {
        registered(&stack, OWLS).await.then_some(())
    })
    .await;
    let ash_id = stack.user("ash").await;
    let ash = stack.login_as(stack.web(0), ash_id).await;
    // Another login of the same person: its streams live on.
    let other = stack.login_as(stack.web(1), ash_id).await;
    let mut ended = Vec::new();
    for web in [stack.web(0), stack.web(1)] {
        for guild in [GUILD, OWLS] {
            let url = web.url(&format!("/api/stream?guild={guild}"));
            ended.push(ash.stream(&url, None).await);
        }
    }
    let mut kept = other
        .stream(
            &stack.web(1).url(&format!("/api/stream?guild={OWLS}")),
            None,
        )
        .await;
    assert_eq!(ash.log_out(stack.web(0)).await.status(), 303);
    for stream in &mut ended {
        assert!(
            stream.ends_within(Duration::from_secs(10)).await,
            "every stream of the login ended"
        );
    }
    assert!(
        !kept.ends_within(Duration::from_secs(1)).await,
        "another login's stream lives on"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_room_link_leads_only_to_a_room_its_follower_may_see() {
    let stack = with_night_owls(&[]).await;
    let web = stack.web(0);
    let nyx = stack
        .login_as(web, stack.sim.user_of(OWLS, "nyx").await)
        .await;
    let room = make_room(&nyx, web, OWLS, "Behind the door").await;
    // Its creator is led to it, the way (and the query) kept.
    let res = nyx.get(&web.url(&format!("/rooms/{room}?from=old"))).await;
    assert_eq!(res.status(), 308);
    assert_eq!(location(&res), format!("/g/{OWLS}/rooms/{room}?from=old"));
    // Ash is in Night Owls but may not see the room: exactly like a room that does not
    // exist, in any spelling.
    let ash = stack.login_as(web, stack.user("ash").await).await;
    let missing = ash.get(&web.url("/rooms/424242")).await;
    assert_eq!(missing.status(), 404);
    let missing = missing.text().await.unwrap();
    for path in [
        format!("/rooms/{room}"),
        format!("/rooms/{room}/close"),
        format!("/rooms/+{room}"),
        format!("/rooms/0{room}"),
    ] {
        let res = ash.get(&web.url(&path)).await;
        assert_eq!(res.status(), 404, "{path}");
        assert_eq!(res.text().await.unwrap(), missing, "{path}");
    }
}

/// One person opening a community they have not visited yet on two replicas at once (tabs
/// behind a balancer, streams reconnecting): the replica that finds the other asking
/// Discord waits for its answer instead of saying "no such community" (the scale run saw
/// hundreds of such 404s, which a browser's EventSource never retries).
#[tokio::test(flavor = "multi_thread")]
async fn a_first_visit_on_two_replicas_at_once_lets_the_member_in_on_both() {
    let stack = Stack::every_community(2, &[]).await;
    wait_for("Night Owls registered", || async {
        registered(&stack, OWLS).await.then_some(())
    })
    .await;
    let ash = stack.user("ash").await;
    let browser = Browser::new();
    browser.login(stack.web(0), &stack.sim, ash).await;
    // Discord makes the first replica's question wait a second (a rate limit on the
    // person's token), so the second one's arrives while it is being asked.
    stack
        .sim
        .fail_once(json!({
            "method": "GET",
            "path": "/users/@me/guilds/*/member",
            "status": 429,
            "retry_after": 1.0,
        }))
        .await;
    let path = format!("/g/{OWLS}/rooms");
    let first = {
        let browser = browser.clone();
        let url = stack.web(0).url(&path);
        tokio::spawn(async move { browser.get(&url).await.status() })
    };
    let redis = stack.redis_client().await;
    let claim = format!("coven:{{{OWLS}}}:member-check:{ash}");
    wait_for("the first replica asking Discord", || async {
        let claimed: bool = redis.exists(&claim).await.unwrap_or(false);
        claimed.then_some(())
    })
    .await;
    let second = browser.get(&stack.web(1).url(&path)).await.status();
    assert_eq!(
        second, 200,
        "the second replica waited for the first's answer"
    );
    assert_eq!(first.await.unwrap(), 200);
}
