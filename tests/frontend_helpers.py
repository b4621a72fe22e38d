"""Helpers shared by the server, client and CLI tests (imported by them; not a pytest conftest)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hashdb.server import Server

REPO = Path(__file__).resolve().parents[1]


def short_socket_path(tmp_path: Path, name: str = "s.sock") -> str:
    """AF_UNIX paths are limited to ~107 bytes; pytest's tmp_path can be longer."""
    path = tmp_path / name
    if len(os.fsencode(path)) < 100:
        return str(path)
    import tempfile

    return os.path.join(tempfile.mkdtemp(prefix="hdb"), name)


@contextmanager
def server_thread(db: object, path: str, **kwargs: object) -> Iterator[Server]:
    """A real Server on ``path`` in a background thread, shut down and joined on exit."""
    server = Server(db, path, **kwargs)  # type: ignore[arg-type]
    server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    assert server.ready.wait(10)
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(20)
        assert not thread.is_alive(), "server thread did not stop"


def wait_for_socket(path: str, proc: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stderr.read() if proc.stderr else b""
            raise AssertionError(f"server exited with {proc.returncode}: {out!r}")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            return
        except OSError:
            time.sleep(0.05)
        finally:
            probe.close()
    raise AssertionError(f"no server on {path} after {timeout} s")


def start_server_process(db_path: str, sock_path: str, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "hashdb", "serve", db_path, "--socket", sock_path, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=str(REPO),
    )
    wait_for_socket(sock_path, proc)
    return proc


def run_cli(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python3 -m hashdb ARGS`` as a real subprocess (text mode)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "hashdb", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO),
        timeout=timeout,
    )
