//! The world's JSON as Discord documents it: what REST answers and the Gateway
//! dispatches (ids as strings, bitsets as decimal strings, obfuscated channels), and the
//! request shapes REST and the control API read.
//!
//! Shapes only; must not decide who may see or do what beyond asking `permissions`.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::{Channel, Dispatch, Overwrite, Refusal, Role, RoleEdit, User, Voice, World, kind};
use twilight_model::guild::Permissions;

/// Channel flags (Discord's numbering).
pub mod channel_flag {
    /// Set on a channel dispatched to a bot that cannot view it ("Obfuscated Channels").
    pub const OBFUSCATED: u64 = 1 << 17;
}

/// The name Discord gives an obfuscated channel.
pub const HIDDEN_NAME: &str = "___hidden___";

impl World {
    /// A channel event as the bot receives it (obfuscated when it cannot view it).
    pub(super) fn channel_dispatch(&self, name: &'static str, c: &Channel) -> Dispatch {
        Dispatch {
            name,
            data: self.channel_json_for_bot(c, true),
        }
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
            "avatar": m.avatar,
            "banner": m.banner,
            "roles": m.roles.iter().map(u64::to_string).collect::<Vec<_>>(),
            "joined_at": m.joined_at,
            "premium_since": null,
            "deaf": m.deaf,
            "mute": m.mute,
            "flags": m.flags,
            "pending": false,
            "communication_disabled_until": m.communication_disabled_until,
            "avatar_decoration_data": null,
            "collectibles": null,
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
                "deny": Permissions::VIEW_CHANNEL,
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
                "allow": o.allow,
                "deny": o.deny,
            })).collect::<Vec<_>>(),
        });
        let s = &c.settings;
        v["nsfw"] = json!(s.nsfw);
        if kind::is_voice(c.kind) {
            v["user_limit"] = json!(c.user_limit);
            v["bitrate"] = json!(c.bitrate);
            v["rtc_region"] = json!(s.rtc_region);
            v["rate_limit_per_user"] = json!(s.rate_limit_per_user);
            // "video_quality_mode?": absent until set, as Discord sends it.
            if let Some(q) = s.video_quality_mode {
                v["video_quality_mode"] = json!(q);
            }
        } else if c.kind == kind::TEXT {
            v["topic"] = json!(s.topic);
            v["rate_limit_per_user"] = json!(s.rate_limit_per_user);
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

    /// The guild object (guild resource, "Guild Object"), as REST and the advanced bot
    /// authorization's token response give it.
    pub fn guild_json(&self) -> Value {
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
            "roles": self.roles.values().map(role_json).collect::<Vec<_>>(),
            "emojis": [],
            "stickers": [],
        })
    }

    /// The GUILD_CREATE payload: the guild object and the Gateway's extra fields. Without
    /// the voice-states intent Discord sends no voice states; without GUILD_MEMBERS it
    /// sends only the members it must (the bot and those in voice).
    pub fn guild_create_json(&self, with_voice: bool) -> Value {
        let mut member_ids: BTreeSet<u64> = [self.bot_id].into_iter().collect();
        if with_voice {
            member_ids.extend(self.voice.keys().copied());
        }
        let mut guild = self.guild_json();
        let extra = json!({
            "joined_at": "2024-01-01T00:00:00.000000+00:00",
            "large": false,
            "unavailable": false,
            "member_count": self.members.len(),
            "channels": self.channels.values().map(|c| self.channel_json_for_bot(c, false)).collect::<Vec<_>>(),
            "threads": [],
            "members": member_ids.iter().filter_map(|u| self.member_json(*u)).collect::<Vec<_>>(),
            "voice_states": if with_voice {
                self.voice.iter().map(|(u, v)| self.voice_json(*u, Some(v.channel_id), v, false)).collect::<Vec<_>>()
            } else { Vec::new() },
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
        });
        if let (Some(g), Value::Object(extra)) = (guild.as_object_mut(), extra) {
            g.extend(extra);
        }
        guild
    }
}

