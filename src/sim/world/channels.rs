//! Channel changes: create, modify, delete, and permission overwrites, each with the
//! checks Discord applies and the dispatches it sends.
//!
//! Computes no permissions itself (see `permissions`) and builds no JSON (see `wire`).

use serde_json::Value;
use twilight_model::guild::Permissions;

use super::{
    Channel, ChannelEdit, ChannelSettings, Dispatch, NewChannel, Overwrite, Refusal, VoiceFlags,
    World, check_name, check_user_limit, kind,
};

/// Voice region ids Discord lists (List Voice Regions); `rtc_region` takes one of them.
const REGIONS: &[&str] = &[
    "brazil",
    "hongkong",
    "india",
    "japan",
    "rotterdam",
    "russia",
    "singapore",
    "south-korea",
    "southafrica",
    "sydney",
    "us-central",
    "us-east",
    "us-south",
    "us-west",
];

fn invalid(field: &'static str, code: &'static str, message: String) -> Refusal {
    Refusal::Invalid(field, code, message)
}

/// The bounds Modify Channel documents for a voice or stage channel's bitrate: "min
/// 8000"; "normal servers can set bitrate up to 96000 ... For stage channels, bitrate can
/// be set up to 64000" (the simulated guilds have no boosts).
fn check_bitrate(kind: u8, bitrate: u32) -> Result<(), Refusal> {
    let max = if kind == kind::STAGE { 64_000 } else { 96_000 };
    if bitrate < 8_000 {
        Err(invalid(
            "bitrate",
            "NUMBER_TYPE_MIN",
            "int value should be greater than or equal to 8000.".to_owned(),
        ))
    } else if bitrate > max {
        Err(invalid(
            "bitrate",
            "NUMBER_TYPE_MAX",
            format!("int value should be less than or equal to {max}."),
        ))
    } else {
        Ok(())
    }
}

/// The settings' documented bounds (Modify Channel's JSON params): topic 0-1024
/// characters, slowmode 0-21600 s, a listed voice region, video quality mode 1 or 2.
fn check_settings(
    topic: Option<&str>,
    slowmode: Option<u32>,
    region: Option<&str>,
    video: Option<u8>,
) -> Result<(), Refusal> {
    if topic.is_some_and(|t| t.chars().count() > 1024) {
        return Err(invalid(
            "topic",
            "BASE_TYPE_MAX_LENGTH",
            "Must be 1024 or fewer in length.".to_owned(),
        ));
    }
    if slowmode.is_some_and(|s| s > 21_600) {
        return Err(invalid(
            "rate_limit_per_user",
            "NUMBER_TYPE_MAX",
            "int value should be less than or equal to 21600.".to_owned(),
        ));
    }
    if region.is_some_and(|r| !REGIONS.contains(&r)) {
        return Err(invalid(
            "rtc_region",
            "BASE_TYPE_CHOICES",
            format!("Value must be one of {REGIONS:?}."),
        ));
    }
    if video.is_some_and(|v| !(1..=2).contains(&v)) {
        return Err(invalid(
            "video_quality_mode",
            "BASE_TYPE_CHOICES",
            "Value must be one of {1, 2}.".to_owned(),
        ));
    }
    Ok(())
}

