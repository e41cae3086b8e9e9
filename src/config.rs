//! Command line and environment configuration (clap), turned into the plain settings the server
//! runs with. Every flag has an `IMGATE_*` environment variable; flags win over the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::im::core::ImConfig;
use crate::store::redis::RedisTarget;

#[derive(Debug, Parser)]
#[command(name = "imgate", version, about = "Instant-messaging gateway")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve(Box<ServeArgs>),
    /// Print a login token (HS256 JWT) for development, signed as the app's backend would.
    Token(TokenArgs),
}

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The uid (the token's `sub`), 1-64 bytes.
    #[arg(long)]
    pub uid: String,

    /// How long the token is valid.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,

    /// The secret the server runs with.
    #[arg(long, env = "IMGATE_JWT_SECRET", hide_env_values = true)]
    pub secret: String,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below, named like the flags (`listen = "..."`,
    /// `max-connections = 5000`). Flags and IMGATE_* variables take precedence over it.
    #[arg(long, env = "IMGATE_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address of the public WebSocket listener.
    #[arg(long, env = "IMGATE_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Enable the diagnostic endpoint /echo, which echoes every text and binary message.
    #[arg(long, env = "IMGATE_ECHO")]
    pub echo: bool,

    /// Send a Ping after this long without inbound traffic (e.g. 30s, 500ms).
    #[arg(long, env = "IMGATE_PING_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,

    /// Close a connection (1001) after this long without any inbound frame.
    #[arg(long, env = "IMGATE_IDLE_TIMEOUT", default_value = "75s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// Close a connection that has not completed the HTTP upgrade within this time.
    #[arg(long, env = "IMGATE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// After sending a Close frame, wait this long for the peer's before dropping the TCP
    /// connection.
    #[arg(long, env = "IMGATE_CLOSE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub close_timeout: Duration,

    /// Largest message accepted, in bytes, counted across fragments; larger ones close with
    /// 1009.
    #[arg(long, env = "IMGATE_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,

    /// Most simultaneous connections; upgrades beyond it are answered 503.
    #[arg(long, env = "IMGATE_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// Most bytes queued for one connection that the peer has not read yet; past it the
    /// connection is a slow consumer and is closed with 1008.
    #[arg(long, env = "IMGATE_MAX_OUTBOUND_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_outbound_bytes: usize,

    /// While this many bytes are unsent to a connection, the server reads nothing more from
    /// it and builds no new output for it; both resume once under half of it. A connection
    /// that stays there for --idle-timeout is closed as a slow consumer (1008). Default: 1 MiB,
    /// or half of --max-outbound-bytes if that is less.
    #[arg(long, env = "IMGATE_OUTBOUND_HIGH_WATER")]
    pub outbound_high_water: Option<usize>,

    /// Frames that carry no data (pings, pongs, empty fragments) allowed per connection per
    /// second, in bursts of as many; more close the connection with 1008.
    #[arg(long, env = "IMGATE_MAX_EMPTY_FRAMES", default_value_t = 100)]
    pub max_empty_frames: u32,

    /// Comma-separated Origin allow-list for WebSocket upgrades (403 otherwise); empty allows
    /// every origin.
    #[arg(long, env = "IMGATE_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// On SIGINT/SIGTERM, how long to wait for connections to finish closing before exiting.
    #[arg(long, env = "IMGATE_SHUTDOWN_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// Log level: error, warn, info, debug, trace. Falls back to RUST_LOG, then info.
    #[arg(long, env = "IMGATE_LOG_LEVEL")]
    pub log_level: Option<log::LevelFilter>,

    /// HS256 secret shared with the app's backend, which signs the login tokens. Required
    /// unless --dev is given.
    #[arg(long, env = "IMGATE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Development mode: without --jwt-secret, generate one and print it.
    #[arg(long, env = "IMGATE_DEV")]
    pub dev: bool,

    /// Where the store keeps inboxes, cursors, dedupe keys and friendships.
    #[arg(long, env = "IMGATE_DATA_DIR", default_value = "imgate-data")]
    pub data_dir: PathBuf,

    /// full: a send is acknowledged only once it is synced to disk. none: skip the sync
    /// (benchmarks only; a crash can lose acknowledged messages).
    #[arg(long, env = "IMGATE_DURABILITY", value_enum, default_value_t = Durability::Full)]
    pub durability: Durability,

    /// Memory for the store's page cache, in bytes. Reads (offline catch-up, Sync) beyond it
    /// go to the file.
    #[arg(long, env = "IMGATE_STORE_CACHE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub store_cache_bytes: usize,

    /// Committed messages, keys and cursors held in the commit log (and in memory, for reads)
    /// before they are moved into the per-user tables, in bytes. Larger: fewer, bigger moves;
    /// smaller: less memory and a shorter log to read back at start-up.
    #[arg(long, env = "IMGATE_STORE_LOG_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub store_log_bytes: usize,

    /// Bind the public, raw-TCP and admin listeners with SO_REUSEPORT, so that several
    /// processes (one per core) share the ports and the kernel spreads new connections
    /// over them.
    #[arg(long, env = "IMGATE_REUSE_PORT")]
    pub reuse_port: bool,

    /// Make this process a node of a cluster whose shared state (inboxes, cursors, dedupe
    /// keys, friendships, groups) is in this Redis 7 (`redis://host:port/db`) instead of the
    /// embedded store; --data-dir is then unused. See "Running a cluster" in the README.
    #[arg(long, env = "IMGATE_REDIS", conflicts_with = "redis_cluster")]
    pub redis: Option<String>,

    /// Like --redis, against a Redis Cluster: comma-separated addresses of some of its nodes.
    #[arg(long, env = "IMGATE_REDIS_CLUSTER", value_delimiter = ',')]
    pub redis_cluster: Vec<String>,

    /// A send or login that Redis has not answered within about this time gets
    /// UNAVAILABLE (retryable); commits keep trying, on new connections, until then.
    #[arg(long, env = "IMGATE_REDIS_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub redis_timeout: Duration,

    /// With --redis or --redis-cluster: a commit counts as durable only once this many
    /// replicas of each primary it wrote to have it (Redis WAIT), so that an acknowledged
    /// message survives losing a primary; until then its sends are not answered, and they
    /// get UNAVAILABLE after --redis-timeout. 0: the primary's own durability only.
    #[arg(long, env = "IMGATE_REDIS_WAIT_REPLICAS", default_value_t = 0)]
    pub redis_wait_replicas: u32,

    /// A node renews its presence lease in Redis every third of this; once a node's lease
    /// has run out (killed, or away from Redis), another node takes its devices offline
    /// and their friends are told.
    #[arg(long, env = "IMGATE_NODE_LEASE", default_value = "10s", value_parser = parse_lease)]
    pub node_lease: Duration,

    /// Close (1008) a connection on /ws that has not logged in within this time.
    #[arg(long, env = "IMGATE_AUTH_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub auth_timeout: Duration,

    /// Most devices online at once per user; one more is refused (FORBIDDEN, close 1008).
    #[arg(long, env = "IMGATE_MAX_DEVICES", default_value_t = 16)]
    pub max_devices: usize,

    /// Most members of a group; adding one more is refused (admin API 409). A group send
    /// costs one inbox append per member, written in one batch.
    #[arg(long, env = "IMGATE_MAX_GROUP_MEMBERS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_group_members: u64,

    /// Most unacknowledged messages in flight per device.
    #[arg(long, env = "IMGATE_DELIVERY_WINDOW", default_value_t = 256)]
    pub delivery_window: u64,

    /// Close (1008) a device with messages outstanding and no ack progress for this long.
    #[arg(long, env = "IMGATE_ACK_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub ack_timeout: Duration,

    /// Largest SendMessage.content, in bytes (TOO_LARGE beyond).
    #[arg(long, env = "IMGATE_MAX_CONTENT_BYTES", default_value_t = 16 * 1024)]
    pub max_content_bytes: usize,

    /// Sends per second per connection, on average (RATE_LIMITED beyond).
    #[arg(long, env = "IMGATE_RATE_LIMIT", default_value_t = 50.0)]
    pub rate_limit: f64,

    /// Sends a connection may burst above the rate.
    #[arg(long, env = "IMGATE_RATE_BURST", default_value_t = 100.0)]
    pub rate_burst: f64,

    /// Address of the admin HTTP API for the app's backend (friendships).
    #[arg(long, env = "IMGATE_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: SocketAddr,

    /// Raw TCP listener for the IM protocol (4-byte big-endian length + protobuf per frame);
    /// off when not given.
    #[arg(long, env = "IMGATE_TCP_LISTEN")]
    pub tcp_listen: Option<SocketAddr>,

    /// When set, every admin request must carry `Authorization: Bearer <token>` (else 401).
    #[arg(long, env = "IMGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Most admin API connections at once; further ones get HTTP 503 and are closed.
    #[arg(long, env = "IMGATE_MAX_ADMIN_CONNECTIONS", default_value_t = 64)]
    pub max_admin_connections: usize,
}

/// Exports the settings of a `--config` TOML file as the `IMGATE_*` variables of the same
/// flags, unless already set, so that precedence is: flag, environment, file, default.
/// Unknown keys are refused, so a typo is not silently ignored.
pub fn apply_config_file(path: &std::path::Path) -> Result<(), String> {
    use clap::CommandFactory;
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("{} is not valid TOML: {e}", path.display()))?;
    let cmd = Cli::command();
    let serve = cmd.find_subcommand("serve").ok_or("no serve command")?;
    for (key, value) in table {
        let env = serve
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && key != "config")
            .and_then(|a| a.get_env())
            .ok_or_else(|| format!("unknown setting {key:?} in {}", path.display()))?;
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string())
                })
                .collect::<Vec<_>>()
                .join(","),
            other => return Err(format!("setting {key:?} has an unsupported value {other}")),
        };
        if std::env::var_os(env).is_none() {
            // Start-up, single-threaded: nothing else reads the environment concurrently.
            std::env::set_var(env, value);
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Durability {
    Full,
    None,
}

/// `--outbound-high-water` unless `--max-outbound-bytes` is less than twice as much.
const DEFAULT_HIGH_WATER: usize = 1024 * 1024;

/// Where a node of a cluster keeps the shared state, and how long it waits for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    pub target: RedisTarget,
    pub timeout: Duration,
    /// Replicas of each written primary that must have a commit before it counts as durable.
    pub wait_replicas: u32,
    /// How long the node's presence lease lasts unless renewed.
    pub lease: Duration,
}

