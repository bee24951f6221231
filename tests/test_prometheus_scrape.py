"""A real Prometheus (the `prometheus` binary, as .ci/run installs it) with the shipped scrape
config, its targets pointed at a running API and worker on loopback: it scrapes both, finds the
latentd series, evaluates every shipped alert rule without error, and runs every Grafana
dashboard query; every metric those queries and rules name is one the code exports."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from devkit.api_proc import ALICE, KEYS, ApiProc
from devkit.services import ROOT, RedisServer, WorkerProc, free_port
from latentd.jobs import keys
from latentd.jobs.models import name_of

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "latentd.json"


def get_json(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url, timeout=10).read())


class Prometheus:
    def __init__(self, config: dict):
        self.dir = tempfile.mkdtemp(prefix="latentd-prom-")
        self.port = free_port()
        with open(f"{self.dir}/prometheus.yml", "w") as f:
            yaml.safe_dump(config, f)
        self.log = open(f"{self.dir}/log", "w+")
        binary = shutil.which("prometheus") or "/usr/bin/prometheus"
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.dir}/prometheus.yml", f"--storage.tsdb.path={self.dir}/data",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def api(self, path: str, **params) -> dict:
        q = urllib.parse.urlencode(params)
        return get_json(f"http://127.0.0.1:{self.port}/api/v1/{path}" + (f"?{q}" if q else ""))

    def wait(self, what, timeout=60.0):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.output()}")
            try:
                last = what()
                if last:
                    return last
            except OSError as e:
                last = e
            time.sleep(0.25)
        raise AssertionError(f"timed out; last: {last}\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def loopback_config(targets: dict[str, str]) -> dict:
    """The shipped deploy/prometheus.yml, unchanged but for: service discovery -> the loopback
    targets, its rule file -> this checkout's alerts.yml, 1 s intervals."""
    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(DEPLOY / "alerts.yml")]
    assert {j["job_name"] for j in cfg["scrape_configs"]} == set(targets)
    for job in cfg["scrape_configs"]:
        assert job.pop("dns_sd_configs")
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    return cfg


@pytest.fixture(scope="module")
def stack(tiny_model):
    redis = RedisServer().start()
    api_metrics = free_port()
    api = worker = prom = None
    try:
        worker = WorkerProc(redis.url, str(tiny_model), worker_metrics_port=free_port()).start()
        port = free_port()
        # `latentd serve`: it serves /metrics on LATENTD_METRICS_PORT, as in compose and k8s
        api = ApiProc(redis.url, port=port, api_keys=KEYS, model=str(tiny_model),
                      rate_limit_per_s=0, metrics_port=api_metrics,
                      argv=[sys.executable, "-m", "latentd.cli", "serve", "--host", "127.0.0.1",
                            "--port", str(port)]).start()
        worker.wait_ready()
        # the worker's published address (`latentd workers`): what goes in the scrape config
        w_url = redis.client().hget(keys.worker(worker.name), "metrics_url").decode()
        w_target = urllib.parse.urlsplit(w_url).netloc
        w_port = int(w_target.rsplit(":", 1)[1])
        with api.client(ALICE) as c:                   # one job: histograms get samples
            r = c.post("/v1/images/generations", json={"prompt": "a red circle", "steps": 2,
                                                       "response_format": "b64_json"})
            assert r.status_code == 200, r.text
        prom = Prometheus(loopback_config({"latentd-api": f"127.0.0.1:{api_metrics}",
                                           "latentd-worker": w_target}))
        yield {"prom": prom, "api_metrics": api_metrics, "worker_metrics": w_port,
               "model": name_of(str(tiny_model))}
    finally:
        for p in (prom, api, worker, redis):
            if p is not None:
                p.stop()


def exported(port: int) -> set[str]:
    """Series names a /metrics endpoint can produce, from its # TYPE lines (families without
    samples yet included: a labelled counter nobody incremented still declares itself)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif kind == "summary":
            names |= {name, f"{name}_sum", f"{name}_count"}
        elif kind == "counter":
            names |= {name if name.endswith("_total") else f"{name}_total"}
        else:
            names.add(name)
    return names


def dashboard_queries(model: str = ".*") -> list[str]:
    """Every panel's query, its $model variable set as Grafana sets it (All: ".*")."""
    d = json.loads(DASHBOARD.read_text())
    return [t["expr"].replace("$model", model) for p in d["panels"] for t in p.get("targets", [])]


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"] for r in g["rules"]]


