//! imgate: an instant-messaging gateway.
//!
//! The crate is layered so every protocol rule can be tested without a network:
//! - [`ws`]: the WebSocket protocol as sans-IO state machines.
//! - [`gateway`]: every connection decision that is not a socket call (transports, services,
//!   deadlines, closes, flow control, admin exchanges, metrics), sans-IO.
//! - [`im`]: the IM domain: the core's sessions, sends and deliveries; tokens; the wire.
//! - [`store`]: the embedded store and its storage thread.
//! - [`server`]: the mio reactor that owns sockets and time.
//! - [`web`]: the web demo's pages and `/dev/*` routes.
//! - [`config`]: flags, variables and config files.
//! - [`buffer_pool`]: the free list that lets idle connections hold no buffers.

pub mod buffer_pool;
pub mod config;
pub mod gateway;
pub mod im;
pub mod server;
pub mod store;
pub mod web;
pub mod ws;
