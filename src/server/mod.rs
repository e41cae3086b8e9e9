//! The mio reactor around the [`crate::gateway::Gateway`]: listeners, sockets, the storage
//! thread's waker, signals and the clock. It knows nothing about WebSocket, HTTP or IM.
//!
//! - [`reactor`]: the poll loop.
//! - [`signals`]: SIGINT/SIGTERM into the loop.
//! - [`rlimit`]: the open-file limit raised at start.

mod reactor;
pub mod rlimit;
mod signals;

pub use reactor::Server;
