//! Rate limits and injected failures in front of every REST route: fixed windows per
//! route bucket and major parameter, Discord's global limit per token, the
//! `X-RateLimit-*` headers as the Rate Limits page documents them (the bucket headers on
//! every answer, `X-RateLimit-Scope` and `X-RateLimit-Global` on 429s only), 429s shaped
//! as Discord's for each scope, and the failures `POST /_sim/rest/fail` queues.
//!
//! Owns no routes and no guild state; must not look inside a request's body.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use crate::sim::Shared;
use crate::sim::ids::{digest_hex, now_ms};

#[derive(Debug)]
pub struct Limits {
    limit: u32,
    window: Duration,
    /// Requests per second per caller, across all routes (the global limit).
    global: u32,
    buckets: HashMap<String, Window>,
    globals: HashMap<String, Window>,
    /// Limits an injected 429 announced, held until its `retry_after` has passed: a
    /// client asking again sooner is refused again, as Discord refuses it.
    holds: HashMap<String, Instant>,
    faults: Vec<Fault>,
    /// 429s served because a bucket or the global limit ran out (not injected ones).
    pub rate_limited: u64,
    /// Requests that reached the REST API, by who made them.
    pub requests: Requests,
}

/// REST requests counted by the credentials they carried (served, limited or failed
/// alike): the bot's token, a person's OAuth2 bearer token, or neither (the token
/// endpoint authenticates with the client's secret instead).
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Requests {
    pub bot: u64,
    pub bearer: u64,
    pub other: u64,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    used: u32,
}

/// A failure injected through the control API.
#[derive(Debug, Clone, Deserialize)]
pub struct Fault {
    #[serde(default)]
    pub method: Option<String>,
    pub path: String,
    pub status: u16,
    #[serde(default = "one")]
    pub count: u32,
    #[serde(default)]
    pub retry_after: Option<f64>,
    /// A Discord JSON error code to answer with (for example 50013).
    #[serde(default)]
    pub code: Option<u32>,
    /// Shorthand for `"scope": "global"`.
    #[serde(default)]
    pub global: bool,
    /// Which limit a 429 says was hit: `user` (the route's bucket, the default),
    /// `global`, or `shared` (a resource's own limit, which spends nothing of the
    /// caller's).
    #[serde(default)]
    pub scope: Option<Scope>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    User,
    Global,
    Shared,
}

impl Scope {
    fn as_str(self) -> &'static str {
        match self {
            Scope::User => "user",
            Scope::Global => "global",
            Scope::Shared => "shared",
        }
    }
}

fn one() -> u32 {
    1
}

impl Fault {
    /// The longest `retry_after` the control API takes, in seconds.
    pub const LONGEST_WAIT: f64 = 86_400.0;

    /// How long an injected 429 says to wait (and holds its limit): `retry_after`,
    /// 1 s by default.
    fn wait(&self) -> Duration {
        Duration::try_from_secs_f64(
            self.retry_after
                .unwrap_or(1.0)
                .clamp(0.0, Self::LONGEST_WAIT),
        )
        .unwrap_or(Duration::ZERO)
    }

    fn scope(&self) -> Scope {
        match (self.scope, self.global) {
            (Some(s), _) => s,
            (None, true) => Scope::Global,
            (None, false) => Scope::User,
        }
    }

    fn matches(&self, method: &Method, path: &str) -> bool {
        let method_ok = self
            .method
            .as_deref()
            .is_none_or(|m| m == "*" || m.eq_ignore_ascii_case(method.as_str()));
        let want = self.path.strip_prefix("/api/v10").unwrap_or(&self.path);
        let have = path.strip_prefix("/api/v10").unwrap_or(path);
        let (mut w, mut h) = (
            want.trim_matches('/').split('/'),
            have.trim_matches('/').split('/'),
        );
        let path_ok = loop {
            match (w.next(), h.next()) {
                (None, None) => break true,
                (Some(a), Some(b)) if a == "*" || a == b => {}
                _ => break false,
            }
        };
        method_ok && path_ok
    }
}

