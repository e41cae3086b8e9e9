use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use imgate::config::{Cli, Command, ServeArgs, ServerConfig, TokenArgs};
use imgate::server::Server;

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if let Command::Serve(args) = &cli.command {
        if let Some(path) = args.config.clone() {
            if let Err(e) = imgate::config::apply_config_file(&path) {
                eprintln!("imgate: {e}");
                return ExitCode::from(2);
            }
            // Parse again so the file's settings show through the environment.
            cli = Cli::parse();
        }
    }
    match cli.command {
        Command::Serve(args) => serve(&args),
        Command::Token(args) => token(&args),
    }
}

fn token(args: &TokenArgs) -> ExitCode {
    if args.uid.is_empty() || args.uid.len() > imgate::im::auth::MAX_ID_BYTES {
        eprintln!("imgate token: --uid must be 1-64 bytes");
        return ExitCode::from(2);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let exp = now.saturating_add(args.ttl.as_secs());
    println!(
        "{}",
        imgate::im::auth::issue(args.secret.as_bytes(), &args.uid, exp)
    );
    ExitCode::SUCCESS
}

/// 32 random bytes from the kernel, hex-encoded.
fn dev_secret() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn init_logging(args: &ServeArgs) {
    let level = args
        .log_level
        .or_else(|| std::env::var("RUST_LOG").ok()?.parse().ok())
        .unwrap_or(log::LevelFilter::Info);
    // Logging is best effort: a second initialisation is the only possible failure.
    let _ = simple_logger::SimpleLogger::new()
        .with_level(level)
        .with_utc_timestamps()
        .init();
}

fn serve(args: &ServeArgs) -> ExitCode {
    init_logging(args);
    let mut args = args.clone();
    let cfg_secret_generated = args.jwt_secret.is_none();
    if args.jwt_secret.is_none() {
        if !args.dev {
            log::error!(
                "no JWT secret: set --jwt-secret or IMGATE_JWT_SECRET (or run with --dev to get a generated one)"
            );
            return ExitCode::from(2);
        }
        let secret = match dev_secret() {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot generate a development secret: {e}");
                return ExitCode::FAILURE;
            }
        };
        args.jwt_secret = Some(secret);
    }
    let args = &args;
    let cfg = ServerConfig::from(args);
    if let Err(e) = cfg.validate() {
        log::error!("invalid configuration: {e}");
        return ExitCode::from(2);
    }
    match imgate::server::rlimit::raise_fd_limit() {
        // A few descriptors go to listeners, the store, the waker and the signal pipe.
        Ok(n) if (n as usize) < cfg.max_connections + 32 => log::warn!(
            "open-file limit {n} is below --max-connections ({}) + 32: past it, new \
             connections get 503 (raise the hard limit, e.g. ulimit -Hn)",
            cfg.max_connections
        ),
        Ok(n) => log::info!("open-file limit {n}"),
        Err(e) => log::warn!("cannot read the open-file limit: {e}"),
    }
    let cfg_im = cfg.im.clone();
    let server = match Server::bind(cfg) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let paths = server.endpoint_paths();
    let admin = server.admin_addr();
    // One line per listener on stdout, for people and for scripts that bind port 0.
    println!(
        "imgate listening on ws://{} (endpoints: {})",
        server.local_addr(),
        if paths.is_empty() {
            "none; add --echo for /echo".to_owned()
        } else {
            paths.join(", ")
        }
    );
    println!("imgate admin API on http://{admin}");
    if let Some(addr) = server.tcp_addr() {
        println!("imgate raw TCP (length-prefixed protobuf) listening on tcp://{addr}");
    }
    match &cfg_im.redis {
        Some(r) => println!("imgate data in Redis at {}", r.target),
        None => println!(
            "imgate data in {} (durability {})",
            cfg_im.data_dir.display(),
            if cfg_im.sync { "full" } else { "none" }
        ),
    }
    {
        println!(
            "imgate web demo at http://{}/{}",
            server.local_addr(),
            if args.dev {
                " (dev mode: log in by name)"
            } else {
                " (paste a token from `imgate token`)"
            }
        );
    }
    if args.dev && std::env::var_os("IMGATE_JWT_SECRET").is_none() && cfg_secret_generated {
        println!(
            "imgate dev mode: generated JWT secret {} (pass it with --jwt-secret to keep it)",
            args.jwt_secret.as_deref().unwrap_or_default()
        );
    }
    let _ = std::io::stdout().flush();
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("event loop failed: {e}");
            ExitCode::FAILURE
        }
    }
}
