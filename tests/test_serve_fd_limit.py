"""Idle sockets cannot take a server down: with 130 silent connections against a limit of 128
open files, /health answers again once the header timeout closes them (before the server had
timeouts, it never did)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(port: int, tries: int) -> int | None:
    """/health's status, asked up to ``tries`` times (0.3 s apart); None if it never answers."""
    for _ in range(tries):
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code
        except httpx.HTTPError:
            time.sleep(0.3)
    return None


@pytest.mark.slow
def test_idle_sockets_past_the_file_limit_do_not_keep_health_down(tiny_run):
    """A server under `ulimit -n 128` with 130 idle client sockets answers /health within
    the default header timeout (10 s) plus a generous margin."""
    port = _free_port()
    cmd = f"ulimit -n 128 && exec {sys.executable} -m moorelm serve {tiny_run} --port {port}"
    server = subprocess.Popen(["bash", "-c", cmd], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    socks = []
    try:
        assert _health(port, 400) == 200, "the server did not start"
        for _ in range(130):
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                break  # the server's accept queue is full: that is the attack succeeding
        assert len(socks) >= 100
        assert _health(port, 200) == 200
        assert server.poll() is None
    finally:
        for s in socks:
            s.close()
        server.terminate()
        _, err = server.communicate(timeout=30)
    assert "Traceback" not in err, err[-2000:]