struct Verdict {
    headers: Vec<(&'static str, String)>,
    rejection: Option<Response>,
}

impl Limits {
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit,
            window,
            global: u32::MAX,
            buckets: HashMap::new(),
            globals: HashMap::new(),
            holds: HashMap::new(),
            faults: Vec::new(),
            rate_limited: 0,
            requests: Requests::default(),
        }
    }

    /// Discord's global limit: `per_second` requests by one caller, all routes together.
    pub fn with_global(mut self, per_second: u32) -> Self {
        self.global = per_second;
        self
    }

    pub fn add_fault(&mut self, fault: Fault) {
        self.faults.push(fault);
    }

    fn take_fault(&mut self, method: &Method, path: &str) -> Option<Fault> {
        let i = self.faults.iter().position(|f| f.matches(method, path))?;
        let fault = self.faults[i].clone();
        self.faults[i].count = self.faults[i].count.saturating_sub(1);
        if self.faults[i].count == 0 {
            self.faults.remove(i);
        }
        Some(fault)
    }

    /// Counts a request against its bucket. Discord keeps a route's windows per token
    /// (`X-RateLimit-Scope: user`: "per bot or user limit"), so `caller` (the request's
    /// credentials) is part of the key: one person's page views never use up another's,
    /// nor the bot's.
    /// What an injected 429 of `scope` holds: the caller's route bucket, every route of
    /// the caller (global), or the resource for everyone (shared).
    fn hold_key(scope: Scope, bucket: &str, major: &str, caller: &str) -> String {
        match scope {
            Scope::User => format!("user:{bucket}:{major}:{caller}"),
            Scope::Global => format!("global:{caller}"),
            Scope::Shared => format!("shared:{bucket}:{major}"),
        }
    }

    fn hold(&mut self, scope: Scope, method: &Method, path: &str, caller: &str, for_: Duration) {
        let (bucket, major) = bucket_of(method, path);
        let now = Instant::now();
        self.holds.retain(|_, until| *until > now);
        self.holds
            .insert(Self::hold_key(scope, &bucket, &major, caller), now + for_);
    }

    /// The 429 a held limit still answers, if one holds this request.
    fn held(&mut self, bucket: &str, major: &str, caller: &str, now: Instant) -> Option<Response> {
        for scope in [Scope::Global, Scope::Shared, Scope::User] {
            let key = Self::hold_key(scope, bucket, major, caller);
            let Some(until) = self.holds.get(&key).copied() else {
                continue;
            };
            if until <= now {
                self.holds.remove(&key);
                continue;
            }
            self.rate_limited += 1;
            return Some(scoped_429(bucket, scope, until - now));
        }
        None
    }

    fn check(&mut self, method: &Method, path: &str, caller: &str) -> Verdict {
        let (bucket, major) = bucket_of(method, path);
        let now = Instant::now();
        if !self.holds.is_empty()
            && let Some(rejection) = self.held(&bucket, &major, caller, now)
        {
            return Verdict {
                headers: Vec::new(),
                rejection: Some(rejection),
            };
        }
        // The global limit first: a request it refuses spends nothing of the route's.
        let second = Duration::from_secs(1);
        let g = self.globals.entry(caller.to_owned()).or_insert(Window {
            started: now,
            used: 0,
        });
        if now.duration_since(g.started) >= second {
            *g = Window {
                started: now,
                used: 0,
            };
        }
        if g.used >= self.global {
            self.rate_limited += 1;
            let wait = second.saturating_sub(now.duration_since(g.started));
            return Verdict {
                headers: Vec::new(),
                rejection: Some(too_many(&[], wait.as_secs_f64(), Scope::Global)),
            };
        }
        g.used += 1;
        if self.globals.len() > 10_000 {
            self.globals
                .retain(|_, w| now.duration_since(w.started) < second);
        }
        let w = self
            .buckets
            .entry(format!("{bucket}:{major}:{caller}"))
            .or_insert(Window {
                started: now,
                used: 0,
            });
        if now.duration_since(w.started) >= self.window {
            *w = Window {
                started: now,
                used: 0,
            };
        }
        let reset_after = self.window.saturating_sub(now.duration_since(w.started));
        let limited = w.used >= self.limit;
        if limited {
            self.rate_limited += 1;
        } else {
            w.used += 1;
        }
        let remaining = self.limit - w.used.min(self.limit);
        let headers = limit_headers(&bucket, self.limit, remaining, reset_after);
        let rejection = limited.then(|| too_many(&headers, reset_after.as_secs_f64(), Scope::User));
        Verdict { headers, rejection }
    }
}

