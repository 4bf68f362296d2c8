//! The bot joining a guild (OAuth2 bot authorization) and leaving it (removed by an
//! admin).
//!
//! Dispatches nothing itself: the bot learns of both through GUILD_CREATE and
//! GUILD_DELETE, which the caller sends, since they go to the bot's sessions whatever
//! the guild's state.

use std::collections::BTreeSet;

use super::{Member, Role, World};
use twilight_model::guild::Permissions;

impl World {
    /// The bot joins. Discord gives it a managed role named after it holding the
    /// requested `permissions`, or no role when none were requested ("Bot Authorization
    /// Flow": `permissions` are what the bot's role gets). `false` when it was in already.
    pub fn add_bot(&mut self, permissions: Permissions) -> bool {
        if self.bot_in() {
            return false;
        }
        let mut roles = BTreeSet::new();
        if !permissions.is_empty() {
            let id = self.ids.mint();
            let position = self.roles.values().map(|r| r.position).max().unwrap_or(0) + 1;
            let name = self
                .users
                .get(&self.bot_id)
                .map_or_else(|| "Coven".to_owned(), |u| u.username.clone());
            self.roles.insert(
                id,
                Role {
                    id,
                    name,
                    permissions,
                    position,
                    color: 0,
                    hoist: false,
                    mentionable: false,
                    managed: true,
                    bot: Some(self.bot_id),
                },
            );
            roles.insert(id);
        }
        self.members.insert(self.bot_id, Member::new(roles));
        true
    }

    /// The bot is removed: out of voice, no longer a member, its managed role gone with
    /// it. `false` when it was not in the guild.
    pub fn remove_bot(&mut self) -> bool {
        let Some(member) = self.members.remove(&self.bot_id) else {
            return false;
        };
        self.voice.remove(&self.bot_id);
        for role in member.roles {
            if self.roles.get(&role).is_some_and(|r| r.managed) {
                self.roles.remove(&role);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    #[test]
    fn the_bot_leaves_with_its_managed_role_and_comes_back_with_the_asked_permissions() {
        let mut w = world();
        let managed = |w: &World| w.roles.values().filter(|r| r.managed).count();
        assert!(w.bot_in());
        assert_eq!(managed(&w), 1);
        assert!(w.remove_bot());
        assert!(!w.bot_in() && !w.remove_bot());
        assert_eq!(managed(&w), 0);
        assert!(w.guild_permissions(w.bot_id).is_empty());

        let asked = Permissions::VIEW_CHANNEL | Permissions::MANAGE_CHANNELS;
        assert!(w.add_bot(asked));
        assert!(!w.add_bot(asked), "already in");
        assert_eq!(managed(&w), 1);
        assert!(w.guild_permissions(w.bot_id).contains(asked));

        w.remove_bot();
        assert!(w.add_bot(Permissions::empty()));
        assert_eq!(managed(&w), 0, "no permissions asked: no role");
    }
}
