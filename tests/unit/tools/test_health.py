"""The container health check: healthy before training starts and while the heartbeat is fresh,
unhealthy once it is older than the limit; the heartbeat is throttled and off without a path."""

from __future__ import annotations

import os
import time

from pipeline.tools.health import Heartbeat, check, main


def test_no_heartbeat_yet_is_healthy(tmp_path):
    healthy, why = check(tmp_path / "hb", max_age_s=60)
    assert healthy and "not training yet" in why


def test_stale_heartbeat_is_unhealthy(tmp_path, capsys):
    hb = tmp_path / "hb"
    Heartbeat(hb).beat()
    assert main(["--file", str(hb), "--max-age", "60"]) == 0
    old = time.time() - 120
    os.utime(hb, (old, old))
    assert main(["--file", str(hb), "--max-age", "60"]) == 1
    assert "no training progress for 120 s" in capsys.readouterr().out


def test_beats_are_throttled_and_off_without_a_path(tmp_path):
    hb = tmp_path / "sub" / "hb"
    beat = Heartbeat(hb, every_s=3600)
    beat.beat()
    first = hb.stat().st_mtime_ns
    os.utime(hb, ns=(first - 10**9, first - 10**9))
    beat.beat()  # within every_s: not touched again
    assert hb.stat().st_mtime_ns == first - 10**9
    Heartbeat(None).beat()  # no file, no error
    assert Heartbeat.from_env(local_rank=1).path is None


def test_without_a_file_it_says_how_to_give_one(monkeypatch, capsys):
    monkeypatch.delenv("PIPELINE_HEARTBEAT", raising=False)
    assert main([]) == 2
    assert "PIPELINE_HEARTBEAT" in capsys.readouterr().err
