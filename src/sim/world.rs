//! The simulated guild: users, members, roles, channels and voice states, the permission
//! rules Discord applies to them, and their JSON shapes as Discord documents them.
//!
//! Every change goes through a method here that returns the Gateway dispatches it causes,
//! so the REST routes and the control API cannot change state without Discord's events.
//! Owns no I/O: the caller delivers the dispatches.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// Discord's permission bits that the simulator checks or grants.
pub mod perm {
    pub const CREATE_INSTANT_INVITE: u64 = 1 << 0;
    pub const KICK_MEMBERS: u64 = 1 << 1;
    pub const ADMINISTRATOR: u64 = 1 << 3;
    pub const MANAGE_CHANNELS: u64 = 1 << 4;
    pub const ADD_REACTIONS: u64 = 1 << 6;
    pub const STREAM: u64 = 1 << 9;
    pub const VIEW_CHANNEL: u64 = 1 << 10;
    pub const SEND_MESSAGES: u64 = 1 << 11;
    pub const READ_MESSAGE_HISTORY: u64 = 1 << 16;
    pub const CONNECT: u64 = 1 << 20;
    pub const SPEAK: u64 = 1 << 21;
    pub const MUTE_MEMBERS: u64 = 1 << 22;
    pub const DEAFEN_MEMBERS: u64 = 1 << 23;
    pub const MOVE_MEMBERS: u64 = 1 << 24;
    pub const USE_VAD: u64 = 1 << 25;
    pub const CHANGE_NICKNAME: u64 = 1 << 26;
    pub const MANAGE_ROLES: u64 = 1 << 28;
    /// Every bit Discord defines today (up to SEND_VOICE_MESSAGES and friends).
    pub const ALL: u64 = (1 << 51) - 1;

    /// Names for the bits, for error messages that say which permission is missing.
    pub fn name(bit: u64) -> &'static str {
        match bit {
            CREATE_INSTANT_INVITE => "CREATE_INSTANT_INVITE",
            KICK_MEMBERS => "KICK_MEMBERS",
            ADMINISTRATOR => "ADMINISTRATOR",
            MANAGE_CHANNELS => "MANAGE_CHANNELS",
            STREAM => "STREAM",
            VIEW_CHANNEL => "VIEW_CHANNEL",
            CONNECT => "CONNECT",
            SPEAK => "SPEAK",
            MUTE_MEMBERS => "MUTE_MEMBERS",
            DEAFEN_MEMBERS => "DEAFEN_MEMBERS",
            MOVE_MEMBERS => "MOVE_MEMBERS",
            USE_VAD => "USE_VAD",
            MANAGE_ROLES => "MANAGE_ROLES",
            _ => "a permission",
        }
    }
}

/// Channel types used here (Discord's numbering).
pub mod kind {
    pub const TEXT: u8 = 0;
    pub const VOICE: u8 = 2;
    pub const CATEGORY: u8 = 4;
    pub const STAGE: u8 = 13;

    pub fn is_voice(k: u8) -> bool {
        k == VOICE || k == STAGE
    }

    /// The types a bot may create in a guild through REST (threads and DMs excluded).
    pub fn creatable(k: u8) -> bool {
        matches!(k, 0 | 2 | 4 | 5 | 13 | 15 | 16)
    }
}

/// Channel flags (Discord's numbering).
pub mod channel_flag {
    /// Set on a channel dispatched to a bot that cannot view it ("Obfuscated Channels").
    pub const OBFUSCATED: u64 = 1 << 17;
}

/// The name Discord gives an obfuscated channel.
pub const HIDDEN_NAME: &str = "___hidden___";

const DISCORD_EPOCH_MS: u64 = 1_420_070_400_000;

/// Makes Discord-shaped ids: milliseconds since Discord's epoch above 22 counter bits.
#[derive(Debug)]
pub struct Snowflakes {
    last: u64,
}

impl Snowflakes {
    /// Starts at a fixed instant so a fresh simulator always seeds the same ids.
    fn seeded() -> Self {
        // 2024-01-01T00:00:00Z
        let ms = 1_704_067_200_000 - DISCORD_EPOCH_MS;
        Self { last: ms << 22 }
    }

    pub fn mint(&mut self) -> u64 {
        let now = (now_ms().saturating_sub(DISCORD_EPOCH_MS)) << 22;
        self.last = (self.last + 1).max(now);
        self.last
    }

