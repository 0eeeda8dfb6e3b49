//! shindensen: a messenger backend. See the README for the API and operations.

pub mod app;
pub mod auth;
pub mod config;
pub mod http;
pub mod ratelimit;
pub mod store;
pub mod telemetry;
pub mod ws;