/// The bucket a route belongs to (its hash) and its major parameter, as Discord keys
/// rate limits: the same route for another guild or channel is a separate window.
fn bucket_of(method: &Method, path: &str) -> (String, String) {
    let mut major = String::new();
    let mut template = String::from(method.as_str());
    let mut prev = "";
    for seg in path
        .trim_start_matches("/api/v10")
        .split('/')
        .filter(|s| !s.is_empty())
    {
        let numeric = seg.bytes().all(|b| b.is_ascii_digit());
        if numeric && major.is_empty() && matches!(prev, "guilds" | "channels" | "webhooks") {
            major = seg.to_owned();
            template.push_str("/{major}");
        } else if numeric {
            template.push_str("/{id}");
        } else {
            template.push('/');
            template.push_str(seg);
        }
        prev = seg;
    }
    (digest_hex(template.as_bytes(), 8), major)
}

/// The bucket headers Discord puts on "most API requests" (Rate Limits, "Header
/// Format"); `X-RateLimit-Scope` is not among them: it is "returned only on HTTP 429
/// responses" (`too_many` adds it). twilight-http 0.18 reads the bucket headers only
/// beside a scope (response/future.rs, `parse_ratelimit_headers`), so against Discord it
/// learns a bucket from its first 429 and waits that out.
fn limit_headers(
    bucket: &str,
    limit: u32,
    remaining: u32,
    reset_after: Duration,
) -> Vec<(&'static str, String)> {
    let reset_at = now_ms() as f64 / 1000.0 + reset_after.as_secs_f64();
    vec![
        ("x-ratelimit-bucket", bucket.to_owned()),
        ("x-ratelimit-limit", limit.to_string()),
        ("x-ratelimit-remaining", remaining.to_string()),
        ("x-ratelimit-reset", format!("{reset_at:.3}")),
        (
            "x-ratelimit-reset-after",
            format!("{:.3}", reset_after.as_secs_f64()),
        ),
    ]
}

