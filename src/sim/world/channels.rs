//! Channel changes: create, modify, delete, and permission overwrites, each with the
//! checks Discord applies and the dispatches it sends.
//!
//! Computes no permissions itself (see `permissions`) and builds no JSON (see `wire`).

use serde_json::Value;
use twilight_model::guild::Permissions;

use super::{
    Channel, ChannelEdit, Dispatch, NewChannel, Overwrite, Refusal, VoiceFlags, World, check_name,
    check_user_limit, kind,
};

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
            self.require(have, Permissions::MANAGE_CHANNELS)?;
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
