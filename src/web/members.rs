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
use twilight_model::id::marker::{GuildMarker, RoleMarker, UserMarker};

use super::guilds::Guild;
use super::http::error::WebError;
use super::session::SessionUser;
use super::{App, AppState};
use crate::access::MemberRecord;
use crate::bus::Backend;
use crate::discord::DiscordError;
use crate::event::EventData;

pub fn check_key(user: Id<UserMarker>) -> String {
    format!("member-check:{user}")
}

/// The member record of `who` in `guild`, rechecked with Discord (with their own token)
/// when its time has come. `Err(Discord(Unauthorized))`: their token no longer works.
pub async fn current(
    app: &App,
    guild: &Guild,
    who: &SessionUser,
) -> Result<Option<MemberRecord>, WebError> {
    let user = who.person.id;
    let known = guild.bus.member(user).await?;
    if known.is_some() {
        return fresh(app, guild, who, known).await;
    }
    // Nothing known yet (a first visit): a burst of requests of one person (tabs, a
    // reconnecting stream) asks once, and the others read what it recorded.
    let turn = app.asking.turn(guild.id, user);
    let _held = turn.lock().await;
    let known = guild.bus.member(user).await?;
    let answer = fresh(app, guild, who, known).await;
    drop(_held);
    app.asking.done(guild.id, user, turn);
    answer
}

/// `known`, rechecked when its time has come.
async fn fresh(
    app: &App,
    guild: &Guild,
    who: &SessionUser,
    known: Option<MemberRecord>,
) -> Result<Option<MemberRecord>, WebError> {
    let user = who.person.id;
    if guild
        .bus
        .claim(&check_key(user), app.settings.member_recheck)
        .await?
    {
        return recheck(app, guild.id, &*guild.bus, who, known).await;
    }
    if known.is_some() {
        return Ok(known);
    }
    // Nothing known, and another replica is asking Discord right now (one person opening
    // streams on several replicas at once): its answer, not a "no" before it has one.
    let deadline = Instant::now() + ANSWER_WAIT;
    while Instant::now() < deadline {
        tokio::time::sleep(ANSWER_POLL).await;
        if let Some(member) = guild.bus.member(user).await? {
            return Ok(Some(member));
        }
    }
    Ok(None)
}

/// How long a replica that found another asking Discord about a person it knows nothing
/// of waits for that answer (Discord's answer to a person's token takes well under this;
/// a non-member is told "no" after it).
const ANSWER_WAIT: Duration = Duration::from_secs(3);
/// How often it looks for the answer meanwhile.
const ANSWER_POLL: Duration = Duration::from_millis(50);

/// Asks Discord (`GET /users/@me/guilds/{guild}/member` with the person's token, so the
/// bot's budget is not spent on page views) and records what changed. When Discord
/// cannot be asked, what is known stands (a Discord outage must not lock members out);
/// the next recheck tries again. A 401 is the caller's: the person logs in again.
async fn recheck(
    app: &App,
    guild: Id<GuildMarker>,
    bus: &dyn Backend,
    who: &SessionUser,
    known: Option<MemberRecord>,
) -> Result<Option<MemberRecord>, WebError> {
    let user = who.person.id;
    match app.discord.roles_in(&who.access_token, guild).await {
        Ok(roles) => record(bus, user, known, roles).await,
        Err(DiscordError::Unauthorized) => Err(DiscordError::Unauthorized.into()),
        Err(e) => {
            tracing::warn!(error = %e, %user, %guild, "cannot recheck a membership; keeping what is known");
            Ok(known)
        }
    }
}

/// Records Discord's answer (`None`: not a member) if it differs from `known`.
pub async fn record(
    bus: &dyn Backend,
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
            Ok(Some(updated(bus, user, roles).await?))
        }
        (None, Some(mut roles)) => {
            roles.sort_unstable();
            Ok(Some(updated(bus, user, roles).await?))
        }
        (Some(_), None) => {
            tracing::info!(%user, guild = %bus.guild_id(), "no longer a member of the guild");
            bus.append(EventData::MemberRemoved { user_id: user }, None)
                .await?;
            Ok(None)
        }
        (None, None) => Ok(None),
    }
}

