//! The command line: help text, config files, refusing to start without a secret.

mod common;

use std::process::Command;

use common::{ServerProc, UPGRADE};

fn imgate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_imgate"))
        .args(args)
        .env_remove("IMGATE_JWT_SECRET")
        .output()
        .expect("run imgate")
}

#[test]
fn serve_help_documents_every_flag_with_its_variable() {
    let out = imgate(&["serve", "--help"]);
    let help = String::from_utf8(out.stdout).unwrap();
    for var in [
        "IMGATE_LISTEN",
        "IMGATE_ECHO",
        "IMGATE_PING_INTERVAL",
        "IMGATE_IDLE_TIMEOUT",
        "IMGATE_HANDSHAKE_TIMEOUT",
        "IMGATE_CLOSE_TIMEOUT",
        "IMGATE_MAX_MESSAGE_BYTES",
        "IMGATE_MAX_CONNECTIONS",
        "IMGATE_MAX_OUTBOUND_BYTES",
        "IMGATE_ALLOWED_ORIGINS",
        "IMGATE_SHUTDOWN_TIMEOUT",
        "IMGATE_LOG_LEVEL",
        "IMGATE_JWT_SECRET",
        "IMGATE_DEV",
        "IMGATE_DATA_DIR",
        "IMGATE_DURABILITY",
        "IMGATE_AUTH_TIMEOUT",
        "IMGATE_MAX_DEVICES",
        "IMGATE_DELIVERY_WINDOW",
        "IMGATE_ACK_TIMEOUT",
        "IMGATE_MAX_CONTENT_BYTES",
        "IMGATE_RATE_LIMIT",
        "IMGATE_RATE_BURST",
        "IMGATE_ADMIN_LISTEN",
        "IMGATE_ADMIN_TOKEN",
        "IMGATE_TCP_LISTEN",
        "IMGATE_CONFIG",
    ] {
        assert!(
            help.contains(&format!("[env: {var}")),
            "{var} missing from:\n{help}"
        );
    }
    assert!(help.contains("[default: 0.0.0.0:8080]"));
    assert!(help.contains("[default: 65536]"));
}

#[test]
fn refuses_to_start_without_a_secret() {
    let out = imgate(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("JWT secret"));
}

#[test]
fn config_file_settings_with_flags_taking_precedence() {
    let dir = common::temp_data_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "max-conections = 5\n").unwrap();
    let out = imgate(&["serve", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown setting \"max-conections\""));

    let file = dir.join("imgate.toml");
    std::fs::write(&file, "echo = true\nmax-connections = 1\n").unwrap();
    let server = ServerProc::start(&["--config", file.to_str().unwrap()]);
    let upgrade = format!("GET /echo HTTP/1.1\r\nHost: x\r\n{UPGRADE}\r\n");
    let mut first = common::Raw::connect(server.addr);
    first.send(upgrade.as_bytes());
    assert!(
        first.read_http_head().starts_with("HTTP/1.1 101 "),
        "echo from the file"
    );
    let mut second = common::Raw::connect(server.addr);
    second.send(upgrade.as_bytes());
    assert!(
        second.read_to_end().starts_with("HTTP/1.1 503 "),
        "max-connections from the file"
    );
    drop(server);

    let server = ServerProc::start(&["--config", file.to_str().unwrap(), "--max-connections", "2"]);
    let mut a = common::Raw::connect(server.addr);
    a.send(upgrade.as_bytes());
    assert!(a.read_http_head().starts_with("HTTP/1.1 101 "));
    let mut b = common::Raw::connect(server.addr);
    b.send(upgrade.as_bytes());
    assert!(
        b.read_http_head().starts_with("HTTP/1.1 101 "),
        "the flag wins over the file"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
