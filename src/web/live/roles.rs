//! Members' roles for opening streams, kept per replica for a few seconds and updated by
//! the role events the hub passes on.
//!
//! Owns the cache. Must not ask Discord (the record in Redis is the one answer).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use twilight_model::id::Id;
use twilight_model::id::marker::{RoleMarker, UserMarker};

use crate::bus::{Backend, BusError};

/// How long a member's roles read from Redis serve stream openings on this replica.
const ROLES_TTL: Duration = Duration::from_secs(10);

/// Members' roles for opening streams, so a wave of reconnecting browsers reads each
/// person's roles from Redis once per `ROLES_TTL` rather than once per stream. The events
/// that change roles (`member.updated`, `member.removed`) pass through the hub, which
/// updates this as they do; a read that raced one is not kept.
pub type Roles = Arc<[Id<RoleMarker>]>;
type RoleEntries = HashMap<Id<UserMarker>, (Instant, Roles)>;

#[derive(Default)]
pub struct RoleCache {
    entries: Mutex<RoleEntries>,
    /// Role events passed so far: a Redis read during which one passed may be older than
    /// it, and is used but not kept.
    changes: AtomicU64,
}

impl RoleCache {
    fn lock(&self) -> MutexGuard<'_, RoleEntries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A member's roles; `None` when they are not a member.
    pub async fn roles(
        &self,
        bus: &dyn Backend,
        user: Id<UserMarker>,
    ) -> Result<Option<Roles>, BusError> {
        let now = Instant::now();
        if let Some((at, roles)) = self.lock().get(&user)
            && now.duration_since(*at) < ROLES_TTL
        {
            return Ok(Some(roles.clone()));
        }
        let before = self.changes.load(Ordering::Acquire);
        let roles: Option<Roles> = bus.member(user).await?.map(|m| m.roles.into());
        let mut entries = self.lock();
        if self.changes.load(Ordering::Acquire) == before {
            match &roles {
                Some(roles) => {
                    if entries.len() >= 200_000 {
                        entries.retain(|_, (at, _)| now.duration_since(*at) < ROLES_TTL);
                    }
                    entries.insert(user, (now, roles.clone()));
                }
                None => {
                    entries.remove(&user);
                }
            }
        }
        Ok(roles)
    }

    /// A role event passed: what it says is the newest word.
    pub fn changed(&self, user: Id<UserMarker>, roles: Option<Roles>) {
        let mut entries = self.lock();
        self.changes.fetch_add(1, Ordering::AcqRel);
        match roles {
            Some(roles) => {
                entries.insert(user, (Instant::now(), roles));
            }
            None => {
                entries.remove(&user);
            }
        }
    }
}
