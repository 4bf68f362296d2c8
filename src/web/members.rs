//! Who is a member of the guild, with which roles, as Discord last said.
//!
//! The shared record (`P:{G}:members`, written by `member.updated` / `member.removed`
//! through the bus) is the one answer every replica and stream uses. It is filled at
//! login from the REST member object, updated at once by Coven's own grants (a room made,
//! an invite followed), and rechecked against Discord on a bounded schedule: at most once
//! per `MEMBER_RECHECK` per user across all replicas (a `claim` in Redis), for people
//! loading pages and for people holding streams. Discord does not send role or
//! membership changes without the privileged GUILD_MEMBERS intent, so the recheck is how
//! a removed member loses access.
//!
//! Owns the record's updates and the recheck ([`super::guard::Member`] asks it). Must
//! not render pages.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use tokio_util::sync::CancellationToken;
use twilight_model::id::Id;
use twilight_model::id::marker::{RoleMarker, UserMarker};

use super::http::error::WebError;
use super::{App, AppState};
use crate::access::MemberRecord;
use crate::event::EventData;

pub fn check_key(user: Id<UserMarker>) -> String {
    format!("member-check:{user}")
}

/// The member record, rechecked with Discord when its time has come.
pub async fn current(app: &App, user: Id<UserMarker>) -> Result<Option<MemberRecord>, WebError> {
    let known = app.bus.member(user).await?;
    if app
        .bus
        .claim(&check_key(user), app.settings.member_recheck)
        .await?
    {
        return recheck(app, user, known).await;
    }
    Ok(known)
}

/// Asks Discord and records what changed. When Discord cannot be asked, what is known
/// stands (a Discord outage must not lock members out); the next recheck tries again.
async fn recheck(
    app: &App,
    user: Id<UserMarker>,
    known: Option<MemberRecord>,
) -> Result<Option<MemberRecord>, WebError> {
    match app.discord.member_roles(user).await {
        Ok(roles) => record(app, user, known, roles).await,
        Err(e) => {
            tracing::warn!(error = %e, %user, "cannot recheck a membership; keeping what is known");
            Ok(known)
        }
    }
}

/// Records Discord's answer (`None`: not a member) if it differs from `known`.
pub async fn record(
    app: &App,
    user: Id<UserMarker>,
    known: Option<MemberRecord>,
    roles: Option<Vec<Id<RoleMarker>>>,
) -> Result<Option<MemberRecord>, WebError> {
    match (known, roles) {
        (Some(known), Some(mut roles)) => {
            roles.sort_unstable();
            let mut had = known.roles.clone();
            had.sort_unstable();
            if had == roles {
                return Ok(Some(known));
            }
            Ok(Some(updated(app, user, roles).await?))
        }
        (None, Some(mut roles)) => {
            roles.sort_unstable();
            Ok(Some(updated(app, user, roles).await?))
        }
        (Some(_), None) => {
            tracing::info!(%user, "no longer a member of the guild");
            app.bus
                .append(EventData::MemberRemoved { user_id: user }, None)
                .await?;
            Ok(None)
        }
        (None, None) => Ok(None),
    }
}

async fn updated(
    app: &App,
    user: Id<UserMarker>,
    roles: Vec<Id<RoleMarker>>,
) -> Result<MemberRecord, WebError> {
    app.bus
        .append(
            EventData::MemberUpdated {
                user_id: user,
                roles: roles.clone(),
            },
            None,
        )
        .await?;
    Ok(MemberRecord {
        user_id: user,
        roles,
    })
}

/// Coven itself gave `user` a role (a room made, an invite followed): recorded at once,
/// so pages and streams follow without waiting for a recheck.
pub async fn granted(
    app: &App,
    user: Id<UserMarker>,
    role: Id<RoleMarker>,
) -> Result<(), WebError> {
    let known = app.bus.member(user).await?;
    let mut roles = known.as_ref().map(|k| k.roles.clone()).unwrap_or_default();
    if !roles.contains(&role) {
        roles.push(role);
    }
    record(app, user, known, Some(roles)).await?;
    Ok(())
}

/// The people holding streams on this replica: how many each holds (capped by
/// `STREAM_MAX_PER_USER`), and their rechecks in the background, so that a removed
/// member's streams end even if they never load another page.
/// User → (their open streams here, when this replica next asks about them).
type Streams = HashMap<Id<UserMarker>, (usize, Instant)>;

#[derive(Clone, Default)]
pub struct StreamHolders {
    users: Arc<Mutex<Streams>>,
}

/// Held by a stream: its user stays rechecked while any of their streams is open.
pub struct HeldStream {
    holders: StreamHolders,
    user: Id<UserMarker>,
}

impl Drop for HeldStream {
    fn drop(&mut self) {
        let mut users = self.holders.lock();
        if let Some((n, _)) = users.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                users.remove(&self.user);
            }
        }
    }
}

impl StreamHolders {
    fn lock(&self) -> MutexGuard<'_, Streams> {
        self.users.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one more stream of `user`, unless they already hold `max` here.
    pub fn hold(&self, user: Id<UserMarker>, max: usize) -> Option<HeldStream> {
        let mut users = self.lock();
        let entry = users.entry(user).or_insert((0, Instant::now()));
        if entry.0 >= max {
            return None;
        }
        entry.0 += 1;
        Some(HeldStream {
            holders: self.clone(),
            user,
        })
    }

    /// Rechecks `user` if no replica did within the interval; returns when to look again:
    /// a full interval, or when the other replica's claim runs out.
    async fn recheck(&self, app: &App, user: Id<UserMarker>) -> Result<Duration, WebError> {
        let key = check_key(user);
        if app.bus.claim(&key, app.settings.member_recheck).await? {
            let known = app.bus.member(user).await?;
            recheck(app, user, known).await?;
            return Ok(app.settings.member_recheck);
        }
        Ok(app
            .bus
            .lease_left(&key)
            .await?
            .unwrap_or_default()
            .min(app.settings.member_recheck))
    }

    /// Rechecks watched users whose time has come, until `shutdown`. A tick of a quarter
    /// of `MEMBER_RECHECK` keeps the worst case near 1.25 × the setting.
    pub fn start(app: AppState, shutdown: CancellationToken) {
        tokio::spawn(async move {
            let every = (app.settings.member_recheck / 4).max(Duration::from_millis(250));
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                // Only users due here: Redis is asked once per user per interval, not per
                // tick (the claim then decides which replica asks Discord).
                let now = Instant::now();
                let due: Vec<Id<UserMarker>> = app
                    .holders
                    .lock()
                    .iter()
                    .filter(|(_, (_, next))| *next <= now)
                    .map(|(user, _)| *user)
                    .collect();
                for user in due {
                    let next = match app.holders.recheck(&app, user).await {
                        Ok(next) => next,
                        Err(e) => {
                            tracing::warn!(error = %e, %user, "membership recheck failed");
                            app.settings.member_recheck
                        }
                    };
                    if let Some((_, at)) = app.holders.lock().get_mut(&user) {
                        *at = Instant::now() + next;
                    }
                }
            }
        });
    }
}