/// A lease shorter than 300 ms would be renewed more often than Redis answers a slow call.
fn parse_lease(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(300) {
        return Err("a lease is at least 300ms".into());
    }
    Ok(d)
}

/// Settings of the IM endpoint `/ws`.
#[derive(Debug, Clone)]
pub struct ImSettings {
    pub tcp_listen: Option<SocketAddr>,
    pub admin_listen: SocketAddr,
    pub admin_token: Option<String>,
    pub max_admin_connections: usize,
    pub jwt_secret: Vec<u8>,
    pub data_dir: PathBuf,
    pub sync: bool,
    pub store_cache_bytes: usize,
    pub store_log_bytes: usize,
    /// Shared state in Redis instead of the embedded store at `data_dir`.
    pub redis: Option<RedisSettings>,
    pub auth_timeout: Duration,
    pub core: ImConfig,
    /// `--dev`: the web demo's `/dev/*` routes issue tokens and make friendships.
    pub dev_routes: bool,
}

/// Settings of a running server, independent of how they were given.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// `--reuse-port`: every listener is bound with SO_REUSEPORT.
    pub reuse_port: bool,
    pub echo: bool,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub handshake_timeout: Duration,
    pub close_timeout: Duration,
    pub max_message_bytes: usize,
    pub max_connections: usize,
    pub max_outbound_bytes: usize,
    /// Unsent bytes above which a connection's input and new output wait for it to drain.
    pub outbound_high_water: usize,
    /// Empty frames (pings, pongs, empty fragments) per connection per second.
    pub max_empty_frames: u32,
    pub allowed_origins: Vec<String>,
    pub shutdown_timeout: Duration,
    /// The IM endpoint `/ws`, its admin API and its store.
    pub im: ImSettings,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            reuse_port: false,
            echo: false,
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(75),
            handshake_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
            max_message_bytes: 64 * 1024,
            max_connections: 10_000,
            max_outbound_bytes: 8 * 1024 * 1024,
            outbound_high_water: 1024 * 1024,
            max_empty_frames: 100,
            allowed_origins: Vec::new(),
            shutdown_timeout: Duration::from_secs(5),
            im: ImSettings::default(),
        }
    }
}

