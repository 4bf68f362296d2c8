//! Guild routes: the guild object (Get Guild).
//!
//! Reads the world only; must not change it.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;

use super::error::ApiResult;
use super::extract::{Bot, boolean_query, bot_guild};
use crate::sim::Shared;

#[derive(Deserialize)]
pub(super) struct GuildQuery {
    with_counts: Option<String>,
}

/// Get Guild: the guild object; `with_counts=true` adds `approximate_member_count` and
/// `approximate_presence_count` (the simulator has no presences: everyone in voice counts
/// as online).
pub(super) async fn get_guild(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path(g): Path<String>,
    Query(q): Query<GuildQuery>,
) -> ApiResult {
    let with_counts = boolean_query("with_counts", q.with_counts.as_deref())?;
    let mut state = shared.lock();
    let (_, w) = bot_guild(&mut state, &g)?;
    let mut guild = w.guild_json();
    if with_counts {
        guild["approximate_member_count"] = json!(w.members.len());
        guild["approximate_presence_count"] = json!(w.voice.len());
    }
    Ok(axum::Json(guild).into_response())
}
