//! SIGINT and SIGTERM as a readable event in the poll loop (the self-pipe pattern).
//!
//! The signal handler only writes a byte to a socket pair; the loop sees the read end become
//! readable and starts a graceful shutdown on its own time. No flag polling, no extra thread.

use std::io::{self, Read};
use std::os::unix::net::UnixStream as StdUnixStream;

use mio::net::UnixStream;
use mio::{Interest, Registry, Token};

pub struct ShutdownSignals {
    read: UnixStream,
    handlers: Vec<signal_hook::SigId>,
}

impl ShutdownSignals {
    /// Installs handlers for SIGINT and SIGTERM and registers the pipe under `token`.
    pub fn register(registry: &Registry, token: Token) -> io::Result<Self> {
        let (read, write) = StdUnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        let mut handlers = Vec::new();
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            handlers.push(signal_hook::low_level::pipe::register(
                sig,
                write.try_clone()?,
            )?);
        }
        let mut read = UnixStream::from_std(read);
        registry.register(&mut read, token, Interest::READABLE)?;
        Ok(ShutdownSignals { read, handlers })
    }

    /// Drains the pipe; returns whether any signal arrived.
    pub fn take(&mut self) -> bool {
        let mut buf = [0u8; 64];
        let mut any = false;
        loop {
            match self.read.read(&mut buf) {
                Ok(0) => return any,
                Ok(_) => any = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return any,
            }
        }
    }
}

impl Drop for ShutdownSignals {
    fn drop(&mut self) {
        for id in self.handlers.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}
