"""A short soak of a real `moorelm serve` (bench/serve_soak.py): healthy seeded clients mixed
with clients that hang up, read slowly, send invalid requests or stall. Nothing is answered
with a 5xx, no slot or queue place is left behind, and every healthy client gets the text
its request got alone."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "serve_soak.py"


def load_soak():
    spec = importlib.util.spec_from_file_location("serve_soak", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_short_soak(tiny_run, tmp_path):
    """16 clients, five requests each (a fixed, seeded mix with a handful of every kind of
    bad client): 0 5xx, 0 leaked slots, healthy outputs unchanged, every invalid request
    answered with its 4xx and every stalled one closed by the server. Bounded by request
    counts, not time; timeouts are generous."""
    soak = load_soak()
    settings = soak.Settings(clients=16, duration_s=3600, max_requests=5, seed=0, specs=8,
                             header_timeout_s=1.0, body_timeout_s=2.0, max_body=1 << 16,
                             weights=(40, 20, 15, 17, 8))
    report, log = soak.run_soak(str(tiny_run), settings, ("--max-batch", "8", "--threads", "1"),
                                log_path=str(tmp_path / "server.log"))
    kinds = report.kinds()
    assert sum(kinds.values()) == 16 * 5
    assert all(kinds[k] >= 3 for k in soak.KINDS), kinds
    assert report.five_xx == 0
    assert report.leaked == {"active": 0, "waiting": 0}
    assert report.mismatches == 0 and report.after_mismatches == 0
    assert report.healthy_checked >= kinds["healthy"]
    assert report.unexpected == [], report.unexpected
    assert report.server_alive and report.failures() == []
    assert "Traceback" not in log