impl Default for ImSettings {
    /// The documented defaults, with no JWT secret (which [`ServerConfig::validate`]
    /// refuses).
    fn default() -> Self {
        ImSettings {
            tcp_listen: None,
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            admin_token: None,
            max_admin_connections: 64,
            jwt_secret: Vec::new(),
            data_dir: PathBuf::from("imgate-data"),
            sync: true,
            store_cache_bytes: 64 * 1024 * 1024,
            store_log_bytes: 32 * 1024 * 1024,
            redis: None,
            auth_timeout: Duration::from_secs(10),
            core: ImConfig::default(),
            dev_routes: false,
        }
    }
}

impl ServerConfig {
    /// Rejects settings that would make the server misbehave for every client rather than
    /// for the ones that break a limit.
    pub fn validate(&self) -> Result<(), String> {
        // One echoed or delivered message must fit in the outbound allowance, or every
        // client that sends a large (allowed) message would be closed as a slow consumer.
        let frame_overhead = 14;
        if self.max_outbound_bytes < self.max_message_bytes + frame_overhead {
            return Err(format!(
                "--max-outbound-bytes ({}) must be at least --max-message-bytes ({}) + {frame_overhead}",
                self.max_outbound_bytes, self.max_message_bytes
            ));
        }
        if self.outbound_high_water == 0 || self.outbound_high_water > self.max_outbound_bytes {
            return Err(format!(
                "--outbound-high-water ({}) must be positive and at most --max-outbound-bytes ({})",
                self.outbound_high_water, self.max_outbound_bytes
            ));
        }
        if self.max_empty_frames == 0 {
            return Err("--max-empty-frames must be positive".into());
        }
        if self.max_message_bytes == 0 || self.max_connections == 0 {
            return Err("--max-message-bytes and --max-connections must be positive".into());
        }
        if self.ping_interval.is_zero() || self.idle_timeout.is_zero() {
            return Err("--ping-interval and --idle-timeout must be positive".into());
        }
        let im = &self.im;
        if im.jwt_secret.is_empty() {
            return Err("no JWT secret: set --jwt-secret or IMGATE_JWT_SECRET".into());
        }
        {
            if im.max_admin_connections == 0 {
                return Err("--max-admin-connections must be positive".into());
            }
            // A reader that keeps up must never count as a slow consumer: one full delivery
            // window of the largest messages, as JSON (base64 grows content by 4/3) with room
            // for the other fields, has to fit in the outbound allowance.
            let per_message = im.core.max_content_bytes.div_ceil(3) * 4 + 1024;
            let window = im.core.delivery_window as usize * per_message;
            if self.max_outbound_bytes < window {
                return Err(format!(
                    "--max-outbound-bytes ({}) must hold a full delivery window: \
                     --delivery-window ({}) x (--max-content-bytes ({}) x 4/3 + 1024) = {window}",
                    self.max_outbound_bytes, im.core.delivery_window, im.core.max_content_bytes
                ));
            }
        }
        Ok(())
    }
}

