"""Slow: the load script end to end, small: batching shares pipeline calls, autoscaling goes 1 -> 2 -> 1.

`pytest -m slow tests/test_serving_load.py` (a few minutes on 2 cores); not part of `make test`.
"""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_loadtest_shows_batching_and_autoscaling(tmp_path):
    pytest.importorskip("ray")
    from serving.loadtest import main

    out = tmp_path / "loadtest.json"
    results = main(
        [
            "--concurrency",
            "1,4",
            "--requests",
            "8",
            "--steps",
            "4",
            "--phase-s",
            "40",
            "--scale-concurrency",
            "8",
            "--scale-load-s",
            "60",
            "--scale-idle-s",
            "60",
            "--out",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    on, off = results["batching"]["on"], results["batching"]["off"]
    assert all(not r["errors"] for r in on + off)
    assert on[-1]["mean_rows_per_call"] > 1 and off[-1]["mean_rows_per_call"] == 1
    scale = results["autoscaling"]
    assert scale["max_replicas_seen"] == 2, scale["timeline"]
    assert scale["scaled_down_after_s"] is not None, scale["timeline"]
