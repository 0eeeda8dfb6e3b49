//! Black-box tests: the real application on port 0, a fresh SQLite file per
//! test, spoken to over HTTP (and WebSocket).

mod helpers;
mod process;

mod accounts;
mod chats;
mod errors;
mod history;
mod lifecycle;
mod operations;
mod store_writer;
mod tokens;
mod ws;
mod ws_delivery;
