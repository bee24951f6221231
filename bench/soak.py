"""Soak test: N minutes of mixed load against a running stack while workers are killed
with SIGKILL at random moments and restarted. Prints numbers; asserts nothing (exit status 1 if
anything was lost or duplicated, so a script can notice).

    .venv/bin/python bench/soak.py --minutes 10
    .venv/bin/python bench/soak.py --minutes 2 --redis-url redis://... --api-url http://... --key KEY

Stack: by default it starts its own redis-server (deploy/redis.conf, AOF, temp dir), the API under
uvicorn and two `latentd worker`s on the bundled model models/shapes if present, else the tiny
random model of devkit/tiny_model.py written to a temp dir (--model PATH to choose). With
--api-url/--redis-url/--key it uses that API and Redis instead and only starts (and kills) its own
workers (--workers 0: none, and no kills).

Load: --clients concurrent clients; each loops over a mix of async jobs (POST /v1/jobs, some
canceled at a random moment with DELETE), sync requests (POST /v1/images/generations, url or
b64_json) and polls, with different sizes, steps, n and samplers; at most --inflight async jobs
outstanding. A killer SIGKILLs a random worker every --kill-every seconds (uniform in [a, b]) and
starts a replacement at once.

At the end it stops the load and the killing, waits (--drain-s) for every job that got a 2xx to be
terminal, then counts, per job, from the API and from Redis:
  submitted  jobs that got a 2xx (202 from /v1/jobs, 200/504 from the sync endpoint)
  succeeded / failed (by error code) / canceled
  lost       a 2xx job that vanished (404) or never reached a terminal state
  duplicated a job whose stored results disagree with its images: more or fewer image records
             than n, a repeated index, `done` != number of image records, a missing PNG, an
             extra stored PNG beyond n, or (seeded requests) image seeds other than seed + k
and p50/p95 latency: server-side created -> finished of succeeded jobs, and the sync endpoint's
wall time as the client saw it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # bench/ and devkit/ are repository folders, not part of the installed latentd
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TERMINAL = ("succeeded", "failed", "canceled")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))] if xs else float("nan")


def pick_model(path: str | None) -> str:
    if path:
        return path
    bundled = Path(ROOT) / "models" / "shapes"
    if (bundled / "model_index.json").exists() or (bundled / "unet").is_dir():
        return str(bundled)
    from devkit.tiny_model import make_tiny_sd

    print("soak: models/shapes not found; using the tiny random model", flush=True)
    return str(make_tiny_sd(Path(tempfile.mkdtemp(prefix="latentd-soak-model-")) / "tiny", variant="sd1",
                            safety=True, seed=0))


def size_choices(info: dict) -> list[str]:
    if info.get("sizes"):
        return [f"{w}x{h}" for w, h in info["sizes"]][:4]
    m, native = info["size_multiple"], (info["native_width"], info["native_height"])
    cap = min(info["max_pixels"], native[0] * native[1])
    out = {f"{native[0]}x{native[1]}"}
    for w, h in ((native[0] // 2, native[1] // 2), (native[0], native[1] // 2), (native[0] // 2, native[1])):
        w, h = max(m, w - w % m), max(m, h - h % m)
        if w * h <= cap:
            out.add(f"{w}x{h}")
    return sorted(out)


class Soak:
    def __init__(self, args):
        self.a = args
        self.rng = random.Random(args.seed)
        self.jobs: dict[str, dict] = {}          # id -> {kind, n, submitted, status, ...}
        self.rejected: Counter = Counter()
        self.errors: Counter = Counter()         # unexpected HTTP answers (5xx, ...) by status
        self.sync_latency: list[float] = []
        self.kills = 0
        self.stop_load = False
        self.procs: list = []                    # things we started, stopped in close()
        self.workers: list = []
        self.redis = None

    # --- stack ----------------------------------------------------------------------------------
    def start(self):
        from devkit.api_proc import ApiProc
        from devkit.services import RedisServer

        a = self.a
        self.model = pick_model(a.model)
        if a.api_url:
            self.api_url, self.key, self.redis_url = a.api_url.rstrip("/"), a.key, a.redis_url
        else:
            from latentd.app.auth import hash_key, new_key

            server = RedisServer().start()
            self.procs.append(server)
            self.redis_url = server.url
            self.key = new_key()
            api = ApiProc(self.redis_url, api_keys=f"soak:{hash_key(self.key)}", model=self.model,
                          rate_limit_per_s=0, sync_wait_s=a.sync_wait_s).start()
            self.procs.append(api)
            self.api_url = api.url
        import redis

        self.r = redis.Redis.from_url(self.redis_url)
        for _ in range(a.workers):
            self.workers.append(self.new_worker())
        for w in self.workers:
            w.wait_ready(300)
        print(f"soak: stack up: api {self.api_url}, redis {self.redis_url}, {len(self.workers)} worker(s), "
              f"model {self.model}", flush=True)

    def new_worker(self):
        from devkit.services import WorkerProc

        a = self.a
        w = WorkerProc(self.redis_url, self.model, lease_s=a.lease_s, reap_interval_s=a.reap_interval_s,
                       max_attempts=a.max_attempts, worker_max_batch=a.max_batch,
                       worker_heartbeat_s=1.0).start()
        return w

    def close(self):
        for w in self.workers + getattr(self, "workers_dead", []):
            w.stop()
        for p in reversed(self.procs):
            p.stop()

    # --- load -------------------------------------------------------------------------------------
    def body(self, rng: random.Random) -> dict:
        n = rng.choice([1, 1, 1, 2, 3])
        b = {"prompt": f"a {rng.choice(COLORS)} {rng.choice(SHAPES)}", "size": rng.choice(self.sizes),
             "steps": rng.choice(self.a.steps), "n": n, "sampler": rng.choice(self.samplers)}
        if rng.random() < 0.5:
            b["seed"] = rng.randrange(2**40)
        return b

    async def client_loop(self, i: int, sem: asyncio.Semaphore):
        import httpx

        rng = random.Random(self.a.seed * 1000 + i)
        async with httpx.AsyncClient(base_url=self.api_url, timeout=self.a.sync_wait_s + 60,
                                     headers={"Authorization": f"Bearer {self.key}"}) as c:
            while not self.stop_load:
                roll = rng.random()
                try:
                    if roll < 0.25:
                        await self.sync_request(c, rng)
                    else:
                        async with sem:
                            await self.async_job(c, rng, cancel=roll > 0.85)
                except httpx.HTTPError as e:
                    self.errors[type(e).__name__] += 1
                await asyncio.sleep(rng.uniform(0.0, 0.3))

    def admitted(self, jid: str, kind: str, body: dict) -> dict:
        rec = {"kind": kind, "n": body["n"], "t": time.time(), "status": None, "canceled_by_us": False,
               "seed": body.get("seed")}
        self.jobs[jid] = rec
        return rec

    def refused(self, status: int, text: str):
        if status in (429, 503):
            self.rejected[status] += 1
        else:
            self.errors[status] += 1
            if self.errors[status] <= 3:
                print(f"soak: unexpected {status}: {text[:300]}", flush=True)

    async def async_job(self, c, rng: random.Random, cancel: bool):
        body = self.body(rng)
        resp = await c.post("/v1/jobs", json=body)
        if resp.status_code != 202:
            self.refused(resp.status_code, resp.text)
            return
        jid = resp.json()["id"]
        self.admitted(jid, "async", body)
        if cancel:
            await asyncio.sleep(rng.uniform(0, 3.0))
            d = await c.delete(f"/v1/jobs/{jid}")
            if d.status_code == 200:
                self.jobs[jid]["canceled_by_us"] = True
            else:
                self.refused(d.status_code, d.text)
        # hold the slot until the job ends (bounded outstanding work), polling as a client would
        while not self.stop_load:
            g = await c.get(f"/v1/jobs/{jid}")
            if g.status_code == 200 and g.json()["status"] in TERMINAL:
                self.jobs[jid]["status"] = g.json()["status"]
                return
            await asyncio.sleep(0.5)

    async def sync_request(self, c, rng: random.Random):
        body = self.body(rng)
        body["response_format"] = rng.choice(["url", "b64_json"])
        t = time.perf_counter()
        resp = await c.post("/v1/images/generations", json=body)
        dt = time.perf_counter() - t
        if resp.status_code == 200:
            self.sync_latency.append(dt)
            data = resp.json()["data"]
            # the job id is not in the OpenAI body: the URL carries it (b64: counted by n only)
            jid = data[0]["url"].split("/v1/jobs/")[1].split("/")[0] if data and data[0].get("url") else None
            if len(data) != body["n"]:
                self.errors["sync_image_count"] += 1
            if jid:
                self.admitted(jid, "sync", body)["status"] = "succeeded"
            else:
                self.jobs[f"sync-b64-{len(self.jobs)}"] = {"kind": "sync-b64", "n": body["n"],
                                                           "t": time.time(), "status": "succeeded",
                                                           "canceled_by_us": False, "untracked": True}
        elif resp.status_code in (504, 502, 409, 422) and "job_id" in resp.text:
            err = resp.json()["error"]
            rec = self.admitted(err["job_id"], "sync", body)
            if resp.status_code == 504:
                self.errors["sync_504_then_polled"] += 1
            else:
                rec["status"] = None          # failed/canceled: the poller reads the reason
        else:
            self.refused(resp.status_code, resp.text)

    async def killer(self):
        lo, hi = self.a.kill_every
        while not self.stop_load:
            await asyncio.sleep(self.rng.uniform(lo, hi))
            if self.stop_load or not self.workers:
                return
            i = self.rng.randrange(len(self.workers))
            victim = self.workers[i]
            victim.kill()
            self.kills += 1
            self.workers[i] = self.new_worker()
            print(f"soak: t={time.time() - self.t0:6.0f}s SIGKILL {victim.name}, started "
                  f"{self.workers[i].name} (kill #{self.kills})", flush=True)
            self.workers_dead.append(victim)

    async def reporter(self):
        while not self.stop_load:
            await asyncio.sleep(30)
            st = Counter(j["status"] for j in self.jobs.values())
            print(f"soak: t={time.time() - self.t0:6.0f}s submitted {len(self.jobs)} "
                  f"{dict(st)} rejected {dict(self.rejected)} errors {dict(self.errors)} "
                  f"queue {self.r.llen('rq:queue:latentd')}", flush=True)

    async def run_load(self):
        import httpx

        async with httpx.AsyncClient(base_url=self.api_url, headers={"Authorization": f"Bearer {self.key}"}) as c:
            info = (await c.get("/v1/models")).json()["data"][0]["info"]
        self.sizes = size_choices(info)
        self.samplers = [s for s in ("euler", "ddim", "dpmpp_2m", "euler_a") if s in info["samplers"]] or \
            [info["default_sampler"]]
        print(f"soak: sizes {self.sizes}, steps {self.a.steps}, samplers {self.samplers}", flush=True)
        self.workers_dead = []
        self.t0 = time.time()
        sem = asyncio.Semaphore(self.a.inflight)
        tasks = [asyncio.create_task(self.client_loop(i, sem)) for i in range(self.a.clients)]
        side = [asyncio.create_task(self.reporter())]
        if self.a.workers and self.a.kill_every[1] > 0:
            side.append(asyncio.create_task(self.killer()))
        await asyncio.sleep(self.a.minutes * 60)
        self.stop_load = True
        print(f"soak: load stopped after {time.time() - self.t0:.0f}s; draining", flush=True)
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in side:
            t.cancel()
        await asyncio.gather(*side, return_exceptions=True)

    # --- verdict ----------------------------------------------------------------------------------
    def drain_and_count(self) -> dict:
        import httpx

        from latentd.jobs import keys

        tracked = {j: rec for j, rec in self.jobs.items() if not rec.get("untracked")}
        deadline = time.time() + self.a.drain_s
        views: dict[str, dict | None] = {}
        with httpx.Client(base_url=self.api_url, headers={"Authorization": f"Bearer {self.key}"},
                          timeout=30) as c:
            pending = set(tracked)
            while pending and time.time() < deadline:
                for jid in list(pending):
                    g = c.get(f"/v1/jobs/{jid}")
                    if g.status_code == 404:
                        views[jid] = None
                        pending.discard(jid)
                    elif g.status_code == 200:
                        views[jid] = g.json()
                        if views[jid]["status"] in TERMINAL:
                            pending.discard(jid)
                if pending:
                    time.sleep(1.0)
        out = Counter()
        fail_codes: Counter = Counter()
        lost_ids, dup_ids, latency = [], [], []
        for jid, rec in self.jobs.items():
            out["submitted"] += 1
            if rec.get("untracked"):
                out["succeeded"] += 1
                continue
            v = views.get(jid)
            if v is None or v["status"] not in TERMINAL:
                out["lost"] += 1
                lost_ids.append((jid, None if v is None else v["status"]))
                continue
            out[v["status"]] += 1
            if v["status"] == "failed":
                fail_codes[(v.get("error") or {}).get("code", "?")] += 1
            if v["status"] == "succeeded":
                t = v["timings"]
                latency.append(t["finished_at"] - t["created_at"])
            if self.duplicated(jid, v, rec["n"], keys) or (
                    v["status"] == "succeeded" and rec.get("seed") is not None
                    and sorted(im["seed"] for im in v["images"]) != [rec["seed"] + k for k in range(rec["n"])]):
                out["duplicated"] += 1
                dup_ids.append(jid)
        return {"counts": out, "fail_codes": fail_codes, "lost": lost_ids, "dup": dup_ids,
                "latency": latency}

    def duplicated(self, jid: str, view: dict, n: int, keys) -> bool:
        rec = {k.decode(): v for k, v in self.r.hgetall(keys.job(jid)).items()}
        imgs = sorted(int(k[4:]) for k in rec if k.startswith("img:"))
        done = int(rec.get("done", b"0"))
        bad = len(imgs) != len(set(imgs)) or done != len(imgs) or any(k >= n for k in imgs)
        if view["status"] == "succeeded":
            bad |= imgs != list(range(n)) or len(view["images"]) != n
            bad |= sorted(im["index"] for im in view["images"]) != list(range(n))
            bad |= any(not self.r.exists(keys.image(jid, k)) for k in range(n))
        bad |= any(self.r.exists(keys.image(jid, k)) for k in range(n, n + 2))
        return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--inflight", type=int, default=10, help="max outstanding async jobs")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--kill-every", type=float, nargs=2, default=(15.0, 45.0), metavar=("MIN_S", "MAX_S"),
                   help="seconds between worker SIGKILLs, uniform (0 0: no kills)")
    p.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--model")
    p.add_argument("--api-url")
    p.add_argument("--redis-url")
    p.add_argument("--key")
    p.add_argument("--lease-s", type=float, default=5.0)
    p.add_argument("--reap-interval-s", type=float, default=1.0)
    p.add_argument("--max-attempts", type=int, default=5)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--sync-wait-s", type=float, default=120.0)
    p.add_argument("--drain-s", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=6)
    p.add_argument("--json", help="also write the figures here")
    a = p.parse_args(argv)
    if a.api_url and not (a.redis_url and a.key):
        p.error("--api-url needs --redis-url and --key")
    soak = Soak(a)
    try:
        soak.start()
        asyncio.run(soak.run_load())
        res = soak.drain_and_count()
    finally:
        soak.close()
    c = res["counts"]
    lat, sync = res["latency"], soak.sync_latency
    print("\n=== soak result ===")
    print(f"duration      {a.minutes:g} min of load, {soak.kills} worker SIGKILLs "
          f"(lease {a.lease_s:g}s, reap {a.reap_interval_s:g}s, max attempts {a.max_attempts})")
    for k in ("submitted", "succeeded", "failed", "canceled", "lost", "duplicated"):
        print(f"{k:<13} {c.get(k, 0)}")
    print(f"failed by     {dict(res['fail_codes'])}")
    print(f"rejected      {dict(soak.rejected)} (429/503: not submitted)")
    untracked = sum(1 for j in soak.jobs.values() if j.get("untracked"))
    print(f"              ({untracked} sync b64_json requests carry no job id: counted succeeded by their 200)")
    print(f"unexpected    {dict(soak.errors)}")
    print(f"latency       job created->finished p50 {pct(lat, 50):.2f}s p95 {pct(lat, 95):.2f}s "
          f"(n={len(lat)}); sync request p50 {pct(sync, 50):.2f}s p95 {pct(sync, 95):.2f}s (n={len(sync)})")
    if res["lost"]:
        print(f"lost jobs     {res['lost'][:20]}")
    if res["dup"]:
        print(f"duplicated    {res['dup'][:20]}")
    figures = {"minutes": a.minutes, "kills": soak.kills, **{k: c.get(k, 0) for k in
               ("submitted", "succeeded", "failed", "canceled", "lost", "duplicated")},
               "failed_by": dict(res["fail_codes"]), "rejected": {str(k): v for k, v in soak.rejected.items()},
               "unexpected": {str(k): v for k, v in soak.errors.items()},
               "latency_p50_s": pct(lat, 50), "latency_p95_s": pct(lat, 95),
               "sync_p50_s": pct(sync, 50), "sync_p95_s": pct(sync, 95)}
    print(json.dumps(figures))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 1 if c.get("lost", 0) or c.get("duplicated", 0) else 0


if __name__ == "__main__":
    sys.exit(main())
