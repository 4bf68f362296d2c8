//! `coven gateway`: holds the guild's Discord Gateway session and turns what Discord
//! says into domain events on the bus.
//!
//! Owns the shard, the derivation of events from dispatches ([`derive`]), reconciling
//! after reconnects, the leader lease and the stored session. Must not serve pages or
//! call Discord's REST API on users' behalf (that is `web`).

pub mod derive;
