//! Logging in against a real `coven web` and the simulator's OAuth2: `return_to` that
//! stays on the site whatever is thrown at it, anonymous visitors who leave only small,
//! short-lived state in Redis, and Discord's rate limit on its token endpoint waited out
//! (or, past a deadline, answered 503).

use std::collections::BTreeSet;
use std::time::Duration;

use fred::prelude::*;
use fred::types::CustomCommand;
use futures_util::StreamExt;

use crate::harness::{Browser, RedisServer, Stack, TestSim, location, metric};
use crate::harness::{GUILD, g};

/// The longest a login attempt may live in Redis.
const LOGIN_TTL_MS: i64 = 10 * 60 * 1000;

async fn redis(server: &RedisServer) -> Client {
    let client = Client::new(Config::from_url(&server.url()).unwrap(), None, None, None);
    client.init().await.expect("redis");
    client
}

async fn keys(client: &Client) -> BTreeSet<String> {
    client
        .custom(CustomCommand::new_static("KEYS", None, false), vec!["*"])
        .await
        .expect("KEYS")
}

/// The bus's own keys (`coven:{G}:...`): shared state, not anyone's session.
fn is_bus_key(key: &str) -> bool {
    key.starts_with("coven:")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_return_to_values_stay_on_the_site_through_a_real_login() {
    let stack = Stack::start(1, &[]).await;
    let web = stack.web(0);
    let ash = stack.user("ash").await;
    let long = format!("/g/{GUILD}/rooms/{}", "x".repeat(3000));
    let cases: Vec<(&str, &str)> = vec![
        ("/.//elsewhere.example", "/rooms"),
        ("/a/..//elsewhere.example", "/rooms"),
        ("/%2e//elsewhere.example", "/rooms"),
        ("/%2E%2E//elsewhere.example", "/rooms"),
        ("/%2f/elsewhere.example", "/rooms"),
        ("/%2F%2Felsewhere.example", "/rooms"),
        ("/.%2f%2felsewhere.example", "/rooms"),
        ("/%252f%252felsewhere.example", "/rooms"),
        ("//elsewhere.example", "/rooms"),
        ("///elsewhere.example", "/rooms"),
        ("/\\elsewhere.example", "/rooms"),
        ("/%5celsewhere.example", "/rooms"),
        ("/%5C%5Celsewhere.example", "/rooms"),
        ("/\t/elsewhere.example", "/rooms"),
        ("/%09/elsewhere.example", "/rooms"),
        ("/%0d%0aSet-Cookie:x=1", "/rooms"),
        ("https://elsewhere.example/", "/rooms"),
        ("javascript:alert(1)", "/rooms"),
        ("/auth/login", "/rooms"),
        ("/rooms/../auth/login", "/rooms"),
        (&long, "/rooms"),
        // What is legitimately on the site still comes back.
        ("/rooms/1/../2?from=invite", "/rooms/2?from=invite"),
        ("/invite/abc.def", "/invite/abc.def"),
    ];
    for (raw, want) in cases {
        let done = Browser::new().login_to(web, &stack.sim, ash, raw).await;
        assert_eq!(done.status(), 303, "{raw:?}");
        let to = location(&done);
        assert_eq!(to, want, "{raw:?}");
        assert!(
            to.starts_with('/') && !to.starts_with("//") && !to.starts_with("/\\"),
            "{raw:?} sent the browser to {to:?}"
        );
        let landed = url::Url::parse(&web.url).unwrap().join(&to).unwrap();
        assert_eq!(landed.origin().ascii_serialization(), web.url, "{raw:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_anonymous_logins_leave_only_small_sessions_that_expire_within_ten_minutes() {
    let stack = Stack::start(1, &[]).await;
    let web = stack.web(0);
    let client = redis(&stack.redis).await;
    let before = keys(&client).await;

    // Visitors without cookies, each a new session; return_to at, over and far over the
    // 2 KiB cap.
    let at_cap = format!("/g/{GUILD}/rooms/{}", "x".repeat(2048 - 7));
    let over = format!("/g/{GUILD}/rooms/{}", "x".repeat(4096));
    let far_over = format!("/g/{GUILD}/rooms/{}", "x".repeat(16 * 1024));
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let answers: Vec<(u16, String)> = futures_util::stream::iter(0..1000)
        .map(|i| {
            let return_to = [at_cap.as_str(), &over, &far_over, "/rooms/1"][i % 4];
            let req = http
                .get(web.url("/auth/login"))
                .query(&[("return_to", return_to)]);
            async move {
                let res = req.send().await.expect("login");
                let cookie = res
                    .headers()
                    .get("set-cookie")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                (res.status().as_u16(), cookie)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for (status, cookie) in &answers {
        assert_eq!(*status, 303);
        assert!(
            cookie.contains("Max-Age=600"),
            "the cookie lives as long as the attempt: {cookie}"
        );
    }

    let after = keys(&client).await;
    let new: Vec<&String> = after.difference(&before).collect();
    assert_eq!(new.len(), 1000, "one session per visitor");
    assert!(
        new.iter().all(|k| !is_bus_key(k)),
        "logins write no shared state"
    );
    let mut largest = 0;
    for key in after.iter().filter(|k| !is_bus_key(k)) {
        let ttl: i64 = client.pttl(key).await.unwrap();
        assert!(
            ttl > 0 && ttl <= LOGIN_TTL_MS,
            "{key} lives {ttl} ms more (-1: forever)"
        );
        let size: i64 = client
            .custom(
                CustomCommand::new_static("MEMORY", None, false),
                vec!["USAGE", key.as_str()],
            )
            .await
            .unwrap();
        let len: i64 = client.strlen(key).await.unwrap();
        assert!(
            size <= 4096 && len <= 4096,
            "{key}: {size} bytes in memory, {len} stored"
        );
        largest = largest.max(size);
    }
    println!("largest login attempt in Redis: {largest} bytes");

    // A completed login is a normal session again, under a new id.
    let ash = stack.user("ash").await;
    let browser = Browser::new();
    let start = browser
        .get(&web.url("/auth/login?return_to=%2Frooms"))
        .await;
    assert_eq!(start.status(), 303);
    let pending = keys(&client).await;
    let attempt: Vec<&String> = pending.difference(&after).collect();
    assert_eq!(attempt.len(), 1);
    browser.login(web, &stack.sim, ash).await;
    let done = keys(&client).await;
    assert!(!done.contains(attempt[0]), "the id was cycled");
    // (The bus's own keys about the member are no session.)
    let session: Vec<&String> = done
        .difference(&pending)
        .filter(|k| !k.starts_with("coven:"))
        .collect();
    assert_eq!(session.len(), 1, "{session:?}");
    let ttl: i64 = client.pttl(session[0]).await.unwrap();
    assert!(
        ttl > 6 * 24 * 3600 * 1000,
        "a logged-in session lives SESSION_TTL (7d): {ttl} ms"
    );
    assert_eq!(browser.get(&web.url(&g("/rooms"))).await.status(), 200);
    // Opening the community recorded the membership (the bus's keys, no session).
    let done = keys(&client).await;

    // A logged-in user who starts another login keeps their long session.
    let again = browser.get(&web.url("/auth/login")).await;
    assert_eq!(again.status(), 303);
    let ttl: i64 = client.pttl(session[0]).await.unwrap();
    assert!(ttl > LOGIN_TTL_MS, "{ttl}");

    // A failed callback leaves nothing behind for an anonymous visitor.
    let stranger = Browser::new();
    let start = stranger.get(&web.url("/auth/login")).await;
    assert_eq!(start.status(), 303);
    let with_attempt = keys(&client).await;
    assert_eq!(with_attempt.len(), done.len() + 1);
    let forged = stranger
        .get(&web.url("/auth/callback?code=abc&state=forged"))
        .await;
    assert_eq!(forged.status(), 400);
    assert_eq!(keys(&client).await, done, "the failed attempt is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twelve_logins_started_within_a_second_all_succeed_through_discords_rate_limit() {
    let stack = Stack::start(1, &[]).await;
    let web = stack.web(0);
    let ash = stack.user("ash").await;
    let browsers: Vec<Browser> = (0..12).map(|_| Browser::new()).collect();
    let started = std::time::Instant::now();
    let logins = browsers
        .iter()
        .map(|b| b.login_to(web, &stack.sim, ash, "/rooms/1"));
    let done = futures_util::future::join_all(logins).await;
    let took = started.elapsed();
    for res in &done {
        assert_eq!(
            (res.status().as_u16(), location(res)),
            (303, "/rooms/1".to_owned())
        );
    }
    for b in &browsers {
        assert_eq!(b.get(&web.url(&g("/rooms"))).await.status(), 200);
    }
    let limited = stack.sim.sim.shared.lock().oauth.token_rate_limited();
    assert!(
        limited >= 1,
        "the sim's token endpoint (5 a second) refused some: {limited}"
    );
    assert!(
        metric(&web.metrics, "coven_web_discord_rate_limit_waits_total").await >= 1.0,
        "and the replica waited them out"
    );
    println!("12 logins in {took:?}, {limited} token requests rate limited on the way");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_rate_limited_past_the_deadline_is_answered_503() {
    let sim = TestSim::start_with(|s| {
        s.token_rate_limit = 1;
        s.token_rate_window = Duration::from_secs(60);
    })
    .await;
    let stack = Stack::start_on(RedisServer::start(), sim, 1, &[]).await;
    let web = stack.web(0);
    let ash = stack.user("ash").await;
    Browser::new().login(web, &stack.sim, ash).await;
    let client = redis(&stack.redis).await;
    let before = keys(&client).await;

    let started = std::time::Instant::now();
    let refused = Browser::new()
        .login_to(web, &stack.sim, ash, "/rooms")
        .await;
    assert_eq!(refused.status(), 503);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a 60 s wait is past the 10 s budget: no waiting at all"
    );
    let page = refused.text().await.unwrap();
    assert!(page.contains("Discord is not answering"), "{page}");
    assert_eq!(keys(&client).await, before, "nothing left of the attempt");
}

/// Coven's Discord client pointed at `sim`, as `coven web` builds it.
fn discord_of(sim: &TestSim) -> coven::discord::Discord {
    use secrecy::{ExposeSecret, SecretString};
    let s = &sim.sim.shared.settings;
    let settings = coven::discord::DiscordSettings {
        bot_token: SecretString::from(s.bot_token.expose_secret().to_owned()),
        client_id: twilight_model::id::Id::new(s.client_id),
        client_secret: SecretString::from(s.client_secret.expose_secret().to_owned()),
        api_url: url::Url::parse(&sim.url("/api")).unwrap(),
        oauth_url: sim.sim.shared.public_url.clone(),
        app_url: sim.sim.shared.public_url.clone(),
    };
    coven::discord::Discord::new(&settings, &url::Url::parse("http://127.0.0.1:9").unwrap())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persons_guilds_and_roles_are_read_with_their_own_token() {
    use coven::discord::DiscordError;
    use coven::sim::defaults::{DICE_TOWER_GUILD_ID, NIGHT_OWLS_GUILD_ID};
    use twilight_model::id::Id;

    let sim = TestSim::start().await;
    let discord = discord_of(&sim);
    let scopes = "identify guilds guilds.join guilds.members.read";
    // ember: in the first guild and Dice Tower (Manage Server there), not Night Owls.
    let ember = sim.user("ember").await;
    let token = sim.user_token(ember, scopes).await;
    let guilds = discord.guilds_of(&token).await.unwrap();
    let ids: BTreeSet<u64> = guilds.iter().map(|g| g.id.get()).collect();
    assert!(ids.contains(&sim.guild_id()), "{guilds:?}");
    assert!(ids.contains(&DICE_TOWER_GUILD_ID), "{guilds:?}");
    assert!(!ids.contains(&NIGHT_OWLS_GUILD_ID), "{guilds:?}");
    let dice = guilds.iter().find(|g| g.id.get() == DICE_TOWER_GUILD_ID);
    assert!(
        dice.is_some_and(|g| g.manages),
        "Manage Server there: {guilds:?}"
    );

    // Roles where they are a member; none where they are not (never an error).
    assert!(
        discord
            .roles_in(&token, Id::new(sim.guild_id()))
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        discord
            .roles_in(&token, Id::new(NIGHT_OWLS_GUILD_ID))
            .await
            .unwrap(),
        None
    );

    // A 429 on the person's token is waited out, as long as Discord says.
    sim.fail_once(serde_json::json!({
        "method": "GET", "path": "/users/@me/guilds", "status": 429, "retry_after": 0.3
    }))
    .await;
    let started = std::time::Instant::now();
    assert_eq!(discord.guilds_of(&token).await.unwrap(), guilds);
    assert!(started.elapsed() >= Duration::from_millis(300), "it waited");

    // A token Discord no longer accepts: logged out at once, never asked again.
    let (status, body) = sim
        .control(
            "/oauth/revoke",
            serde_json::json!({"user_id": ember.to_string()}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let refused = discord.guilds_of(&token).await;
    assert!(
        matches!(refused, Err(DiscordError::Unauthorized)),
        "{refused:?}"
    );
    assert!(matches!(
        discord.roles_in(&token, Id::new(sim.guild_id())).await,
        Err(DiscordError::Unauthorized)
    ));

    // Last, as a 429 holds its bucket for as long as it says (30 s here), as Discord's do.
    // One that asks for longer than a page may wait is not waited for: Discord is said
    // to be busy within the 5 s a call may take.
    sim.fail_once(serde_json::json!({
        "method": "GET", "path": "/users/@me/guilds", "status": 429, "retry_after": 30.0
    }))
    .await;
    let started = std::time::Instant::now();
    assert!(matches!(
        discord.guilds_of(&token).await,
        Err(DiscordError::Unavailable(_))
    ));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_from_before_communities_logs_in_again_once_with_a_page_saying_why() {
    let stack = Stack::start(1, &[]).await;
    let web = stack.web(0);
    let ash = stack.user("ash").await;
    let browser = stack.login_as(web, ash).await;
    assert_eq!(browser.get(&web.url(&g("/rooms"))).await.status(), 200);

    // Make the session what an older Coven wrote: no version, a token without the
    // `guilds` scopes.
    let client = stack.redis_client().await;
    let session = keys(&client)
        .await
        .iter()
        .find(|k| !is_bus_key(k))
        .expect("the session's key")
        .clone();
    let raw: Vec<u8> = client.get(&session).await.unwrap();
    let mut record: tower_sessions::session::Record = rmp_serde::from_slice(&raw).unwrap();
    let user = record.data.get_mut("user").expect("a logged-in session");
    user.as_object_mut().unwrap().remove("version");
    let raw = rmp_serde::to_vec(&record).unwrap();
    let _: () = client
        .set(
            &session,
            raw,
            None,
            Some(fred::types::SetOptions::XX),
            false,
        )
        .await
        .unwrap();
    let _: bool = client.expire(&session, 3600, None).await.unwrap();

    // Its page says why, once; streams are told to log in.
    assert_eq!(browser.get(&web.url("/api/stream")).await.status(), 401);
    let page = browser.get(&web.url(&g("/rooms"))).await;
    assert_eq!(page.status(), 401);
    let html = page.text().await.unwrap();
    assert!(html.contains("Please log in again"), "{html}");
    assert!(html.contains("href=\"/auth/login\""), "{html}");
    // The old session is gone: the next request is an ordinary one of someone logged out.
    let next = browser.get(&web.url(&g("/rooms"))).await;
    assert_eq!(next.status(), 303);
    assert!(location(&next).starts_with("/auth/login"));
    // Logged in again, all is well, for good.
    browser.login(web, &stack.sim, ash).await;
    for _ in 0..2 {
        assert_eq!(browser.get(&web.url(&g("/rooms"))).await.status(), 200);
    }
}
