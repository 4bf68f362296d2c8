//! `coven web` replicas as browsers use them: logging in through the simulator's OAuth2,
//! sessions shared through Redis, `/api/stream` replay and resync across replicas, pages
//! and streams meeting without a gap, presence, failure paths and operations.

use std::time::{Duration, Instant};

use coven::bus::Bus;
use coven::bus::redis::RedisBus;
use coven::event::EventData;
use reqwest::cookie::CookieStore;
use serde_json::json;
use twilight_model::id::Id;

use crate::harness::{
    Browser, Message, RedisServer, Stack, TestSim, location, metric, metrics_page, wait_for, within,
};
use crate::harness::{GUILD, g};

fn ids(messages: &[Message]) -> Vec<String> {
    messages.iter().filter_map(|m| m.id.clone()).collect()
}

/// The snapshot id a page hands to its stream.
fn page_event_id(html: &str) -> String {
    let start = html
        .find("last_event_id=")
        .expect("the page links its stream")
        + 14;
    html[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '-')
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_on_one_replica_works_on_the_other_and_both_streams_go_live() {
    let stack = Stack::start(2, &[]).await;
    let (a, b) = (stack.web(0), stack.web(1));
    let ash = stack.user("ash").await;
    let browser = Browser::new();
    browser.login(a, &stack.sim, ash).await;

    let rooms = browser.get(&b.url(&g("/rooms"))).await;
    assert_eq!(rooms.status(), 200, "the session made on A works on B");
    let html = rooms.text().await.unwrap();
    assert!(html.contains("Lobby") && html.contains("Ash"), "{html}");
    let set_cookie = browser
        .get(&a.url("/auth/login"))
        .await
        .headers()
        .get("set-cookie")
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    if let Some(cookie) = set_cookie {
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
            "{cookie}"
        );
        assert!(
            !cookie.contains("Secure"),
            "no Secure flag on a plain-http PUBLIC_URL"
        );
    }

    let mut on_a = browser.stream(&a.url("/api/stream"), None).await;
    let mut on_b = browser.stream(&b.url("/api/stream"), None).await;
    let changed = Instant::now();
    stack.voice(ash, Some(stack.lobby), json!({})).await;
    for stream in [&mut on_a, &mut on_b] {
        let joined = stream.next_domain().await;
        let took = changed.elapsed();
        assert_eq!(joined.event, "voice.joined");
        let data = joined.json();
        assert_eq!(data["data"]["user"]["id"], ash.to_string());
        assert_eq!(
            data["id"].as_str(),
            joined.id.as_deref(),
            "id: is the envelope's id"
        );
        // Pushed, not polled (the bench measures speed); the margin is for a loaded CI.
        assert!(took < Duration::from_secs(3), "took {took:?}");
    }
    assert_eq!(
        on_a.retry,
        Some(2000),
        "the stream tells browsers when to retry"
    );

    // Logging out needs the form's token (a cross-site page cannot log people out);
    // on B it ends the session on A too.
    let refused = browser.post(b, "/auth/logout", &[]).await;
    assert_eq!(refused.status(), 403, "no CSRF token");
    let token = browser.csrf(a).await;
    let out = browser
        .post(b, "/auth/logout", &[("csrf_token", &token)])
        .await;
    assert_eq!(
        (out.status().as_u16(), location(&out)),
        (303, "/".to_owned())
    );
    let after = browser.get(&a.url("/api/stream")).await;
    assert_eq!(after.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_resumes_on_the_other_replica_with_exactly_what_it_missed() {
    let stack = Stack::start(2, &[]).await;
    let (a, b) = (stack.web(0), stack.web(1));
    let ash = stack.user("ash").await;
    let bramble = stack.user("bramble").await;
    let browser = Browser::new();
    browser.login(a, &stack.sim, ash).await;

    // The page's snapshot, then changes land before its stream connects.
    let html = browser
        .get(&a.url(&g("/rooms")))
        .await
        .text()
        .await
        .unwrap();
    let page_at = page_event_id(&html);
    let mut observer = browser.stream(&b.url("/api/stream"), None).await;
    stack.voice(ash, Some(stack.lobby), json!({})).await;
    stack.voice(bramble, Some(stack.lobby), json!({})).await;
    let landed = observer
        .until(|m| m.event == "voice.joined" && m.data.contains(&bramble.to_string()))
        .await;
    let landed: Vec<_> = landed
        .into_iter()
        .filter(|m| m.event.starts_with("voice."))
        .collect();
    let mut from_page = browser
        .stream(
            &b.url(&format!("/api/stream?last_event_id={page_at}")),
            None,
        )
        .await;
    let first = [from_page.next_domain().await, from_page.next_domain().await];
    assert_eq!(
        ids(&first),
        ids(&landed),
        "the page's stream starts exactly after its snapshot"
    );

    // A stream on A sees one change, drops, and misses three more.
    let mut on_a = browser.stream(&a.url("/api/stream"), None).await;
    stack
        .voice(ash, Some(stack.lobby), json!({"self_mute": true}))
        .await;
    let seen = on_a.next_domain().await;
    assert_eq!(seen.event, "voice.updated");
    drop(on_a);
    stack
        .voice(
            ash,
            Some(stack.lobby),
            json!({"self_mute": false, "self_video": true}),
        )
        .await;
    stack.voice(bramble, None, json!({})).await;
    stack
        .voice(bramble, Some(stack.lobby), json!({"self_deaf": true}))
        .await;
    let missed = observer
        .until(|m| m.event == "voice.joined")
        .await
        .into_iter()
        .filter(|m| m.event.starts_with("voice."))
        .collect::<Vec<_>>();
    let missed: Vec<_> = missed.into_iter().skip_while(|m| m.id == seen.id).collect();
    assert_eq!(
        missed.iter().map(|m| m.event.as_str()).collect::<Vec<_>>(),
        ["voice.updated", "voice.left", "voice.joined"]
    );

    // The browser reconnects to B with Last-Event-ID: exactly the three, in order, then live.
    let mut resumed = browser
        .stream(&b.url("/api/stream"), seen.id.as_deref())
        .await;
    let replayed = [
        resumed.next_domain().await,
        resumed.next_domain().await,
        resumed.next_domain().await,
    ];
    assert_eq!(ids(&replayed), ids(&missed));
    stack.voice(ash, None, json!({})).await;
    let live = resumed.next_domain().await;
    assert_eq!(live.event, "voice.left");
    assert!(
        ids(&replayed).iter().all(|id| Some(id) != live.id.as_ref()),
        "no duplicate between replay and live"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_older_than_the_log_gets_resync_then_live_events() {
    let stack = Stack::start(1, &[]).await;
    let web = stack.web(0);
    let ash = stack.user("ash").await;
    let browser = Browser::new();
    browser.login(web, &stack.sim, ash).await;
    let first = RedisBus::connect(
        &stack.redis.url(),
        "coven",
        Id::new(stack.sim.guild_id()),
        1_000_000,
    )
    .await
    .unwrap();
    let oldest = first
        .append(EventData::Ping { seq: 0, ts: 0 }, None)
        .await
        .unwrap()
        .id;
    // A writer with a short log trims the old events away.
    let trimming = RedisBus::connect(
        &stack.redis.url(),
        "coven",
        Id::new(stack.sim.guild_id()),
        10,
    )
    .await
    .unwrap();
    for seq in 1..=400 {
        trimming
            .append(EventData::Ping { seq, ts: 0 }, None)
            .await
            .unwrap();
    }
    let mut stream = browser
        .stream(&web.url("/api/stream"), Some(&oldest.to_string()))
        .await;
    let resync = stream.next().await.expect("a message");
    assert_eq!(resync.event, "resync", "{resync:?}");
    let at = resync.json()["at"].as_str().unwrap_or_default().to_owned();
    assert_eq!(
        resync.id.as_deref(),
        Some(at.as_str()),
        "resync moves the client's id to the snapshot"
    );
    stack.voice(ash, Some(stack.lobby), json!({})).await;
    let next = stream.next_domain().await;
    assert_eq!(next.event, "voice.joined");

    // An id the log never gave out — ahead of it (Redis lost its data), or inside its
    // range but absent (another log's history) — gets resync at once, not silence.
    let newest = first
        .append(EventData::Ping { seq: 500, ts: 0 }, None)
        .await
        .unwrap()
        .id;
    let ahead = coven::event::EventId {
        ms: newest.ms + 86_400_000,
        seq: 0,
    };
    // Appends until the clock moved on, so an id between the two is inside the range.
    let mut seq = 501;
    while first
        .append(EventData::Ping { seq, ts: 0 }, None)
        .await
        .unwrap()
        .id
        .ms
        == newest.ms
    {
        seq += 1;
    }
    let inside = coven::event::EventId {
        ms: newest.ms,
        seq: newest.seq + 1_000_000,
    };
    for foreign in [ahead, inside] {
        let mut stream = browser
            .stream(&web.url("/api/stream"), Some(&foreign.to_string()))
            .await;
        let msg = within("resync for a foreign id", stream.next()).await;
        assert_eq!(msg.map(|m| m.event).as_deref(), Some("resync"), "{foreign}");
    }

    // Malformed ids and room ids are refused plainly.
    let bad = browser
        .get(&web.url("/api/stream?last_event_id=yesterday"))
        .await;
    assert_eq!(bad.status(), 400);
    let bad = browser.get(&web.url("/api/stream?room=lobby")).await;
    assert_eq!(bad.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_valid_session_nothing_is_shown_and_logins_stay_on_site() {
    let stack = Stack::start(1, &[]).await;
    let web = stack.web(0);
    let anonymous = Browser::new();
    // Both streams, asked for as EventSource asks (the lean path) and otherwise (hyper).
    for route in ["/api/stream", "/api/stream/html"] {
        for accept in ["text/event-stream", "*/*"] {
            for cookie in [
                None,
                Some("coven_session=AAAAAAAAAAAAAAAAAAAAAA"),
                Some("coven_session=%%%not-an-id"),
                Some("coven_sessionx=AAAAAAAAAAAAAAAAAAAAAA"),
                Some("coven_session="),
            ] {
                let mut request = anonymous.http.get(web.url(route)).header("accept", accept);
                if let Some(cookie) = cookie {
                    request = request.header("cookie", cookie);
                }
                let res = request.send().await.unwrap();
                assert_eq!(res.status(), 401, "{route} {accept} {cookie:?}");
            }
        }
    }
    // A page sends the browser to log in and come back.
    let page = anonymous.get(&web.url(&g("/rooms/123?x=1"))).await;
    assert_eq!(page.status(), 303);
    assert_eq!(
        location(&page),
        format!("/auth/login?return_to=%2Fg%2F{GUILD}%2Frooms%2F123%3Fx%3D1")
    );

    let ash = stack.user("ash").await;
    let browser = Browser::new();
    let done = browser
        .login_to(web, &stack.sim, ash, "//elsewhere.example")
        .await;
    assert_eq!(
        (done.status().as_u16(), location(&done)),
        (303, "/rooms".to_owned())
    );
    let done = Browser::new()
        .login_to(web, &stack.sim, ash, "/rooms/1?from=invite")
        .await;
    assert_eq!(location(&done), "/rooms/1?from=invite");

    // A callback that did not start here, or was replayed, is refused.
    let stranger = Browser::new();
    let replay = stranger
        .get(&web.url("/auth/callback?code=abc&state=def"))
        .await;
    assert_eq!(replay.status(), 400);
    let text = replay.text().await.unwrap();
    assert!(text.contains("Start again"), "{text}");

    // Someone outside the guild sees nothing of it, and is told how to get in.
    let iris = stack.user("iris").await;
    let outsider = Browser::new();
    outsider.login_to(web, &stack.sim, iris, "/rooms").await;
    assert_eq!(outsider.get(&web.url(&g("/rooms"))).await.status(), 404);
    let text = outsider.get(&web.url("/")).await.text().await.unwrap();
    assert!(
        text.contains("None of your Discord servers has Coven yet") && text.contains("invite"),
        "{text}"
    );
    assert_eq!(outsider.get(&web.url("/api/stream")).await.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_discord_token_is_refreshed_silently_and_a_refused_one_logs_in_again() {
    // Tokens that live under the refresh margin: every request refreshes.
    let sim = TestSim::start_with(|s| s.token_ttl = Duration::from_secs(30)).await;
    let stack = Stack::start_on(RedisServer::start(), sim, 1, &[]).await;
    let web = stack.web(0);
    let ash = stack.user("ash").await;
    let browser = Browser::new();
    browser.login(web, &stack.sim, ash).await;
    let refreshed = || async {
        stack.sim.state().await["oauth"]["refreshed"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = refreshed().await;
    assert_eq!(browser.get(&web.url(&g("/rooms"))).await.status(), 200);
    assert_eq!(
        refreshed().await,
        before + 1,
        "the page refreshed the token silently"
    );

    let (status, _) = stack
        .sim
        .control("/oauth/revoke", json!({"user_id": ash.to_string()}))
        .await;
    assert_eq!(status, 200);
    let lobby = stack.lobby;
    let page = browser
        .get(&web.url(&format!("/g/{GUILD}/rooms/{lobby}")))
        .await;
    assert_eq!(
        page.status(),
        303,
        "a refused refresh means logging in again"
    );
    assert_eq!(
        location(&page),
        format!("/auth/login?return_to=%2Fg%2F{GUILD}%2Frooms%2F{lobby}"),
        "and coming back to the same page"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_recover_from_a_redis_restart_and_miss_nothing() {
    let mut stack = Stack::start_on(
        RedisServer::start_persistent(),
        TestSim::start().await,
        1,
        &[],
    )
    .await;
    let base = stack.web(0).url.clone();
    let url = |path: &str| format!("{base}{path}");
    let ash = stack.user("ash").await;
    let browser = Browser::new();
    browser.login(stack.web(0), &stack.sim, ash).await;
    let mut stream = browser.stream(&url("/api/stream"), None).await;
    stack.voice(ash, Some(stack.lobby), json!({})).await;
    let mut last = stream.next_domain().await.id;

    tokio::task::block_in_place(|| stack.redis.restart());
    let mut changes = Vec::new();
    for i in 0..6 {
        let flags = json!({"self_mute": i % 2 == 0});
        stack.voice(ash, Some(stack.lobby), flags).await;
        changes.push(i);
    }
    // Like a browser: if the stream ends, reconnect with the last id.
    let mut got = Vec::new();
    while got.len() < changes.len() {
        match stream.next_within(crate::harness::DEADLINE).await {
            Ok(Some(m)) if m.event == "voice.updated" => {
                last = m.id.clone();
                got.push(m);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(()) => {
                let taken = wait_for("the replica to take the stream back", || async {
                    let mut req = browser.http.get(url("/api/stream"));
                    if let Some(id) = &last {
                        req = req.header("Last-Event-ID", id);
                    }
                    let r = req.send().await.ok()?;
                    (r.status() == 200).then_some(r)
                })
                .await;
                stream = crate::harness::Sse::new(taken);
            }
        }
    }
    let got_ids = ids(&got);
    let mut sorted = got_ids.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), 6, "no duplicates: {got_ids:?}");
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, m)| m.json()["data"]["self_mute"] == (i % 2 == 0)),
        "in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_once_it_falls_too_far_behind() {
    let stack = Stack::start(1, &[("STREAM_BUFFER", "16")]).await;
    let web = stack.web(0);
    let ash = stack.user("ash").await;
    let browser = Browser::new();
    browser.login(web, &stack.sim, ash).await;
    let cookie = browser
        .jar
        .as_ref()
        .cookies(&web.url.parse().unwrap())
        .and_then(|v| v.to_str().ok().map(str::to_owned))
        .expect("a session cookie");

    // A reader with a tiny receive window that reads the headers, then nothing.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let addr = web.url.trim_start_matches("http://").parse().unwrap();
    let mut conn = socket.connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(
        format!("GET /api/stream HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut head = vec![0u8; 512];
    let n = conn.read(&mut head).await.unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));

    let bus = RedisBus::connect(
        &stack.redis.url(),
        "coven",
        Id::new(stack.sim.guild_id()),
        1_000_000,
    )
    .await
    .unwrap();
    // 10 MB in all: more than the kernel's socket buffers and the server's write buffer
    // hold, so the reader's place in the shared ring is overrun.
    let sent = 1000;
    let bulky = "x".repeat(10_000);
    for _ in 0..sent {
        let status = EventData::GatewayStatus {
            state: coven::event::GatewayState::Connected,
            reason: Some(bulky.clone()),
        };
        bus.append(status, None).await.unwrap();
    }
    // Reading again: what was buffered, then the end of the response (the last chunk);
    // far from everything.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(crate::harness::DEADLINE, async {
        let mut chunk = vec![0u8; 64 * 1024];
        while !rest.ends_with(b"\r\n0\r\n\r\n") {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => rest.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&rest);
    assert!(
        read.is_ok(),
        "the server closed the stream (read {} bytes, {} events)\n{}",
        rest.len(),
        text.matches("event: gateway.status").count(),
        web.process.stderr().join("\n")
    );
    let delivered = text.matches("event: gateway.status").count();
    assert!(delivered < sent, "cut off after {delivered} of {sent}");
    assert_eq!(
        metric(&web.metrics, "coven_web_streams_cut_off_total").await,
        1.0
    );
    // Its reconnect would replay from its last id: nothing is lost for good.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_pages_count_their_viewers_across_replicas() {
    let stack = Stack::start(2, &[("VIEWER_TTL", "3s")]).await;
    let (a, b) = (stack.web(0), stack.web(1));
    let (ash, bramble) = (stack.user("ash").await, stack.user("bramble").await);
    let (ash_browser, bramble_browser) = (Browser::new(), Browser::new());
    ash_browser.login(a, &stack.sim, ash).await;
    bramble_browser.login(b, &stack.sim, bramble).await;
    let room = format!("/api/stream?room={}", stack.lobby);
    let mut ash_view = ash_browser.stream(&a.url(&room), None).await;
    let viewers = |m: &Message| -> Vec<String> {
        m.json()["data"]["viewers"]
            .as_array()
            .map(|vs| {
                vs.iter()
                    .filter_map(|v| v["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let seen = ash_view.until(|m| m.event == "room.viewers").await;
    assert_eq!(viewers(seen.last().unwrap()), [ash.to_string()]);
    let bramble_view = bramble_browser.stream(&b.url(&room), None).await;
    let seen = ash_view.until(|m| m.event == "room.viewers").await;
    let mut both = vec![ash.to_string(), bramble.to_string()];
    both.sort();
    assert_eq!(viewers(seen.last().unwrap()), both);
    let page = ash_browser
        .get(&a.url(&format!("/g/{GUILD}/rooms/{}", stack.lobby)))
        .await
        .text()
        .await
        .unwrap();
    assert!(page.contains("Bramble"), "the page lists who is viewing");
    drop(bramble_view);
    let seen = ash_view.until(|m| m.event == "room.viewers").await;
    assert_eq!(viewers(seen.last().unwrap()), [ash.to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_readiness_metrics_headers_and_a_spread_drain() {
    let stack = Stack::start(1, &[("DRAIN_TIMEOUT", "2s")]).await;
    let web = stack.web(0);
    let ready = reqwest::get(web.url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    let health = reqwest::get(web.url("/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    let landing = reqwest::get(web.url("/")).await.unwrap();
    let h = landing.headers();
    assert!(
        h["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'self'")
    );
    assert!(
        h["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'")
    );
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert!(h.contains_key("referrer-policy"));
    let missing = reqwest::get(web.url("/nowhere")).await.unwrap();
    assert_eq!(missing.status(), 404);
    assert!(missing.text().await.unwrap().contains("Not found"));

    let ash = stack.user("ash").await;
    let browser = Browser::new();
    browser.login(web, &stack.sim, ash).await;
    let mut streams = Vec::new();
    for _ in 0..20 {
        streams.push(browser.stream(&web.url("/api/stream"), None).await);
    }
    assert_eq!(metric(&web.metrics, "coven_web_streams").await, 20.0);
    stack.voice(ash, Some(stack.lobby), json!({})).await;
    for s in &mut streams {
        assert_eq!(s.next_domain().await.event, "voice.joined");
    }
    assert!(metric(&web.metrics, "coven_web_events_delivered_total").await >= 20.0);
    assert!(metric(&web.metrics, "coven_web_request_seconds_count").await >= 1.0);
    // Metrics are on METRICS_BIND only, latencies as histograms that add up across
    // replicas.
    let public = reqwest::get(web.url("/metrics")).await.unwrap();
    assert_eq!(public.status(), 404, "no metrics on the public site");
    assert!(!web.metrics.starts_with(&web.url), "a listener of its own");
    let text = metrics_page(&web.metrics).await;
    assert!(
        text.contains("coven_web_request_seconds_bucket{")
            && text.contains(r#"le="+Inf""#)
            && !text.contains("quantile="),
        "{text}"
    );

    // SIGTERM: streams close spread over DRAIN_TIMEOUT, not all at once.
    let started = Instant::now();
    web.process.signal("TERM");
    let readers: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                while s.next().await.is_some() {}
                started.elapsed()
            })
        })
        .collect();
    let mut ended = Vec::new();
    for r in readers {
        ended.push(r.await.unwrap());
    }
    ended.sort();
    let (first, last) = (ended[0], ended[ended.len() - 1]);
    assert!(
        last - first >= Duration::from_millis(500),
        "spread: {first:?}..{last:?}"
    );
    assert!(last <= Duration::from_secs(5), "within the drain: {last:?}");

    // Redis gone: not ready.
    let mut other = stack;
    let replica = other.spawn_web(&[]);
    tokio::task::block_in_place(|| other.redis.stop());
    wait_for("/readyz to turn 503", || async {
        let r = reqwest::get(replica.url("/readyz")).await.ok()?;
        (r.status() == 503).then_some(())
    })
    .await;
}

/// What a page must look like while Redis is away: the readable 503 page with
/// `Retry-After`, answered quickly.
async fn assert_unavailable(what: &str, request: reqwest::RequestBuilder) {
    let started = Instant::now();
    let res = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let took = started.elapsed();
    let status = res.status();
    let retry_after = res.headers().get("retry-after").cloned();
    let body = res.text().await.unwrap_or_default();
    assert_eq!(status, 503, "{what}: {body}");
    assert!(retry_after.is_some(), "{what}: Retry-After");
    assert!(
        body.contains("Temporarily unavailable"),
        "{what}: a readable page, got {body:?}"
    );
    // REQUEST_TIMEOUT (1 s) and a margin for a loaded CI: not the 5 s and more of a
    // request that waits for Redis to come back.
    assert!(
        took < Duration::from_millis(3_000),
        "{what}: answered in {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_away_every_page_answers_503_at_once_and_all_works_after() {
    let mut stack = Stack::start_on(
        RedisServer::start_persistent(),
        TestSim::start().await,
        1,
        &[],
    )
    .await;
    let ash = stack.user("ash").await;
    let browser = Browser::new();
    browser.login(stack.web(0), &stack.sim, ash).await;
    let room = browser.create_room(stack.web(0), "Away game").await;
    let token = browser.csrf(stack.web(0)).await;
    let anonymous = Browser::new();

    tokio::task::block_in_place(|| stack.redis.stop());
    let web = stack.web(0);
    wait_for("/readyz to turn 503", || async {
        let r = reqwest::get(web.url("/readyz")).await.ok()?;
        (r.status() == 503).then_some(())
    })
    .await;
    let started = Instant::now();
    let ready = reqwest::get(web.url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    assert!(started.elapsed() < Duration::from_millis(3_000));
    let health = reqwest::get(web.url("/healthz")).await.unwrap();
    assert_eq!(health.status(), 200, "the process is alive all the same");

    let (b, a) = (&browser.http, &anonymous.http);
    let room_page = web.url(&format!("/g/{GUILD}/rooms/{room}"));
    for (what, request) in [
        ("GET / anonymous", a.get(web.url("/"))),
        ("GET / logged in", b.get(web.url("/"))),
        ("GET /rooms anonymous", a.get(web.url(&g("/rooms")))),
        ("GET /rooms logged in", b.get(web.url(&g("/rooms")))),
        ("GET a room page", b.get(&room_page)),
        (
            "GET /auth/login",
            a.get(web.url("/auth/login?return_to=/rooms")),
        ),
        ("GET /invite/x anonymous", a.get(web.url("/invite/x"))),
        ("GET /invite/x logged in", b.get(web.url("/invite/x"))),
        (
            "POST /rooms",
            b.post(web.url(&g("/rooms")))
                .header("origin", &web.url)
                .form(&[("name", "Another"), ("csrf_token", token.as_str())]),
        ),
        (
            "POST /auth/logout",
            b.post(web.url("/auth/logout"))
                .header("origin", &web.url)
                .form(&[("csrf_token", token.as_str())]),
        ),
        ("GET /api/stream", b.get(web.url("/api/stream"))),
        (
            "GET /api/stream for a room",
            b.get(web.url(&format!("/api/stream?room={room}"))),
        ),
        ("GET /api/stream anonymous", a.get(web.url("/api/stream"))),
    ] {
        assert_unavailable(what, request).await;
    }

    // Back: the same session, pages, posts and streams work again without a restart.
    tokio::task::block_in_place(|| stack.redis.start_again());
    let web = stack.web(0);
    wait_for("/readyz to turn 200", || async {
        let r = reqwest::get(web.url("/readyz")).await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let html = browser.page(&room_page).await;
    assert!(html.contains("Away game"), "the room page again");
    browser.stream(&web.url("/api/stream"), None).await;
    let again = browser.create_room(stack.web(0), "Back again").await;
    assert_ne!(again, room);
    let landing = anonymous.get(&web.url("/")).await;
    assert_eq!(landing.status(), 200);
    let login = anonymous.get(&web.url("/auth/login")).await;
    assert_eq!(login.status(), 303, "a login starts again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_store_that_fails_gives_the_503_page_never_a_bare_500() {
    use fred::prelude::*;
    use fred::types::CustomCommand;

    let stack = Stack::start(1, &[]).await;
    let web = stack.web(0);
    let ash = stack.user("ash").await;
    let browser = Browser::new();
    browser.login(web, &stack.sim, ash).await;
    let redis = stack.redis_client().await;
    let acl = |rules: Vec<&'static str>| {
        let redis = redis.clone();
        async move {
            let mut args = vec!["SETUSER", "default"];
            args.extend(rules);
            let _: Value = redis
                .custom(CustomCommand::new_static("ACL", None, false), args)
                .await
                .expect("ACL SETUSER");
        }
    };
    // Redis answers, but no longer lets anyone touch session keys (bare ids): the bus
    // keeps working while every session load and save fails.
    acl(vec!["resetkeys", "~coven:*"]).await;
    let anonymous = Browser::new();
    assert_unavailable(
        "a login whose session cannot be saved",
        anonymous.http.get(web.url("/auth/login?return_to=/rooms")),
    )
    .await;
    assert_unavailable(
        "a page whose session cannot be loaded",
        browser.http.get(web.url(&g("/rooms"))),
    )
    .await;
    let ready = reqwest::get(web.url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200, "the bus still answers");

    acl(vec!["allkeys"]).await;
    browser.page(&web.url(&g("/rooms"))).await;
    let login = anonymous.get(&web.url("/auth/login")).await;
    assert_eq!(login.status(), 303);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_stops_answering_costs_a_page_about_a_second_not_five() {
    use fred::prelude::*;
    use fred::types::CustomCommand;

    let stack = Stack::start(1, &[]).await;
    let web = stack.web(0);
    let ash = stack.user("ash").await;
    let browser = Browser::new();
    browser.login(web, &stack.sim, ash).await;
    let redis = stack.redis_client().await;
    // Connections stay open but nothing is answered: what a partition or a stalled
    // Redis looks like to a replica, with no closed socket to notice.
    let _: Value = redis
        .custom(
            CustomCommand::new_static("CLIENT", None, false),
            vec!["PAUSE", "5000", "ALL"],
        )
        .await
        .unwrap();
    let anonymous = Browser::new();
    tokio::join!(
        assert_unavailable(
            "a page whose session load is not answered",
            browser.http.get(web.url(&g("/rooms"))),
        ),
        assert_unavailable(
            "a login whose session save is not answered",
            anonymous.http.get(web.url("/auth/login?return_to=/rooms")),
        ),
    );
    wait_for("pages to work again once Redis answers", || async {
        let r = browser.http.get(web.url(&g("/rooms"))).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_stream_resumes_exactly_from_memory_and_refuses_bad_views() {
    let stack = Stack::start(1, &[]).await;
    let a = stack.web(0);
    let (ash, bramble) = (stack.user("ash").await, stack.user("bramble").await);
    let browser = Browser::new();
    browser.login(a, &stack.sim, ash).await;
    let many = (1..=65)
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(",");
    for bad in ["abc", "0", "1,,x", many.as_str()] {
        let res = browser
            .get(&a.url(&format!("/api/stream/html?view={bad}")))
            .await;
        assert_eq!(res.status(), 400, "view={bad}");
    }
    let res = browser
        .get(&a.url("/api/stream/html?last_event_id=nope"))
        .await;
    assert_eq!(res.status(), 400);

    // Without an id, the pages come whole first, closed by the id they are at.
    let mut live = browser.stream(&a.url("/api/stream/html"), None).await;
    let opening = live.until(|m| m.event == "at").await;
    assert!(
        opening
            .iter()
            .any(|m| m.event == "rooms" && m.data.contains("id=\"rooms-list\"")),
        "{opening:?}"
    );
    let from = opening.last().unwrap().data.clone();
    stack.voice(bramble, Some(stack.lobby), json!({})).await;
    let joined = live.until(|m| m.event == "at").await;
    let parts = |ms: &[crate::harness::Message]| -> Vec<String> {
        ms.iter()
            .filter(|m| m.event == "rooms")
            .map(|m| m.data.clone())
            .collect()
    };
    assert!(
        parts(&joined)
            .iter()
            .any(|d| d.contains("Bramble joined “Lobby”.")),
        "announced: {joined:?}"
    );

    // Resuming after `from`: exactly that event again, announcement and all, from the
    // replica's memory (not the pages whole).
    let mut again = browser
        .stream(&a.url("/api/stream/html"), Some(&from))
        .await;
    let joined_at = joined.last().unwrap().data.clone();
    let replay = again
        .until(|m| m.event == "at" && m.data == joined_at)
        .await;
    assert_eq!(parts(&replay), parts(&joined));
    // First where the connection starts (an id, so the browser's last id is never empty),
    // then the viewer's own whereabouts: Ash is in no voice channel.
    let opening: Vec<(&str, &str)> = replay
        .iter()
        .take(2)
        .map(|m| (m.event.as_str(), m.data.as_str()))
        .collect();
    assert_eq!(opening, [("at", from.as_str()), ("me", "none")]);
    assert_eq!(replay[0].id.as_deref(), Some(from.as_str()));
}
