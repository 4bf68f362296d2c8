//! Integration tests: one binary, one module per area. Every Coven component here is the
//! real one on real sockets; Discord is played by `coven sim`, Redis is a private
//! `redis-server` per test that needs one.

// A test's failed assumption is a failed test: unwrap and expect say where.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

mod a11y;
mod browser;
mod bus;
mod cli;
mod clients;
mod clients_js;
mod cluster;
mod communities;
mod demo;
mod deploy;
mod edges;
mod gateway;
mod ha;
mod login;
mod ownership;
mod pages;
mod rooms;
mod shards;
mod sim_gateway;
mod sim_oauth;
mod sim_params;
mod sim_rest;
mod site;
mod tls;
mod traces;
mod trust;
mod web;
