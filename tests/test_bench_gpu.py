"""bench/gpu.py runs every section end to end on a tiny model on the CPU (the same code that runs
SD 1.5 on a GPU), and writes its table as JSON. No figure is asserted: only that each section ran."""
import json
import os
import subprocess
import sys

import pytest

from devkit.services import ROOT

pytestmark = pytest.mark.slow


def test_bench_gpu_tiny_runs_every_section(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("LATENTD_")}
    p = subprocess.run([sys.executable, "bench/gpu.py", "--tiny", "--timeout", "500", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-5000:] + p.stderr[-5000:]
    rows = json.loads(out.read_text())["rows"]
    by = {(r["section"], r["config"]): r for r in rows}
    notes = [r.get("note", "") for r in rows]
    assert not [n for n in notes if n.startswith(("FAILED", "skipped", "stopped"))], rows
    for section in ("eager", "compile:on", "diffusers"):
        assert by[(section, "batch 1")]["s_per_image"] > 0
    assert by[("eager", "batch 2")]["images_per_s"] > 0
    assert by[("compile:on", "batch 1")]["note"].startswith("1 compile(s)")
    service = next(r for r in rows if r["section"] == "service")
    assert service["images_per_s"] > 0 and "{200: 2}" in service["note"]
    parity = next(r for r in rows if r["section"] == "parity")
    assert "max pixel diff" in parity["note"]
    assert {"sdpa", "syncs", "memory", "build"} <= {r["section"] for r in rows}
    for who in ("latentd", "diffusers"):                          # SDXL rows, tiny shapes
        for b in (1, 2):
            assert by[("sdxl", f"{who} batch {b}, 64x64 4 steps")]["s_per_image"] > 0
    assert "latentd / diffusers" in by[("sdxl", "diffusers batch 2, 64x64 4 steps")]["note"]
    assert "== latentd bench/gpu.py" in p.stdout                 # the closing table
