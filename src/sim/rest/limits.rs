//! Rate limits and injected failures in front of every REST route: fixed windows per
//! route bucket and major parameter, with the `X-RateLimit-*` headers Discord sends on
//! every answer (twilight-http reads them only when `X-RateLimit-Scope` is present), 429s
//! shaped as Discord's, and the failures `POST /_sim/rest/fail` queues.
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
use crate::sim::ids::now_ms;

#[derive(Debug)]
pub struct Limits {
    limit: u32,
    window: Duration,
    buckets: HashMap<String, Window>,
    faults: Vec<Fault>,
    /// 429s served because a bucket ran out (not injected ones): a client that reads the
    /// headers right never causes one.
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
    #[serde(default)]
    pub global: bool,
    /// The `X-RateLimit-Scope` of an injected 429: `user` (the route's bucket, the
    /// default), `global` (as `global: true`) or `shared` (a per-resource limit, which
    /// Discord sends with `global: false`).
    #[serde(default)]
    pub scope: Option<FaultScope>,
}

/// "Rate Limits": the scopes Discord names in `X-RateLimit-Scope`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultScope {
    User,
    Global,
    Shared,
}

fn one() -> u32 {
    1
}

impl Fault {
    /// The scope this fault's 429 names; `None` when `global` and `scope` disagree.
    pub fn scope(&self) -> Option<FaultScope> {
        match (self.global, self.scope) {
            (true, None | Some(FaultScope::Global)) => Some(FaultScope::Global),
            (true, Some(_)) => None,
            (false, scope) => Some(scope.unwrap_or(FaultScope::User)),
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
            buckets: HashMap::new(),
            faults: Vec::new(),
            rate_limited: 0,
            requests: Requests::default(),
        }
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
    fn check(&mut self, method: &Method, path: &str, caller: &str) -> Verdict {
        let (bucket, major) = bucket_of(method, path);
        let now = Instant::now();
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
        let headers = limit_headers(&bucket, self.limit, remaining, reset_after, "user");
        let rejection = limited.then(|| too_many(&headers, reset_after.as_secs_f64(), false));
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
    use sha2::{Digest, Sha256};
    let hash: String = Sha256::digest(template.as_bytes())[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    (hash, major)
}

fn limit_headers(
    bucket: &str,
    limit: u32,
    remaining: u32,
    reset_after: Duration,
    scope: &str,
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
        ("x-ratelimit-scope", scope.to_owned()),
    ]
}

fn too_many(headers: &[(&'static str, String)], retry_after: f64, global: bool) -> Response {
    let body = json!({
        "message": "You are being rate limited.",
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
    if global {
        h.insert("x-ratelimit-global", HeaderValue::from_static("true"));
    }
    response
}

fn fault_response(fault: &Fault, method: &Method, path: &str) -> Response {
    let status = StatusCode::from_u16(fault.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (bucket, _) = bucket_of(method, path);
    if status == StatusCode::TOO_MANY_REQUESTS {
        let retry = fault.retry_after.unwrap_or(1.0).max(0.0);
        let scope = fault.scope().unwrap_or(FaultScope::User);
        let name = match scope {
            FaultScope::User => "user",
            FaultScope::Global => "global",
            FaultScope::Shared => "shared",
        };
        let headers = limit_headers(&bucket, 1, 0, Duration::from_secs_f64(retry), name);
        return too_many(&headers, retry, scope == FaultScope::Global);
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
            Some(fault) => (Some(fault), None),
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
        use sha2::{Digest, Sha256};
        let digest: String = Sha256::digest(token.as_bytes())[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("user:{digest}")
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