impl ServeArgs {
    /// `--redis` or `--redis-cluster`, whichever is given.
    fn redis_target(&self) -> Option<RedisTarget> {
        if let Some(url) = &self.redis {
            return Some(RedisTarget::Single(url.clone()));
        }
        let urls: Vec<String> = self
            .redis_cluster
            .iter()
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        (!urls.is_empty()).then_some(RedisTarget::Cluster(urls))
    }

    /// `--outbound-high-water`, or its default for the `--max-outbound-bytes` given.
    fn high_water(&self) -> usize {
        self.outbound_high_water
            .unwrap_or((self.max_outbound_bytes / 2).min(DEFAULT_HIGH_WATER))
    }
}

impl From<&ServeArgs> for ServerConfig {
    fn from(a: &ServeArgs) -> Self {
        ServerConfig {
            listen: a.listen,
            reuse_port: a.reuse_port,
            echo: a.echo,
            ping_interval: a.ping_interval,
            idle_timeout: a.idle_timeout,
            handshake_timeout: a.handshake_timeout,
            close_timeout: a.close_timeout,
            max_message_bytes: a.max_message_bytes,
            max_connections: a.max_connections,
            max_outbound_bytes: a.max_outbound_bytes,
            outbound_high_water: a.high_water(),
            max_empty_frames: a.max_empty_frames,
            allowed_origins: a
                .allowed_origins
                .iter()
                .map(|o| o.trim().to_owned())
                .filter(|o| !o.is_empty())
                .collect(),
            shutdown_timeout: a.shutdown_timeout,
            im: ImSettings {
                tcp_listen: a.tcp_listen,
                admin_listen: a.admin_listen,
                admin_token: a.admin_token.clone(),
                max_admin_connections: a.max_admin_connections,
                jwt_secret: a
                    .jwt_secret
                    .as_deref()
                    .unwrap_or_default()
                    .as_bytes()
                    .to_vec(),
                data_dir: a.data_dir.clone(),
                sync: a.durability == Durability::Full,
                store_cache_bytes: a.store_cache_bytes,
                store_log_bytes: a.store_log_bytes,
                redis: a.redis_target().map(|target| RedisSettings {
                    target,
                    timeout: a.redis_timeout,
                    wait_replicas: a.redis_wait_replicas,
                    lease: a.node_lease,
                }),
                auth_timeout: a.auth_timeout,
                dev_routes: a.dev,
                core: ImConfig {
                    max_devices: a.max_devices,
                    delivery_window: a.delivery_window,
                    ack_timeout_ms: a.ack_timeout.as_millis() as u64,
                    max_content_bytes: a.max_content_bytes,
                    rate_per_sec: a.rate_limit,
                    rate_burst: a.rate_burst,
                    max_bad_frames: 10,
                    output_room: a.high_water(),
                    max_group_members: a.max_group_members as usize,
                    cluster: a.redis_target().is_some(),
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_ones() {
        let cli = Cli::try_parse_from(["imgate", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        let cfg = ServerConfig::from(&*args);
        let d = ServerConfig::default();
        assert_eq!(cfg.listen, d.listen);
        assert_eq!(cfg.ping_interval, d.ping_interval);
        assert_eq!(cfg.idle_timeout, d.idle_timeout);
        assert_eq!(cfg.max_message_bytes, 65_536);
        assert!(!cfg.echo);
    }

    #[test]
    fn outbound_allowance_must_hold_one_message() {
        let mut cfg = ServerConfig::default();
        cfg.im.jwt_secret = b"s".to_vec();
        assert!(cfg.validate().is_ok());
        cfg.max_message_bytes = 16 << 20;
        assert!(cfg.validate().unwrap_err().contains("--max-outbound-bytes"));
        cfg.max_outbound_bytes = 17 << 20;
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn the_outbound_allowance_must_hold_a_delivery_window() {
        let cli = Cli::try_parse_from(["imgate", "serve", "--jwt-secret", "s"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        let mut cfg = ServerConfig::from(&*args);
        assert!(cfg.validate().is_ok(), "the defaults are consistent");
        cfg.im.core.delivery_window = 4096;
        let err = cfg.validate().unwrap_err();
        assert!(err.contains("--delivery-window"), "{err}");
    }

    #[test]
    fn flags_parse_durations_and_lists() {
        let cli = Cli::try_parse_from([
            "imgate",
            "serve",
            "--echo",
            "--ping-interval",
            "500ms",
            "--idle-timeout",
            "2m",
            "--allowed-origins",
            "https://a.example, https://b.example",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        let cfg = ServerConfig::from(&*args);
        assert!(cfg.echo);
        assert_eq!(cfg.ping_interval, Duration::from_millis(500));
        assert_eq!(cfg.idle_timeout, Duration::from_secs(120));
        assert_eq!(
            cfg.allowed_origins,
            ["https://a.example", "https://b.example"]
        );
    }
}
