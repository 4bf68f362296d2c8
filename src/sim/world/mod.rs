//! A simulated guild: users, members, roles, channels and voice states. The simulator
//! holds many, one `World` each; they share one id sequence and never each other's state.
//!
//! Every change goes through a method here that returns the Gateway dispatches it causes,
//! so the REST routes and the control API cannot change state without Discord's events.
//! This file holds the model (the types and the refusals); the changes live beside the
//! rules that govern them (`channels`, `roles`, `members`), and permissions, seeding and
//! JSON shapes have their own modules. Owns no I/O: the caller delivers the dispatches.
//! Must not know about HTTP or Gateway sessions.

mod bot;
mod channels;
mod members;
mod permissions;
mod roles;
mod seed;
#[cfg(test)]
mod testing;
mod wire;

pub use channels::ChannelMove;
pub use members::Joining;

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::sim::ids::{Snowflakes, iso_now};

pub use permissions::name as permission_name;
pub use seed::{BOT_PERMISSIONS, seed_others};
use twilight_model::guild::Permissions;
pub use wire::{
    HIDDEN_NAME, bits_from_json, channel_flag, id_from_json, overwrite_from_json,
    role_edit_from_json, role_json, user_json,
};

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
    /// Guild avatar and banner hashes (Modify Current Member sets them).
    pub avatar: Option<String>,
    pub banner: Option<String>,
    /// Guild member bio (Modify Current Member); not part of the member object.
    pub bio: Option<String>,
    /// A timeout's end, as the ISO 8601 timestamp it was set with.
    pub communication_disabled_until: Option<String>,
    /// Guild member flags (only BYPASSES_VERIFICATION is editable).
    pub flags: u64,
}

#[derive(Debug, Clone)]
pub struct Role {
    pub id: u64,
    pub name: String,
    pub permissions: Permissions,
    pub position: i64,
    pub color: u32,
    pub hoist: bool,
    pub mentionable: bool,
    pub managed: bool,
    /// The bot a managed role belongs to: Discord says so in the role's `tags.bot_id`
    /// ("Role Tags Structure"), and libraries use it to find the bot's own role.
    pub bot: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overwrite {
    pub id: u64,
    /// 0 = role, 1 = member.
    pub kind: u8,
    pub allow: Permissions,
    pub deny: Permissions,
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
    pub settings: ChannelSettings,
}

/// A channel's documented settings that change nothing else the simulator models: kept
/// and echoed as Discord does, so a client's edit lands and shows in the dispatch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelSettings {
    pub topic: Option<String>,
    pub nsfw: bool,
    pub rate_limit_per_user: u32,
    pub rtc_region: Option<String>,
    /// 1 = auto, 2 = full (voice channels); Discord omits it until set.
    pub video_quality_mode: Option<u8>,
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
    MissingPermission(Permissions),
    /// Discord's 40032: the target is not connected to voice.
    NotInVoice,
    /// A voice channel at its user limit.
    ChannelFull,
    /// Discord's 40009: Modify Guild Channel Positions changing more than one parent.
    OneParentAtATime,
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
    /// Discord reports the guild unavailable (an outage): its dispatches are not sent
    /// until it is back.
    pub unavailable: bool,
    /// Every successful move through Modify Guild Member with a `channel_id`, in order:
    /// (user, target channel). Tests read it to prove a move did or did not happen.
    pub moves: Vec<(u64, u64)>,
    pub ids: Snowflakes,
}

impl Member {
    fn new(roles: BTreeSet<u64>) -> Self {
        Self {
            roles,
            joined_at: iso_now(),
            nick: None,
            mute: false,
            deaf: false,
            avatar: None,
            banner: None,
            bio: None,
            communication_disabled_until: None,
            flags: 0,
        }
    }
}

/// Modify Channel's fields (absent = unchanged).
#[derive(Debug, Clone, Default)]
pub struct ChannelEdit {
    pub name: Option<String>,
    pub user_limit: Option<u32>,
    /// The whole new list of overwrites.
    pub overwrites: Option<Vec<Overwrite>>,
    pub position: Option<i64>,
    /// `Some(None)` moves the channel out of its category.
    pub parent_id: Option<Option<u64>>,
    pub bitrate: Option<u32>,
    pub topic: Option<Option<String>>,
    pub nsfw: Option<bool>,
    pub rate_limit_per_user: Option<u32>,
    pub rtc_region: Option<Option<String>>,
    pub video_quality_mode: Option<u8>,
}

/// Modify Guild Member's fields (absent = unchanged; `Some(None)` clears).
#[derive(Debug, Clone, Default)]
pub struct MemberEdit {
    pub nick: Option<Option<String>>,
    pub roles: Option<Vec<u64>>,
    pub mute: Option<bool>,
    pub deaf: Option<bool>,
    /// `Some(None)` disconnects from voice.
    pub channel_id: Option<Option<u64>>,
    /// The timestamp as given and when it falls, in ms since the epoch.
    pub communication_disabled_until: Option<Option<(String, i64)>>,
    pub flags: Option<u64>,
}

/// Modify Current Member's fields (absent = unchanged; `Some(None)` clears).
#[derive(Debug, Clone, Default)]
pub struct SelfEdit {
    pub nick: Option<Option<String>>,
    pub avatar: Option<Option<String>>,
    pub banner: Option<Option<String>>,
    pub bio: Option<Option<String>>,
}

/// Modify Guild Role's fields (absent = unchanged).
#[derive(Debug, Clone, Default)]
pub struct RoleEdit {
    pub name: Option<String>,
    pub permissions: Option<Permissions>,
    pub color: Option<u32>,
    pub hoist: Option<bool>,
    pub mentionable: Option<bool>,
}

/// Create Channel's settings beyond the model's core (`ChannelSettings`), and its
/// bitrate and position.
#[derive(Debug, Clone, Default)]
pub struct NewChannelExtras {
    pub bitrate: Option<u32>,
    pub position: Option<i64>,
    pub settings: ChannelSettings,
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

/// The fields of a channel-create request the world needs.
#[derive(Debug, Clone)]
pub struct NewChannel {
    pub name: String,
    pub kind: u8,
    pub parent_id: Option<u64>,
    pub user_limit: u32,
    pub overwrites: Vec<Overwrite>,
    pub extras: NewChannelExtras,
}

impl World {
    pub fn channel(&self, id: u64) -> Result<&Channel, Refusal> {
        self.channels.get(&id).ok_or(Refusal::UnknownChannel)
    }

    /// Whether the bot is a member of this guild.
    pub fn bot_in(&self) -> bool {
        self.members.contains_key(&self.bot_id)
    }
}
