//! The simulator's OAuth2, driven by the oauth2 crate unmodified: authorization code with
//! PKCE, refresh, and the bearer token on REST.

use oauth2::basic::BasicClient;
use oauth2::{
    AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointNotSet, EndpointSet,
    PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RequestTokenError, Scope, TokenResponse,
    TokenUrl,
};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use url::Url;

use crate::harness::TestSim;

type Client = BasicClient<EndpointSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

const REDIRECT: &str = "http://127.0.0.1:9/auth/callback";

fn client(sim: &TestSim, secret: &str) -> Client {
    BasicClient::new(ClientId::new(sim.sim.shared.settings.client_id.to_string()))
        .set_client_secret(ClientSecret::new(secret.to_owned()))
        .set_auth_uri(AuthUrl::new(sim.url("/oauth2/authorize")).unwrap())
        .set_token_uri(TokenUrl::new(sim.url("/api/oauth2/token")).unwrap())
        .set_redirect_uri(RedirectUrl::new(REDIRECT.to_owned()).unwrap())
}

fn secret(sim: &TestSim) -> String {
    sim.sim
        .shared
        .settings
        .client_secret
        .expose_secret()
        .to_owned()
}

fn http() -> oauth2::reqwest::Client {
    oauth2::reqwest::Client::builder()
        .redirect(oauth2::reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Runs the browser's part: authorize as `user`, return (code, state) from the redirect.
async fn authorize(
    sim: &TestSim,
    client: &Client,
    user: u64,
) -> (String, String, PkceCodeVerifier, CsrfToken) {
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, csrf) = client
        .authorize_url(CsrfToken::new_random)
        .add_scope(Scope::new("identify".into()))
        .add_scope(Scope::new("guilds.join".into()))
        .set_pkce_challenge(challenge)
        .url();
    let res = sim
        .http
        .get(format!("{url}&sim_user={user}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303, "authorize redirects back");
    let location = Url::parse(res.headers()["location"].to_str().unwrap()).unwrap();
    assert!(location.as_str().starts_with(REDIRECT));
    let get = |k: &str| {
        location
            .query_pairs()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.into_owned())
    };
    (
        get("code").expect("code"),
        get("state").expect("state"),
        verifier,
        csrf,
    )
}

#[tokio::test]
async fn code_with_pkce_then_refresh_then_bearer_rest() {
    let sim = TestSim::start().await;
    let client = client(&sim, &secret(&sim));
    let juniper = sim.user("juniper").await;
    let (code, state, verifier, csrf) = authorize(&sim, &client, juniper).await;
    assert_eq!(&state, csrf.secret());

    let token = client
        .exchange_code(AuthorizationCode::new(code.clone()))
        .set_pkce_verifier(verifier)
        .request_async(&http())
        .await
        .expect("code exchange");
    let scopes: Vec<String> = token
        .scopes()
        .unwrap()
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(scopes, ["identify", "guilds.join"]);

    // The bearer token works with twilight-http, as Coven uses it.
    let user_http = twilight_http::Client::builder()
        .token(format!("Bearer {}", token.access_token().secret()))
        .proxy(sim.host(), true)
        .build();
    let me = user_http
        .current_user()
        .await
        .expect("users/@me")
        .model()
        .await
        .expect("model");
    assert_eq!(me.id.get(), juniper);

    // A code is single use.
    let (_, v2) = PkceCodeChallenge::new_random_sha256();
    let reuse = client
        .exchange_code(AuthorizationCode::new(code))
        .set_pkce_verifier(v2)
        .request_async(&http())
        .await;
    assert!(
        matches!(reuse, Err(RequestTokenError::ServerResponse(ref e)) if e.error().to_string() == "invalid_grant"),
        "{reuse:?}"
    );

    // Refresh rotates: the new tokens work, the old refresh token does not.
    let refresh = token.refresh_token().expect("refresh token").clone();
    let renewed = client
        .exchange_refresh_token(&refresh)
        .request_async(&http())
        .await
        .expect("refresh");
    assert_ne!(
        renewed.access_token().secret(),
        token.access_token().secret()
    );
    let again = client
        .exchange_refresh_token(&refresh)
        .request_async(&http())
        .await;
    assert!(again.is_err(), "a used refresh token is refused");

    // guilds.join lets the bot add juniper to the guild: 201 added, then 204 already there.
    let put = |access: String| {
        let http = sim.twilight_http();
        let guild = twilight_model::id::Id::new(sim.guild_id());
        async move {
            http.add_guild_member(guild, twilight_model::id::Id::new(juniper), &access)
                .await
                .map(|r| r.status().get())
        }
    };
    assert_eq!(
        put(renewed.access_token().secret().clone()).await.unwrap(),
        201
    );
    assert_eq!(
        put(renewed.access_token().secret().clone()).await.unwrap(),
        204
    );
}

#[tokio::test]
async fn a_wrong_verifier_secret_or_redirect_is_refused() {
    let sim = TestSim::start().await;
    let good = client(&sim, &secret(&sim));
    let ash = sim.user("ash").await;

    let (code, _, _, _) = authorize(&sim, &good, ash).await;
    let (_, wrong_verifier) = PkceCodeChallenge::new_random_sha256();
    let res = good
        .exchange_code(AuthorizationCode::new(code))
        .set_pkce_verifier(wrong_verifier)
        .request_async(&http())
        .await;
    assert!(
        matches!(res, Err(RequestTokenError::ServerResponse(ref e)) if e.error().to_string() == "invalid_grant"),
        "{res:?}"
    );

    let (code, _, verifier, _) = authorize(&sim, &good, ash).await;
    let bad = client(&sim, "not-the-secret");
    let res = bad
        .exchange_code(AuthorizationCode::new(code))
        .set_pkce_verifier(verifier)
        .request_async(&http())
        .await;
    assert!(
        matches!(res, Err(RequestTokenError::ServerResponse(ref e)) if e.error().to_string() == "invalid_client"),
        "{res:?}"
    );

    let (code, _, verifier, _) = authorize(&sim, &good, ash).await;
    let elsewhere = good
        .clone()
        .set_redirect_uri(RedirectUrl::new("http://127.0.0.1:9/other".into()).unwrap());
    let res = elsewhere
        .exchange_code(AuthorizationCode::new(code))
        .set_pkce_verifier(verifier)
        .request_async(&http())
        .await;
    assert!(
        res.is_err(),
        "redirect_uri must match the authorize request"
    );
}

#[tokio::test]
async fn the_authorize_page_offers_every_user_and_bad_requests_are_explained() {
    let sim = TestSim::start().await;
    let client_id = sim.sim.shared.settings.client_id;
    let base = format!(
        "/oauth2/authorize?client_id={client_id}&redirect_uri={REDIRECT}&response_type=code&scope=identify"
    );
    let res = sim.http.get(sim.url(&base)).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let page = res.text().await.unwrap();
    for name in ["ash", "hollow", "iris", "juniper"] {
        assert!(page.contains(&format!("@{name}")), "page lists {name}");
    }
    assert_eq!(page.matches("not in the guild").count(), 2);

    let shown = |path: String| {
        let url = sim.url(&path);
        let http = sim.http.clone();
        async move {
            let res = http.get(url).send().await.unwrap();
            (
                res.status().as_u16(),
                res.headers()
                    .get("location")
                    .map(|l| l.to_str().unwrap().to_owned()),
            )
        }
    };
    // Client and redirect problems are shown, never redirected.
    let (status, location) = shown(base.replace(&client_id.to_string(), "123")).await;
    assert_eq!((status, location), (400, None));
    let (status, location) = shown(base.replace(REDIRECT, "javascript:alert(1)")).await;
    assert_eq!((status, location), (400, None));
    let (status, location) = shown(format!("{base}&sim_user=nobody")).await;
    assert_eq!((status, location), (400, None));
    // Other problems go back to the client as OAuth2 errors.
    let (status, location) = shown(base.replace("scope=identify", "scope=everything")).await;
    assert_eq!(status, 303);
    assert!(location.unwrap().contains("error=invalid_scope"));
    let (status, location) = shown(format!(
        "{base}&code_challenge=abc&code_challenge_method=plain"
    ))
    .await;
    assert_eq!(status, 303);
    assert!(location.unwrap().contains("error=invalid_request"));
    let (_, location) = shown(base.replace("response_type=code", "response_type=token")).await;
    assert!(
        location
            .unwrap()
            .contains("error=unsupported_response_type")
    );

    let res = sim
        .http
        .post(sim.url("/api/oauth2/token"))
        .body("grant_type=password")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"], "invalid_client");
}

/// One raw token request (a wrong code: the answer is 400 unless rate limited).
async fn token_request(sim: &TestSim, path: &str) -> reqwest::Response {
    sim.http
        .post(sim.url(path))
        .basic_auth(
            sim.sim.shared.settings.client_id.to_string(),
            Some(secret(sim)),
        )
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", "not-a-code"),
            ("redirect_uri", REDIRECT),
        ])
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_token_endpoint_is_rate_limited_as_discord_does_it() {
    let sim = TestSim::start_with(|s| {
        s.token_rate_limit = 2;
        s.token_rate_window = std::time::Duration::from_secs(3);
    })
    .await;
    let header = |res: &reqwest::Response, name: &str| {
        res.headers()
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .unwrap()
            .to_owned()
    };
    // Both paths share one window.
    let first = token_request(&sim, "/api/oauth2/token").await;
    assert_eq!(first.status(), 400, "a wrong code, not a rate limit");
    assert_eq!(header(&first, "x-ratelimit-limit"), "2");
    assert_eq!(header(&first, "x-ratelimit-remaining"), "1");
    let second = token_request(&sim, "/api/v10/oauth2/token").await;
    assert_eq!(second.status(), 400);
    assert_eq!(header(&second, "x-ratelimit-remaining"), "0");

    let limited = token_request(&sim, "/api/oauth2/token").await;
    assert_eq!(limited.status(), 429);
    let retry_after: u64 = header(&limited, "retry-after").parse().unwrap();
    assert!((1..=3).contains(&retry_after), "{retry_after}");
    assert_eq!(header(&limited, "x-ratelimit-limit"), "2");
    assert_eq!(header(&limited, "x-ratelimit-remaining"), "0");
    assert_eq!(header(&limited, "x-ratelimit-scope"), "user");
    assert!(!header(&limited, "x-ratelimit-bucket").is_empty());
    let reset_after: f64 = header(&limited, "x-ratelimit-reset-after").parse().unwrap();
    assert!((0.0..=3.0).contains(&reset_after), "{reset_after}");
    let reset: f64 = header(&limited, "x-ratelimit-reset").parse().unwrap();
    assert!(reset > 1.7e9, "a unix time: {reset}");
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["message"], "You are being rate limited.");
    assert_eq!(body["global"], false);
    let wait = body["retry_after"]
        .as_f64()
        .expect("retry_after in seconds");
    assert!((0.0..=3.0).contains(&wait), "{body}");
    assert_eq!(
        token_request(&sim, "/api/v10/oauth2/token").await.status(),
        429,
        "the versioned path shares the window"
    );
    assert_eq!(sim.sim.shared.lock().oauth.token_rate_limited(), 2);

    // The oauth2 crate sees an answer it cannot read as a token response: a client must
    // handle the 429 itself.
    let client = client(&sim, &secret(&sim));
    let (_, v) = PkceCodeChallenge::new_random_sha256();
    let res = client
        .exchange_code(AuthorizationCode::new("x".into()))
        .set_pkce_verifier(v)
        .request_async(&http())
        .await;
    assert!(matches!(res, Err(RequestTokenError::Parse(..))), "{res:?}");

    // Once the wait Discord gave has passed, the endpoint answers again.
    tokio::time::sleep(std::time::Duration::from_secs_f64(wait + 0.05)).await;
    let again = token_request(&sim, "/api/oauth2/token").await;
    assert_eq!(again.status(), 400, "a fresh window");
    assert_eq!(header(&again, "x-ratelimit-remaining"), "1");
}