def test_prometheus_scrapes_api_and_worker(stack):
    prom = stack["prom"]

    def both_up():
        t = prom.api("targets")["data"]["activeTargets"]
        return len(t) == 2 and all(x["health"] == "up" for x in t) and t
    targets = prom.wait(both_up)
    assert {x["labels"]["job"] for x in targets} == {"latentd-api", "latentd-worker"}
    for query, job in (("latentd_ready_workers", "latentd-api"),
                       ("latentd_worker_model_load_seconds", "latentd-worker"),
                       ("latentd_worker_images_generated_total", "latentd-worker"),
                       ('latentd_api_requests_total{route="/v1/images/generations"}', "latentd-api")):
        res = prom.wait(lambda: prom.api("query", query=query)["data"]["result"])
        assert {r["metric"]["job"] for r in res} == {job}, (query, res)
    ready = prom.api("query", query="latentd_ready_workers")["data"]["result"]
    assert float(ready[0]["value"][1]) == 1.0 and ready[0]["metric"]["model"] == stack["model"]
    images = prom.api("query", query="latentd_worker_images_generated_total")["data"]["result"]
    assert float(images[0]["value"][1]) >= 1.0


def test_alert_rules_load_and_evaluate(stack):
    prom = stack["prom"]
    names = {r["alert"] for r in alert_rules()}

    def evaluated():
        groups = prom.api("rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if len(rules) == len(names) and all(r.get("lastEvaluation", "").startswith("2")
                                                         and r["health"] != "unknown" for r in rules) else None
    rules = prom.wait(evaluated)
    assert {r["name"] for r in rules} == names
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert bad == []
    # a healthy stack with one ready worker: once both targets have been scraped (an evaluation
    # before the first scrape sees no series yet), the paging alerts are neither pending nor firing
    paging = {"LatentdNoReadyWorker", "LatentdRedisDown", "LatentdWorkerStalled"}

    def quiet():
        active = {a["labels"]["alertname"] for a in prom.api("alerts")["data"]["alerts"]}
        return not active & paging
    prom.wait(quiet, timeout=30)


def test_dashboard_queries_run_and_name_exported_metrics(stack):
    names = exported(stack["api_metrics"]) | exported(stack["worker_metrics"])
    used = set()
    for expr in dashboard_queries() + [r["expr"] for r in alert_rules()]:
        used |= set(re.findall(r"\blatentd_[a-z0-9_]+", expr))
    missing = sorted(used - names)
    assert not missing, f"queries name metrics nobody exports: {missing}"
    prom = stack["prom"]
    for expr in dashboard_queries():
        res = prom.api("query", query=expr)
        assert res["status"] == "success", (expr, res)
    # the panels that show the basics have data from this stack
    for expr in ('max by (model) (latentd_ready_workers{model=~".*"})',
                 "sum by (status) (rate(latentd_api_requests_total[1m]))"):
        assert expr in dashboard_queries()
        assert prom.wait(lambda: prom.api("query", query=expr)["data"]["result"])
    # the model selector: its values come from the API's per-model series; picking the model
    # this stack serves keeps the per-model panels' data
    d = json.loads(DASHBOARD.read_text())
    (var,) = [v for v in d["templating"]["list"] if v["name"] == "model"]
    assert var["query"]["query"] == "label_values(latentd_queue_depth, model)"
    model = prom.api("label/model/values")["data"]
    assert model == [stack["model"]]
    for expr in dashboard_queries(stack["model"]):
        if "model=" in expr and ("ready_workers" in expr or "images_generated" in expr):
            assert prom.wait(lambda: prom.api("query", query=expr)["data"]["result"]), expr


def test_every_model_labelled_series_names_the_model(stack):
    """The API's queue gauges and the worker's work metrics carry the model they are about."""
    prom = stack["prom"]
    for metric in ("latentd_queue_depth", "latentd_ready_workers", "latentd_jobs_admitted_total",
                   "latentd_worker_images_generated_total", "latentd_worker_step_seconds_count"):
        res = prom.wait(lambda: prom.api("query", query=metric)["data"]["result"])
        assert {r["metric"].get("model") for r in res} == {stack["model"]}, (metric, res)
