"""Continuous-batching benchmark. Prints numbers; asserts nothing.

  1. Throughput (images/s) with 1, 4 and 16 concurrent closed-loop clients, batched worker
     (max batch 16) vs the same worker taking one request at a time (max batch 1).
  2. Head-of-line blocking: latency of a 10-step request submitted while eight 50-step requests
     run, vs its latency alone.
  3. U-Net calls per image at 16 clients.
  4. With --previews on|both: the same throughput runs with live previews (model/preview.py):
     stack clients stream (`stream: true, partial_images: 3`, reading every event); in process,
     every request is watched with a preview every --preview-every steps (PNG-encoded as the
     worker does). `both` prints the throughput cost of previews per client count.
With --edit-every K, every K-th request is an edit (alternately img2img at strength 0.75 and
inpainting of the centre with a mask), sent to /v1/images/edits (stack) or given an init image
(in process): edits share U-Net calls with the generations around them.

Two setups (the output says which ran):
  --setup stack      (default) the full service: redis-server + `latentd worker` + the API under
                     uvicorn; clients are threads POSTing /v1/images/generations (b64_json) over
                     HTTP, so text encoding, VAE decode, safety, PNG and queue traffic all count.
  --setup inprocess  BatchExecutor driven in this process (PNG encoding of each result included).
Model: the bundled models/shapes if present, else the tiny random SD1 model of devkit/tiny_model.py
(--model PATH to choose). The machine is shared: keep the sizes modest.

    .venv/bin/python bench/batching.py [--setup stack|inprocess] [--steps 20] [--per-client 2]
                                       [--previews off|on|both] [--preview-every 5]
                                       [--edit-every 2] [--repeat 3]
--repeat N runs N rounds, each one at a time then batched back to back, and reports the median
of the per-round gains (each gain compares runs made under the same machine conditions).
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # bench/ and devkit/ are repository folders, not part of the installed latentd
os.environ.setdefault("HF_HUB_OFFLINE", "1")

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
BGS = ("white", "black", "gray")


def prompt(i: int) -> str:
    return f"a {COLORS[i % 6]} {SHAPES[i // 6 % 3]} on a {BGS[i // 18 % 3]} background"


EDIT_EVERY = 0                  # set by --edit-every
IMG2IMG_STRENGTH = 0.75


def edit_kind(i: int) -> str | None:
    """None for a generation; "img2img" or "inpaint" for request i (alternating) of the mix."""
    if EDIT_EVERY <= 0 or i % EDIT_EVERY != EDIT_EVERY - 1:
        return None
    return "img2img" if (i // EDIT_EVERY) % 2 == 0 else "inpaint"


_EDIT_INPUTS: dict = {}


def edit_inputs(model: str):
    """(init image RGB, mask L: white centre = repaint) at the model's native size, made once."""
    if model not in _EDIT_INPUTS:
        from PIL import Image, ImageDraw

        from latentd.model.info import read_model_info
        info = read_model_info(model)
        w, h = info.native_width, info.native_height
        img = Image.new("RGB", (w, h), "white")
        ImageDraw.Draw(img).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill="red")
        mask = Image.new("L", (w, h), 0)
        mask.paste(255, (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
        _EDIT_INPUTS[model] = img, mask
    return _EDIT_INPUTS[model]


def png_bytes(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def pick_model(path: str | None) -> tuple[str, str]:
    if path:
        return path, f"model at {path}"
    bundled = Path(ROOT) / "models" / "shapes"
    if (bundled / "model_index.json").exists() or (bundled / "unet").exists():
        return str(bundled), "bundled models/shapes"
    from devkit.tiny_model import make_tiny_sd
    folder = make_tiny_sd(Path(tempfile.mkdtemp(prefix="latentd-bench-tiny-")), "sd1", True, 0)
    return str(folder), "tiny random SD1 model (devkit/tiny_model.py; models/shapes not present)"


# --- in process --------------------------------------------------------------------------------
class InProcess:
    name = "in-process BatchExecutor (no Redis/HTTP; PNG encoding included)"
    previews = False
    preview_every = 5

    def __init__(self, model: str):
        import torch

        from latentd.model.pipeline import load_pipeline
        # Threads: on this shared, loaded 2-core machine 2 OpenMP threads are far slower than 1.
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
        self.model = model
        self.pipe = load_pipeline(model, safety=True)
        from latentd.model.preview import fit_for
        self.preview_map = fit_for(self.pipe)

    def req(self, i: int, steps: int):
        from latentd.model.pipeline import GenerationRequest
        kind = edit_kind(i)
        if kind is None:
            return self.pipe.validate(GenerationRequest(prompt=prompt(i), steps=steps, seed=1000 + i))
        img, mask = edit_inputs(self.model)
        return self.pipe.validate(GenerationRequest(prompt=prompt(i), steps=steps, seed=1000 + i, init_image=img,
                                                    mask=mask if kind == "inpaint" else None,
                                                    strength=IMG2IMG_STRENGTH if kind == "img2img" else 1.0))

    def prepare(self, max_batch: int):
        from latentd.model.pipeline import GenerationRequest
        self.pipe.generate([GenerationRequest(prompt="warm up", steps=2)])   # first-call costs

    def throughput(self, max_batch: int, clients: int, per_client: int, steps: int):
        """Closed loop: each client submits its next request when its previous one is done."""
        from PIL import Image

        from latentd.worker.executor import BatchExecutor, Finished, Preview
        ex = BatchExecutor(self.pipe, max_batch=max_batch,
                           preview=self.preview_map if self.previews else None)
        png_s = 0.0
        sent = {c: 0 for c in range(clients)}
        n = 0

        def submit(c):
            nonlocal n
            rid = f"{c}:{sent[c]}"
            ex.add(rid, f"client{c}", self.req(n, steps))
            if self.previews:
                ex.watch(rid, self.preview_every)
            sent[c] += 1
            n += 1
        t0 = time.perf_counter()
        for c in range(clients):
            submit(c)
        done = 0
        while not ex.idle:
            for ev in ex.iterate():
                if isinstance(ev, Preview):          # what the worker does with one
                    Image.fromarray(ev.rgb).save(io.BytesIO(), format="PNG")
                if isinstance(ev, Finished):
                    t = time.perf_counter()
                    ev.image.image.save(io.BytesIO(), format="PNG")
                    png_s += time.perf_counter() - t
                    done += 1
                    c = int(ev.request_id.split(":")[0])
                    if sent[c] < per_client:
                        submit(c)
        wall = time.perf_counter() - t0
        st = ex.stats
        self.breakdown = (f"per image: text {st['text_s'] / done * 1e3:.1f} ms, U-Net "
                          f"{st['unet_s'] / done * 1e3:.1f} ms, decode+safety "
                          f"{st['finish_s'] / done * 1e3:.1f} ms, PNG {png_s / done * 1e3:.1f} ms, "
                          f"other {(wall - st['text_s'] - st['unet_s'] - st['finish_s'] - png_s) / done * 1e3:.1f} ms")
        return done / wall, st["unet_calls"] / max(done, 1)

    def head_of_line(self, steps_long: int, steps_short: int, band: float = 2.0):
        from latentd.worker.executor import BatchExecutor, Finished
        self.prepare(16)

        def short_latency(ex):
            t0 = time.perf_counter()
            ex.add("short", "k2", self.req(99, steps_short))
            while True:
                for ev in ex.iterate():
                    if isinstance(ev, Finished) and ev.request_id == "short":
                        ev.image.image.save(io.BytesIO(), format="PNG")
                        return time.perf_counter() - t0
        alone = short_latency(BatchExecutor(self.pipe, max_batch=16))
        ex = BatchExecutor(self.pipe, max_batch=16, band=band)
        for i in range(8):
            ex.add(f"long{i}", "k1", self.req(i, steps_long))
        for _ in range(3):
            ex.iterate()                         # all eight are running
        busy = short_latency(ex)
        return alone, busy

    def close(self):
        pass


# --- full stack --------------------------------------------------------------------------------
KEY = "ltd_bench_0123456789abcdef0123456789"


class Stack:
    name = "full stack: redis-server + `latentd worker` + API (uvicorn) over HTTP"
    previews = False

    def __init__(self, model: str):
        from latentd.app.auth import hash_key
        from devkit.services import RedisServer
        self.model = model
        self.redis = RedisServer().start()
        self.keys = f"bench:{hash_key(KEY)}"
        self.worker = self.api = None
        self.max_batch = None

    def _start(self, max_batch: int):
        if self.max_batch == max_batch:
            return
        from devkit.api_proc import ApiProc
        from devkit.services import WorkerProc, free_port
        if self.worker:
            self.worker.stop()
        self.metrics_port = free_port()
        threads = os.environ.get("BENCH_THREADS")
        self.worker = WorkerProc(self.redis.url, self.model, worker_max_batch=max_batch,
                                 worker_metrics_port=self.metrics_port, progress_interval_s=0.25)
        if threads:
            self.worker.env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        else:       # the worker's own choice, as deployed (worker/cpu.py: usable cores, governor)
            for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                self.worker.env.pop(k, None)
        self.worker.start().wait_ready()
        if self.api is None:
            self.api = ApiProc(self.redis.url, api_keys=self.keys, model=self.model,
                               rate_limit_per_s=0, sync_wait_s=600, queue_cap=10000).start()
        self.max_batch = max_batch

    def prepare(self, max_batch: int):
        self._start(max_batch)
        with self.api.client(KEY, timeout=600) as http:
            self._post(http, 0, 2)                                 # warm up the fresh worker

    def _post(self, client, i: int, steps: int):
        kind = edit_kind(i)
        if kind is not None:
            img, mask = edit_inputs(self.model)
            files = [("image", ("init.png", png_bytes(img), "image/png"))]
            if kind == "inpaint":
                files.append(("mask", ("mask.png", png_bytes(mask), "image/png")))
            fields = {"prompt": prompt(i), "steps": str(steps), "seed": str(1000 + i),
                      "response_format": "b64_json",
                      "strength": str(IMG2IMG_STRENGTH if kind == "img2img" else 1.0)}
            r = client.post("/v1/images/edits", data=fields, files=files)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
            return r
        body = {"prompt": prompt(i), "steps": steps, "seed": 1000 + i, "response_format": "b64_json"}
        if self.previews:                    # OpenAI-style streaming with 3 partial images
            with client.stream("POST", "/v1/images/generations",
                               json={**body, "stream": True, "partial_images": 3}) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
                text = "".join(r.iter_text())
            if "image_generation.completed" not in text:
                raise RuntimeError(f"stream ended without an image: {text[-300:]}")
            return r
        r = client.post("/v1/images/generations", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
        return r

    def _metric(self, name: str) -> float:
        import httpx
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def throughput(self, max_batch: int, clients: int, per_client: int, steps: int):
        self._start(max_batch)
        calls0 = self._metric("latentd_worker_unet_calls_total")
        imgs0 = self._metric("latentd_worker_images_generated_total")
        throttled0 = self._metric("latentd_worker_throttled_seconds_total")
        errors = []

        def client(c):
            try:
                with self.api.client(KEY, timeout=600) as http:
                    for k in range(per_client):
                        self._post(http, c * per_client + k, steps)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        if errors:
            raise errors[0]
        calls = self._metric("latentd_worker_unet_calls_total") - calls0
        imgs = self._metric("latentd_worker_images_generated_total") - imgs0
        throttled = self._metric("latentd_worker_throttled_seconds_total") - throttled0
        self.breakdown = (f"worker on fewer threads than cores (busy neighbours) for "
                          f"{throttled:.1f} s of {wall:.1f} s")
        return clients * per_client / wall, calls / max(imgs, 1)

    def head_of_line(self, steps_long: int, steps_short: int):
        self.prepare(16)
        with self.api.client(KEY, timeout=600) as http:
            t0 = time.perf_counter()
            self._post(http, 99, steps_short)
            alone = time.perf_counter() - t0
            ids = []
            for i in range(8):
                r = http.post("/v1/jobs", json={"prompt": prompt(i), "steps": steps_long,
                                                "seed": 2000 + i})
                ids.append(r.json()["id"])
            while True:                      # until all eight are running
                js = [http.get(f"/v1/jobs/{j}").json() for j in ids]
                if all(j["status"] == "running" and j["progress"]["step"] >= 1 for j in js):
                    break
                time.sleep(0.05)
            t0 = time.perf_counter()
            self._post(http, 99, steps_short)
            busy = time.perf_counter() - t0
            for j in ids:                    # wait for the long ones, so later runs start clean
                while http.get(f"/v1/jobs/{j}").json()["status"] in ("queued", "running"):
                    time.sleep(0.2)
        return alone, busy

    def close(self):
        for p in (self.api, self.worker, self.redis):
            if p:
                p.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setup", choices=("stack", "inprocess"), default="stack")
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=20, help="steps per request in the throughput runs")
    ap.add_argument("--per-client", type=int, default=2, help="requests per client (closed loop)")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds (one at a time, then batched); the median gain is reported")
    ap.add_argument("--previews", choices=("off", "on", "both"), default="off",
                    help="live previews in the throughput runs (both: compare, max batch 16)")
    ap.add_argument("--preview-every", type=int, default=5,
                    help="in process: a preview every k steps of every request")
    ap.add_argument("--edit-every", type=int, default=0,
                    help="every K-th request is an edit (img2img / inpainting, alternating); 0: none")
    args = ap.parse_args(argv)
    global EDIT_EVERY
    EDIT_EVERY = args.edit_every

    model, model_label = pick_model(args.model)
    bench = (Stack if args.setup == "stack" else InProcess)(model)
    bench.preview_every = args.preview_every
    if args.previews != "off":
        return previews_main(bench, args, model_label)
    import torch
    print(f"setup : {bench.name}")
    print(f"model : {model_label}")
    print(f"device: cpu, torch {torch.__version__}, {os.cpu_count()} cores "
          f"(shared; torch threads {os.environ.get('BENCH_THREADS') or 'in process 1, stack: the worker decides'})")
    print(f"requests: {args.steps} steps, native size, default sampler; "
          f"{args.per_client} per client, closed loop"
          + (f"; every {args.edit_every}th an edit (img2img strength {IMG2IMG_STRENGTH} / inpainting)"
             if args.edit_every else ""))
    try:
        clients = [int(x) for x in args.clients.split(",")]
        runs = {}     # (max batch, clients) -> [(img/s, U-Net calls/image)], one per round
        for r in range(args.repeat):
            # One round measures one at a time and batched back to back, so each ratio compares
            # runs made under the same machine conditions: on a shared VM the speed drifts by
            # ~10 % over minutes, more than the effects measured here.
            for mb in (1, 16):               # one worker per setting, warmed up, all client counts
                bench.prepare(mb)
                for c in clients:
                    ips, calls = bench.throughput(mb, c, args.per_client, args.steps)
                    runs.setdefault((mb, c), []).append((ips, calls))
                    print(f"  round {r + 1}, max batch {mb:>2}, clients {c:>2}: {ips:7.2f} img/s, "
                          f"U-Net calls/image {calls:5.2f}, load average {os.getloadavg()[0]:.2f}",
                          flush=True)
                    if getattr(bench, "breakdown", None):
                        print(f"      {bench.breakdown}")
        gains = {c: sorted(f[0] / b[0] for b, f in zip(runs[1, c], runs[16, c])) for c in clients}
        for c in clients:
            base = statistics.median(x[0] for x in runs[1, c])
            fast = statistics.median(x[0] for x in runs[16, c])
            calls = statistics.median(x[1] for x in runs[16, c])
            print(f"clients {c:>2}: max batch 1 {base:6.2f} img/s | max batch 16 {fast:6.2f} img/s "
                  f"| x{statistics.median(gains[c]):.2f} (rounds: "
                  f"{', '.join(f'x{g:.2f}' for g in gains[c])}) | U-Net calls/image {calls:.2f}")
        alone, busy = bench.head_of_line(50, 10)
        print(f"head-of-line: 10-step request alone {alone:.3f} s, while eight 50-step run "
              f"{busy:.3f} s -> x{busy / alone:.2f} (target <= 1.5)")
        if isinstance(bench, InProcess):     # the same without shortest-remaining-first bands
            alone, busy = bench.head_of_line(50, 10, band=float("inf"))
            print(f"  (plain continuous batching, band=inf: alone {alone:.3f} s, busy {busy:.3f} s"
                  f" -> x{busy / alone:.2f})")
        if 16 in clients:
            print(f"16 clients: x{statistics.median(gains[16]):.2f} images/s vs one at a time "
                  f"(median of {args.repeat} rounds; target >= 2.5)")
    finally:
        bench.close()
    return 0


def previews_main(bench, args, model_label) -> int:
    """Throughput at max batch 16 with previews on (and off, for `both`)."""
    print(f"setup : {bench.name}")
    print(f"model : {model_label}")
    what = ("stream: true, partial_images: 3" if isinstance(bench, Stack)
            else f"a preview every {args.preview_every} steps per request")
    print(f"requests: {args.steps} steps, {args.per_client} per client, closed loop; previews: {what}")
    modes = {"on": [True], "both": [False, True]}[args.previews]
    clients = [int(x) for x in args.clients.split(",")]
    res = {}
    try:
        for on in modes:
            bench.previews = on
            bench.prepare(16)
            for c in clients:
                runs = [bench.throughput(16, c, args.per_client, args.steps) for _ in range(args.repeat)]
                res[on, c] = max(runs)[0]
                print(f"  previews {'on ' if on else 'off'}, clients {c:>2}: {res[on, c]:7.2f} img/s",
                      flush=True)
        if len(modes) == 2:
            for c in clients:
                cost = 1 - res[True, c] / res[False, c]
                print(f"clients {c:>2}: previews cost {cost * 100:5.1f} % of throughput (target <= 3 % at 16)")
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