#[tokio::test]
async fn five_token_requests_a_second_by_default_and_other_routes_do_not_count() {
    let defaults = coven::sim::Settings::default();
    assert_eq!(
        (defaults.token_rate_limit, defaults.token_rate_window),
        (5, std::time::Duration::from_secs(1))
    );
    // A long window, so the count cannot straddle two windows on a slow machine.
    let sim =
        TestSim::start_with(|s| s.token_rate_window = std::time::Duration::from_secs(60)).await;
    for _ in 0..10 {
        let other = sim.http.get(sim.url("/_sim/state")).send().await.unwrap();
        assert_eq!(other.status(), 200);
    }
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(
            token_request(&sim, "/api/oauth2/token")
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses, [400, 400, 400, 400, 400, 429]);
}

/// `GET /oauth2/authorize` with these query pairs (the client id added).
async fn authorize_raw(sim: &TestSim, pairs: &[(&str, String)]) -> reqwest::Response {
    let mut query = vec![("client_id", sim.sim.shared.settings.client_id.to_string())];
    query.extend(pairs.iter().cloned());
    sim.http
        .get(sim.url("/oauth2/authorize"))
        .query(&query)
        .send()
        .await
        .unwrap()
}

async fn bot_in(sim: &TestSim, guild: u64) -> bool {
    sim.state().await["guilds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["id"].as_str() == Some(guild.to_string().as_str()))
        .map(|g| g["bot"] == true)
        .expect("the guild is listed")
}

#[tokio::test]
async fn plain_bot_authorization_adds_the_bot_and_its_session_gets_the_guild() {
    use coven::sim::defaults::DICE_TOWER_GUILD_ID as DICE;
    use twilight_gateway::Event;
    use twilight_model::gateway::payload::incoming::GuildCreate;
    let sim = TestSim::start().await;
    let mut shard = crate::harness::shard(&sim);
    crate::harness::next_event(&mut shard, |e| matches!(e, Event::Ready(_))).await;
    let ember = sim.user("ember").await;
    let asked = (1u64 << 4) | (1 << 10) | (1 << 20); // Manage Channels, View Channel, Connect

    // ember has Manage Server in Dice Tower: `scope=bot` alone needs no redirect.
    let res = authorize_raw(
        &sim,
        &[
            ("scope", "bot".into()),
            ("permissions", asked.to_string()),
            ("guild_id", DICE.to_string()),
            ("sim_user", ember.to_string()),
        ],
    )
    .await;
    assert_eq!(res.status(), 200);
    assert!(res.headers().get("location").is_none());
    assert!(res.text().await.unwrap().contains("Dice Tower"));
    assert!(bot_in(&sim, DICE).await);

    let event = crate::harness::next_event(
        &mut shard,
        |e| matches!(e, Event::GuildCreate(g) if g.id().get() == DICE),
    )
    .await;
    let Event::GuildCreate(g) = event else {
        unreachable!()
    };
    let GuildCreate::Available(guild) = *g else {
        panic!("Dice Tower arrived unavailable")
    };
    assert_eq!(guild.name, "Dice Tower");
    // The bot's managed role holds exactly what was asked.
    let managed: Vec<_> = guild.roles.iter().filter(|r| r.managed).collect();
    assert_eq!(managed.len(), 1);
    assert_eq!(managed[0].permissions.bits(), asked);

    // The bot may now work there.
    let res = sim
        .http
        .get(sim.url(&format!("/api/v10/guilds/{DICE}/channels")))
        .header("authorization", format!("Bot {}", sim.token()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn advanced_bot_authorization_is_a_code_grant_whose_token_carries_the_guild() {
    use coven::sim::defaults::DICE_TOWER_GUILD_ID as DICE;
    let sim = TestSim::start().await;
    let dusk = sim.user("dusk").await;
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let res = authorize_raw(
        &sim,
        &[
            ("scope", "bot identify".into()),
            ("response_type", "code".into()),
            ("redirect_uri", REDIRECT.into()),
            ("state", "s-123".into()),
            ("permissions", "1024".into()),
            ("guild_id", DICE.to_string()),
            ("disable_guild_select", "true".into()),
            ("code_challenge", challenge.as_str().to_owned()),
            ("code_challenge_method", "S256".into()),
            ("sim_user", dusk.to_string()),
        ],
    )
    .await;
    assert!(res.status().is_redirection(), "{}", res.status());
    let location = Url::parse(res.headers()["location"].to_str().unwrap()).unwrap();
    assert!(location.as_str().starts_with(REDIRECT));
    let q: std::collections::HashMap<String, String> =
        location.query_pairs().into_owned().collect();
    assert_eq!(q["state"], "s-123");
    assert_eq!(q["guild_id"], DICE.to_string());
    assert_eq!(q["permissions"], "1024");
    assert!(
        bot_in(&sim, DICE).await,
        "added on approval, before the code is redeemed"
    );

    let res = sim
        .http
        .post(sim.url("/api/oauth2/token"))
        .basic_auth(
            sim.sim.shared.settings.client_id.to_string(),
            Some(secret(&sim)),
        )
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", q["code"].as_str()),
            ("redirect_uri", REDIRECT),
            ("code_verifier", verifier.secret().as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let token: Value = res.json().await.unwrap();
    assert_eq!(token["guild"]["id"], DICE.to_string());
    assert_eq!(token["guild"]["name"], "Dice Tower");
    assert!(token["guild"]["roles"].is_array());
    let _: twilight_model::guild::Guild =
        serde_json::from_value(token["guild"].clone()).expect("twilight-model reads the guild");
    assert_eq!(token["scope"], "bot identify");
    let (status, me) = sim
        .as_user(token["access_token"].as_str().unwrap(), "/users/@me")
        .await;
    assert_eq!((status, me["id"].clone()), (200, json!(dusk.to_string())));

    // Advanced without a redirect the application registered is shown, never followed.
    let res = authorize_raw(
        &sim,
        &[
            ("scope", "bot identify".into()),
            ("response_type", "code".into()),
            ("guild_id", DICE.to_string()),
            ("sim_user", dusk.to_string()),
        ],
    )
    .await;
    assert_eq!(res.status(), 400, "no redirect_uri and none registered");
}

#[tokio::test]
async fn who_may_not_add_the_bot_is_refused_and_the_page_offers_only_what_they_may() {
    use coven::sim::defaults::{DICE_TOWER_GUILD_ID as DICE, NIGHT_OWLS_GUILD_ID as OWLS};
    let sim = TestSim::start().await;
    let (ember, fable, hollow, nyx) = (
        sim.user("ember").await,
        sim.user("fable").await,
        sim.user("hollow").await,
        sim.user_of(OWLS, "nyx").await,
    );
    let cases = [
        (
            fable,
            DICE,
            "a plain member of Dice Tower, no Manage Server",
        ),
        (hollow, DICE, "not in Dice Tower at all"),
        (ember, 4_242_424_242, "a forged guild_id no guild has"),
        (nyx, OWLS, "owns Night Owls, where the bot is already"),
    ];
    for (user, guild, why) in cases {
        for advanced in [false, true] {
            let mut pairs = vec![
                (
                    "scope",
                    if advanced { "bot identify" } else { "bot" }.to_owned(),
                ),
                ("guild_id", guild.to_string()),
                ("disable_guild_select", "true".into()),
                ("sim_user", user.to_string()),
            ];
            if advanced {
                pairs.push(("response_type", "code".into()));
                pairs.push(("redirect_uri", REDIRECT.into()));
            }
            let res = authorize_raw(&sim, &pairs).await;
            assert_eq!(res.status(), 403, "{why} (advanced: {advanced})");
            assert!(
                res.headers().get("location").is_none(),
                "{why}: never redirected"
            );
        }
    }
    assert!(!bot_in(&sim, DICE).await);

    // The page with Dice Tower locked offers it to those who manage it, and to no one else.
    let res = authorize_raw(
        &sim,
        &[
            ("scope", "bot".into()),
            ("guild_id", DICE.to_string()),
            ("disable_guild_select", "true".into()),
        ],
    )
    .await;
    assert_eq!(res.status(), 200);
    let page = res.text().await.unwrap();
    assert!(page.contains(&format!("sim_user={ember}")));
    assert!(page.contains(&format!("sim_user={}", sim.user("dusk").await)));
    assert!(!page.contains(&format!("sim_user={fable}")));
    // Unlocked, the page offers every guild someone may add the bot to, and never one the
    // bot is already in (Night Owls' owner manages it, yet it is not offered).
    let open = authorize_raw(&sim, &[("scope", "bot".into())]).await;
    assert_eq!(open.status(), 200);
    let open = open.text().await.unwrap();
    assert!(open.contains(&format!("guild_id={DICE}")), "{open}");
    assert!(
        !open.contains(&format!("guild_id={OWLS}")),
        "the bot is in Night Owls already"
    );
    // Following an offered link adds the bot.
    let href = page
        .split("href=\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .find(|h| h.contains(&format!("sim_user={ember}")))
        .expect("a link for ember")
        .replace("&#38;", "&")
        .replace("&amp;", "&");
    let res = sim.http.get(sim.url(&href)).send().await.unwrap();
    assert_eq!(res.status(), 200, "{href}: {}", res.text().await.unwrap());
    assert!(bot_in(&sim, DICE).await);
}

#[tokio::test]
async fn a_private_bot_is_added_by_the_applications_owner_only() {
    use coven::sim::defaults::DICE_TOWER_GUILD_ID as DICE;
    let sim = TestSim::start_with(|s| s.bot_public = false).await;
    let (ash, dusk, first) = (
        sim.user("ash").await,
        sim.user("dusk").await,
        sim.guild_id(),
    );
    // dusk owns Dice Tower but not the application.
    let res = authorize_raw(
        &sim,
        &[
            ("scope", "bot".into()),
            ("guild_id", DICE.to_string()),
            ("sim_user", dusk.to_string()),
        ],
    )
    .await;
    assert_eq!(res.status(), 403);
    assert!(res.text().await.unwrap().contains("private"));
    assert!(!bot_in(&sim, DICE).await);

    // ash owns the application (and the first guild): removed from there, the bot comes
    // back when ash adds it.
    let (status, _) = sim
        .control_with(
            reqwest::Method::DELETE,
            &format!("/guilds/{first}/bot"),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let res = authorize_raw(
        &sim,
        &[
            ("scope", "bot".into()),
            ("guild_id", first.to_string()),
            ("sim_user", ash.to_string()),
        ],
    )
    .await;
    assert_eq!(res.status(), 200);
    assert!(bot_in(&sim, first).await);
}
