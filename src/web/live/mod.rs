//! The live path of a replica: the [`hub`] between the bus and every open stream, and
//! the two stream endpoints built on it, [`json`] (`/api/stream`) and [`html`]
//! (`/api/stream/html`).
//!
//! Reading order: [`frame`] (the bytes), [`hub`] (its opening comment gives the flow of
//! an event and of a stream, and the lock order), [`sight`] (what one stream may show),
//! [`replay`] and [`feed`] (before and after going live), then the endpoints. Beside
//! them: [`fragments`] (the HTML an event becomes, rendered once), [`presence`] (who is
//! viewing which room), [`freshness`] (the gateway as this replica sees it), [`roles`]
//! and [`recent`] (the hub's caches), [`query`] (the endpoints' parsed input).
//!
//! Owns everything that moves events to browsers. Must not change shared state beyond
//! counting viewers, and must not import a feature (rooms, pages, invites, login).

pub mod communities;
pub mod feed;
pub mod fragments;
pub mod frame;
pub mod freshness;
pub mod html;
pub mod hub;
pub mod json;
pub mod presence;
pub mod query;
pub mod recent;
pub mod replay;
pub mod roles;
pub mod sight;

pub use hub::Hub;
