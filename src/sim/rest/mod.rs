//! The simulated REST API under `/api/v10`: the routes Coven uses, answered with
//! Discord's JSON and error codes, behind per-route rate limits and injected failures.
//!
//! Owns HTTP concerns only; every change is made through [`super::world::World`] and its
//! dispatches handed to the Gateway hub. Must not keep guild state of its own.

mod channels;
mod error;
mod extract;
mod guilds;
mod limits;
mod members;
mod roles;
mod users;

use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::middleware;
use axum::routing::{get, put};

use super::Shared;
use channels::*;
use guilds::*;
use members::*;
use roles::*;
use users::*;

pub use error::ApiError;
pub use limits::{Fault, Limits, Scope};

pub fn router(shared: Arc<Shared>) -> Router<Arc<Shared>> {
    let v10 = Router::new()
        .route("/gateway", get(gateway))
        .route("/gateway/bot", get(gateway_bot))
        .route("/oauth2/applications/@me", get(current_application))
        .route("/applications/@me", get(current_application))
        .route("/users/@me", get(current_user))
        .route("/users/{user}", get(get_user))
        .route("/guilds/{guild}", get(get_guild))
        .route("/users/@me/guilds", get(current_user_guilds))
        .route(
            "/users/@me/guilds/{guild}/member",
            get(current_user_guild_member),
        )
        .route(
            "/guilds/{guild}/channels",
            get(list_channels).post(create_channel).patch(move_channels),
        )
        .route(
            "/channels/{channel}",
            get(get_channel)
                .patch(update_channel)
                .delete(delete_channel),
        )
        .route(
            "/channels/{channel}/permissions/{overwrite}",
            put(set_overwrite).delete(delete_overwrite),
        )
        .route(
            "/guilds/{guild}/roles",
            get(get_roles).post(create_role).patch(move_roles),
        )
        .route(
            "/guilds/{guild}/roles/{role}",
            get(get_role).delete(delete_role).patch(update_role),
        )
        .route("/guilds/{guild}/members", get(list_members))
        .route(
            "/guilds/{guild}/members/{user}",
            get(get_member)
                .put(add_member)
                .patch(modify_member)
                .delete(remove_member),
        )
        .route(
            "/guilds/{guild}/members/{user}/roles/{role}",
            put(add_member_role).delete(remove_member_role),
        )
        .route("/guilds/{guild}/voice-states/{user}", get(get_voice_state))
        .merge(super::oauth::token_routes())
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, 0, "405: Method Not Allowed")
        });
    Router::new()
        .nest("/api/v10", v10)
        .merge(super::oauth::token_routes_unversioned())
        .layer(middleware::from_fn_with_state(shared, limits::limit))
}