    fn next_seeded(&mut self) -> u64 {
        self.last += 1;
        self.last
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Now, in the ISO 8601 form Discord writes (`+00:00`, microseconds).
fn iso_now() -> String {
    let t = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
    match t.strip_suffix('Z') {
        Some(base) => format!("{base}+00:00"),
        None => t,
    }
}

#[derive(Debug, Clone)]
pub struct User {
    pub id: u64,
    pub username: String,
    pub global_name: Option<String>,
    pub avatar: Option<String>,
    pub bot: bool,
}

#[derive(Debug, Clone)]
pub struct Member {
    pub roles: BTreeSet<u64>,
    pub joined_at: String,
    pub nick: Option<String>,
    pub mute: bool,
    pub deaf: bool,
}

#[derive(Debug, Clone)]
pub struct Role {
    pub id: u64,
    pub name: String,
    pub permissions: u64,
    pub position: i64,
    pub color: u32,
    pub hoist: bool,
    pub mentionable: bool,
    pub managed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overwrite {
    pub id: u64,
    /// 0 = role, 1 = member.
    pub kind: u8,
    pub allow: u64,
    pub deny: u64,
}

#[derive(Debug, Clone)]
pub struct Channel {
    pub id: u64,
    pub kind: u8,
    pub name: String,
    pub parent_id: Option<u64>,
    pub position: i64,
    pub user_limit: u32,
    pub bitrate: u32,
    pub overwrites: Vec<Overwrite>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VoiceFlags {
    pub self_mute: bool,
    pub self_deaf: bool,
    pub self_video: bool,
    pub self_stream: bool,
}

#[derive(Debug, Clone)]
pub struct Voice {
    pub channel_id: u64,
    pub session_id: String,
    pub flags: VoiceFlags,
}

/// One Gateway event the world emits: its name and its `d` payload.
#[derive(Debug, Clone)]
pub struct Dispatch {
    pub name: &'static str,
    pub data: Value,
}

/// Why the world refused a change, in Discord's terms; the REST layer maps these to
/// Discord's JSON error codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    UnknownChannel,
    UnknownRole,
    UnknownMember,
    UnknownUser,
    UnknownVoiceState,
    /// Discord's 10009: no overwrite for that target on the channel.
    UnknownOverwrite,
    /// Discord's 50001: the caller cannot view the channel it addressed.
    MissingAccess,
    /// The acting user lacks this permission bit.
    MissingPermission(u64),
    /// Discord's 40032: the target is not connected to voice.
    NotInVoice,
    /// A voice channel at its user limit.
    ChannelFull,
    /// Form validation: field name and Discord's error code and message.
    Invalid(&'static str, &'static str, String),
}

#[derive(Debug)]
pub struct World {
    pub guild_id: u64,
    pub guild_name: String,
    pub owner_id: u64,
    pub bot_id: u64,
    pub room_category_id: u64,
    pub lobby_id: u64,
    pub users: BTreeMap<u64, User>,
    pub members: BTreeMap<u64, Member>,
    pub roles: BTreeMap<u64, Role>,
    pub channels: BTreeMap<u64, Channel>,
    pub voice: BTreeMap<u64, Voice>,
    /// Every successful move through Modify Guild Member with a `channel_id`, in order:
    /// (user, target channel). Tests read it to prove a move did or did not happen.
    pub moves: Vec<(u64, u64)>,
    pub ids: Snowflakes,
}

/// The seeded people: (username, display name, member of the guild).
const SEED_USERS: &[(&str, &str, bool)] = &[
    ("ash", "Ash", true),
    ("bramble", "Bramble", true),
    ("cinder", "Cinder", true),
    ("dusk", "Dusk", true),
    ("ember", "Ember", true),
    ("fable", "Fable", true),
    ("gale", "Gale", true),
    ("hollow", "Hollow", true),
    ("iris", "Iris", false),
    ("juniper", "Juniper", false),
];

/// What `@everyone` may do in a fresh guild: see, talk, join voice.
const EVERYONE_PERMISSIONS: u64 = perm::CREATE_INSTANT_INVITE
    | perm::ADD_REACTIONS
    | perm::STREAM
    | perm::VIEW_CHANNEL
    | perm::SEND_MESSAGES
    | perm::READ_MESSAGE_HISTORY
    | perm::CONNECT
    | perm::SPEAK
    | perm::USE_VAD
    | perm::CHANGE_NICKNAME;

/// What the bot's managed role grants: exactly what Coven needs, not ADMINISTRATOR, so
/// permission mistakes in Coven show up as Discord's 50013.
pub const BOT_PERMISSIONS: u64 = EVERYONE_PERMISSIONS
    | perm::MANAGE_CHANNELS
    | perm::MANAGE_ROLES
    | perm::MUTE_MEMBERS
    | perm::DEAFEN_MEMBERS
    | perm::MOVE_MEMBERS;

impl World {
    /// A guild with a text channel, a lobby voice channel, a room category, the bot and
    /// the seeded users (two of whom are not members yet).
    pub fn seeded(guild_id: u64, bot_id: u64) -> Self {
        let mut ids = Snowflakes::seeded();
        let fresh = |ids: &mut Snowflakes| loop {
            let id = ids.next_seeded();
            if id != guild_id && id != bot_id {
                return id;
            }
        };
        let mut w = World {
            guild_id,
            guild_name: "Coven Playgroup".to_owned(),
            owner_id: 0,
            bot_id,
            room_category_id: 0,
            lobby_id: 0,
            users: BTreeMap::new(),
            members: BTreeMap::new(),
            roles: BTreeMap::new(),
            channels: BTreeMap::new(),
            voice: BTreeMap::new(),
            moves: Vec::new(),
            ids: Snowflakes::seeded(),
        };

        w.roles.insert(
            guild_id,
            Role {
                id: guild_id,
                name: "@everyone".to_owned(),
                permissions: EVERYONE_PERMISSIONS,
                position: 0,
                color: 0,
                hoist: false,
                mentionable: false,
                managed: false,
            },
        );
        let bot_role = fresh(&mut ids);
        w.roles.insert(
            bot_role,
            Role {
                id: bot_role,
                name: "Coven".to_owned(),
                permissions: BOT_PERMISSIONS,
                position: 10,
                color: 0x7c3aed,
                hoist: false,
                mentionable: false,
                managed: true,
            },
        );

        w.users.insert(
            bot_id,
            User {
                id: bot_id,
                username: "Coven".to_owned(),
                global_name: None,
                avatar: Some(avatar_hash(bot_id)),
                bot: true,
            },
        );
        w.members
            .insert(bot_id, Member::new([bot_role].into_iter().collect()));

        for (i, (username, display, member)) in SEED_USERS.iter().enumerate() {
            let id = fresh(&mut ids);
            w.users.insert(
                id,
                User {
                    id,
                    username: (*username).to_owned(),
                    global_name: Some((*display).to_owned()),
                    avatar: Some(avatar_hash(id)),
                    bot: false,
                },
            );
            if *member {
                w.members.insert(id, Member::new(BTreeSet::new()));
            }
            if i == 0 {
                w.owner_id = id;
            }
        }

        let mut channel = |w: &mut World, kind: u8, name: &str, parent: Option<u64>, pos| {
            let id = fresh(&mut ids);
            w.channels.insert(
                id,
                Channel {
                    id,
                    kind,
                    name: name.to_owned(),
                    parent_id: parent,
                    position: pos,
                    user_limit: 0,
                    bitrate: if kind::is_voice(kind) { 64_000 } else { 0 },
                    overwrites: Vec::new(),
                },
            );
            id
        };
        channel(&mut w, kind::TEXT, "general", None, 0);
        w.lobby_id = channel(&mut w, kind::VOICE, "Lobby", None, 1);
        w.room_category_id = channel(&mut w, kind::CATEGORY, "Game Rooms", None, 2);
        w.ids = ids;
        w
    }

    // -----------------------------------------------------------------------------------
    // Permissions, as Discord's documentation computes them.

    /// Guild-level permissions of a member (0 for a non-member).
    pub fn base_permissions(&self, user_id: u64) -> u64 {
        if user_id == self.owner_id {
            return perm::ALL;
        }
        let Some(member) = self.members.get(&user_id) else {
            return 0;
        };
        let mut p = self.roles.get(&self.guild_id).map_or(0, |r| r.permissions);
        for role in &member.roles {
            p |= self.roles.get(role).map_or(0, |r| r.permissions);
        }
        if p & perm::ADMINISTRATOR != 0 {
            return perm::ALL;
        }
        p
    }

    /// Permissions of a member in a channel, overwrites applied.
    pub fn channel_permissions(&self, user_id: u64, channel: &Channel) -> u64 {
        let mut p = self.base_permissions(user_id);
        if p == perm::ALL {
            return p;
        }
        let Some(member) = self.members.get(&user_id) else {
            return 0;
        };
        let ow = &channel.overwrites;
        if let Some(o) = ow.iter().find(|o| o.kind == 0 && o.id == self.guild_id) {
            p = (p & !o.deny) | o.allow;
        }
        let (mut allow, mut deny) = (0, 0);
        for o in ow
            .iter()
            .filter(|o| o.kind == 0 && member.roles.contains(&o.id))
        {
            allow |= o.allow;
            deny |= o.deny;
        }
        p = (p & !deny) | allow;
        if let Some(o) = ow.iter().find(|o| o.kind == 1 && o.id == user_id) {
            p = (p & !o.deny) | o.allow;
        }
        // Discord's "Implicit Permissions": without View Channel nothing else in the
        // channel applies.
        if p & perm::VIEW_CHANNEL == 0 {
            return 0;
        }
        p
    }

    /// Whether the bot may view a channel, which decides if Discord obfuscates it.
    pub fn bot_can_view(&self, channel: &Channel) -> bool {
        self.channel_permissions(self.bot_id, channel) & perm::VIEW_CHANNEL != 0
    }

    fn bot_view(&self) -> BTreeSet<u64> {
        self.channels
            .values()
            .filter(|c| self.bot_can_view(c))
            .map(|c| c.id)
            .collect()
    }

    /// A channel as `actor` may address it through REST: Discord answers 50001 Missing
    /// Access for a channel the caller cannot view. `None` (an admin) sees everything.
    pub fn channel_for(&self, actor: Option<u64>, id: u64) -> Result<&Channel, Refusal> {
        let channel = self.channel(id)?;
        match actor {
            Some(a) if self.channel_permissions(a, channel) & perm::VIEW_CHANNEL == 0 => {
                Err(Refusal::MissingAccess)
            }
            _ => Ok(channel),
        }
    }

    /// Whether an overwrite in the channel that applies to `user` allows MANAGE_ROLES.
    fn has_manage_roles_overwrite(&self, user: u64, channel: &Channel) -> bool {
        let roles = self.members.get(&user).map(|m| &m.roles);
        channel.overwrites.iter().any(|o| {
            let applies = match o.kind {
                0 => o.id == self.guild_id || roles.is_some_and(|r| r.contains(&o.id)),
                _ => o.id == user,
            };
            applies && o.allow & perm::MANAGE_ROLES != 0
        })
    }

    /// May `actor` allow or deny the bits `changed` in an overwrite of `channel`?
    /// Edit Channel Permissions and Modify Channel: "Only permissions your bot has in the
    /// guild or parent channel (if applicable) can be allowed/denied (unless your bot has
    /// a MANAGE_ROLES overwrite in the channel)"; change log 2021-01-22: "Setting
    /// MANAGE_ROLES permission in channel overwrites is only possible for guild
    /// administrators or users with MANAGE_ROLES as a permission overwrite in the
    /// channel".
    fn may_set_overwrite_bits(
        &self,
        actor: u64,
        channel: &Channel,
        changed: u64,
    ) -> Result<(), Refusal> {
        let base = self.base_permissions(actor);
        if base == perm::ALL || self.has_manage_roles_overwrite(actor, channel) {
            return Ok(());
        }
        if changed & perm::MANAGE_ROLES != 0 {
            return Err(Refusal::MissingPermission(perm::MANAGE_ROLES));
        }
        let have = match channel.parent_id.and_then(|p| self.channels.get(&p)) {
            Some(parent) => self.channel_permissions(actor, parent),
            None => base,
        };
        self.require(have, changed)
    }

    /// Overwrite targets must exist: a role for type 0, a member for type 1.
    fn check_overwrite_targets(&self, overwrites: &[Overwrite]) -> Result<(), Refusal> {
        for o in overwrites {
            let known = match o.kind {
                0 => self.roles.contains_key(&o.id),
                1 => self.members.contains_key(&o.id),
                _ => false,
            };
            if !known {
                return Err(Refusal::Invalid(
                    "permission_overwrites",
                    "UNKNOWN_OVERWRITE",
                    format!("Unknown overwrite target {}.", o.id),
                ));
            }
        }
        Ok(())
    }

    /// Runs a change that may alter what the bot can view (a role's permissions, the
    /// bot's roles) and adds the CHANNEL_UPDATE Discord sends for each channel whose
    /// visibility flipped: full data once the bot gains View Channel, the obfuscated form
    /// once it loses it. Channels the change dispatched itself are not repeated.
    fn tracking_view<T>(
        &mut self,
        change: impl FnOnce(&mut Self) -> Result<(T, Vec<Dispatch>), Refusal>,
    ) -> Result<(T, Vec<Dispatch>), Refusal> {
        let before = self.bot_view();
        let (out, mut events) = change(self)?;
        let after = self.bot_view();
        let mentioned: BTreeSet<String> = events
            .iter()
            .filter(|d| d.name.starts_with("CHANNEL_"))
            .filter_map(|d| d.data["id"].as_str().map(str::to_owned))
            .collect();
        for id in before.symmetric_difference(&after) {
            if let Some(c) = self.channels.get(id)
                && !mentioned.contains(&id.to_string())
            {
                events.push(self.channel_dispatch("CHANNEL_UPDATE", c));
            }
        }
        Ok((out, events))
    }

    /// A channel event as the bot receives it (obfuscated when it cannot view it).
    fn channel_dispatch(&self, name: &'static str, c: &Channel) -> Dispatch {
        Dispatch {
            name,
            data: self.channel_json_for_bot(c, true),
        }
    }

    fn require(&self, have: u64, need: u64) -> Result<(), Refusal> {
        let missing = need & !have;
        if missing == 0 {
            Ok(())
        } else {
            Err(Refusal::MissingPermission(1 << missing.trailing_zeros()))
        }
    }

    /// The highest position among a member's roles (the owner outranks everyone).
    fn top_position(&self, user_id: u64) -> i64 {
        if user_id == self.owner_id {
            return i64::MAX;
        }
        self.members.get(&user_id).map_or(0, |m| {
            m.roles
                .iter()
                .filter_map(|r| self.roles.get(r))
                .map(|r| r.position)
                .max()
                .unwrap_or(0)
        })
    }

    pub fn channel(&self, id: u64) -> Result<&Channel, Refusal> {
        self.channels.get(&id).ok_or(Refusal::UnknownChannel)
    }

    // -----------------------------------------------------------------------------------
    // Changes. `actor` is the user on whose authority the change is made (the bot for
    // REST calls); `None` means "made in Discord by an admin" (the control API).

    pub fn create_channel(
        &mut self,
        actor: Option<u64>,
        new: NewChannel,
    ) -> Result<(u64, Vec<Dispatch>), Refusal> {
        let name = new.name.trim().to_owned();
        check_name(&name)?;
        if !kind::creatable(new.kind) {
            return Err(Refusal::Invalid(
                "type",
                "BASE_TYPE_CHOICES",
                "Value must be one of {0, 2, 4, 5, 13, 15, 16}.".to_owned(),
            ));
        }
        check_user_limit(new.user_limit)?;
        if let Some(parent) = new.parent_id {
            match self.channels.get(&parent) {
                Some(c) if c.kind == kind::CATEGORY && new.kind != kind::CATEGORY => {}
                _ => {
                    return Err(Refusal::Invalid(
                        "parent_id",
                        "CHANNEL_PARENT_INVALID",
                        "Category does not exist.".to_owned(),
                    ));
                }
            }
        }
        self.check_overwrite_targets(&new.overwrites)?;
        if let Some(actor) = actor {
            let have = self.base_permissions(actor);
            self.require(have, perm::MANAGE_CHANNELS)?;
            if !new.overwrites.is_empty() {
                self.require(have, perm::MANAGE_ROLES)?;
                // Change log 2021-01-22: overwrites in a new channel need the bot to
                // have the permissions it applies (in the guild), and only
                // administrators may set MANAGE_ROLES in them.
                for o in &new.overwrites {
                    let bits = o.allow | o.deny;
                    if have != perm::ALL && bits & perm::MANAGE_ROLES != 0 {
                        return Err(Refusal::MissingPermission(perm::MANAGE_ROLES));
                    }
                    self.require(have, bits)?;
                }
            }
        }
        let id = self.ids.mint();
        let position = self
            .channels
            .values()
            .map(|c| c.position)
            .max()
            .unwrap_or(0)
            + 1;
        let channel = Channel {
            id,
            kind: new.kind,
            name,
            parent_id: new.parent_id,
            position,
            user_limit: if kind::is_voice(new.kind) {
                new.user_limit
            } else {
                0
            },
            bitrate: if kind::is_voice(new.kind) { 64_000 } else { 0 },
            overwrites: new.overwrites,
        };
        let event = self.channel_dispatch("CHANNEL_CREATE", &channel);
        self.channels.insert(id, channel);
        Ok((id, vec![event]))
    }

    /// Modify Channel: name, user limit and the whole overwrite list.
    pub fn update_channel(
        &mut self,
        actor: Option<u64>,
        id: u64,
        edit: ChannelEdit,
    ) -> Result<Vec<Dispatch>, Refusal> {
        let channel = self.channel_for(actor, id)?;
        if let Some(n) = &edit.name {
            check_name(n.trim())?;
        }
        if let Some(l) = edit.user_limit {
            check_user_limit(l)?;
        }
        if let Some(list) = &edit.overwrites {
            self.check_overwrite_targets(list)?;
        }
        if let Some(actor) = actor {
            let have = self.channel_permissions(actor, channel);
            self.require(have, perm::MANAGE_CHANNELS)?;
            if let Some(list) = &edit.overwrites {
                // "If modifying permission overwrites, the MANAGE_ROLES permission is
                // required", and only what changes is allowed or denied anew.
                self.require(have, perm::MANAGE_ROLES)?;
                let mut changed = 0;
                for o in list {
                    let old = channel.overwrites.iter().find(|x| x.id == o.id);
                    changed |= overwrite_change(old, Some(o));
                }
                self.may_set_overwrite_bits(actor, channel, changed)?;
            }
        }
        let Some(channel) = self.channels.get_mut(&id) else {
            return Err(Refusal::UnknownChannel);
        };
        if let Some(n) = edit.name {
            channel.name = n.trim().to_owned();
        }
        if let Some(l) = edit.user_limit
            && kind::is_voice(channel.kind)
        {
            channel.user_limit = l;
        }
        if let Some(list) = edit.overwrites {
            channel.overwrites = dedup_overwrites(list);
        }
        let channel = channel.clone();
        Ok(vec![self.channel_dispatch("CHANNEL_UPDATE", &channel)])
    }

    /// Edit Channel Permissions: creates or replaces the overwrite for one role or member.
    pub fn set_overwrite(
        &mut self,
        actor: Option<u64>,
        channel_id: u64,
        overwrite: Overwrite,
    ) -> Result<Vec<Dispatch>, Refusal> {
        let channel = self.channel_for(actor, channel_id)?;
        self.check_overwrite_targets(std::slice::from_ref(&overwrite))?;
        if let Some(actor) = actor {
            self.require(self.channel_permissions(actor, channel), perm::MANAGE_ROLES)?;
            let old = channel.overwrites.iter().find(|o| o.id == overwrite.id);
            let changed = overwrite_change(old, Some(&overwrite));
            self.may_set_overwrite_bits(actor, channel, changed)?;
        }
        let Some(channel) = self.channels.get_mut(&channel_id) else {
            return Err(Refusal::UnknownChannel);
        };
        match channel.overwrites.iter_mut().find(|o| o.id == overwrite.id) {
            Some(o) => *o = overwrite,
            None => channel.overwrites.push(overwrite),
        }
        let channel = channel.clone();
        Ok(vec![self.channel_dispatch("CHANNEL_UPDATE", &channel)])
    }

    /// Delete Channel Permission: needs MANAGE_ROLES only (no rule on the bits removed).
    pub fn delete_overwrite(
        &mut self,
        actor: Option<u64>,
        channel_id: u64,
        target: u64,
    ) -> Result<Vec<Dispatch>, Refusal> {
        let channel = self.channel_for(actor, channel_id)?;
        if let Some(actor) = actor {
            self.require(self.channel_permissions(actor, channel), perm::MANAGE_ROLES)?;
        }
        if !channel.overwrites.iter().any(|o| o.id == target) {
            return Err(Refusal::UnknownOverwrite);
        }
        let Some(channel) = self.channels.get_mut(&channel_id) else {
            return Err(Refusal::UnknownChannel);
        };
        channel.overwrites.retain(|o| o.id != target);
        let channel = channel.clone();
        Ok(vec![self.channel_dispatch("CHANNEL_UPDATE", &channel)])
    }

    /// Deletes a channel; anyone in it is disconnected first, as Discord does. Returns the
    /// channel's full JSON (what Discord answers the deleter, who could view it).
    pub fn delete_channel(
        &mut self,
        actor: Option<u64>,
        id: u64,
    ) -> Result<(Value, Vec<Dispatch>), Refusal> {
        let channel = self.channel_for(actor, id)?;
        if let Some(actor) = actor {
            self.require(
                self.channel_permissions(actor, channel),
                perm::MANAGE_CHANNELS,
            )?;
        }
        let mut out = Vec::new();
        let in_channel: Vec<u64> = self
            .voice
            .iter()
            .filter(|(_, v)| v.channel_id == id)
            .map(|(u, _)| *u)
            .collect();
        for user in in_channel {
            out.extend(self.set_voice_unchecked(user, None, VoiceFlags::default()));
        }
        let Some(channel) = self.channels.remove(&id) else {
            return Err(Refusal::UnknownChannel);
        };
        // Children of a deleted category move to the top level.
        let orphans: Vec<u64> = self
            .channels
            .values()
            .filter(|c| c.parent_id == Some(id))
            .map(|c| c.id)
            .collect();
        for child in orphans {
            if let Some(c) = self.channels.get_mut(&child) {
                c.parent_id = None;
                let c = c.clone();
                out.push(self.channel_dispatch("CHANNEL_UPDATE", &c));
            }
        }
        out.push(self.channel_dispatch("CHANNEL_DELETE", &channel));
        Ok((self.channel_json(&channel, true), out))
    }

    pub fn create_role(
        &mut self,
        actor: Option<u64>,
        name: Option<String>,
        permissions: u64,
        color: u32,
        hoist: bool,
        mentionable: bool,
    ) -> Result<(Value, Vec<Dispatch>), Refusal> {
        let name = name.unwrap_or_else(|| "new role".to_owned());
        check_name(&name)?;
        if let Some(actor) = actor {
            let have = self.base_permissions(actor);
            self.require(have, perm::MANAGE_ROLES)?;
            self.require(have, permissions)?;
        }
        let id = self.ids.mint();
        // New roles sit just above @everyone, below the bot's role, as on Discord.
        for r in self.roles.values_mut().filter(|r| r.id != self.guild_id) {
            r.position += 1;
        }
        let role = Role {
            id,
            name,
            permissions: permissions & perm::ALL,
            position: 1,
            color,
            hoist,
            mentionable,
            managed: false,
        };
        let data = role_json(&role);
        self.roles.insert(id, role);
        Ok((
            data.clone(),
            vec![Dispatch {
                name: "GUILD_ROLE_CREATE",
                data: json!({"guild_id": self.guild_id.to_string(), "role": data}),
            }],
        ))
    }

    /// Modify Guild Role. Discord's Permission Hierarchy: "A bot can edit roles of a lower
    /// position than its highest role, but it can only grant permissions it has to those
    /// roles."
    pub fn update_role(
        &mut self,
        actor: Option<u64>,
        id: u64,
        edit: RoleEdit,
    ) -> Result<(Value, Vec<Dispatch>), Refusal> {
        let role = self.roles.get(&id).ok_or(Refusal::UnknownRole)?;
        if let Some(n) = &edit.name {
            check_name(n)?;
        }
        if let Some(actor) = actor {
            let have = self.base_permissions(actor);
            self.require(have, perm::MANAGE_ROLES)?;
            if role.position >= self.top_position(actor) {
                return Err(Refusal::MissingPermission(perm::MANAGE_ROLES));
            }
            if let Some(p) = edit.permissions {
                self.require(have, p & !role.permissions)?;
            }
        }
        self.tracking_view(|w| {
            let guild_id = w.guild_id;
            let Some(role) = w.roles.get_mut(&id) else {
                return Err(Refusal::UnknownRole);
            };
            if let Some(n) = edit.name {
                role.name = n;
            }
            if let Some(p) = edit.permissions {
                role.permissions = p & perm::ALL;
            }
            if let Some(c) = edit.color {
                role.color = c;
            }
            if let Some(h) = edit.hoist {
                role.hoist = h;
            }
            if let Some(m) = edit.mentionable {
                role.mentionable = m;
            }
            let data = role_json(role);
            Ok((
                data.clone(),
                vec![Dispatch {
                    name: "GUILD_ROLE_UPDATE",
                    data: json!({"guild_id": guild_id.to_string(), "role": data}),
                }],
            ))
        })
    }

    pub fn delete_role(&mut self, actor: Option<u64>, id: u64) -> Result<Vec<Dispatch>, Refusal> {
        let role = self.roles.get(&id).ok_or(Refusal::UnknownRole)?;
        if id == self.guild_id || role.managed {
            return Err(Refusal::Invalid(
                "role_id",
                "ROLE_UNDELETABLE",
                "This role cannot be deleted.".to_owned(),
            ));
        }
        if let Some(actor) = actor {
            self.require(self.base_permissions(actor), perm::MANAGE_ROLES)?;
            if role.position >= self.top_position(actor) {
                return Err(Refusal::MissingPermission(perm::MANAGE_ROLES));
            }
        }
        let ((), out) = self.tracking_view(|w| {
            w.roles.remove(&id);
            let mut out = Vec::new();
            let holders: Vec<u64> = w
                .members
                .iter()
                .filter(|(_, m)| m.roles.contains(&id))
                .map(|(u, _)| *u)
                .collect();
            for user in holders {
                if let Some(m) = w.members.get_mut(&user) {
                    m.roles.remove(&id);
                }
                out.push(w.member_update(user));
            }
            out.push(Dispatch {
                name: "GUILD_ROLE_DELETE",
                data: json!({"guild_id": w.guild_id.to_string(), "role_id": id.to_string()}),
            });
            Ok(((), out))
        })?;
        Ok(out)
    }

    /// Adds (`grant`) or removes a role from a member. Managed roles and @everyone are
    /// not assignable, even by an admin.
    pub fn set_member_role(
        &mut self,
        actor: Option<u64>,
        user_id: u64,
        role_id: u64,
        grant: bool,
    ) -> Result<Vec<Dispatch>, Refusal> {
        if !self.members.contains_key(&user_id) {
            return Err(Refusal::UnknownMember);
        }
        let role = self.roles.get(&role_id).ok_or(Refusal::UnknownRole)?;
        if let Some(actor) = actor {
            self.require(self.base_permissions(actor), perm::MANAGE_ROLES)?;
            if role.position >= self.top_position(actor) {
                return Err(Refusal::MissingPermission(perm::MANAGE_ROLES));
            }
        }
        if role.managed || role_id == self.guild_id {
            return Err(match actor {
                Some(_) => Refusal::MissingPermission(perm::MANAGE_ROLES),
                None => Refusal::Invalid(
                    "role_id",
                    "ROLE_NOT_ASSIGNABLE",
                    "Managed roles and @everyone cannot be assigned.".to_owned(),
                ),
            });
        }
        let ((), out) = self.tracking_view(|w| {
            let Some(member) = w.members.get_mut(&user_id) else {
                return Err(Refusal::UnknownMember);
            };
            let changed = if grant {
                member.roles.insert(role_id)
            } else {
                member.roles.remove(&role_id)
            };
            Ok((
                (),
                if changed {
                    vec![w.member_update(user_id)]
                } else {
                    Vec::new()
                },
            ))
        })?;
        Ok(out)
    }

    /// Adds a user to the guild (the OAuth2 `guilds.join` flow). `Ok(None)` when they were
    /// a member already.
    pub fn add_member(
        &mut self,
        actor: u64,
        user_id: u64,
        roles: &[u64],
    ) -> Result<Option<Vec<Dispatch>>, Refusal> {
        if !self.users.contains_key(&user_id) {
            return Err(Refusal::UnknownUser);
        }
        if self.members.contains_key(&user_id) {
            return Ok(None);
        }
        let have = self.base_permissions(actor);
        self.require(have, perm::CREATE_INSTANT_INVITE)?;
        if !roles.is_empty() {
            self.require(have, perm::MANAGE_ROLES)?;
        }
        for r in roles {
            if !self.roles.contains_key(r) {
                return Err(Refusal::UnknownRole);
            }
        }
        self.members
            .insert(user_id, Member::new(roles.iter().copied().collect()));
        let mut data = self.member_json(user_id).unwrap_or(Value::Null);
        data["guild_id"] = json!(self.guild_id.to_string());
        Ok(Some(vec![Dispatch {
            name: "GUILD_MEMBER_ADD",
            data,
        }]))
    }

    /// Remove Guild Member (a kick): KICK_MEMBERS, and Discord's Permission Hierarchy ("A
    /// bot can only kick ... users whose highest role is lower than the bot's highest
    /// role"). The member leaves voice first, then GUILD_MEMBER_REMOVE follows.
    pub fn remove_member(
        &mut self,
        actor: Option<u64>,
        user_id: u64,
    ) -> Result<Vec<Dispatch>, Refusal> {
        if !self.members.contains_key(&user_id) {
            return Err(Refusal::UnknownMember);
        }
        match actor {
            Some(actor) => {
                self.require(self.base_permissions(actor), perm::KICK_MEMBERS)?;
                if self.top_position(user_id) >= self.top_position(actor) {
                    return Err(Refusal::MissingPermission(perm::KICK_MEMBERS));
                }
            }
            // The owner cannot leave without transferring the guild, and the bot leaving
            // would end the simulated guild for every Gateway session.
            None if user_id == self.owner_id || user_id == self.bot_id => {
                return Err(Refusal::Invalid(
                    "user_id",
                    "MEMBER_NOT_REMOVABLE",
                    "The owner and the bot cannot be removed.".to_owned(),
                ));
            }
            None => {}
        }
        let mut out = self.set_voice_unchecked(user_id, None, VoiceFlags::default());
        self.members.remove(&user_id);
        out.push(Dispatch {
            name: "GUILD_MEMBER_REMOVE",
            data: json!({
                "guild_id": self.guild_id.to_string(),
                "user": self.user_json(user_id).unwrap_or(Value::Null),
            }),
        });
        Ok(out)
    }

    /// Moves a member between voice channels (or disconnects them with `None`) on the
    /// bot's authority. The mover needs MOVE_MEMBERS; the target must be in voice.
    pub fn move_member(
        &mut self,
        actor: u64,
        user_id: u64,
        channel_id: Option<u64>,
    ) -> Result<Vec<Dispatch>, Refusal> {
        if !self.members.contains_key(&user_id) {
            return Err(Refusal::UnknownMember);
        }
        let Some(current) = self.voice.get(&user_id).cloned() else {
            return Err(Refusal::NotInVoice);
        };
        let from = self.channel(current.channel_id)?;
        self.require(self.channel_permissions(actor, from), perm::MOVE_MEMBERS)?;
        let Some(to) = channel_id else {
            return Ok(self.set_voice_unchecked(user_id, None, current.flags));
        };
        let target = self.channel(to)?;
        if !kind::is_voice(target.kind) {
            return Err(Refusal::Invalid(
                "channel_id",
                "CHANNEL_TYPE_INVALID",
                "Channel is not a voice channel.".to_owned(),
            ));
        }
        // Modify Guild Member: "When moving members to channels, the API user must have
        // permissions to both connect to the channel and have the MOVE_MEMBERS
        // permission." That is all Discord checks: nothing about whether the moved member
        // could see or join the target themselves, so a bot can move anyone anywhere it
        // may go (Coven must make that check itself).
        self.require(
            self.channel_permissions(actor, target),
            perm::MOVE_MEMBERS | perm::CONNECT,
        )?;
        self.moves.push((user_id, to));
        if current.channel_id == to {
            return Ok(Vec::new());
        }
        Ok(self.set_voice_unchecked(user_id, Some(to), current.flags))
    }

    /// A user joins, changes flags in, or leaves (`None`) voice on their own, with the
    /// checks Discord's client faces: membership, VIEW_CHANNEL + CONNECT, and the limit.
    pub fn user_voice(
        &mut self,
        user_id: u64,
        channel_id: Option<u64>,
        flags: VoiceFlags,
    ) -> Result<Vec<Dispatch>, Refusal> {
        if !self.users.contains_key(&user_id) {
            return Err(Refusal::UnknownUser);
        }
        if !self.members.contains_key(&user_id) {
            return Err(Refusal::UnknownMember);
        }
        let Some(to) = channel_id else {
            return Ok(if self.voice.contains_key(&user_id) {
                self.set_voice_unchecked(user_id, None, flags)
            } else {
                Vec::new()
            });
        };
        let target = self.channel(to)?;
        if !kind::is_voice(target.kind) {
            return Err(Refusal::Invalid(
                "channel_id",
                "CHANNEL_TYPE_INVALID",
                "Channel is not a voice channel.".to_owned(),
            ));
        }
        let perms = self.channel_permissions(user_id, target);
        self.require(perms, perm::VIEW_CHANNEL | perm::CONNECT)?;
        let already_here = self.voice.get(&user_id).is_some_and(|v| v.channel_id == to);
        if !already_here && target.user_limit > 0 && perms & perm::MOVE_MEMBERS == 0 {
            let present = self.voice.values().filter(|v| v.channel_id == to).count();
            if present >= target.user_limit as usize {
                return Err(Refusal::ChannelFull);
            }
        }
        if already_here && self.voice.get(&user_id).is_some_and(|v| v.flags == flags) {
            return Ok(Vec::new());
        }
        Ok(self.set_voice_unchecked(user_id, Some(to), flags))
    }

    fn set_voice_unchecked(
        &mut self,
        user_id: u64,
        channel_id: Option<u64>,
        flags: VoiceFlags,
    ) -> Vec<Dispatch> {
        match channel_id {
            Some(c) => {
                let session_id = match self.voice.get(&user_id) {
                    Some(v) => v.session_id.clone(),
                    None => random_hex(16),
                };
                self.voice.insert(
                    user_id,
                    Voice {
                        channel_id: c,
                        session_id,
                        flags,
                    },
                );
            }
            None => {
                let Some(old) = self.voice.remove(&user_id) else {
                    return Vec::new();
                };
                let mut data = self.voice_json(user_id, None, &old, true);
                data["channel_id"] = Value::Null;
                return vec![Dispatch {
                    name: "VOICE_STATE_UPDATE",
                    data,
                }];
            }
        }
        let state = self.voice.get(&user_id).cloned();
        state
            .map(|v| Dispatch {
                name: "VOICE_STATE_UPDATE",
                data: self.voice_json(user_id, Some(v.channel_id), &v, true),
            })
            .into_iter()
            .collect()
    }

    fn member_update(&self, user_id: u64) -> Dispatch {
        let mut data = self.member_json(user_id).unwrap_or(Value::Null);
        data["guild_id"] = json!(self.guild_id.to_string());
        Dispatch {
            name: "GUILD_MEMBER_UPDATE",
            data,
        }
    }

    pub fn add_user(&mut self, username: String, global_name: Option<String>, member: bool) -> u64 {
        let id = self.ids.mint();
        self.users.insert(
            id,
            User {
                id,
                username,
                global_name,
                avatar: Some(avatar_hash(id)),
                bot: false,
            },
        );
        if member {
            self.members.insert(id, Member::new(BTreeSet::new()));
        }
        id
    }

    // -----------------------------------------------------------------------------------
    // JSON, in the shapes Discord's documentation gives (ids as strings).

    pub fn user_json(&self, id: u64) -> Option<Value> {
        self.users.get(&id).map(user_json)
    }

    pub fn member_json(&self, user_id: u64) -> Option<Value> {
        let m = self.members.get(&user_id)?;
        Some(json!({
            "user": self.user_json(user_id)?,
            "nick": m.nick,
            "avatar": null,
            "roles": m.roles.iter().map(u64::to_string).collect::<Vec<_>>(),
            "joined_at": m.joined_at,
            "premium_since": null,
            "deaf": m.deaf,
            "mute": m.mute,
            "flags": 0,
            "pending": false,
            "communication_disabled_until": null,
        }))
    }

    /// A channel as the bot receives it: in full when it can view it, otherwise
    /// obfuscated as Discord does since 2026-11-16 (channel resource, "Obfuscated
    /// Channels"): only `id`, `type`, `position` and `parent_id` are real.
    pub fn channel_json_for_bot(&self, c: &Channel, with_guild: bool) -> Value {
        if self.bot_can_view(c) {
            self.channel_json(c, with_guild)
        } else {
            self.obfuscated_channel_json(c, with_guild)
        }
    }

    fn obfuscated_channel_json(&self, c: &Channel, with_guild: bool) -> Value {
        let mut v = json!({
            "id": c.id.to_string(),
            "type": c.kind,
            "name": HIDDEN_NAME,
            "position": c.position,
            "parent_id": c.parent_id.map(|p| p.to_string()),
            "nsfw": false,
            "flags": channel_flag::OBFUSCATED,
            // The real overwrites are replaced by one denying View Channel to @everyone.
            "permission_overwrites": [{
                "id": self.guild_id.to_string(),
                "type": 0,
                "allow": "0",
                "deny": perm::VIEW_CHANNEL.to_string(),
            }],
        });
        if kind::is_voice(c.kind) {
            v["user_limit"] = json!(0);
            v["bitrate"] = Value::Null;
            v["rtc_region"] = Value::Null;
            v["rate_limit_per_user"] = json!(0);
        } else if c.kind == kind::TEXT {
            v["topic"] = Value::Null;
            v["rate_limit_per_user"] = json!(0);
            v["last_message_id"] = Value::Null;
        }
        if with_guild {
            v["guild_id"] = json!(self.guild_id.to_string());
        }
        v
    }

    pub fn channel_json(&self, c: &Channel, with_guild: bool) -> Value {
        let mut v = json!({
            "id": c.id.to_string(),
            "type": c.kind,
            "name": c.name,
            "position": c.position,
            "parent_id": c.parent_id.map(|p| p.to_string()),
            "nsfw": false,
            "flags": 0,
            "permission_overwrites": c.overwrites.iter().map(|o| json!({
                "id": o.id.to_string(),
                "type": o.kind,
                "allow": o.allow.to_string(),
                "deny": o.deny.to_string(),
            })).collect::<Vec<_>>(),
        });
        if kind::is_voice(c.kind) {
            v["user_limit"] = json!(c.user_limit);
            v["bitrate"] = json!(c.bitrate);
            v["rtc_region"] = Value::Null;
            v["rate_limit_per_user"] = json!(0);
        } else if c.kind == kind::TEXT {
            v["topic"] = Value::Null;
            v["rate_limit_per_user"] = json!(0);
            v["last_message_id"] = Value::Null;
        }
        if with_guild {
            v["guild_id"] = json!(self.guild_id.to_string());
        }
        v
    }

    /// A voice state. `channel` is what to report as `channel_id` (None on leave).
    pub fn voice_json(&self, user_id: u64, channel: Option<u64>, v: &Voice, full: bool) -> Value {
        let (mute, deaf) = self
            .members
            .get(&user_id)
            .map_or((false, false), |m| (m.mute, m.deaf));
        let mut out = json!({
            "channel_id": channel.map(|c| c.to_string()),
            "user_id": user_id.to_string(),
            "session_id": v.session_id,
            "deaf": deaf,
            "mute": mute,
            "self_deaf": v.flags.self_deaf,
            "self_mute": v.flags.self_mute,
            "self_video": v.flags.self_video,
            "self_stream": v.flags.self_stream,
            "suppress": false,
            "request_to_speak_timestamp": null,
        });
        if full {
            out["guild_id"] = json!(self.guild_id.to_string());
            if let Some(m) = self.member_json(user_id) {
                out["member"] = m;
            }
        }
        out
    }

    /// The GUILD_CREATE payload. Without the voice-states intent Discord sends no voice
    /// states; without GUILD_MEMBERS it sends only the members it must (the bot and
    /// those in voice).
    pub fn guild_create_json(&self, with_voice: bool) -> Value {
        let mut member_ids: BTreeSet<u64> = [self.bot_id].into_iter().collect();
        if with_voice {
            member_ids.extend(self.voice.keys().copied());
        }
        json!({
            "id": self.guild_id.to_string(),
            "name": self.guild_name,
            "icon": null,
            "splash": null,
            "discovery_splash": null,
            "banner": null,
            "description": null,
            "owner_id": self.owner_id.to_string(),
            "afk_channel_id": null,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "features": [],
            "mfa_level": 0,
            "nsfw_level": 0,
            "application_id": null,
            "system_channel_id": null,
            "system_channel_flags": 0,
            "rules_channel_id": null,
            "public_updates_channel_id": null,
            "vanity_url_code": null,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "premium_progress_bar_enabled": false,
            "preferred_locale": "en-US",
            "max_members": 500_000,
            "max_video_channel_users": 25,
            "joined_at": "2024-01-01T00:00:00.000000+00:00",
            "large": false,
            "unavailable": false,
            "member_count": self.members.len(),
            "roles": self.roles.values().map(role_json).collect::<Vec<_>>(),
            "emojis": [],
            "stickers": [],
            "channels": self.channels.values().map(|c| self.channel_json_for_bot(c, false)).collect::<Vec<_>>(),
            "threads": [],
            "members": member_ids.iter().filter_map(|u| self.member_json(*u)).collect::<Vec<_>>(),
            "voice_states": if with_voice {
                self.voice.iter().map(|(u, v)| self.voice_json(*u, Some(v.channel_id), v, false)).collect::<Vec<_>>()
            } else { Vec::new() },
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
        })
    }
}

impl Member {
    fn new(roles: BTreeSet<u64>) -> Self {
        Self {
            roles,
            joined_at: iso_now(),
            nick: None,
            mute: false,
            deaf: false,
        }
    }
}

/// Modify Channel's fields the simulator supports (absent = unchanged).
#[derive(Debug, Clone, Default)]
pub struct ChannelEdit {
    pub name: Option<String>,
    pub user_limit: Option<u32>,
    /// The whole new list of overwrites.
    pub overwrites: Option<Vec<Overwrite>>,
}

/// Modify Guild Role's fields (absent = unchanged).
#[derive(Debug, Clone, Default)]
pub struct RoleEdit {
    pub name: Option<String>,
    pub permissions: Option<u64>,
    pub color: Option<u32>,
    pub hoist: Option<bool>,
    pub mentionable: Option<bool>,
}

fn check_name(name: &str) -> Result<(), Refusal> {
    if (1..=100).contains(&name.chars().count()) {
        Ok(())
    } else {
        Err(Refusal::Invalid(
            "name",
            "BASE_TYPE_BAD_LENGTH",
            "Must be between 1 and 100 in length.".to_owned(),
        ))
    }
}

fn check_user_limit(limit: u32) -> Result<(), Refusal> {
    if limit <= 99 {
        Ok(())
    } else {
        Err(Refusal::Invalid(
            "user_limit",
            "NUMBER_TYPE_MAX",
            "int value should be less than or equal to 99.".to_owned(),
        ))
    }
}

/// The permission bits an overwrite edit allows or denies anew (or stops allowing or
/// denying), which are what Discord's grant rule looks at.
fn overwrite_change(old: Option<&Overwrite>, new: Option<&Overwrite>) -> u64 {
    let (oa, od) = old.map_or((0, 0), |o| (o.allow, o.deny));
    let (na, nd) = new.map_or((0, 0), |o| (o.allow, o.deny));
    (oa ^ na) | (od ^ nd)
}

/// One overwrite per target, the last one given winning.
fn dedup_overwrites(list: Vec<Overwrite>) -> Vec<Overwrite> {
    let mut out: Vec<Overwrite> = Vec::with_capacity(list.len());
    for o in list {
        match out.iter_mut().find(|x| x.id == o.id) {
            Some(x) => *x = o,
            None => out.push(o),
        }
    }
    out
}

/// A permission bitset as Discord writes it (a decimal string); numbers are accepted
/// too, and `null` means none, as Discord's overwrite objects allow.
pub fn bits_from_json(v: &Value) -> Option<u64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        Value::Null => Some(0),
        _ => None,
    }
}

/// A snowflake as a string (Discord's way) or a number.
pub fn id_from_json(v: &Value) -> Option<u64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

/// An overwrite object `{id, type, allow?, deny?}`; `id` may come from elsewhere (the
/// path of Edit Channel Permissions). On error, names the bad field.
pub fn overwrite_from_json(
    o: &serde_json::Map<String, Value>,
    id: Option<u64>,
) -> Result<Overwrite, &'static str> {
    let id = match id {
        Some(id) => id,
        None => o.get("id").and_then(id_from_json).ok_or("id")?,
    };
    let kind = o
        .get("type")
        .and_then(|t| {
            t.as_u64()
                .or_else(|| t.as_str().and_then(|s| s.parse().ok()))
        })
        .filter(|t| *t <= 1)
        .ok_or("type")? as u8;
    let allow = o
        .get("allow")
        .map_or(Some(0), bits_from_json)
        .ok_or("allow")?;
    let deny = o
        .get("deny")
        .map_or(Some(0), bits_from_json)
        .ok_or("deny")?;
    Ok(Overwrite {
        id,
        kind,
        allow,
        deny,
    })
}

