//! The IM domain as a sans-IO core: frames and events in, frames and store writes out.

pub mod auth;
pub mod core;
pub mod proto;
pub mod tcp_framing;
pub mod wire;
