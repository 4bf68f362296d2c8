//! What every state-changing request must pass before it does anything: the CSRF token
//! (form field `csrf_token` or header `X-CSRF-Token`), an `Origin` of this site when the
//! browser sends one, and the per-user rate limit.
//!
//! Owns the CSRF token's shape, the limiter and the check itself; [`crate::web::guard::Posted`]
//! runs it for every post handler, so no handler can forget it. Must not look at what the
//! request asks for beyond reading its form.

use std::num::NonZeroU32;
use std::time::Duration;

use axum::Form;
use axum::extract::rejection::FormRejection;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use base64::Engine;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Deserialize;

use super::error::WebError;
use crate::web::session::SessionUser;

/// A fresh CSRF token for a new session: 32 random bytes, URL-safe.
pub fn new_token() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

/// Per-user limits on posts: one every second on average (5 per 5 s), bursts up to 10.
/// Kept per replica; a load balancer that spreads one user over n replicas lets them
/// n times as far, which still stops a runaway script.
pub struct RateLimits {
    limiter: DefaultKeyedRateLimiter<u64>,
}

impl RateLimits {
    pub fn new(per: Duration, burst: u32) -> Self {
        let quota = Quota::with_period(per)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        RateLimits {
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

impl Default for RateLimits {
    fn default() -> Self {
        Self::new(Duration::from_secs(1), 10)
    }
}

/// What of a post's headers the checks need (taken before the body is read).
pub struct Sender {
    origin: Option<HeaderValue>,
    token: Option<HeaderValue>,
    pub htmx: bool,
}

impl Sender {
    pub fn of(headers: &HeaderMap) -> Self {
        Sender {
            origin: headers.get(header::ORIGIN).cloned(),
            token: headers.get("x-csrf-token").cloned(),
            htmx: headers.contains_key("hx-request"),
        }
    }
}

/// What every post is checked against: this site's origin and the per-user limit.
pub struct Protect {
    /// `PUBLIC_URL`'s origin, as browsers send it in `Origin`.
    origin: String,
    limits: RateLimits,
}

impl Protect {
    pub fn new(public_url: &url::Url) -> Self {
        Protect {
            origin: public_url.origin().ascii_serialization(),
            limits: RateLimits::default(),
        }
    }

    /// Refuses a post that did not come from one of our own pages, or comes too fast.
    pub fn check(
        &self,
        user: &SessionUser,
        sender: &Sender,
        form_token: Option<&str>,
    ) -> Result<(), WebError> {
        if let Some(origin) = &sender.origin
            && origin.as_bytes() != self.origin.as_bytes()
        {
            return Err(WebError::Forbidden(
                "This request came from another site, so it was refused.".to_owned(),
            ));
        }
        let sent = sender
            .token
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .or(form_token)
            .unwrap_or_default();
        if user.csrf.is_empty() || !same(sent.as_bytes(), user.csrf.as_bytes()) {
            return Err(WebError::Forbidden(
            "This form is out of date or did not come from Coven. Reload the page and try again."
                .to_owned(),
        ));
        }
        self.limits.check(user.person.id.get())
    }
}

#[derive(Debug, Default, Deserialize)]
/// A form that carries only its CSRF token.
pub struct TokenForm {
    #[serde(default)]
    pub csrf_token: Option<String>,
}

/// Forms without fields of their own (the token is all they carry).
#[derive(Debug, Default, Deserialize)]
pub struct NoFields {}

#[derive(Deserialize)]
pub struct WithToken<F> {
    #[serde(default)]
    pub csrf_token: Option<String>,
    #[serde(flatten)]
    pub form: F,
}

/// Reads a form; a bodiless post (a script sending only the `X-CSRF-Token` header) is
/// an empty one.
pub fn read_form<T: Default>(form: Result<Form<T>, FormRejection>) -> Result<T, WebError> {
    match form {
        Ok(Form(f)) => Ok(f),
        Err(FormRejection::InvalidFormContentType(_)) => Ok(T::default()),
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(WebError::TooLarge),
        Err(e) => Err(WebError::BadRequest(format!(
            "The form could not be read: {e}"
        ))),
    }
}

/// Compares in time that does not depend on where the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    subtle::ConstantTimeEq::ct_eq(a, b).into()
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
        let limits = RateLimits::new(Duration::from_secs(1), 10);
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
