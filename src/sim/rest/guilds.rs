//! Guild routes: the guild object (Get Guild).
//!
//! Reads the world only; must not change it.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;

use super::error::{ApiError, ApiResult};
use super::extract::{Bot, bot_guild};
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

/// A boolean query string param, as the Reference's "Boolean Query Strings" reads one:
/// `True`, `true` or `1`, and `False`, `false` or `0`.
pub(super) fn boolean_query(name: &str, raw: Option<&str>) -> ApiResult<bool> {
    match raw {
        None | Some("false" | "False" | "0") => Ok(false),
        Some("true" | "True" | "1") => Ok(true),
        Some(_) => Err(ApiError::invalid_field(
            name,
            "BASE_TYPE_BOOLEAN",
            "Must be either true or false.",
        )),
    }
}
