//! imgate: an instant-messaging gateway.
//!
//! The crate is layered so every protocol rule can be tested without a network:
//! - [`ws`]: the WebSocket protocol as sans-IO state machines.
//! - [`server`]: the single-threaded mio shell that owns sockets and time.
//! - [`buffer_pool`]: the free list that lets idle connections hold no buffers.

pub mod buffer_pool;
pub mod config;
pub mod im;
pub mod server;
pub mod store;
pub mod web;
pub mod ws;
