//! The logged-in person and their session: what the session keeps (in Redis, never in
//! the cookie), the cookie's name and lifetime, the one session store every part of a
//! replica reads, and the cache that lets a wave of reconnecting streams know their
//! viewer without reading and rewriting a session each.
//!
//! Owns the session record's shape. Must not depend on any other part of `web`: errors,
//! protection, pages and streams all build on it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tower_sessions::Expiry;
use tower_sessions::cookie::time::{Duration, OffsetDateTime};
use tower_sessions::session::{Id as SessionId, Record};
use tower_sessions::session_store::{self, SessionStore};
use twilight_model::id::Id;
use twilight_model::id::marker::UserMarker;

use crate::event::{Person, Viewer};

/// The session key of the logged-in [`SessionUser`].
pub const USER: &str = "user";
/// The session cookie's name.
pub const SESSION_COOKIE: &str = "coven_session";
/// Sessions made before this are logged in again, once: their Discord token lacks the
/// scopes communities need (`guilds`, `guilds.members.read`).
pub const SESSION_VERSION: u32 = 2;
/// The session key of the person's guilds as their token last listed them.
pub const GUILDS: &str = "guilds";
/// Who is logged in, as the session keeps it (in Redis, never in the cookie).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionUser {
    pub person: Person,
    pub access_token: String,
    pub refresh_token: Option<String>,
    /// Unix ms when the access token expires.
    pub expires_at: u64,
    /// The session's CSRF token: every post must carry it.
    #[serde(default)]
    pub csrf: String,
    /// Names this login (not secret): logging out ends this login's streams, not the
    /// same person's other devices.
    #[serde(default)]
    pub login: String,
    /// [`SESSION_VERSION`] when the login was made (absent: before communities).
    #[serde(default)]
    pub version: u32,
}

impl SessionUser {
    pub fn viewer(&self) -> Viewer {
        Viewer {
            id: self.person.id,
            username: self.person.display_name().to_owned(),
            avatar_url: self.person.avatar_url.clone(),
        }
    }
}

/// A logged-in session ends after `ttl` unused.
pub fn session_expiry(ttl: std::time::Duration) -> Expiry {
    Expiry::OnInactivity(Duration::seconds(
        i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
    ))
}

/// The site's one session store (Redis in production, memory in the demo), shared by
/// the session layer and the stream openers' [`SessionCache`].
#[derive(Clone)]
pub struct Store(Arc<dyn SessionStore>);

impl Store {
    pub fn new(store: impl SessionStore) -> Self {
        Store(Arc::new(store))
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

#[async_trait::async_trait]
impl SessionStore for Store {
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        self.0.create(record).await
    }

    async fn save(&self, record: &Record) -> session_store::Result<()> {
        self.0.save(record).await
    }

    async fn load(&self, id: &SessionId) -> session_store::Result<Option<Record>> {
        self.0.load(id).await
    }

    async fn delete(&self, id: &SessionId) -> session_store::Result<()> {
        self.0.delete(id).await
    }
}

/// How long a stream's session stays cached in the replica after it was read.
pub const SESSION_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(10);
/// Sessions cached at most; past it, entries older than the TTL are dropped first.
const SESSION_CACHE_MAX: usize = 200_000;

/// The sessions of recent stream openers, by session id, so a wave of reconnecting
/// browsers asks Redis for a session once per `SESSION_CACHE_TTL` instead of reading and
/// rewriting it for every stream. Revocation stays immediate: a logout (`session.ended`)
/// or a removal from the server (`member.removed`) drops the person's entries on every
/// replica as the hub passes the event on.
pub struct SessionCache {
    entries: Mutex<HashMap<i128, (Instant, Arc<SessionUser>)>>,
    /// Where sessions are read on a miss.
    store: Store,
    /// Logins ended lately, so a stream that read its session just before the logout
    /// passed, and subscribed just after, still learns of it.
    revoked: Mutex<VecDeque<(Instant, Id<UserMarker>, String)>>,
}

impl SessionCache {
    pub fn new(store: Store) -> Self {
        SessionCache {
            entries: Mutex::default(),
            store,
            revoked: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i128, (Instant, Arc<SessionUser>)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops the entries of one login (it logged out).
    pub fn revoke_login(&self, user: Id<UserMarker>, login: &str) {
        self.lock()
            .retain(|_, (_, u)| !(u.person.id == user && u.login == login));
        self.remember(user, login.to_owned());
    }

    /// Drops every entry of a person (they left the server). No mark is needed: a
    /// stream reads membership after subscribing, so it sees the removal either way.
    pub fn revoke_user(&self, user: Id<UserMarker>) {
        self.lock().retain(|_, (_, u)| u.person.id != user);
    }

    fn remember(&self, user: Id<UserMarker>, login: String) {
        let now = Instant::now();
        let mut revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
        while revoked
            .front()
            .is_some_and(|(at, ..)| now.duration_since(*at) > SESSION_CACHE_TTL * 3)
        {
            revoked.pop_front();
        }
        revoked.push_back((now, user, login));
    }

    /// Whether `user`'s login was revoked in the last moments (asked by a stream once it
    /// has subscribed to the events that would revoke it from then on).
    pub fn was_revoked(&self, user: &SessionUser) -> bool {
        self.revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(_, who, login)| *who == user.person.id && *login == user.login)
    }

    /// The logged-in person of session `id`, if it is a live login.
    pub async fn user(&self, id: SessionId) -> session_store::Result<Option<Arc<SessionUser>>> {
        let now = Instant::now();
        if let Some((at, user)) = self.lock().get(&id.0)
            && now.duration_since(*at) < SESSION_CACHE_TTL
        {
            return Ok(Some(user.clone()));
        }
        let record = self.store.load(&id).await?;
        let user = record
            .filter(|r| r.expiry_date > OffsetDateTime::now_utc())
            .and_then(|mut r| r.data.remove(USER))
            .and_then(|v| serde_json::from_value::<SessionUser>(v).ok())
            .map(Arc::new);
        let mut entries = self.lock();
        match &user {
            Some(user) => {
                if entries.len() >= SESSION_CACHE_MAX {
                    entries.retain(|_, (at, _)| now.duration_since(*at) < SESSION_CACHE_TTL);
                    if entries.len() >= SESSION_CACHE_MAX {
                        entries.clear();
                    }
                }
                entries.insert(id.0, (now, user.clone()));
            }
            None => {
                entries.remove(&id.0);
            }
        }
        Ok(user)
    }
}
