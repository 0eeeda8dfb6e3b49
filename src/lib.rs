//! shindensen: a messenger backend. See the README for the API and
//! operations, and its Architecture section for how the modules fit.

pub mod app;
pub mod auth;
#[cfg(feature = "postgres")]
pub mod cluster;
pub mod config;
pub mod domain;
pub mod http;
pub mod ids;
pub mod limits;
pub mod ratelimit;
pub mod store;
pub mod telemetry;
pub mod ws;
