//! The real-time protocol behind `GET /ws` (README "WebSocket").
//!
//! * [`connection`]: one connection's loop: a reader half (frames in) and
//!   a writer half (frames out, pings, the close frame).
//! * [`send`](mod@send): a connection's sends, from frame to ack.
//! * [`resume`]: `?since=` replay and its merge with live traffic.
//! * [`hub`]: fan-out of committed messages to this node's connections.
//! * [`protocol`]: the frames.
//!
//! The HTTP upgrade itself (authentication, buffer sizes) is `http::ws`.

pub mod connection;
pub mod hub;
pub mod protocol;
mod resume;
mod send;

pub use connection::{CloseReason, ConnControl, serve};
pub use hub::Hub;
