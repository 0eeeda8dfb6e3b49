//! Black-box tests: the real application on port 0, a fresh database per
//! test (a SQLite file, or a PostgreSQL database when
//! `SHINDENSEN_TEST_POSTGRES` is set: see `db.rs`), spoken to over HTTP
//! (and WebSocket).

mod db;
mod helpers;
mod process;

mod accounts;
mod chats;
mod errors;
mod groups;
mod hardening;
mod history;
mod lifecycle;
mod operations;
mod postgres;
mod receipts;
mod reliability;
mod sessions;
mod store_writer;
mod tokens;
mod upgrade;
mod web;
mod ws;
mod ws_delivery;
