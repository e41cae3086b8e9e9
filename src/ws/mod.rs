//! The WebSocket protocol (RFC 6455) as pure state machines: no sockets, no clocks.
//!
//! - [`handshake`]: the HTTP Upgrade request and its answers.
//! - [`frame`]: frame headers, masking, server frame encoding.
//! - [`utf8`]: incremental UTF-8 validation for text messages.
//! - [`connection`]: one connection's lifecycle, from the first request byte to the TCP close.
//! - [`error`]: protocol violations and the close code each one maps to.
//! - `flood`: the per-second allowance for frames that carry no data.

pub mod connection;
pub mod error;
mod flood;
pub mod frame;
pub mod handshake;
pub mod utf8;

pub use connection::{Connection, Event, Failure, MessageKind, Progress, State};
pub use error::{code, WsError};