/// Modify Guild Role's JSON body; every field is optional and nullable (a null name or
/// permissions reads as "unchanged", a null color as no colour). On error, names the bad
/// field.
pub fn role_edit_from_json(req: &serde_json::Map<String, Value>) -> Result<RoleEdit, &'static str> {
    let flag = |field: &'static str| match req.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(field),
    };
    Ok(RoleEdit {
        name: match req.get("name") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err("name"),
        },
        permissions: match req.get("permissions") {
            None | Some(Value::Null) => None,
            Some(v) => Some(bits_from_json(v).ok_or("permissions")?),
        },
        color: match req.get("color") {
            None => None,
            Some(Value::Null) => Some(0),
            Some(v) => Some(
                v.as_u64()
                    .and_then(|c| u32::try_from(c).ok())
                    .ok_or("color")?,
            ),
        },
        hoist: flag("hoist")?,
        mentionable: flag("mentionable")?,
    })
}

/// The fields of a channel-create request the world needs.
#[derive(Debug, Clone)]
pub struct NewChannel {
    pub name: String,
    pub kind: u8,
    pub parent_id: Option<u64>,
    pub user_limit: u32,
    pub overwrites: Vec<Overwrite>,
}

pub fn user_json(u: &User) -> Value {
    let mut v = json!({
        "id": u.id.to_string(),
        "username": u.username,
        "global_name": u.global_name,
        "avatar": u.avatar,
        "discriminator": "0",
        "public_flags": 0,
        "flags": 0,
        "banner": null,
        "accent_color": null,
    });
    if u.bot {
        v["bot"] = json!(true);
    }
    v
}

