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
    /// Arguments beyond the common ones, kept for restarts.
    extra: Vec<String>,
    pub port: u16,
}

impl RedisProc {
    /// Starts a Redis with AOF `always` in a new temporary folder.
    ///
    /// Panics when `redis-server` is missing (tests/run.sh installs Debian's) or does not
    /// come up within 10 s.
    pub fn start() -> RedisProc {
        RedisProc::start_with(&[])
    }

    /// [`RedisProc::start`] with more arguments for `redis-server`.
    pub fn start_with(extra: &[&str]) -> RedisProc {
        let dir = super::temp_data_dir();
        std::fs::create_dir_all(&dir).expect("create the Redis folder");
        let mut r = RedisProc {
            child: None,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
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
            .args(&self.extra)
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

/// A Redis Cluster of `RedisProc`s, every one a primary (no replicas), made with
/// `redis-cli --cluster create`; all killed on drop.
pub struct RedisCluster {
    pub nodes: Vec<RedisProc>,
}

impl RedisCluster {
    /// Starts `primaries` nodes, joins them into a cluster that covers every slot, and waits
    /// until each node reports the cluster up.
    pub fn start(primaries: usize) -> RedisCluster {
        let nodes: Vec<RedisProc> = (0..primaries)
            .map(|_| {
                RedisProc::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .expect("run redis-cli --cluster create");
        assert!(status.success(), "redis-cli --cluster create failed");
        let c = RedisCluster { nodes };
        c.wait_until_up();
        c
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }

    /// Kills every node with SIGKILL, then starts each again on its port and folder (its AOF
    /// and its view of the cluster), and waits until the cluster is up again.
    pub fn restart_all(&mut self) {
        for n in &mut self.nodes {
            n.kill9();
        }
        for n in &mut self.nodes {
            n.restart();
        }
        self.wait_until_up();
    }

    fn wait_until_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.nodes.iter().all(|n| cluster_up(n.port)) {
            assert!(
                Instant::now() < deadline,
                "the Redis Cluster did not come up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Whether the node on `port` says `cluster_state:ok`.
fn cluster_up(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"CLUSTER INFO\r\n").is_err() {
        return false;
    }
    // A bulk string: `$<len>\r\n<len bytes>\r\n`.
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        let whole = text
            .strip_prefix('$')
            .and_then(|t| t.split_once("\r\n"))
            .and_then(|(len, rest)| Some(rest.len() >= len.parse::<usize>().ok()? + 2));
        if whole != Some(false) {
            break;
        }
    }
    String::from_utf8_lossy(&got).contains("cluster_state:ok")
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
