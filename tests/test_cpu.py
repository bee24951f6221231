"""worker/cpu.py: OpenMP threads and spinning decided from what the process may use."""
from __future__ import annotations

import os
import subprocess
import sys

from latentd.worker import cpu


def test_cgroup_quota_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpu.cgroup_cpu_limit(str(tmp_path)) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu.cgroup_cpu_limit(str(tmp_path)) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu.cgroup_cpu_limit(str(v1)) == 3.0
    assert cpu.cgroup_cpu_limit(str(tmp_path / "none")) is None


def test_configure_fills_in_but_the_operator_wins():
    env: dict[str, str] = {}
    got = cpu.configure(0, env)
    assert env["OMP_NUM_THREADS"] == str(cpu.usable_cpus()) and int(env["OMP_NUM_THREADS"]) >= 1
    assert env["GOMP_SPINCOUNT"] == str(cpu.SPINCOUNT) and got == env
    mine = {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "PASSIVE"}
    cpu.configure(0, mine)
    assert mine == {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "PASSIVE"}     # nothing overridden
    forced = {"OMP_NUM_THREADS": "3"}
    cpu.configure(1, forced)                                                  # LATENTD_CPU_THREADS=1
    assert forced["OMP_NUM_THREADS"] == "1"


def test_usable_cpus_follows_affinity():
    if not hasattr(os, "sched_setaffinity"):
        return
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); from latentd.worker import cpu; print(cpu.usable_cpus())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def test_torch_in_a_configured_process_uses_that_many_threads():
    code = ("import os; from latentd.worker import cpu; cpu.configure(1); import torch; "
            "print(torch.get_num_threads(), os.environ['GOMP_SPINCOUNT'])")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["1", str(cpu.SPINCOUNT)]


def test_governor_gives_the_cores_others_leave_free():
    calls = []
    g = cpu.ThreadGovernor(2, calls.append, interval=0.0)
    assert g.decide(0.0) == 2 and g.decide(0.3) == 2        # an idle machine (or a little noise)
    assert g.decide(1.0) == 1 and g.decide(2.0) == 1        # one or two busy neighbours: never 0
    assert cpu.ThreadGovernor(8, calls.append).decide(3.2) == 5


def test_governor_sees_a_busy_neighbour():
    """A real busy process next to us: the governor drops to fewer threads (the way back up is
    decide() above; whether the machine is idle afterwards is not this test's to know)."""
    import multiprocessing as mp
    calls = []
    g = cpu.ThreadGovernor(max(2, cpu.usable_cpus()), calls.append, interval=0.3)
    if cpu.usable_cpus() < 2 or cpu._cpu_jiffies() is None:
        return
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_spin, args=(3.0,))
    p.start()
    import time
    t = time.monotonic()
    while time.monotonic() - t < 2.5:
        g.tick()
        time.sleep(0.05)
    p.join()
    assert g.threads < g.max and calls and calls[-1] == g.threads


def _spin(seconds):
    import time
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