pub fn role_json(r: &Role) -> Value {
    json!({
        "id": r.id.to_string(),
        "name": r.name,
        "color": r.color,
        "colors": {"primary_color": r.color, "secondary_color": null, "tertiary_color": null},
        "hoist": r.hoist,
        "icon": null,
        "unicode_emoji": null,
        "position": r.position,
        "permissions": r.permissions.to_string(),
        "managed": r.managed,
        "mentionable": r.mentionable,
        "flags": 0,
    })
}

/// A stable 32-hex-digit avatar hash for a user, shaped like Discord's image hashes.
fn avatar_hash(id: u64) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(id.to_le_bytes());
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

pub fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world() -> World {
        World::seeded(900, 901)
    }

    fn member_named(w: &World, name: &str) -> u64 {
        w.users
            .values()
            .find(|u| u.username == name)
            .map(|u| u.id)
            .unwrap()
    }

    #[test]
    fn seeds_users_two_of_whom_are_not_members() {
        let w = world();
        let humans = w.users.values().filter(|u| !u.bot).count();
        let outsiders = w
            .users
            .keys()
            .filter(|u| !w.members.contains_key(u))
            .count();
        assert!(humans >= 8);
        assert_eq!(outsiders, 2);
        assert_eq!(w.channels[&w.lobby_id].kind, kind::VOICE);
        assert_eq!(w.channels[&w.room_category_id].kind, kind::CATEGORY);
    }

    #[test]
    fn seeding_is_deterministic() {
        let (a, b) = (world(), world());
        assert_eq!(
            a.users.keys().collect::<Vec<_>>(),
            b.users.keys().collect::<Vec<_>>()
        );
    }

    #[test]
    fn room_overwrites_gate_voice_access() {
        let mut w = world();
        let bot = w.bot_id;
        let (role, _) = w
            .create_role(Some(bot), Some("room".into()), 0, 0, false, false)
            .unwrap();
        let role: u64 = role["id"].as_str().unwrap().parse().unwrap();
        let room_perms = perm::VIEW_CHANNEL | perm::CONNECT | perm::SPEAK;
        let (room, _) = w
            .create_channel(
                Some(bot),
                NewChannel {
                    name: "table".into(),
                    kind: kind::VOICE,
                    parent_id: Some(w.room_category_id),
                    user_limit: 1,
                    overwrites: vec![
                        Overwrite {
                            id: w.guild_id,
                            kind: 0,
                            allow: 0,
                            deny: perm::VIEW_CHANNEL | perm::CONNECT,
                        },
                        Overwrite {
                            id: role,
                            kind: 0,
                            allow: room_perms,
                            deny: 0,
                        },
                        Overwrite {
                            id: bot,
                            kind: 1,
                            allow: room_perms | perm::MOVE_MEMBERS,
                            deny: 0,
                        },
                    ],
                },
            )
            .unwrap();
        let (bramble, cinder) = (member_named(&w, "bramble"), member_named(&w, "cinder"));
        let none = VoiceFlags::default();
        assert_eq!(
            w.user_voice(bramble, Some(room), none.clone()).unwrap_err(),
            Refusal::MissingPermission(perm::VIEW_CHANNEL)
        );
        w.set_member_role(Some(bot), bramble, role, true).unwrap();
        w.set_member_role(Some(bot), cinder, role, true).unwrap();
        assert_eq!(
            w.user_voice(bramble, Some(room), none.clone())
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            w.user_voice(cinder, Some(room), none.clone()).unwrap_err(),
            Refusal::ChannelFull
        );
        // Deleting the channel disconnects bramble before the channel goes.
        let (_, events) = w.delete_channel(Some(bot), room).unwrap();
        let names: Vec<_> = events.iter().map(|d| d.name).collect();
        assert_eq!(names, ["VOICE_STATE_UPDATE", "CHANNEL_DELETE"]);
        assert!(w.voice.is_empty());
    }

    #[test]
    fn the_bot_cannot_grant_what_it_lacks() {
        let mut w = world();
        let bot = w.bot_id;
        let err = w
            .create_role(Some(bot), None, perm::ADMINISTRATOR, 0, false, false)
            .unwrap_err();
        assert_eq!(err, Refusal::MissingPermission(perm::ADMINISTRATOR));
    }

    /// A voice room closed to @everyone, open to `role` and to the bot.
    fn private_room(w: &mut World, role: Option<u64>) -> u64 {
        let room_perms = perm::VIEW_CHANNEL | perm::CONNECT | perm::SPEAK;
        let mut overwrites = vec![
            Overwrite {
                id: w.guild_id,
                kind: 0,
                allow: 0,
                deny: perm::VIEW_CHANNEL | perm::CONNECT,
            },
            Overwrite {
                id: w.bot_id,
                kind: 1,
                allow: room_perms | perm::MOVE_MEMBERS,
                deny: 0,
            },
        ];
        if let Some(role) = role {
            overwrites.push(Overwrite {
                id: role,
                kind: 0,
                allow: room_perms,
                deny: 0,
            });
        }
        let new = NewChannel {
            name: "table".into(),
            kind: kind::VOICE,
            parent_id: Some(w.room_category_id),
            user_limit: 0,
            overwrites,
        };
        w.create_channel(None, new).unwrap().0
    }

    fn names(events: &[Dispatch]) -> Vec<&'static str> {
        events.iter().map(|d| d.name).collect()
    }

    #[test]
    fn the_bot_moves_a_member_who_could_not_join_by_themselves() {
        let mut w = world();
        let bot = w.bot_id;
        let room = private_room(&mut w, None);
        let bramble = member_named(&w, "bramble");
        w.user_voice(bramble, Some(w.lobby_id), VoiceFlags::default())
            .unwrap();
        // Bramble may not enter the room on their own...
        assert_eq!(
            w.user_voice(bramble, Some(room), VoiceFlags::default())
                .unwrap_err(),
            Refusal::MissingPermission(perm::VIEW_CHANNEL)
        );
        // ...but Discord lets a mover with Move Members and Connect put them there.
        let events = w.move_member(bot, bramble, Some(room)).unwrap();
        assert_eq!(names(&events), ["VOICE_STATE_UPDATE"]);
        assert_eq!(w.voice[&bramble].channel_id, room);
        assert_eq!(w.moves, [(bramble, room)]);
    }

    #[test]
    fn the_movers_own_permissions_still_count() {
        let mut w = world();
        let bot = w.bot_id;
        let ash = member_named(&w, "ash");
        w.user_voice(ash, Some(w.lobby_id), VoiceFlags::default())
            .unwrap();
        let room = private_room(&mut w, None);
        // Without Connect for the bot in the target, no move.
        w.set_overwrite(
            None,
            room,
            Overwrite {
                id: bot,
                kind: 1,
                allow: perm::VIEW_CHANNEL | perm::MOVE_MEMBERS,
                deny: perm::CONNECT,
            },
        )
        .unwrap();
        assert_eq!(
            w.move_member(bot, ash, Some(room)).unwrap_err(),
            Refusal::MissingPermission(perm::CONNECT)
        );
        // Nor without Move Members.
        w.set_overwrite(
            None,
            room,
            Overwrite {
                id: bot,
                kind: 1,
                allow: perm::VIEW_CHANNEL | perm::CONNECT,
                deny: perm::MOVE_MEMBERS,
            },
        )
        .unwrap();
        assert_eq!(
            w.move_member(bot, ash, Some(room)).unwrap_err(),
            Refusal::MissingPermission(perm::MOVE_MEMBERS)
        );
        assert!(w.moves.is_empty());
    }

    #[test]
    fn a_channel_the_bot_cannot_view_is_dispatched_obfuscated() {
        let mut w = world();
        let new = NewChannel {
            name: "secret".into(),
            kind: kind::VOICE,
            parent_id: Some(w.room_category_id),
            user_limit: 5,
            overwrites: vec![Overwrite {
                id: w.guild_id,
                kind: 0,
                allow: 0,
                deny: perm::VIEW_CHANNEL,
            }],
        };
        let (id, events) = w.create_channel(None, new).unwrap();
        let d = &events[0].data;
        assert_eq!(d["name"], HIDDEN_NAME);
        assert_eq!(d["flags"], channel_flag::OBFUSCATED);
        assert_eq!(d["user_limit"], 0);
        assert_eq!(d["bitrate"], Value::Null);
        assert_eq!(d["parent_id"], w.room_category_id.to_string());
        assert_eq!(
            d["permission_overwrites"],
            json!([{"id": w.guild_id.to_string(), "type": 0, "allow": "0", "deny": "1024"}])
        );
        assert!(
            w.guild_create_json(true)["channels"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["id"].as_str() == Some(id.to_string().as_str())
                    && c["name"] == HIDDEN_NAME)
        );
        assert_eq!(
            w.channel_for(Some(w.bot_id), id).unwrap_err(),
            Refusal::MissingAccess
        );
        // An overwrite for the bot reveals it: the update carries the real data.
        let bot = w.bot_id;
        let events = w
            .set_overwrite(
                None,
                id,
                Overwrite {
                    id: bot,
                    kind: 1,
                    allow: perm::VIEW_CHANNEL,
                    deny: 0,
                },
            )
            .unwrap();
        assert_eq!(names(&events), ["CHANNEL_UPDATE"]);
        assert_eq!(events[0].data["name"], "secret");
        assert_eq!(events[0].data["user_limit"], 5);
        assert_eq!(events[0].data["flags"], 0);
    }

    #[test]
    fn role_changes_that_flip_the_bots_view_send_channel_updates() {
        let mut w = world();
        let bot = w.bot_id;
        let (role, _) = w
            .create_role(None, Some("seer".into()), 0, 0, false, false)
            .unwrap();
        let role: u64 = role["id"].as_str().unwrap().parse().unwrap();
        let new = NewChannel {
            name: "vault".into(),
            kind: kind::VOICE,
            parent_id: None,
            user_limit: 0,
            overwrites: vec![
                Overwrite {
                    id: w.guild_id,
                    kind: 0,
                    allow: 0,
                    deny: perm::VIEW_CHANNEL,
                },
                Overwrite {
                    id: role,
                    kind: 0,
                    allow: perm::VIEW_CHANNEL,
                    deny: 0,
                },
            ],
        };
        let (vault, _) = w.create_channel(None, new).unwrap();
        // Giving the bot the role reveals the vault.
        let events = w.set_member_role(None, bot, role, true).unwrap();
        assert_eq!(names(&events), ["GUILD_MEMBER_UPDATE", "CHANNEL_UPDATE"]);
        assert_eq!(events[1].data["id"], vault.to_string());
        assert_eq!(events[1].data["name"], "vault");
        // Taking View Channel from @everyone changes nothing for the bot, whose own role
        // still grants it...
        let no_view = |p: u64| RoleEdit {
            permissions: Some(p & !perm::VIEW_CHANNEL),
            ..RoleEdit::default()
        };
        let everyone = w.guild_id;
        let (_, events) = w
            .update_role(None, everyone, no_view(EVERYONE_PERMISSIONS))
            .unwrap();
        assert_eq!(names(&events), ["GUILD_ROLE_UPDATE"]);
        // ...until its role loses it too: every other channel is now hidden from it...
        let bot_role = w.roles.values().find(|r| r.managed).unwrap().id;
        let (_, events) = w
            .update_role(None, bot_role, no_view(BOT_PERMISSIONS))
            .unwrap();
        assert_eq!(events[0].name, "GUILD_ROLE_UPDATE");
        let hidden: Vec<_> = events[1..]
            .iter()
            .map(|d| (d.name, d.data["name"].as_str().unwrap()))
            .collect();
        assert_eq!(hidden.len(), 3, "general, Lobby, Game Rooms: {hidden:?}");
        assert!(
            hidden
                .iter()
                .all(|(n, name)| *n == "CHANNEL_UPDATE" && *name == HIDDEN_NAME)
        );
        // ...but not the vault, which the bot still sees through its role.
        assert!(w.bot_can_view(&w.channels[&vault]));
        // Deleting the role hides the vault again.
        let events = w.delete_role(None, role).unwrap();
        assert_eq!(
            names(&events),
            ["GUILD_MEMBER_UPDATE", "GUILD_ROLE_DELETE", "CHANNEL_UPDATE"]
        );
        assert_eq!(events[2].data["name"], HIDDEN_NAME);
    }

    #[test]
    fn overwrite_edits_follow_discords_grant_rules() {
        let mut w = world();
        let bot = w.bot_id;
        let room = private_room(&mut w, None);
        let ash = member_named(&w, "ash");
        let grant = |allow| Overwrite {
            id: ash,
            kind: 1,
            allow,
            deny: 0,
        };
        // The bot cannot allow what it does not have...
        assert_eq!(
            w.set_overwrite(Some(bot), room, grant(perm::ADMINISTRATOR))
                .unwrap_err(),
            Refusal::MissingPermission(perm::ADMINISTRATOR)
        );
        // ...nor set MANAGE_ROLES without being an administrator...
        assert_eq!(
            w.set_overwrite(Some(bot), room, grant(perm::MANAGE_ROLES))
                .unwrap_err(),
            Refusal::MissingPermission(perm::MANAGE_ROLES)
        );
        // ...but may grant what it has.
        let events = w
            .set_overwrite(Some(bot), room, grant(perm::VIEW_CHANNEL))
            .unwrap();
        assert_eq!(names(&events), ["CHANNEL_UPDATE"]);
        assert_eq!(
            w.delete_overwrite(Some(bot), room, 1).unwrap_err(),
            Refusal::UnknownOverwrite
        );
        assert_eq!(
            names(&w.delete_overwrite(Some(bot), room, ash).unwrap()),
            ["CHANNEL_UPDATE"]
        );
        // With its role's MANAGE_ROLES denied in the channel, nothing at all.
        let bot_role = *w.members[&bot].roles.iter().next().unwrap();
        w.set_overwrite(
            None,
            room,
            Overwrite {
                id: bot_role,
                kind: 0,
                allow: 0,
                deny: perm::MANAGE_ROLES,
            },
        )
        .unwrap();
        assert_eq!(
            w.set_overwrite(Some(bot), room, grant(perm::VIEW_CHANNEL))
                .unwrap_err(),
            Refusal::MissingPermission(perm::MANAGE_ROLES)
        );
    }

    #[test]
    fn removing_a_member_disconnects_them_first() {
        let mut w = world();
        let bot = w.bot_id;
        let cinder = member_named(&w, "cinder");
        w.user_voice(cinder, Some(w.lobby_id), VoiceFlags::default())
            .unwrap();
        assert_eq!(
            w.remove_member(Some(bot), cinder).unwrap_err(),
            Refusal::MissingPermission(perm::KICK_MEMBERS)
        );
        let (kicker, _) = w
            .create_role(
                None,
                Some("kick".into()),
                perm::KICK_MEMBERS,
                0,
                false,
                false,
            )
            .unwrap();
        let kicker: u64 = kicker["id"].as_str().unwrap().parse().unwrap();
        w.set_member_role(None, bot, kicker, true).unwrap();
        // The owner outranks the bot.
        assert_eq!(
            w.remove_member(Some(bot), w.owner_id).unwrap_err(),
            Refusal::MissingPermission(perm::KICK_MEMBERS)
        );
        let events = w.remove_member(Some(bot), cinder).unwrap();
        assert_eq!(
            names(&events),
            ["VOICE_STATE_UPDATE", "GUILD_MEMBER_REMOVE"]
        );
        assert_eq!(events[0].data["channel_id"], Value::Null);
        assert_eq!(events[1].data["user"]["id"], cinder.to_string());
        assert!(!w.members.contains_key(&cinder));
        assert!(w.voice.is_empty());
        assert_eq!(
            w.remove_member(None, cinder).unwrap_err(),
            Refusal::UnknownMember
        );
    }

    #[test]
    fn moving_needs_voice() {
        let mut w = world();
        let bot = w.bot_id;
        let ash = member_named(&w, "ash");
        assert_eq!(
            w.move_member(bot, ash, Some(w.lobby_id)).unwrap_err(),
            Refusal::NotInVoice
        );
    }
}
