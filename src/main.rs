use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use imgate::config::{Cli, Command, ServeArgs, ServerConfig};
use imgate::server::Server;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(&args),
    }
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
    let cfg = ServerConfig::from(args);
    if let Err(e) = cfg.validate() {
        log::error!("invalid configuration: {e}");
        return ExitCode::from(2);
    }
    let server = match Server::bind(cfg) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let paths = server.endpoint_paths();
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
    let _ = std::io::stdout().flush();
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("event loop failed: {e}");
            ExitCode::FAILURE
        }
    }
}
