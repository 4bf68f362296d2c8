//! What every state-changing request must pass before it does anything: the CSRF token
//! (form field `csrf_token` or header `X-CSRF-Token`), an `Origin` of this site when the
//! browser sends one, and the per-user rate limit.
//!
//! Owns the CSRF token's shape and the limiter. Must not look at what the request asks
//! for; handlers call [`check`] first and then do their work.

use std::num::NonZeroU32;
use std::time::Duration;

use axum::http::{HeaderMap, header};
use base64::Engine;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::App;
use super::auth::SessionUser;
use super::error::WebError;

/// A fresh CSRF token for a new session: 32 random bytes, URL-safe.
pub fn new_token() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

/// Per-user limits on posts: one every second on average (5 per 5 s), bursts up to 10.
/// Kept per replica; a load balancer that spreads one user over n replicas lets them
/// n times as far, which still stops a runaway script.
pub struct Limits {
    limiter: DefaultKeyedRateLimiter<u64>,
}

impl Limits {
    pub fn new(per: Duration, burst: u32) -> Self {
        let quota = Quota::with_period(per)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        Limits {
            limiter: RateLimiter::keyed(quota),
        }
    }

    fn check(&self, user: u64) -> Result<(), WebError> {
        if self.limiter.len() > 10_000 {
            self.limiter.retain_recent();
        }
        self.limiter.check_key(&user).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            WebError::TooMany {
                retry_after: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
            }
        })
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::new(Duration::from_secs(1), 10)
    }
}

/// Refuses a post that did not come from one of our own pages, or comes too fast.
pub fn check(
    app: &App,
    user: &SessionUser,
    headers: &HeaderMap,
    form_token: Option<&str>,
) -> Result<(), WebError> {
    if let Some(origin) = headers.get(header::ORIGIN) {
        let ours = app.settings.public_url.origin().ascii_serialization();
        if origin.as_bytes() != ours.as_bytes() {
            return Err(WebError::Forbidden(
                "This request came from another site, so it was refused.".to_owned(),
            ));
        }
    }
    let sent = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .or(form_token)
        .unwrap_or_default();
    if user.csrf.is_empty() || !same(sent.as_bytes(), user.csrf.as_bytes()) {
        return Err(WebError::Forbidden(
            "This form is out of date or did not come from Coven. Reload the page and try again."
                .to_owned(),
        ));
    }
    app.limits.check(user.person.id.get())
}

/// Compares in time that does not depend on where the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_and_distinct() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(a.len(), 43);
        assert_ne!(a, b);
        assert!(same(a.as_bytes(), a.as_bytes()));
        assert!(!same(a.as_bytes(), b.as_bytes()));
        assert!(!same(a.as_bytes(), &a.as_bytes()[1..]));
    }

    #[test]
    fn the_limit_allows_a_burst_then_says_when_to_retry() {
        let limits = Limits::new(Duration::from_secs(1), 10);
        for _ in 0..10 {
            assert!(limits.check(7).is_ok());
        }
        match limits.check(7) {
            Err(WebError::TooMany { retry_after }) => assert_eq!(retry_after, 1),
            other => panic!("expected 429, got {other:?}"),
        }
        assert!(limits.check(8).is_ok(), "limits are per user");
    }
}