impl World {
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
        let extras = new.extras;
        if let Some(b) = extras.bitrate
            && kind::is_voice(new.kind)
        {
            check_bitrate(new.kind, b)?;
        }
        check_settings(
            extras.settings.topic.as_deref(),
            Some(extras.settings.rate_limit_per_user),
            extras.settings.rtc_region.as_deref(),
            extras.settings.video_quality_mode,
        )?;
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
            let have = self.guild_permissions(actor);
            self.require(have, Permissions::MANAGE_CHANNELS)?;
            if !new.overwrites.is_empty() {
                self.require(have, Permissions::MANAGE_ROLES)?;
                // Change log 2021-01-22: overwrites in a new channel need the bot to
                // have the permissions it applies (in the guild), and only
                // administrators may set MANAGE_ROLES in them.
                for o in &new.overwrites {
                    let bits = o.allow | o.deny;
                    if !have.contains(Permissions::ADMINISTRATOR)
                        && bits.contains(Permissions::MANAGE_ROLES)
                    {
                        return Err(Refusal::MissingPermission(Permissions::MANAGE_ROLES));
                    }
                    self.require(have, bits)?;
                }
            }
        }
        let id = self.ids.mint();
        let position = extras.position.unwrap_or_else(|| {
            self.channels
                .values()
                .map(|c| c.position)
                .max()
                .unwrap_or(0)
                + 1
        });
        let voice = kind::is_voice(new.kind);
        let channel = Channel {
            id,
            kind: new.kind,
            name,
            parent_id: new.parent_id,
            position,
            user_limit: if voice { new.user_limit } else { 0 },
            bitrate: if voice {
                extras.bitrate.unwrap_or(64_000)
            } else {
                0
            },
            overwrites: new.overwrites,
            settings: applicable(new.kind, extras.settings),
        };
        let event = self.channel_dispatch("CHANNEL_CREATE", &channel);
        self.channels.insert(id, channel);
        Ok((id, vec![event]))
    }

    /// Modify Channel (guild channel params): every documented field is checked and
    /// kept; the fields a channel type does not have (Modify Channel's "Channel Type"
    /// column) are left alone, as Discord leaves them.
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
        if let Some(b) = edit.bitrate
            && kind::is_voice(channel.kind)
        {
            check_bitrate(channel.kind, b)?;
        }
        check_settings(
            edit.topic.as_ref().and_then(Option::as_deref),
            edit.rate_limit_per_user,
            edit.rtc_region.as_ref().and_then(Option::as_deref),
            edit.video_quality_mode,
        )?;
        if let Some(list) = &edit.overwrites {
            self.check_overwrite_targets(list)?;
        }
        if let Some(Some(parent)) = edit.parent_id {
            self.check_parent(channel, parent)?;
        }
        if let Some(actor) = actor {
            let have = self.channel_permissions(actor, channel);
            self.require(have, Permissions::MANAGE_CHANNELS)?;
            if let Some(Some(parent)) = edit.parent_id {
                let parent = self.channel(parent)?;
                self.require(
                    self.channel_permissions(actor, parent),
                    Permissions::MANAGE_CHANNELS,
                )?;
            }
            if let Some(list) = &edit.overwrites {
                // "If modifying permission overwrites, the MANAGE_ROLES permission is
                // required", and only what changes is allowed or denied anew.
                self.require(have, Permissions::MANAGE_ROLES)?;
                let mut changed = Permissions::empty();
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
        if let Some(p) = edit.position {
            channel.position = p;
        }
        if let Some(parent) = edit.parent_id
            && channel.kind != kind::CATEGORY
        {
            channel.parent_id = parent;
        }
        if let Some(b) = edit.bitrate
            && kind::is_voice(channel.kind)
        {
            channel.bitrate = b;
        }
        let mut settings = channel.settings.clone();
        if let Some(t) = edit.topic {
            settings.topic = t;
        }
        if let Some(n) = edit.nsfw {
            settings.nsfw = n;
        }
        if let Some(r) = edit.rate_limit_per_user {
            settings.rate_limit_per_user = r;
        }
        if let Some(r) = edit.rtc_region {
            settings.rtc_region = r;
        }
        if let Some(v) = edit.video_quality_mode {
            settings.video_quality_mode = Some(v);
        }
        channel.settings = applicable(channel.kind, settings);
        let channel = channel.clone();
        Ok(vec![self.channel_dispatch("CHANNEL_UPDATE", &channel)])
    }

    /// A channel's new parent must be a category, and a category has none.
    fn check_parent(&self, channel: &Channel, parent: u64) -> Result<(), Refusal> {
        match self.channels.get(&parent) {
            Some(p) if p.kind == kind::CATEGORY && channel.kind != kind::CATEGORY => Ok(()),
            _ => Err(invalid(
                "parent_id",
                "CHANNEL_PARENT_INVALID",
                "Category does not exist.".to_owned(),
            )),
        }
    }

    /// Modify Guild Channel Positions: each entry's position and parent, with the checks
    /// the route documents (MANAGE_CHANNELS; 40009 when more than one entry changes
    /// `parent_id`; `lock_permissions` copies the new parent's overwrites and needs
    /// MANAGE_ROLES). One CHANNEL_UPDATE per channel that changed.
    pub fn move_channels(
        &mut self,
        actor: Option<u64>,
        moves: &[ChannelMove],
    ) -> Result<Vec<Dispatch>, Refusal> {
        let reparented = moves
            .iter()
            .filter(|m| {
                m.parent_id
                    .is_some_and(|p| self.channels.get(&m.id).is_some_and(|c| c.parent_id != p))
            })
            .count();
        if reparented > 1 {
            return Err(Refusal::OneParentAtATime);
        }
        for m in moves {
            let channel = self.channels.get(&m.id).ok_or_else(|| {
                invalid(
                    "id",
                    "CHANNEL_INVALID",
                    format!("Unknown channel {}.", m.id),
                )
            })?;
            if let Some(Some(parent)) = m.parent_id {
                self.check_parent(channel, parent)?;
            }
            let Some(actor) = actor else { continue };
            let guild = self.guild_permissions(actor);
            let reparents = m.parent_id.is_some_and(|p| p != channel.parent_id);
            if !reparents {
                // "An entry that only changes position requires the MANAGE_CHANNELS
                // permission at the guild level (or on the channel's current parent
                // category). It does not require access to the individual channel."
                let on_parent = channel
                    .parent_id
                    .and_then(|p| self.channels.get(&p))
                    .is_some_and(|p| {
                        self.channel_permissions(actor, p)
                            .contains(Permissions::MANAGE_CHANNELS)
                    });
                if !on_parent {
                    self.require(guild, Permissions::MANAGE_CHANNELS)?;
                }
                continue;
            }
            // "An entry that changes parent_id requires MANAGE_CHANNELS on that channel and
            // on the destination ..., and the current user must be able to view the
            // channel. Otherwise the request fails with ... 50001."
            let here = self.channel_permissions(actor, channel);
            let there = match m.parent_id.flatten().and_then(|p| self.channels.get(&p)) {
                Some(p) => self.channel_permissions(actor, p),
                None => guild,
            };
            if !here.contains(Permissions::VIEW_CHANNEL | Permissions::MANAGE_CHANNELS)
                || !there.contains(Permissions::MANAGE_CHANNELS)
            {
                return Err(Refusal::MissingAccess);
            }
            if m.lock_permissions == Some(true) {
                self.require(guild, Permissions::MANAGE_ROLES)?;
            }
        }
        let mut out = Vec::new();
        for m in moves {
            let lock = m.lock_permissions == Some(true);
            let new_parent = m.parent_id;
            let inherited = new_parent
                .flatten()
                .and_then(|p| self.channels.get(&p))
                .map(|p| p.overwrites.clone());
            let Some(c) = self.channels.get_mut(&m.id) else {
                continue;
            };
            let before = c.clone();
            if let Some(p) = m.position {
                c.position = p;
            }
            if let Some(p) = new_parent
                && p != c.parent_id
            {
                c.parent_id = p;
                if lock {
                    c.overwrites = inherited.unwrap_or_default();
                }
            }
            if c.position != before.position
                || c.parent_id != before.parent_id
                || c.overwrites != before.overwrites
            {
                let c = c.clone();
                out.push(self.channel_dispatch("CHANNEL_UPDATE", &c));
            }
        }
        Ok(out)
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
            self.require(
                self.channel_permissions(actor, channel),
                Permissions::MANAGE_ROLES,
            )?;
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
            self.require(
                self.channel_permissions(actor, channel),
                Permissions::MANAGE_ROLES,
            )?;
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
                Permissions::MANAGE_CHANNELS,
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
}

/// One entry of Modify Guild Channel Positions.
#[derive(Debug, Clone, Default)]
pub struct ChannelMove {
    pub id: u64,
    pub position: Option<i64>,
    /// `Some(None)` moves the channel out of its category.
    pub parent_id: Option<Option<u64>>,
    pub lock_permissions: Option<bool>,
}

/// The settings a channel type has (Modify Channel's "Channel Type" column): a voice
/// channel has no topic, a category neither topic nor slowmode nor region.
fn applicable(k: u8, s: ChannelSettings) -> ChannelSettings {
    let voice = kind::is_voice(k);
    let texty = matches!(k, 0 | 5 | 15 | 16);
    ChannelSettings {
        topic: s.topic.filter(|_| texty),
        nsfw: s.nsfw && k != kind::CATEGORY,
        rate_limit_per_user: if texty || voice {
            s.rate_limit_per_user
        } else {
            0
        },
        rtc_region: s.rtc_region.filter(|_| voice),
        video_quality_mode: s.video_quality_mode.filter(|_| voice),
    }
}

/// The permission bits an overwrite edit allows or denies anew (or stops allowing or
/// denying), which are what Discord's grant rule looks at.
fn overwrite_change(old: Option<&Overwrite>, new: Option<&Overwrite>) -> Permissions {
    let none = (Permissions::empty(), Permissions::empty());
    let (oa, od) = old.map_or(none, |o| (o.allow, o.deny));
    let (na, nd) = new.map_or(none, |o| (o.allow, o.deny));
    oa.symmetric_difference(na) | od.symmetric_difference(nd)
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

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::*;
    use serde_json::{Value, json};

    #[test]
    fn room_overwrites_gate_voice_access() {
        let mut w = world();
        let bot = w.bot_id;
        let (role, _) = w
            .create_role(
                Some(bot),
                Some("room".into()),
                Permissions::empty(),
                0,
                false,
                false,
            )
            .unwrap();
        let role: u64 = role["id"].as_str().unwrap().parse().unwrap();
        let room_perms = Permissions::VIEW_CHANNEL | Permissions::CONNECT | Permissions::SPEAK;
        let (room, _) = w
            .create_channel(
                Some(bot),
                NewChannel {
                    extras: Default::default(),
                    name: "table".into(),
                    kind: kind::VOICE,
                    parent_id: Some(w.room_category_id),
                    user_limit: 1,
                    overwrites: vec![
                        Overwrite {
                            id: w.guild_id,
                            kind: 0,
                            allow: Permissions::empty(),
                            deny: Permissions::VIEW_CHANNEL | Permissions::CONNECT,
                        },
                        Overwrite {
                            id: role,
                            kind: 0,
                            allow: room_perms,
                            deny: Permissions::empty(),
                        },
                        Overwrite {
                            id: bot,
                            kind: 1,
                            allow: room_perms | Permissions::MOVE_MEMBERS,
                            deny: Permissions::empty(),
                        },
                    ],
                },
            )
            .unwrap();
        let (bramble, cinder) = (member_named(&w, "bramble"), member_named(&w, "cinder"));
        let none = VoiceFlags::default();
        assert_eq!(
            w.user_voice(bramble, Some(room), none.clone()).unwrap_err(),
            Refusal::MissingPermission(Permissions::VIEW_CHANNEL)
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
    fn a_channel_the_bot_cannot_view_is_dispatched_obfuscated() {
        let mut w = world();
        let new = NewChannel {
            extras: Default::default(),
            name: "secret".into(),
            kind: kind::VOICE,
            parent_id: Some(w.room_category_id),
            user_limit: 5,
            overwrites: vec![Overwrite {
                id: w.guild_id,
                kind: 0,
                allow: Permissions::empty(),
                deny: Permissions::VIEW_CHANNEL,
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
                    allow: Permissions::VIEW_CHANNEL,
                    deny: Permissions::empty(),
                },
            )
            .unwrap();
        assert_eq!(names(&events), ["CHANNEL_UPDATE"]);
        assert_eq!(events[0].data["name"], "secret");
        assert_eq!(events[0].data["user_limit"], 5);
        assert_eq!(events[0].data["flags"], 0);
    }
}
