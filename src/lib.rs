//! Coven: a Discord community's voice rooms on the web, live.
//!
//! One binary, several commands (see [`cli`]). Each module owns one part of the system;
//! its header says what it owns and what it must not touch.

#![recursion_limit = "256"]

pub mod access;
pub mod bus;
pub mod cli;
pub mod config;
pub mod demo;
pub mod discord;
pub mod event;
pub mod gateway;
pub mod prometheus;
pub mod publish;
pub mod sim;
pub mod telemetry;
pub mod web;
