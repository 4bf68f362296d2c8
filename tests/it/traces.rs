//! OpenTelemetry traces, against a real OTLP receiver (`harness::otlp`): one voice change
//! in Discord is one trace, from the gateway's dispatch through its append to each web
//! replica's write to its streams; the trace context crosses Redis beside the event and
//! never reaches a browser.

use serde_json::json;

use crate::harness::otlp::{Collector, Span};
use crate::harness::{Browser, CovenProcess, RedisServer, Stack, TestSim, wait_for};

/// Settings that turn traces on, exporting to `endpoint` over `protocol` quickly.
fn traced<'a>(endpoint: &'a str, protocol: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
        // Exported within 100 ms instead of the default 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_voice_change_is_one_trace_from_the_dispatch_to_both_replicas_writes() {
    let collector = Collector::start().await;
    let otel = traced(&collector.http, "http/protobuf");
    let stack = Stack::start_with(
        RedisServer::start(),
        TestSim::start().await,
        2,
        &otel,
        &otel,
    )
    .await;
    let ash = stack.user("ash").await;
    let mut streams = Vec::new();
    for web in &stack.webs {
        let browser = Browser::new();
        browser.login(web, &stack.sim, ash).await;
        streams.push(browser.stream(&web.url("/api/stream"), None).await);
    }

    stack.voice(ash, Some(stack.lobby), json!({})).await;
    let mut seen = Vec::new();
    for stream in &mut streams {
        let joined = stream.until(|m| m.event == "voice.joined").await;
        seen.push(joined.last().unwrap().clone());
    }
    let id = seen[0].id.clone().unwrap();
    assert_eq!(
        seen[1].id.as_deref(),
        Some(id.as_str()),
        "one event, two replicas"
    );

    // Both replicas' writes of that event, each in the trace of a gateway dispatch.
    let (writes, trace) = wait_for("both replicas' writes of the event, in one trace", || {
        let spans = collector.spans();
        let id = id.clone();
        async move {
            let writes: Vec<Span> = spans
                .iter()
                .filter(|s| s.name == "stream.write" && s.attr("event") == Some(id.as_str()))
                .cloned()
                .collect();
            let replicas: std::collections::BTreeSet<_> =
                writes.iter().map(|w| w.instance().to_owned()).collect();
            if replicas.len() < 2 {
                return None;
            }
            let trace: Vec<Span> = spans
                .iter()
                .filter(|s| s.trace_id == writes[0].trace_id)
                .cloned()
                .collect();
            trace
                .iter()
                .any(|s| s.name == "discord.dispatch")
                .then_some((writes, trace))
        }
    })
    .await;
    let span = |name: &str| {
        trace
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} span in {trace:#?}"))
    };
    let dispatch = span("discord.dispatch");
    let append = span("bus.append");
    assert_eq!(dispatch.command(), "gateway");
    assert_eq!(dispatch.parent_span_id, "", "the dispatch starts the trace");
    assert_eq!(dispatch.attr("shard"), Some("0"));
    assert_eq!(
        dispatch.attr("guild"),
        Some(crate::harness::GUILD.to_string().as_str())
    );
    assert!(dispatch.attr("sequence").is_some(), "{dispatch:?}");
    assert!(
        dispatch
            .attr("kind")
            .is_some_and(|k| k.contains("VoiceStateUpdate"))
    );
    assert_eq!(append.parent_span_id, dispatch.span_id);
    assert_eq!(append.attr("kind"), Some("voice.joined"));
    for write in &writes {
        assert_eq!(write.trace_id, dispatch.trace_id, "{write:?}");
        assert_eq!(write.command(), "web");
        assert_eq!(
            write.parent_span_id, append.span_id,
            "the write follows the append"
        );
        assert_eq!(write.attr("streams"), Some("1"), "{write:?}");
    }
    assert_ne!(writes[0].instance(), writes[1].instance());
    // Each stream's opening is a request span of its replica, ended when the answer began.
    let all = collector.spans();
    let opened = collector_spans(&all, "/api/stream");
    assert_eq!(opened.len(), 2, "{opened:?}");
    assert!(opened.iter().all(|s| s.attr("status") == Some("200")));

    // What the browsers got carries no trace id.
    for message in &seen {
        assert!(!message.data.contains(&dispatch.trace_id), "{message:?}");
        assert!(!message.data.contains("traceparent"), "{message:?}");
    }
}

fn collector_spans<'a>(spans: &'a [Span], route: &str) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|s| s.name == "http.request" && s.attr("route") == Some(route))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_exports_over_grpc_and_http_requests_are_spans() {
    let collector = Collector::start().await;
    let redis = RedisServer::start();
    let sim = TestSim::start().await;
    let otel = traced(&collector.grpc, "grpc");
    let stack = Stack::start_with(redis, sim, 1, &otel, &[]).await;
    let guild = crate::harness::GUILD.to_string();
    CovenProcess::run_ok(
        &["publish", "--ping", "--count", "3", "--rate", "1000"],
        &[
            &[
                ("REDIS_URL", stack.redis.url().as_str()),
                ("DISCORD_GUILD_ID", guild.as_str()),
            ][..],
            &otel[..],
        ]
        .concat(),
    );
    let web = stack.web(0);
    // A caller's trace context, "sampled": anyone can send one, so the request is a trace
    // of its own that links to it, not a child the caller's flag decides about.
    let caller_trace = "0af7651916cd43dd8448eb211c80319c";
    let landing = reqwest::Client::new()
        .get(web.url("/"))
        .header(
            "traceparent",
            format!("00-{caller_trace}-b7ad6b7169203331-01"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(landing.status(), 200);

    let spans = wait_for("publish's three traces and the request's span", || {
        let spans = collector.spans();
        async move {
            let roots = spans.iter().filter(|s| s.name == "publish").count();
            let request = spans
                .iter()
                .any(|s| s.name == "http.request" && s.attr("route") == Some("/"));
            (roots >= 3 && request).then_some(spans)
        }
    })
    .await;
    let publish_roots: Vec<&Span> = spans.iter().filter(|s| s.name == "publish").collect();
    assert!(publish_roots.iter().all(|s| s.command() == "publish"));
    let traces: std::collections::BTreeSet<_> =
        publish_roots.iter().map(|s| s.trace_id.clone()).collect();
    assert_eq!(traces.len(), 3, "each event its own trace");
    let request = spans
        .iter()
        .find(|s| s.name == "http.request" && s.attr("route") == Some("/"))
        .unwrap();
    assert_eq!(request.attr("status"), Some("200"));
    assert_ne!(request.trace_id, caller_trace, "not the caller's trace");
    assert_eq!(request.parent_span_id, "", "a root, not the caller's child");
    assert_eq!(request.links, [caller_trace], "linked to the caller's");
    assert_eq!(request.attr("method"), Some("GET"));
    assert_eq!(request.command(), "web");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_trace_setting_stops_the_process_with_one_line() {
    let mut process = CovenProcess::spawn(
        &["publish", "--ping"],
        &[
            ("REDIS_URL", "redis://127.0.0.1:1"),
            ("DISCORD_GUILD_ID", "1"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
            ("OTEL_TRACES_SAMPLER", "sometimes"),
        ],
    );
    assert_eq!(process.wait_exit(), Some(2));
    let stderr = process.stderr().join("\n");
    assert!(
        stderr.contains("OTEL_TRACES_SAMPLER: expected always_on"),
        "{stderr}"
    );
}
