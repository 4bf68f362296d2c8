//! Role changes: create, modify, delete, and granting or taking a member's role, with
//! Discord's permission hierarchy.
//!
//! Computes no permissions itself (see `permissions`) and builds no JSON (see `wire`).

use serde_json::{Value, json};

use super::permissions::rank;
use super::wire::role_json;
use super::{Dispatch, Refusal, Role, RoleEdit, World, check_name};
use twilight_model::guild::Permissions;

impl World {
    pub fn create_role(
        &mut self,
        actor: Option<u64>,
        name: Option<String>,
        permissions: Permissions,
        color: u32,
        hoist: bool,
        mentionable: bool,
    ) -> Result<(Value, Vec<Dispatch>), Refusal> {
        let name = name.unwrap_or_else(|| "new role".to_owned());
        check_name(&name)?;
        if let Some(actor) = actor {
            let have = self.guild_permissions(actor);
            self.require(have, Permissions::MANAGE_ROLES)?;
            self.require(have, permissions)?;
        }
        let id = self.ids.mint();
        // A new role takes position 1, just above @everyone. The others keep theirs:
        // Create Guild Role fires only GUILD_ROLE_CREATE, and "roles with the same
        // position are sorted by id" (Permissions, "Role Object"), so ties are Discord's.
        let role = Role {
            id,
            name,
            permissions,
            position: 1,
            color,
            hoist,
            mentionable,
            managed: false,
            bot: None,
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
            let have = self.guild_permissions(actor);
            self.require(have, Permissions::MANAGE_ROLES)?;
            if rank(role) >= self.top_rank(actor) {
                return Err(Refusal::MissingPermission(Permissions::MANAGE_ROLES));
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
                role.permissions = p;
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
            self.require(self.guild_permissions(actor), Permissions::MANAGE_ROLES)?;
            if rank(role) >= self.top_rank(actor) {
                return Err(Refusal::MissingPermission(Permissions::MANAGE_ROLES));
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

    /// Modify Guild Role Positions: `(role, position)` pairs. MANAGE_ROLES, and the
    /// Permission Hierarchy: only roles below the bot's highest, and only to places below
    /// it. @everyone stays at 0. The other roles keep their positions (ties are Discord's:
    /// "roles with the same position are sorted by id"); a GUILD_ROLE_UPDATE for each role
    /// that moved.
    pub fn move_roles(
        &mut self,
        actor: Option<u64>,
        moves: &[(u64, i64)],
    ) -> Result<Vec<Dispatch>, Refusal> {
        let top = actor.map(|a| self.top_rank(a));
        if let Some(actor) = actor {
            self.require(self.guild_permissions(actor), Permissions::MANAGE_ROLES)?;
        }
        for (id, position) in moves {
            let role = self.roles.get(id).ok_or(Refusal::UnknownRole)?;
            if *id == self.guild_id {
                return Err(Refusal::Invalid(
                    "id",
                    "ROLE_POSITION_INVALID",
                    "The @everyone role cannot be moved.".to_owned(),
                ));
            }
            if top.is_some_and(|top| rank(role) >= top || *position >= top.0) {
                return Err(Refusal::MissingPermission(Permissions::MANAGE_ROLES));
            }
        }
        let before: Vec<(u64, i64)> = self.roles.values().map(|r| (r.id, r.position)).collect();
        for (id, position) in moves {
            if let Some(r) = self.roles.get_mut(id) {
                r.position = (*position).max(1);
            }
        }
        let guild_id = self.guild_id.to_string();
        Ok(before
            .into_iter()
            .filter_map(|(id, was)| self.roles.get(&id).filter(|r| r.position != was))
            .map(|r| Dispatch {
                name: "GUILD_ROLE_UPDATE",
                data: json!({"guild_id": guild_id, "role": role_json(r)}),
            })
            .collect())
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
            self.require(self.guild_permissions(actor), Permissions::MANAGE_ROLES)?;
            if rank(role) >= self.top_rank(actor) {
                return Err(Refusal::MissingPermission(Permissions::MANAGE_ROLES));
            }
        }
        if role.managed || role_id == self.guild_id {
            return Err(match actor {
                Some(_) => Refusal::MissingPermission(Permissions::MANAGE_ROLES),
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
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::*;
    use crate::sim::world::seed::EVERYONE_PERMISSIONS;

    #[test]
    fn role_changes_that_flip_the_bots_view_send_channel_updates() {
        let mut w = world();
        let bot = w.bot_id;
        let (role, _) = w
            .create_role(
                None,
                Some("seer".into()),
                Permissions::empty(),
                0,
                false,
                false,
            )
            .unwrap();
        let role: u64 = role["id"].as_str().unwrap().parse().unwrap();
        let new = NewChannel {
            extras: Default::default(),
            name: "vault".into(),
            kind: kind::VOICE,
            parent_id: None,
            user_limit: 0,
            overwrites: vec![
                Overwrite {
                    id: w.guild_id,
                    kind: 0,
                    allow: Permissions::empty(),
                    deny: Permissions::VIEW_CHANNEL,
                },
                Overwrite {
                    id: role,
                    kind: 0,
                    allow: Permissions::VIEW_CHANNEL,
                    deny: Permissions::empty(),
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
        let no_view = |p: Permissions| RoleEdit {
            permissions: Some(p - Permissions::VIEW_CHANNEL),
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
}
