//! Helpers for the loopback integration tests: run the real `imgate` binary on 127.0.0.1:0 and
//! talk to it.
#![allow(dead_code)]

pub mod im_client;
pub mod redis;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The JWT secret the test servers run with.
pub const SECRET: &str = "integration-test-secret";

/// A fresh data directory under the system temp dir, removed by [`ServerProc`] on drop
/// unless the test keeps it.
pub fn temp_data_dir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "imgate-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A running `imgate serve`, killed on drop.
pub struct ServerProc {
    child: Child,
    pub addr: SocketAddr,
    /// The admin HTTP API.
    pub admin: SocketAddr,
    /// The raw TCP listener, when started with `--tcp-listen`.
    pub tcp: Option<SocketAddr>,
    pub data_dir: std::path::PathBuf,
    pub keep_data: bool,
    /// The first line the server printed: where it listens, and its WebSocket endpoints.
    pub listening: String,
}

impl ServerProc {
    /// Starts `imgate serve --listen 127.0.0.1:0 ARGS...` and waits for its listening line.
    pub fn start(args: &[&str]) -> ServerProc {
        Self::start_with(args, |_| {})
    }

    pub fn start_with(args: &[&str], customize: impl FnOnce(&mut Command)) -> ServerProc {
        Self::start_in(temp_data_dir(), "127.0.0.1:0", args, customize)
    }

