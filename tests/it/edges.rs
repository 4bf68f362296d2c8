//! Edges: slow, silent and hostile clients against real replicas. None of them may take
//! a replica down or hold it for long.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use coven::bus::Bus;
use coven::bus::redis::RedisBus;
use coven::event::EventData;
use reqwest::cookie::CookieStore;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use twilight_model::id::Id;

use crate::harness::{Browser, Stack, Web, metric, wait_for, within};
use crate::harness::{GUILD, g};

fn addr(web: &Web) -> SocketAddr {
    web.url
        .trim_start_matches("http://")
        .parse()
        .expect("a socket address")
}

/// Reads (and discards) until the server closes the connection: how long that took,
/// or `None` if it was still open after `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_slow_and_idle_connections_are_closed_after_ten_seconds_but_streams_live_on() {
    let stack = Stack::start(1, &[("STREAM_KEEPALIVE", "1s")]).await;
    let web = stack.web(0);
    let ash = stack.user("ash").await;
    let browser = Browser::new();
    browser.login(web, &stack.sim, ash).await;
    let mut stream = browser.stream(&web.url("/api/stream"), None).await;

    // Never sends a byte; sends half a request; finishes a request and then says nothing.
    let mut silent = TcpStream::connect(addr(web)).await.unwrap();
    let mut partial = TcpStream::connect(addr(web)).await.unwrap();
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: coven\r\n")
        .await
        .unwrap();
    let mut idle = TcpStream::connect(addr(web)).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: coven\r\n\r\n")
        .await
        .unwrap();
    let limit = Duration::from_secs(14);
    let (silent, partial, idle) = tokio::join!(
        closed_within(&mut silent, limit),
        closed_within(&mut partial, limit),
        closed_within(&mut idle, limit),
    );
    for (what, took) in [
        ("silent", silent),
        ("partial", partial),
        ("idle keep-alive", idle),
    ] {
        let took =
            took.unwrap_or_else(|| panic!("the {what} connection was still open after {limit:?}"));
        assert!(
            took >= Duration::from_secs(9),
            "the {what} connection was closed after only {took:?}"
        );
    }

    // The stream has been open all along and still delivers.
    let cinder = stack.user("cinder").await;
    stack.voice(cinder, Some(stack.lobby), json!({})).await;
    let id = cinder.to_string();
    stream
        .until(|m| m.event == "voice.joined" && m.json()["data"]["user"]["id"] == id.as_str())
        .await;
    assert!(stream.comments > 5, "keep-alives kept coming");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_out_of_descriptors_still_answers_a_new_client() {
    rlimit::increase_nofile_limit(8192).unwrap();
    let stack = Stack::start(0, &[]).await;
    let web = stack.spawn_web_limited(Some(1024), &[]);
    let http = reqwest::Client::new();
    wait_for("the limited replica to answer", || async {
        let r = http.get(web.url("/healthz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    // 1,050 connections that never send anything, against 1,024 descriptors.
    let mut held = Vec::new();
    for _ in 0..1050 {
        held.push(TcpStream::connect(addr(&web)).await.unwrap());
    }
    // A new client is still answered (without room it would wait in the backlog or be
    // refused).
    let res = within("/healthz under 1,050 idle connections", async {
        reqwest::Client::new()
            .get(web.url("/healthz"))
            .send()
            .await
            .expect("an answer")
    })
    .await;
    assert_eq!(res.status(), 200);
    // The oldest idle ones made room (nothing in flight was touched).
    let mut closed = 0;
    for s in &mut held[..100] {
        if closed_within(s, Duration::from_millis(50)).await.is_some() {
            closed += 1;
        }
    }
    assert!(closed > 0, "idle connections were evicted to make room");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_person_may_hold_32_streams_on_a_replica_and_the_next_is_told_why() {
    let stack = Stack::start(1, &[]).await;
    let web = stack.web(0);
    let ash = stack.user("ash").await;
    let browser = Browser::new();
    browser.login(web, &stack.sim, ash).await;
    let mut streams = Vec::new();
    for _ in 0..32 {
        streams.push(browser.stream(&web.url("/api/stream"), None).await);
    }
    let res = browser.get(&web.url("/api/stream")).await;
    assert_eq!(res.status(), 429);
    assert!(res.headers().contains_key("retry-after"));
    let text = res.text().await.unwrap();
    assert!(
        text.contains("Too many live pages") && text.contains("32"),
        "{text}"
    );
    // Someone else is not affected.
    let other = Browser::new();
    other
        .login(web, &stack.sim, stack.user("bramble").await)
        .await;
    drop(other.stream(&web.url("/api/stream"), None).await);
    // Closing one makes room again.
    drop(streams.pop());
    wait_for("room for another stream", || async {
        (browser.get(&web.url("/api/stream")).await.status() == 200).then_some(())
    })
    .await;
}

/// The session cookie a logged-in browser holds for `web`.
/// One replica with Ash logged in: the stack, Ash's browser and their session cookie.
async fn ash_on_one_replica(extra: &[(&str, &str)]) -> (Stack, Browser, String) {
    let stack = Stack::start(1, extra).await;
    let browser = Browser::new();
    browser
        .login(stack.web(0), &stack.sim, stack.user("ash").await)
        .await;
    let cookie = session_cookie(&browser, stack.web(0));
    (stack, browser, cookie)
}

fn session_cookie(browser: &Browser, web: &Web) -> String {
    let url: reqwest::Url = web.url("/").parse().unwrap();
    let cookie = browser.jar.cookies(&url).expect("a session cookie");
    cookie.to_str().unwrap().to_owned()
}

/// A stream request (`version`: `1.1` or `1.0`, which gets the bare event stream with no
/// chunk framing) for `cookie` on a socket that reads almost nothing: a browser tab
/// frozen in the background, or a hostile client.
async fn stalled_stream(web: &Web, cookie: &str, version: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr(web)).await.unwrap();
    let request = format!(
        "GET /api/stream HTTP/{version}\r\nHost: coven\r\nAccept: text/event-stream\r\nCookie: {cookie}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_stalled_readers_are_cut_within_35_seconds() {
    let stack = Stack::start(1, &[("STREAM_MAX_PER_USER", "1000")]).await;
    let web = stack.web(0);
    let browser = Browser::new();
    browser
        .login(web, &stack.sim, stack.user("ash").await)
        .await;
    let cookie = session_cookie(&browser, web);
    let mut held = Vec::new();
    for _ in 0..500 {
        held.push(stalled_stream(web, &cookie, "1.1").await);
    }
    let streams = |web: &Web| {
        let url = web.url("/healthz");
        async move {
            let body: Value = reqwest::get(url).await.ok()?.json().await.ok()?;
            body["streams"].as_u64()
        }
    };
    wait_for("500 streams open", || async {
        (streams(web).await? >= 500).then_some(())
    })
    .await;

    let bus = RedisBus::connect(
        &stack.redis.url(),
        "coven",
        Id::new(stack.sim.guild_id()),
        100_000,
    )
    .await
    .unwrap();
    let started = Instant::now();
    for seq in 0..3000 {
        bus.append(EventData::Ping { seq, ts: 0 }, None)
            .await
            .unwrap();
    }
    let deadline = Duration::from_secs(35);
    loop {
        if streams(web).await == Some(0) {
            break;
        }
        assert!(
            started.elapsed() < deadline,
            "{:?} streams still open {deadline:?} after the events began",
            streams(web).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("500 stalled streams cut after {:?}", started.elapsed());
    // The replica is fine: a reader that reads gets the newest events.
    let mut fresh = browser.stream(&web.url("/api/stream"), None).await;
    bus.append(EventData::Ping { seq: 9999, ts: 0 }, None)
        .await
        .unwrap();
    fresh
        .until(|m| m.event == "ping" && m.json()["data"]["seq"] == 9999)
        .await;
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_gateway_is_a_delayed_site_not_a_dead_one() {
    // The harness's gateways hold a 2 s lease.
    let stack = Stack::start(2, &[]).await;
    let (a, b) = (stack.web(0), stack.web(1));
    let browser = Browser::new();
    browser.login(a, &stack.sim, stack.user("ash").await).await;
    let mut on_a = browser.stream(&a.url("/api/stream"), None).await;
    let mut on_b = browser.stream(&b.url("/api/stream"), None).await;
    let banner_shown =
        |html: &str| html.contains(r#"id="gateway-banner" class="banner warn" role="status">"#);
    wait_for(
        "pages without the banner while the gateway is connected",
        || async { (!banner_shown(&browser.page(&a.url(&g("/rooms"))).await)).then_some(()) },
    )
    .await;

    stack.gateway.signal("KILL");
    let killed = Instant::now();
    for stream in [&mut on_a, &mut on_b] {
        let told = within(
            "the streams to hear that updates are delayed",
            stream
                .until(|m| m.event == "gateway.status" && m.json()["data"]["state"] != "CONNECTED"),
        )
        .await;
        let told = told.last().unwrap().json();
        assert_eq!(told["view"], true, "the replica's own word, not the log's");
    }
    assert!(
        killed.elapsed() < Duration::from_secs(2 + 5),
        "told after {:?} (lease 2 s)",
        killed.elapsed()
    );
    for web in [a, b] {
        let ready = reqwest::get(web.url("/readyz")).await.unwrap();
        assert_eq!(ready.status(), 200, "a stale gateway keeps no replica out");
        let body: Value = ready.json().await.unwrap();
        assert_eq!(body["gateway"]["fresh"], false, "{body}");
        assert!(
            banner_shown(&browser.page(&web.url(&g("/rooms"))).await),
            "fresh pages show the banner"
        );
    }

    // A gateway is back: the banner goes, live and on fresh pages.
    let _back = stack.spawn_gateway();
    for stream in [&mut on_a, &mut on_b] {
        within(
            "the streams to hear updates flow again",
            stream
                .until(|m| m.event == "gateway.status" && m.json()["data"]["state"] == "CONNECTED"),
        )
        .await;
    }
    wait_for("fresh pages without the banner", || async {
        (!banner_shown(&browser.page(&b.url(&g("/rooms"))).await)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_falls_behind_its_buffer_catches_up_without_being_cut() {
    // A ring of only 16 frames, and a reader that reads nothing while 2,000 events go
    // out (its socket fills, so it falls far behind the ring), then reads on.
    let stack = Stack::start(1, &[("STREAM_BUFFER", "16")]).await;
    let web = stack.web(0);
    let browser = Browser::new();
    browser
        .login(web, &stack.sim, stack.user("ash").await)
        .await;
    let mut conn = stalled_stream(web, &session_cookie(&browser, web), "1.0").await;
    let mut head = [0u8; 16];
    conn.read_exact(&mut head).await.unwrap();
    assert!(
        head.starts_with(b"HTTP/1.0 200"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );

    let bus = RedisBus::connect(
        &stack.redis.url(),
        "coven",
        Id::new(stack.sim.guild_id()),
        100_000,
    )
    .await
    .unwrap();
    const SENT: u64 = 2000;
    for seq in 0..SENT {
        bus.append(EventData::Ping { seq, ts: 0 }, None)
            .await
            .unwrap();
    }
    // Now read: every ping, once, in order, on the same connection.
    let mut text = String::new();
    let mut seqs = Vec::new();
    within("all 2,000 events on the same stream", async {
        let mut chunk = vec![0u8; 64 * 1024];
        while seqs.last() != Some(&(SENT - 1)) {
            let n = conn.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the stream was cut after {} events", seqs.len());
            text.push_str(&String::from_utf8_lossy(&chunk[..n]));
            while let Some(end) = text.find("\n\n") {
                let block: String = text.drain(..end + 2).collect();
                if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: "))
                    && let Ok(v) = serde_json::from_str::<Value>(data)
                    && v["type"] == "ping"
                {
                    seqs.push(v["data"]["seq"].as_u64().unwrap());
                }
            }
        }
    })
    .await;
    assert_eq!(
        seqs,
        (0..SENT).collect::<Vec<_>>(),
        "every event once, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickled_a_byte_at_a_time_is_refused_after_ten_seconds() {
    let (stack, _, cookie) = ash_on_one_replica(&[]).await;
    let web = stack.web(0);
    let mut conn = TcpStream::connect(addr(web)).await.unwrap();
    let head = format!(
        "POST /g/{GUILD}/rooms HTTP/1.1\r\nHost: coven\r\nCookie: {cookie}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\nname=Slow"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    // One more byte every second keeps the body "alive" for ever, were there no deadline.
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        tokio::select! {
            read = conn.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            },
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                if conn.write_all(b"x").await.is_err() {
                    break;
                }
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(14),
            "the trickled body still held the connection after 14 s"
        );
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    // Nothing was made from the part that arrived.
    let state = stack.sim.state().await;
    assert!(
        !state.to_string().contains("Slow"),
        "no room from a cut form"
    );
}

/// Reads from `conn` until `want` shows up in what was read, within the deadline.
async fn read_until(conn: &mut TcpStream, want: &str) -> String {
    let mut seen = Vec::new();
    within("the bytes wanted", async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains(want) {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed before {want:?}: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_on_its_own_connection_is_served_lean_and_ends_when_its_client_goes() {
    let (stack, _, cookie) = ash_on_one_replica(&[]).await;
    let web = stack.web(0);
    let streams = || async {
        let body: Value = reqwest::get(web.url("/healthz"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        body["streams"].as_u64()
    };
    // Which path served a connection: the replica counts the lean ones.
    let lean_streams = || metric(&web.metrics, "coven_web_lean_streams_total");
    let bus = RedisBus::connect(
        &stack.redis.url(),
        "coven",
        Id::new(stack.sim.guild_id()),
        100_000,
    )
    .await
    .unwrap();

    // As EventSource asks on a new connection: chunked, dated, closed when done.
    let before = lean_streams().await;
    let mut lean = TcpStream::connect(addr(web)).await.unwrap();
    lean.write_all(
        format!("GET /api/stream HTTP/1.1\r\nHost: coven\r\nAccept: text/event-stream\r\nCookie: {cookie}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_until(&mut lean, "retry: 2000").await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(
        lean_streams().await,
        before + 1.0,
        "served by the lean path, not hyper: {head}"
    );
    for line in [
        "date: ",
        "content-type: text/event-stream",
        "transfer-encoding: chunked",
        "connection: close",
        "cache-control: no-cache",
    ] {
        assert!(head.to_lowercase().contains(line), "{line} in {head}");
    }
    bus.append(EventData::Ping { seq: 7, ts: 0 }, None)
        .await
        .unwrap();
    let got = read_until(&mut lean, "\"seq\":7").await;
    // Each frame is one chunk: its size in hex, the frame, CRLF.
    let at = got.find("event: ping").unwrap();
    let size_line = got[..at].rsplit("\r\n").nth(1).unwrap_or_default();
    assert!(
        usize::from_str_radix(size_line.trim(), 16).is_ok(),
        "chunk size before the frame: {got:?}"
    );
    wait_for("the stream counted", || async {
        (streams().await? == 1).then_some(())
    })
    .await;
    // The client goes: the stream ends on the replica at once, no write needed to notice.
    drop(lean);
    wait_for("the stream to end with its client", || async {
        (streams().await? == 0).then_some(())
    })
    .await;

    // Refused on the lean path: the answer has its length and the connection closes.
    let mut anonymous = TcpStream::connect(addr(web)).await.unwrap();
    anonymous
        .write_all(b"GET /api/stream HTTP/1.1\r\nHost: coven\r\nAccept: text/event-stream\r\n\r\n")
        .await
        .unwrap();
    let refused = read_until(&mut anonymous, "log in first").await;
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    assert_eq!(lean_streams().await, before + 2.0, "{refused}");
    assert!(
        refused.to_lowercase().contains("content-length: 13"),
        "{refused}"
    );
    assert!(
        closed_within(&mut anonymous, Duration::from_secs(5))
            .await
            .is_some()
    );

    // A stream asked for on a kept-alive connection goes through hyper, and works.
    let mut kept = TcpStream::connect(addr(web)).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: coven\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut kept, "\"status\":\"ok\"").await;
    kept.write_all(
        format!("GET /api/stream HTTP/1.1\r\nHost: coven\r\nAccept: text/event-stream\r\nCookie: {cookie}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_until(&mut kept, "retry: 2000").await;
    assert!(!head.to_lowercase().contains("connection: close"), "{head}");
    let lean_so_far = lean_streams().await;
    assert_eq!(lean_so_far, before + 2.0, "served by hyper: {head}");
    bus.append(EventData::Ping { seq: 8, ts: 0 }, None)
        .await
        .unwrap();
    read_until(&mut kept, "\"seq\":8").await;
    // So does any first request that is not a plain GET for a stream: a body, chunked
    // framing, an Expect or Upgrade, HTTP/1.0, bytes after the head. hyper answers them,
    // each by its own rules.
    for (what, extra, version, after) in [
        ("a body", "Content-Length: 2\r\n", "1.1", "hi"),
        (
            "chunked framing",
            "Transfer-Encoding: chunked\r\n",
            "1.1",
            "0\r\n\r\n",
        ),
        ("Expect", "Expect: 100-continue\r\n", "1.1", ""),
        (
            "Upgrade",
            "Connection: upgrade\r\nUpgrade: websocket\r\n",
            "1.1",
            "",
        ),
        ("HTTP/1.0", "", "1.0", ""),
        (
            "a pipelined request",
            "",
            "1.1",
            "GET /healthz HTTP/1.1\r\nHost: coven\r\n\r\n",
        ),
    ] {
        let mut odd = TcpStream::connect(addr(web)).await.unwrap();
        odd.write_all(
            format!("GET /api/stream HTTP/{version}\r\nHost: coven\r\nAccept: text/event-stream\r\n{extra}Cookie: {cookie}\r\n\r\n{after}")
                .as_bytes(),
        )
        .await
        .unwrap();
        let head = read_until(&mut odd, "\r\n\r\n").await.to_lowercase();
        assert!(head.starts_with("http/1."), "{what}: {head}");
        assert_eq!(
            lean_streams().await,
            lean_so_far,
            "{what} goes to hyper: {head}"
        );
    }
}