/// A 429 as the Rate Limits page shows one for each scope: the bucket headers beside a
/// user or shared limit (none with a global one), `Retry-After`, `X-RateLimit-Scope`,
/// and `X-RateLimit-Global: true` only for the global limit.
fn too_many(headers: &[(&'static str, String)], retry_after: f64, scope: Scope) -> Response {
    let global = scope == Scope::Global;
    let message = if scope == Scope::Shared {
        "The resource is being rate limited."
    } else {
        "You are being rate limited."
    };
    let body = json!({
        "message": message,
        "retry_after": (retry_after * 1000.0).round() / 1000.0,
        "global": global,
        "code": 0,
    });
    let mut response = (StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
    let h = response.headers_mut();
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(*name, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&(retry_after.ceil() as u64).max(1).to_string()) {
        h.insert(header::RETRY_AFTER, v);
    }
    h.insert(
        "x-ratelimit-scope",
        HeaderValue::from_static(scope.as_str()),
    );
    if global {
        h.insert("x-ratelimit-global", HeaderValue::from_static("true"));
    }
    response
}

/// A 429 of `scope` for `bucket`, `wait` from its end: no bucket headers with a global
/// limit; with a shared one the caller's bucket is not spent (the documented example says
/// `X-RateLimit-Remaining: 9` of 10).
fn scoped_429(bucket: &str, scope: Scope, wait: Duration) -> Response {
    let headers = match scope {
        Scope::Global => Vec::new(),
        Scope::Shared => limit_headers(bucket, 10, 9, wait),
        Scope::User => limit_headers(bucket, 1, 0, wait),
    };
    too_many(&headers, wait.as_secs_f64(), scope)
}

fn fault_response(fault: &Fault, method: &Method, path: &str) -> Response {
    let status = StatusCode::from_u16(fault.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (bucket, _) = bucket_of(method, path);
    if status == StatusCode::TOO_MANY_REQUESTS {
        return scoped_429(&bucket, fault.scope(), fault.wait());
    }
    let error = match fault.code {
        Some(code) => {
            let mut e = ApiError::code(code);
            e.status = status;
            e
        }
        None => ApiError::new(
            status,
            0,
            format!(
                "{}: {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("Error")
            ),
        ),
    };
    error.into_response()
}

/// Injected faults first (Discord failing), then the route's bucket, then the route.
pub(super) async fn limit(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let mut response = limited(shared, req, next).await;
    // Discord's answers all come through Cloudflare, which says so in `Via`; discord.py
    // takes a 429 without it for a Cloudflare ban and raises instead of waiting
    // (discord/http.py, `HTTPClient.request`: "Banned by Cloudflare more than likely").
    response
        .headers_mut()
        .insert(header::VIA, HeaderValue::from_static("1.1 google"));
    response
}

async fn limited(shared: Arc<Shared>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let caller = caller_key(req.headers().get(header::AUTHORIZATION));
    let (fault, verdict) = {
        let mut state = shared.lock();
        let counted = &mut state.limits.requests;
        match caller.as_bytes().first() {
            Some(b'b') => counted.bot += 1,
            Some(b'u') => counted.bearer += 1,
            _ => counted.other += 1,
        }
        match state.limits.take_fault(&method, &path) {
            Some(fault) => {
                if fault.status == 429 {
                    state
                        .limits
                        .hold(fault.scope(), &method, &path, &caller, fault.wait());
                }
                (Some(fault), None)
            }
            None => (None, Some(state.limits.check(&method, &path, &caller))),
        }
    };
    if let Some(fault) = fault {
        tracing::debug!(%method, %path, status = fault.status, "injected failure");
        return fault_response(&fault, &method, &path);
    }
    let Some(verdict) = verdict else {
        return ApiError::not_found().into_response();
    };
    if let Some(rejection) = verdict.rejection {
        return rejection;
    }
    let mut response = next.run(req).await;
    let h = response.headers_mut();
    for (name, value) in verdict.headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
    response
}

/// Whose windows a request counts against: `bot` (a `Bot` token), `user:<digest>` (a
/// bearer token, by a digest so tokens are not kept), or `none`.
fn caller_key(authorization: Option<&HeaderValue>) -> String {
    let value = authorization.and_then(|v| v.to_str().ok()).unwrap_or("");
    if value.starts_with("Bot ") {
        "bot".to_owned()
    } else if let Some(token) = value.strip_prefix("Bearer ") {
        format!("user:{}", digest_hex(token.as_bytes(), 8))
    } else {
        "none".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_key_by_route_and_major_parameter() {
        let (a, ga) = bucket_of(&Method::POST, "/api/v10/guilds/1/channels");
        let (b, gb) = bucket_of(&Method::POST, "/api/v10/guilds/2/channels");
        let (c, _) = bucket_of(&Method::GET, "/api/v10/guilds/1/channels");
        assert_eq!(a, b);
        assert_ne!(ga, gb);
        assert_ne!(a, c);
        let (d, _) = bucket_of(&Method::PUT, "/api/v10/guilds/1/members/5/roles/6");
        let (e, _) = bucket_of(&Method::PUT, "/api/v10/guilds/1/members/7/roles/8");
        assert_eq!(d, e);
    }

    #[test]
    fn permission_routes_are_keyed_by_their_channel_or_guild() {
        let put = |c: u32, o: u32| {
            bucket_of(
                &Method::PUT,
                &format!("/api/v10/channels/{c}/permissions/{o}"),
            )
        };
        let (a, ma) = put(1, 5);
        let (b, mb) = put(2, 6);
        assert_eq!((a.as_str(), ma.as_str()), (b.as_str(), "1"));
        assert_eq!(mb, "2");
        let (del, _) = bucket_of(&Method::DELETE, "/api/v10/channels/1/permissions/5");
        assert_ne!(a, del);
        let (role, major) = bucket_of(&Method::PATCH, "/api/v10/guilds/9/roles/5");
        assert_eq!(major, "9");
        let (kick, major) = bucket_of(&Method::DELETE, "/api/v10/guilds/9/members/5");
        assert_eq!(major, "9");
        let (get, _) = bucket_of(&Method::GET, "/api/v10/guilds/9/members/5");
        assert_ne!(kick, get);
        assert_ne!(role, kick);
    }

    #[test]
    fn fault_paths_match_with_wildcards() {
        let f = Fault {
            method: Some("post".into()),
            path: "/guilds/*/channels".into(),
            status: 500,
            count: 1,
            retry_after: None,
            code: None,
            global: false,
            scope: None,
        };
        assert!(f.matches(&Method::POST, "/api/v10/guilds/42/channels"));
        assert!(!f.matches(&Method::GET, "/api/v10/guilds/42/channels"));
        assert!(!f.matches(&Method::POST, "/api/v10/guilds/42/roles"));
    }

    #[test]
    fn a_window_runs_out_and_resets() {
        let mut l = Limits::new(2, Duration::from_millis(50));
        let m = Method::GET;
        assert!(
            l.check(&m, "/api/v10/channels/1", "bot")
                .rejection
                .is_none()
        );
        assert!(
            l.check(&m, "/api/v10/channels/1", "bot")
                .rejection
                .is_none()
        );
        assert!(
            l.check(&m, "/api/v10/channels/1", "bot")
                .rejection
                .is_some()
        );
        assert!(
            l.check(&m, "/api/v10/channels/2", "bot")
                .rejection
                .is_none()
        );
        std::thread::sleep(Duration::from_millis(60));
        assert!(
            l.check(&m, "/api/v10/channels/1", "bot")
                .rejection
                .is_none()
        );
    }

    #[test]
    fn the_global_limit_counts_every_route_and_spends_no_bucket() {
        let mut l = Limits::new(100, Duration::from_secs(60)).with_global(3);
        let m = Method::GET;
        for c in 1..=3 {
            let v = l.check(&m, &format!("/api/v10/channels/{c}"), "bot");
            assert!(v.rejection.is_none());
            assert!(v.headers.iter().all(|(h, _)| *h != "x-ratelimit-scope"));
        }
        let refused = l
            .check(&m, "/api/v10/channels/4", "bot")
            .rejection
            .expect("the fourth request in a second is over the global limit");
        let h = refused.headers();
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(h["x-ratelimit-global"], "true");
        assert_eq!(h["x-ratelimit-scope"], "global");
        assert!(h.contains_key(header::RETRY_AFTER));
        assert!(
            !h.contains_key("x-ratelimit-bucket"),
            "no bucket with a global 429"
        );
        // Another token has its own global window.
        assert!(
            l.check(&m, "/api/v10/channels/4", "user:a")
                .rejection
                .is_none()
        );
        // The refused request spent nothing of channel 4's bucket.
        let mut l = Limits::new(1, Duration::from_secs(60)).with_global(1);
        assert!(
            l.check(&m, "/api/v10/channels/9", "bot")
                .rejection
                .is_none()
        );
        assert!(
            l.check(&m, "/api/v10/channels/8", "bot")
                .rejection
                .is_some()
        );
        std::thread::sleep(Duration::from_millis(1_050));
        assert!(
            l.check(&m, "/api/v10/channels/8", "bot")
                .rejection
                .is_none()
        );
    }

    #[test]
    fn an_injected_429_holds_its_scope_until_retry_after() {
        let m = Method::POST;
        let roles = "/api/v10/guilds/1/roles";
        let other = "/api/v10/channels/7";
        let wait = Duration::from_millis(80);
        let scope_of = |v: &Verdict| {
            v.rejection.as_ref().map(|r| {
                r.headers()["x-ratelimit-scope"]
                    .to_str()
                    .unwrap_or("")
                    .to_owned()
            })
        };

        let mut l = Limits::new(100, Duration::from_secs(60));
        l.hold(Scope::User, &m, roles, "bot", wait);
        assert_eq!(
            scope_of(&l.check(&m, roles, "bot")).as_deref(),
            Some("user")
        );
        assert!(
            l.check(&m, other, "bot").rejection.is_none(),
            "other routes go on"
        );
        assert!(
            l.check(&m, roles, "user:a").rejection.is_none(),
            "other tokens go on"
        );

        let mut l = Limits::new(100, Duration::from_secs(60));
        l.hold(Scope::Global, &m, roles, "bot", wait);
        assert_eq!(
            scope_of(&l.check(&m, other, "bot")).as_deref(),
            Some("global")
        );
        assert!(l.check(&m, other, "user:a").rejection.is_none());

        let mut l = Limits::new(100, Duration::from_secs(60));
        l.hold(Scope::Shared, &m, roles, "bot", wait);
        assert_eq!(
            scope_of(&l.check(&m, roles, "user:a")).as_deref(),
            Some("shared")
        );
        assert!(l.check(&m, other, "bot").rejection.is_none());
        assert_eq!(l.rate_limited, 1);

        std::thread::sleep(wait + Duration::from_millis(20));
        assert!(
            l.check(&m, roles, "user:a").rejection.is_none(),
            "over once it has passed"
        );
    }

    #[test]
    fn windows_are_kept_per_token() {
        let mut l = Limits::new(1, Duration::from_secs(60));
        let m = Method::GET;
        let path = "/api/v10/users/@me/guilds/1/member";
        assert!(l.check(&m, path, "user:a").rejection.is_none());
        assert!(l.check(&m, path, "user:a").rejection.is_some());
        assert!(l.check(&m, path, "user:b").rejection.is_none());
        assert!(l.check(&m, path, "bot").rejection.is_none());
        let bearer = HeaderValue::from_static("Bearer t1");
        assert!(caller_key(Some(&bearer)).starts_with("user:"));
        assert_ne!(
            caller_key(Some(&bearer)),
            caller_key(Some(&HeaderValue::from_static("Bearer t2")))
        );
        assert_eq!(caller_key(Some(&HeaderValue::from_static("Bot x"))), "bot");
        assert_eq!(caller_key(None), "none");
    }
}
