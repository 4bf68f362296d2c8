//! What a logged-in person's answers carry and what they may name a room, against a real
//! `coven web`, gateway and the simulator: `Cache-Control: no-store` on every private
//! answer (the stream and assets keep their own), and room names checked once at the
//! edge, with the room role's name fitted to Discord's limit.

use serde_json::Value;

use crate::harness::demo::Demo;
use crate::harness::{Browser, Stack, form_value, location};
use crate::harness::{GUILD, g};

fn cache_control(res: &reqwest::Response) -> Option<String> {
    res.headers()
        .get("cache-control")
        .map(|v| v.to_str().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_answers_are_never_stored_and_the_stream_and_assets_keep_their_own() {
    let stack = Stack::start(1, &[]).await;
    let web = stack.web(0);
    let ash = stack.user("ash").await;
    let browser = Browser::new();

    // Before login: the landing page and the login redirect are personal too.
    for path in ["/", "/auth/login", "/rooms"] {
        let res = Browser::new().get(&web.url(path)).await;
        assert_eq!(cache_control(&res).as_deref(), Some("no-store"), "{path}");
    }
    browser.login(web, &stack.sim, ash).await;
    let lobby = stack.lobby;
    let token = browser.csrf(web).await;
    let private = [
        ("/", 303),
        (&*format!("/g/{GUILD}/rooms"), 200),
        (&*format!("/g/{GUILD}/rooms/{lobby}"), 200),
        (&*format!("/g/{GUILD}/rooms/999"), 404),
        (&*format!("/g/{GUILD}/rooms/not-a-room"), 404),
        ("/rooms/999", 308),
        ("/invite/forged.token.value", 400),
    ];
    for (path, status) in private {
        let res = browser.get(&web.url(path)).await;
        assert_eq!(res.status().as_u16(), status, "{path}");
        assert_eq!(cache_control(&res).as_deref(), Some("no-store"), "{path}");
    }
    // Posts and their refusals.
    for (form, status) in [
        (
            vec![("name", "\u{202E}"), ("csrf_token", token.as_str())],
            400,
        ),
        (vec![("name", "x")], 403),
    ] {
        let res = browser.post(web, &g("/rooms"), &form).await;
        assert_eq!(res.status().as_u16(), status);
        assert_eq!(cache_control(&res).as_deref(), Some("no-store"));
    }
    let closed = browser
        .post(web, &g("/rooms/999/close"), &[("csrf_token", &token)])
        .await;
    assert_eq!(cache_control(&closed).as_deref(), Some("no-store"));

    // The stream keeps the no-cache its spec asks for.
    let stream = browser.get(&web.url("/api/stream")).await;
    assert_eq!(stream.status(), 200);
    assert_eq!(cache_control(&stream).as_deref(), Some("no-cache"));
    drop(stream);
    // Assets are the same for everyone: not marked private.
    let asset = browser.get(&web.url("/assets/app.css")).await;
    assert_eq!(asset.status(), 200);
    assert_ne!(cache_control(&asset).as_deref(), Some("no-store"));
}

fn channel_names(state: &Value) -> Vec<String> {
    state["channels"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str().map(str::to_owned))
        .collect()
}

fn role_names(state: &Value) -> Vec<String> {
    state["roles"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_character_name_makes_a_room_and_unreadable_names_are_refused() {
    let stack = Stack::start(1, &[]).await;
    let web = stack.web(0);
    let ash = stack.user("ash").await;
    let browser = Browser::new();
    browser.login(web, &stack.sim, ash).await;
    let token = browser.csrf(web).await;

    // The longest name Discord allows for a channel: the role's `Room: …` is shortened,
    // the room keeps every character.
    let name = format!("Commander {}", "\u{e9}".repeat(90));
    assert_eq!(name.chars().count(), 100);
    let made = browser
        .post(
            web,
            &g("/rooms"),
            &[("name", &name), ("csrf_token", &token)],
        )
        .await;
    assert_eq!(made.status(), 303, "{}", made.text().await.unwrap());
    let room = location(&made);
    assert!(room.starts_with(&g("/rooms/")), "{room}");
    let state = stack.sim.state().await;
    assert!(
        channel_names(&state).contains(&name),
        "the channel has it all"
    );
    let role = role_names(&state)
        .into_iter()
        .find(|r| r.starts_with("Room: Commander"))
        .expect("the room's role");
    assert_eq!(role.chars().count(), 100, "{role}");
    assert!(role.ends_with('…'), "{role}");
    let page = browser.page(&web.url(&room)).await;
    assert!(page.contains(&name), "the page shows the whole name");

    // Refused with a reason, and nothing made in Discord. (Someone else posts them: each
    // person has a burst of 10 posts.)
    let bramble = stack.user("bramble").await;
    let browser = Browser::new();
    browser.login(web, &stack.sim, bramble).await;
    let token = browser.csrf(web).await;
    let before = stack.sim.state().await;
    for (raw, why) in [
        ("\u{202E}\u{202D}", "direction"),
        ("Pod \u{202E}gnp.exe", "direction"),
        ("\u{2066}Pod\u{2069}", "direction"),
        ("\u{200B}\u{200C}\u{200D}", "visible"),
        ("\u{2060}\u{FEFF}\u{00AD}", "visible"),
        ("\u{3164}\u{115F}", "visible"),
        ("\u{200B} \u{200B}", "visible"),
        ("a\u{0}b", "control"),
        ("line\nbreak", "control"),
        (&"x".repeat(101), "at most 100"),
    ] {
        let res = browser
            .post(web, &g("/rooms"), &[("name", raw), ("csrf_token", &token)])
            .await;
        assert_eq!(res.status(), 400, "{raw:?}");
        let text = res.text().await.unwrap();
        assert!(text.contains(why), "{raw:?}: {text}");
    }
    let after = stack.sim.state().await;
    assert_eq!(channel_names(&after), channel_names(&before));
    assert_eq!(role_names(&after), role_names(&before));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assets_come_from_the_binary_itself_hashed_cached_and_compressed() {
    // A binary run from an empty directory (the harness's scratch dir): no assets/ beside
    // it, no COVEN_ASSETS.
    let demo = Demo::start(&["--quiet"], &[]);
    let web = demo.web.clone();
    // reqwest here sends no Accept-Encoding unless told: each request says what it takes.
    let http = reqwest::Client::new();
    let landing = http
        .get(format!("{web}/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let at = landing
        .find("rel=\"stylesheet\" href=\"")
        .expect("a stylesheet link")
        + "rel=\"stylesheet\" href=\"".len();
    let css = &landing[at..at + landing[at..].find('"').unwrap()];
    assert!(
        css.starts_with("/assets/app.") && css.ends_with(".css") && css != "/assets/app.css",
        "pages link the content-hashed name: {css}"
    );
    let res = http
        .get(format!("{web}{css}"))
        .header("accept-encoding", "br, gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/css")
    );
    assert_eq!(res.headers()["content-encoding"], "br");
    let cache = res.headers()["cache-control"].to_str().unwrap().to_owned();
    assert!(
        cache.contains("immutable") && cache.contains("max-age=31536000"),
        "{cache}"
    );
    let res = http
        .get(format!("{web}/assets/app.css"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["content-encoding"], "gzip");
    let etag = res.headers()["etag"].to_str().unwrap().to_owned();
    assert!(
        res.headers()["cache-control"]
            .to_str()
            .unwrap()
            .contains("max-age")
    );
    let again = http
        .get(format!("{web}/assets/app.css"))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304, "revalidated by ETag");
    let plain = http
        .get(format!("{web}/assets/app.js"))
        .send()
        .await
        .unwrap();
    assert!(
        plain.headers().get("content-encoding").is_none(),
        "uncompressed when not asked"
    );
    assert!(plain.text().await.unwrap().contains("use strict"));
    assert_eq!(
        http.get(format!("{web}/assets/../Cargo.toml"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_pages_keep_the_logged_in_header() {
    let stack = Stack::start(1, &[]).await;
    let web = stack.web(0);
    // Anonymous: a plain page, nobody's header.
    let res = Browser::new().get(&web.url("/no/such/page")).await;
    assert_eq!(res.status(), 404);
    let html = res.text().await.unwrap();
    assert!(!html.contains("/auth/logout"), "{html}");

    let browser = Browser::new();
    browser
        .login(web, &stack.sim, stack.user("ash").await)
        .await;
    let token = browser.csrf(web).await;
    // The fallback, a handler's own 404 and a refused post: each keeps who is logged in.
    for (res, status) in [
        (browser.get(&web.url("/no/such/page")).await, 404),
        (browser.get(&web.url(&g("/rooms/999"))).await, 404),
        (
            browser
                .post(
                    web,
                    &g("/rooms"),
                    &[("name", "\u{202E}"), ("csrf_token", &token)],
                )
                .await,
            400,
        ),
    ] {
        assert_eq!(res.status().as_u16(), status);
        assert_eq!(cache_control(&res).as_deref(), Some("no-store"));
        let html = res.text().await.unwrap();
        assert!(html.contains("class=\"topbar\""), "{html}");
        assert!(
            html.contains("action=\"/auth/logout\""),
            "a Log out form: {html}"
        );
        assert_eq!(form_value(&html, "csrf_token").as_deref(), Some(&*token));
        assert!(html.contains("Ash"), "the person's name: {html}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn someone_outside_the_server_can_log_out_or_use_another_account() {
    let stack = Stack::start(1, &[]).await;
    let web = stack.web(0);
    // Iris has a Discord account but is not in the server.
    let iris = stack.user("iris").await;
    let browser = Browser::new();
    let res = browser.login_to(web, &stack.sim, iris, "/").await;
    assert_eq!(location(&res), "/");
    // The community's pages answer as if it did not exist; the picker says why not and
    // offers another account.
    let hidden = browser.get(&web.url(&g("/rooms"))).await;
    assert_eq!(hidden.status(), 404);
    let res = browser.get(&web.url("/")).await;
    assert_eq!(res.status(), 200);
    let html = res.text().await.unwrap();
    assert!(
        html.contains("None of your Discord servers has Coven yet"),
        "{html}"
    );
    assert!(html.contains("Use another Discord account"), "{html}");
    assert!(html.contains(">Log out<"), "{html}");
    assert!(
        html.contains("name=\"then\" value=\"login\""),
        "switching logs out, then in: {html}"
    );
    // Loading a page again: the same, with the header.
    let again = browser.get(&web.url("/")).await;
    assert_eq!(again.status(), 200);
    let html = again.text().await.unwrap();
    assert!(html.contains("Use another Discord account"), "{html}");
    let token = form_value(&html, "csrf_token").expect("the session's token");

    // Use another account: the session ends and a new Discord login starts.
    let switched = browser
        .post(
            web,
            "/auth/logout",
            &[("csrf_token", &token), ("then", "login")],
        )
        .await;
    assert_eq!(switched.status(), 303);
    assert_eq!(location(&switched), "/auth/login");
    let login = browser.get(&web.url("/auth/login")).await;
    assert_eq!(login.status(), 303);
    assert!(
        location(&login).starts_with(&stack.sim.url("/oauth2/authorize")),
        "off to Discord's authorize page"
    );
    let gone = browser.get(&web.url(&g("/rooms"))).await;
    assert_eq!(gone.status(), 303, "logged out");
    assert!(location(&gone).starts_with("/auth/login"));
    // The other account is a member: in they go.
    browser
        .login(web, &stack.sim, stack.user("bramble").await)
        .await;
    let rooms = browser.get(&web.url(&g("/rooms"))).await;
    assert_eq!(rooms.status(), 200);

    // Plain Log out from the same page sends them home.
    let other = Browser::new();
    assert_eq!(
        other.login_to(web, &stack.sim, iris, "/").await.status(),
        303
    );
    let html = other.get(&web.url("/")).await.text().await.unwrap();
    let token = form_value(&html, "csrf_token").unwrap();
    let out = other
        .post(web, "/auth/logout", &[("csrf_token", &token)])
        .await;
    assert_eq!(
        (out.status().as_u16(), location(&out)),
        (303, "/".to_owned())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_in_discord_goes_to_discords_app_or_where_discord_app_url_says() {
    let stack = Stack::start(1, &[("DISCORD_APP_URL", "https://app.discord.test")]).await;
    let defaults = stack.spawn_web(&[]);
    let guild = stack.sim.guild_id();
    let lobby = stack.lobby;
    for (web, app) in [
        (stack.web(0), "https://app.discord.test"),
        (&defaults, "https://discord.com"),
    ] {
        let browser = Browser::new();
        browser
            .login(web, &stack.sim, stack.user("ash").await)
            .await;
        let page = browser
            .page(&web.url(&format!("/g/{GUILD}/rooms/{lobby}")))
            .await;
        assert!(
            page.contains(&format!("href=\"{app}/channels/{guild}/{lobby}\"")),
            "{app}: {page}"
        );
    }
}
