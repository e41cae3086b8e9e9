//! A real `redis-server` for the tests, on a free loopback port, with its data in a temporary
//! folder: AOF on and synced before every answer (`appendfsync always`), the configuration
//! docs/CLUSTER.md says an acknowledged message survives a crash under.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running Redis, killed (and its folder removed) on drop.
pub struct RedisProc {
    child: Option<Child>,
    dir: PathBuf,
    pub port: u16,
}

impl RedisProc {
    /// Starts a Redis with AOF `always` in a new temporary folder.
    ///
    /// Panics when `redis-server` is missing (tests/run.sh installs Debian's) or does not
    /// come up within 10 s.
    pub fn start() -> RedisProc {
        let dir = super::temp_data_dir();
        std::fs::create_dir_all(&dir).expect("create the Redis folder");
        let mut r = RedisProc {
            child: None,
            dir,
            port: 0,
        };
        r.spawn_on_a_free_port();
        r
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server with SIGKILL: what it acknowledged is in its AOF, nothing more.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and folder, so that it reads its AOF back.
    pub fn restart(&mut self) {
        self.kill9();
        assert!(
            self.spawn(self.port),
            "redis-server did not come back on its port"
        );
    }

    fn spawn_on_a_free_port(&mut self) {
        // A port found free may be taken before Redis binds it: then try another.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            if self.spawn(port) {
                self.port = port;
                return;
            }
        }
        panic!("redis-server did not start (is it installed? tests/run.sh installs it)");
    }

    /// Starts redis-server on `port`; whether it answers within 10 s.
    fn spawn(&mut self, port: u16) -> bool {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--save", "", "--daemonize", "no", "--protected-mode", "no"])
            .args(["--loglevel", "warning"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run redis-server (tests/run.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    self.child = None;
                    return false;
                }
            }
            if ping(port) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        false
    }
}

/// Whether a Redis on `port` answers PING with PONG (and is done loading its AOF).
fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
