"""A worker with LATENTD_COMPILE=on compiles and warms up before it says it is ready: /readyz
stays 503 until then, and a request at the warmed size compiles nothing more. Real redis-server,
real API and worker processes, real torch.compile (inductor) on the tiny model."""
import time

from devkit.api_proc import ApiProc
from devkit.services import WorkerProc, free_port
from devkit.services import scrape

COMPILES = "latentd_worker_compiles_total"


def test_readyz_waits_for_the_compile_warm_up(redis_server, tiny_model):
    port = free_port()
    api = ApiProc(redis_server.url, model=str(tiny_model), auth="off", env="dev", rate_limit_per_s=0).start()
    w = WorkerProc(redis_server.url, str(tiny_model), compile="on", worker_max_batch=1,
                   worker_metrics_port=port).start()
    try:
        with api.client(timeout=120) as c:
            deadline = time.monotonic() + 300
            while (r := c.get("/readyz")).status_code != 200:
                assert r.status_code == 503
                assert w.alive(), w.output()
                assert time.monotonic() < deadline, w.output()
                time.sleep(0.2)
            assert scrape(port)[COMPILES] == 1          # max_batch 1: one bucket (2 rows), warmed
            res = c.post("/v1/images/generations", json={"prompt": "a red cat", "steps": 3, "seed": 1,
                                                          "response_format": "b64_json"})
            assert res.status_code == 200, res.text
            assert scrape(port)[COMPILES] == 1          # the request found its graph compiled
    finally:
        w.stop()
        api.stop()


def test_unknown_compile_mode_stops_the_worker(redis_server, tiny_model):
    w = WorkerProc(redis_server.url, str(tiny_model), compile="fastest").start()
    try:
        assert w.proc.wait(120) == 2
        assert "compile mode 'fastest'" in w.output()
    finally:
        w.stop()
