//! The mio shell: sockets, time and signals around the sans-IO protocol core.
//!
//! - [`event_loop`]: the poll loop and its handlers.
//! - [`admin`]: the admin HTTP API's routing (sans-IO).
//! - [`conn`]: per-socket shell state.
//! - [`metrics`]: counters and histograms for `GET /metrics`.
//! - [`outbox`]: unsent output, pooled and written with vectored writes.
//! - [`timer_wheel`]: O(1) timers for handshakes, keep-alives and closes.
//! - [`signals`]: SIGINT/SIGTERM into the loop.
//! - [`transport`]: WebSocket or length-prefixed raw TCP framing.

pub mod admin;
pub mod conn;
pub mod event_loop;
pub mod metrics;
pub mod outbox;
pub mod rlimit;
pub mod signals;
pub mod timer_wheel;
pub mod transport;

pub use event_loop::Server;