/// A permission bitset as Discord writes it (a decimal string); numbers are accepted
/// too, and `null` means none, as Discord's overwrite objects allow. Bits Discord does
/// not define are dropped, as twilight-model drops them.
pub fn bits_from_json(v: &Value) -> Option<Permissions> {
    let bits = match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        Value::Null => Some(0),
        _ => None,
    };
    bits.map(Permissions::from_bits_truncate)
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
        .map_or(Some(Permissions::empty()), bits_from_json)
        .ok_or("allow")?;
    let deny = o
        .get("deny")
        .map_or(Some(Permissions::empty()), bits_from_json)
        .ok_or("deny")?;
    Ok(Overwrite {
        id,
        kind,
        allow,
        deny,
    })
}

/// Create and Modify Guild Role's JSON body; every field is optional and nullable (a
/// null name or permissions reads as "unchanged", a null color as no colour). `colors`
/// (the "Role Colors Object") sets the colour through `primary_color`; its other two
/// "can only be set to a non-null value if the guild has the ENHANCED_ROLE_COLORS guild
/// feature", and `icon`/`unicode_emoji` need ROLE_ICONS: the simulated guilds have
/// neither feature, so a value there is refused, never dropped.
pub fn role_edit_from_json(req: &serde_json::Map<String, Value>) -> Result<RoleEdit, Refusal> {
    let wrong = |field: &'static str| {
        Refusal::Invalid(
            field,
            "BASE_TYPE_INVALID",
            "Value is of the wrong type.".to_owned(),
        )
    };
    let flag = |field: &'static str| match req.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(wrong(field)),
    };
    let rgb = |field: &'static str, v: &Value| {
        v.as_u64()
            .and_then(|c| u32::try_from(c).ok())
            .filter(|c| *c <= 0xFF_FFFF)
            .ok_or_else(|| wrong(field))
    };
    let mut color = match req.get("color") {
        None => None,
        Some(Value::Null) => Some(0),
        Some(v) => Some(rgb("color", v)?),
    };
    match req.get("colors") {
        None | Some(Value::Null) => {}
        Some(Value::Object(colors)) => {
            for extra in ["secondary_color", "tertiary_color"] {
                if colors.get(extra).is_some_and(|v| !v.is_null()) {
                    return Err(Refusal::Invalid(
                        "colors",
                        "GUILD_FEATURE_REQUIRED",
                        "This guild lacks the ENHANCED_ROLE_COLORS feature.".to_owned(),
                    ));
                }
            }
            match colors.get("primary_color") {
                None => {}
                Some(Value::Null) => color = Some(0),
                Some(v) => color = Some(rgb("colors", v)?),
            }
        }
        Some(_) => return Err(wrong("colors")),
    }
    for (field, what) in [("icon", "icon"), ("unicode_emoji", "unicode emoji")] {
        if req.get(field).is_some_and(|v| !v.is_null()) {
            return Err(Refusal::Invalid(
                field,
                "GUILD_FEATURE_REQUIRED",
                format!("A role {what} needs the ROLE_ICONS feature, which this guild lacks."),
            ));
        }
    }
    Ok(RoleEdit {
        name: match req.get("name") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(wrong("name")),
        },
        permissions: match req.get("permissions") {
            None | Some(Value::Null) => None,
            Some(v) => Some(bits_from_json(v).ok_or_else(|| wrong("permissions"))?),
        },
        color,
        hoist: flag("hoist")?,
        mentionable: flag("mentionable")?,
    })
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
        "avatar_decoration_data": null,
        "collectibles": null,
        "primary_guild": null,
    });
    if u.bot {
        v["bot"] = json!(true);
    }
    v
}

pub fn role_json(r: &Role) -> Value {
    let mut role = json!({
        "id": r.id.to_string(),
        "name": r.name,
        "color": r.color,
        "colors": {"primary_color": r.color, "secondary_color": null, "tertiary_color": null},
        "hoist": r.hoist,
        "icon": null,
        "unicode_emoji": null,
        "position": r.position,
        "permissions": r.permissions,
        "managed": r.managed,
        "mentionable": r.mentionable,
        "flags": 0,
    });
    // `tags` is optional, and only a managed role has any here.
    if let Some(bot) = r.bot {
        role["tags"] = json!({"bot_id": bot.to_string()});
    }
    role
}
