//! Plumbing every page, post and stream goes through, and that knows no feature:
//! connections ([`conn`], with the [`lean`] event-stream path over [`io`]), the one
//! mapping of failures to responses ([`error`]), what every post must pass
//! ([`protect`]), embedded assets ([`assets`]) and the layers every answer gets
//! ([`ops`]: security headers, request timing, body deadlines).
//!
//! Owns HTTP mechanics. Must not import a feature or the live path: everything here
//! depends only on [`super::session`], [`super::view`] and crate-level modules.

pub mod assets;
pub mod conn;
pub mod error;
pub mod io;
pub mod lean;
pub mod ops;
pub mod protect;
