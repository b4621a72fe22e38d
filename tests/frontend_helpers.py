"""Helpers shared by the server, client and CLI tests (imported by them; not a pytest conftest)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def start_server_process(
    db_path: str, sock_path: str, *extra: str, stderr: Any = subprocess.PIPE, preexec_fn: Any = None
) -> subprocess.Popen:
    """``python -m hashdb serve`` as a subprocess, returned once its socket accepts connections.

    ``preexec_fn`` runs in the child before exec (e.g. resource limits); ``stderr`` may be a file."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "hashdb", "serve", db_path, "--socket", sock_path, *extra],
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=env,
        cwd=str(REPO),
        preexec_fn=preexec_fn,
    )
    wait_for_socket(sock_path, proc)
    return proc


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """Send ``sig`` (if still running) and wait; kill it if it does not exit in ``timeout`` s."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
            raise AssertionError(f"process {proc.pid} did not exit {timeout} s after signal {sig}") from None
    return proc.returncode


def process_rss(pid: int) -> int:
    """Resident memory of a process in bytes (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
def raw_connect(path: str, timeout: float = 30) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def frames(*messages: dict) -> bytes:
    """Requests as one byte string of frames (to send in one write, pipelined)."""
    import msgpack

    bodies = [msgpack.packb(m, use_bin_type=True) for m in messages]
    return b"".join(len(body).to_bytes(4, "big") + body for body in bodies)


def read_reply(sock: socket.socket) -> dict | None:
    """One reply, or None if the server closed the connection."""
    import msgpack

    header = _read_exactly(sock, 4)
    if header is None:
        return None
    body = _read_exactly(sock, int.from_bytes(header, "big"))
    assert body is not None, "connection closed inside a frame"
    return msgpack.unpackb(body, raw=False)


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)
