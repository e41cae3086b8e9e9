"""Starts the real `imgate` binary on 127.0.0.1:0 for interop tests with Python `websockets`."""

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("IMGATE_BIN", str(ROOT / "target" / "debug" / "imgate"))


SECRET = "python-interop-secret-of-32-bytes+"


class Server:
    def __init__(self, data_dir, *args):
        self.proc = subprocess.Popen(
            [BIN, "serve", "--listen", "127.0.0.1:0", "--log-level", "warn",
             "--jwt-secret", SECRET, "--admin-listen", "127.0.0.1:0",
             "--data-dir", str(data_dir), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        match = re.search(r"ws://([0-9.]+:\d+)", line)
        assert match, f"no listening line: {line!r}"
        self.addr = match.group(1)

    def url(self, path="/echo"):
        return f"ws://{self.addr}{path}"

    def terminate(self, timeout=10):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def start_server(tmp_path):
    servers = []

    def start(*args):
        s = Server(tmp_path / f"data{len(servers)}", *args)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()