async fn updated(
    bus: &dyn Backend,
    user: Id<UserMarker>,
    roles: Vec<Id<RoleMarker>>,
) -> Result<MemberRecord, WebError> {
    bus.append(
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
    bus: &dyn Backend,
    user: Id<UserMarker>,
    role: Id<RoleMarker>,
) -> Result<(), WebError> {
    let known = bus.member(user).await?;
    let mut roles = known.as_ref().map(|k| k.roles.clone()).unwrap_or_default();
    if !roles.contains(&role) {
        roles.push(role);
    }
    record(bus, user, known, Some(roles)).await?;
    Ok(())
}

/// First questions about a person's membership being asked on this replica, one per
/// (guild, person) at a time.
#[derive(Default)]
pub struct Asking(Mutex<HashMap<Whom, Turn>>);

/// A person in a guild.
type Whom = (Id<GuildMarker>, Id<UserMarker>);

/// Held while one request asks; the others wait their turn and read its answer.
type Turn = Arc<tokio::sync::Mutex<()>>;

impl Asking {
    fn turn(&self, guild: Id<GuildMarker>, user: Id<UserMarker>) -> Turn {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((guild, user))
            .or_default()
            .clone()
    }

    /// Forgets the question once nobody else waits on it.
    fn done(&self, guild: Id<GuildMarker>, user: Id<UserMarker>, turn: Turn) {
        let mut asking = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Ours and the map's: nobody else holds it.
        if Arc::strong_count(&turn) <= 2 {
            asking.remove(&(guild, user));
        }
    }
}

/// The people holding streams on this replica: how many each holds (capped by
/// `STREAM_MAX_PER_USER`, counted across every guild), and their rechecks in each guild
/// they stream, in the background, so that a removed member's streams end even if they
/// never load another page.
/// User → their open streams here.
type Counts = HashMap<Id<UserMarker>, usize>;
/// (Guild, user) → (their open streams of it here, when this replica next asks about
/// them, the login that asks).
type Watching = HashMap<(Id<GuildMarker>, Id<UserMarker>), (usize, Instant, Arc<SessionUser>)>;

#[derive(Clone, Default)]
pub struct StreamHolders {
    inner: Arc<Mutex<(Counts, Watching)>>,
}

/// Held by a stream: its user stays rechecked while any of their streams is open.
pub struct HeldStream {
    holders: StreamHolders,
    guild: Id<GuildMarker>,
    user: Id<UserMarker>,
}

impl Drop for HeldStream {
    fn drop(&mut self) {
        let mut inner = self.holders.lock();
        let (counts, watching) = &mut *inner;
        if let Some(n) = counts.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.user);
            }
        }
        if let Some((n, _, _)) = watching.get_mut(&(self.guild, self.user)) {
            *n -= 1;
            if *n == 0 {
                watching.remove(&(self.guild, self.user));
            }
        }
    }
}

impl StreamHolders {
    fn lock(&self) -> MutexGuard<'_, (Counts, Watching)> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one more stream of `who` (of `guild`), unless they already hold `max` here,
    /// in whatever guilds.
    pub fn hold(
        &self,
        guild: Id<GuildMarker>,
        who: &Arc<SessionUser>,
        max: usize,
    ) -> Option<HeldStream> {
        let user = who.person.id;
        let mut inner = self.lock();
        let (counts, watching) = &mut *inner;
        let n = counts.entry(user).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        let entry = watching
            .entry((guild, user))
            .or_insert_with(|| (0, Instant::now(), who.clone()));
        entry.0 += 1;
        // The newest login asks from now on (an older one may have logged out).
        entry.2 = who.clone();
        Some(HeldStream {
            holders: self.clone(),
            guild,
            user,
        })
    }

    /// Rechecks `who` in `guild` if no replica did within the interval; returns when to
    /// look again: a full interval, or when the other replica's claim runs out.
    async fn recheck(
        &self,
        app: &App,
        guild: Id<GuildMarker>,
        who: &SessionUser,
    ) -> Result<Duration, WebError> {
        let bus = app.guilds.bus(guild);
        let user = who.person.id;
        let key = check_key(user);
        if bus.claim(&key, app.settings.member_recheck).await? {
            let known = bus.member(user).await?;
            recheck(app, guild, &*bus, who, known).await?;
            return Ok(app.settings.member_recheck);
        }
        Ok(bus
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
                let due: Vec<(Id<GuildMarker>, Arc<SessionUser>)> = app
                    .holders
                    .lock()
                    .1
                    .iter()
                    .filter(|(_, (_, next, _))| *next <= now)
                    .map(|((guild, _), (_, _, who))| (*guild, who.clone()))
                    .collect();
                for (guild, who) in due {
                    let user = who.person.id;
                    let next = match app.holders.recheck(&app, guild, &who).await {
                        Ok(next) => next,
                        Err(e) => {
                            tracing::warn!(error = %e, %user, %guild, "membership recheck failed");
                            app.settings.member_recheck
                        }
                    };
                    if let Some((_, at, _)) = app.holders.lock().1.get_mut(&(guild, user)) {
                        *at = Instant::now() + next;
                    }
                }
            }
        });
    }
}