    /// Starts a server on `listen` with its store in `data_dir`.
    pub fn start_in(
        data_dir: std::path::PathBuf,
        listen: &str,
        args: &[&str],
        customize: impl FnOnce(&mut Command),
    ) -> ServerProc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_imgate"));
        cmd.args(["serve", "--listen", listen, "--log-level", "warn"])
            .args([
                "--jwt-secret",
                SECRET,
                "--admin-listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(&data_dir)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        customize(&mut cmd);
        let mut child = cmd.spawn().expect("spawn imgate");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Forward every line, and keep draining so the server never blocks on a full pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("imgate printed its listening line");
        let admin_line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("imgate printed its admin line");
        let admin = admin_line
            .split("http://")
            .nth(1)
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or_else(|| panic!("no admin address in {admin_line:?}"));
        let tcp = if args.contains(&"--tcp-listen") {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("imgate printed its raw TCP line");
            line.split("tcp://")
                .nth(1)
                .and_then(|a| a.trim().parse().ok())
        } else {
            None
        };
        let addr = line
            .split("ws://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        ServerProc {
            child,
            addr,
            admin,
            tcp,
            data_dir,
            keep_data: false,
            listening: line,
        }
    }

    /// One admin HTTP request; returns the whole response.
    pub fn admin_request(&self, method: &str, path: &str, headers: &str) -> String {
        self.admin_request_with_body(method, path, headers, "")
    }

    /// One admin HTTP request with a body (sent with its Content-Length).
    pub fn admin_request_with_body(
        &self,
        method: &str,
        path: &str,
        headers: &str,
        body: &str,
    ) -> String {
        let mut s = TcpStream::connect(self.admin).expect("connect admin");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let length = if body.is_empty() {
            String::new()
        } else {
            format!("Content-Length: {}\r\n", body.len())
        };
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}{length}\r\n{body}"
        )
        .unwrap();
        String::from_utf8_lossy(&read_until_closed(&mut s, CLOSE_WITHIN)).into_owned()
    }

    /// The server's stderr, when the test started it with `Stdio::piped()` there.
    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.stderr.take()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Kills the server with SIGKILL: nothing of it runs after this returns.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        self.wait(within).expect("imgate exited in time")
    }

    pub fn wait(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.keep_data {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

/// A hand-driven client socket for the cases a library client will not produce (split
/// requests, bad frames, never reading).
pub struct Raw {
    pub stream: TcpStream,
}

pub const UPGRADE: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

impl Raw {
    pub fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Raw { stream }
    }

    /// Connects and completes the opening handshake on `path`.
    pub fn open(addr: SocketAddr, path: &str) -> Raw {
        let mut raw = Raw::connect(addr);
        raw.send(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{UPGRADE}\r\n").as_bytes());
        let head = raw.read_http_head();
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        assert!(head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
        raw
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Reads an HTTP response head (through the blank line).
    pub fn read_http_head(&mut self) -> String {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = self.stream.read(&mut b).expect("read head");
            assert_eq!(
                n,
                1,
                "EOF inside the response head: {:?}",
                String::from_utf8_lossy(&head)
            );
            head.push(b[0]);
        }
        String::from_utf8(head).unwrap()
    }

    /// Reads a whole HTTP response, which the server must end by closing the connection.
    pub fn read_to_end(&mut self) -> String {
        String::from_utf8_lossy(&read_until_closed(&mut self.stream, CLOSE_WITHIN)).into_owned()
    }

    /// Reads one server frame: (fin, opcode, payload).
    pub fn read_frame(&mut self) -> std::io::Result<(bool, u8, Vec<u8>)> {
        let mut h = [0u8; 2];
        self.stream.read_exact(&mut h)?;
        assert_eq!(h[1] & 0x80, 0, "server frames are unmasked");
        let len = match h[1] & 0x7F {
            126 => {
                let mut l = [0u8; 2];
                self.stream.read_exact(&mut l)?;
                u64::from(u16::from_be_bytes(l))
            }
            127 => {
                let mut l = [0u8; 8];
                self.stream.read_exact(&mut l)?;
                u64::from_be_bytes(l)
            }
            n => u64::from(n),
        };
        let mut payload = vec![0u8; len as usize];
        self.stream.read_exact(&mut payload)?;
        Ok((h[0] & 0x80 != 0, h[0] & 0x0F, payload))
    }

    /// Reads frames until a Close; returns its code.
    pub fn read_close_code(&mut self) -> u16 {
        loop {
            let (_, op, payload) = self.read_frame().expect("a Close frame");
            if op == 0x8 {
                return u16::from_be_bytes([payload[0], payload[1]]);
            }
        }
    }

    /// After the server's Close: nothing more arrives, and the server ends the TCP connection.
    pub fn expect_tcp_close(&mut self) {
        let rest = read_until_closed(&mut self.stream, CLOSE_WITHIN);
        assert!(
            rest.is_empty(),
            "{} bytes after the Close: {rest:x?}",
            rest.len()
        );
    }
}

/// How long a test waits for a connection the server must end. A prompt close takes
/// milliseconds; tests that tell it apart from a drop at `--close-timeout` set that timeout far
/// longer than this.
pub const CLOSE_WITHIN: Duration = Duration::from_secs(10);

/// Reads until the peer ends the connection (EOF, or a reset) and returns what arrived first.
/// Panics if the connection is still open after `within`: a read timeout is not a close.
pub fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    use std::io::ErrorKind;
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "the server did not close the connection within {within:?}; it sent {:?}",
            String::from_utf8_lossy(&got)
        );
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return got,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => panic!("reading until the close: {e}"),
        }
    }
}

/// Calls `probe` until it returns `Ok`, for at most `within`; otherwise panics with `what` and
/// what the last probe saw (its `Err`). What the server does in its own time is waited for
/// this way, never with a fixed sleep.
pub fn poll_until<T>(
    within: Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match probe() {
            Ok(v) => return v,
            Err(state) if Instant::now() >= deadline => {
                panic!("{what}: not so after {within:?}; last seen: {state}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Makes the command's process start with an open-file limit (soft and hard) of `n`, so that
/// a test can drive the server into descriptor exhaustion.
pub fn limit_open_files(cmd: &mut Command, n: u64) {
    limit_open_files_to(cmd, n, n);
}

/// Makes the command's process start with a soft open-file limit of `soft` under a hard one of
/// `hard`.
pub fn limit_open_files_to(cmd: &mut Command, soft: u64, hard: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only calls setrlimit, which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A masked client frame.
pub fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// The value of the sample `sample` (a metric name with its labels) in a `/metrics` text, if
/// the exposition has it (states with no connection, say, are left out).
pub fn metric_sample(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}
