"""The GPU fast path, measured in one run, printed as one table.

    python bench/gpu.py [--timeout 540] [--out results.json] [--model DIR] [--only a,b]
    python bench/gpu.py --tiny            # every section on a tiny random model (runs on a CPU)

Stable Diffusion 1.5's architecture with random weights written locally (no download), 512x512,
50 steps, DPM++ 2M, CFG 7.5, safety checker on:

  sdpa       which scaled_dot_product_attention kernels the U-Net's attention runs on
  eager      latentd's engine, batch 1 / 4 / 16 / 32: s per image, images/s, peak device memory
  syncs      two denoising steps under torch.cuda.set_sync_debug_mode("error")
  diffusers  StableDiffusionPipeline in the same dtype with SDPA (its default), the baseline
  compile    latentd with the U-Net step torch.compiled (LATENTD_COMPILE=on): compile time and
             the same figures; then CUDA graphs ("cudagraphs") at batch 1
  memory     the measured per-request device memory that worker admission uses
  parity     half precision against float32 on the same weights: max pixel difference
  service    redis-server, the API and one worker on loopback, 16 concurrent clients:
             images/s and p50/p95 latency of POST /v1/images/generations
  sdxl       SDXL base's architecture (random weights), 1024x1024, 30 steps, DPM++ 2M, CFG 7.5:
             latentd and StableDiffusionXLPipeline at batch 1 and 4, s per image and peak device
             memory (bench/gpu_sdxl.py); `--only sdxl` runs it alone

Float16 on CUDA; on a CPU float32 (bfloat16 for the parity check). Each section is guarded: one
failing does not lose the others, and the whole run stops at --timeout (sections that would not
fit are skipped, most important first). Rows print as they come; the table again at the end.
No assertions: this is a measurement (tests/test_bench_gpu.py runs it with --tiny).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # bench/ and devkit/ are repository folders, not part of the installed latentd
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._stack import pct  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse on the moon"
COLUMNS = (("section", 10), ("config", 30), ("s/image", 8), ("images/s", 8), ("peak GB", 8),
           ("p50 s", 7), ("p95 s", 7), ("note", 0))
KEYS = ("section", "config", "s_per_image", "images_per_s", "peak_gb", "p50_s", "p95_s", "note")


class OutOfTime(BaseException):
    """--timeout reached (a BaseException, so that no library's `except Exception` swallows it)."""


def _fmt(v, width):
    if v is None:
        s = "-"
    elif isinstance(v, float):
        s = f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    else:
        s = str(v)
    return s.ljust(width) if width else s


def row_text(r: dict) -> str:
    return " ".join(_fmt(r.get(k), w) for k, (_, w) in zip(KEYS, COLUMNS))


class Bench:
    def __init__(self, a):
        self.a = a
        self.rows: list[dict] = []
        self.start = time.monotonic()
        self.deadline = self.start + a.timeout
        self.device = torch.device("cuda" if torch.cuda.is_available() and not a.cpu else "cpu")
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.float16 if self.cuda else torch.float32
        self.half = torch.float16 if self.cuda else torch.bfloat16
        self.folder: str | None = a.model
        self.pipe = None
        self.peaks: dict[int, float] = {}

    # --- bookkeeping ---------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def row(self, section: str, config: str, **vals) -> None:
        r = {"section": section, "config": config, **vals}
        self.rows.append(r)
        print(row_text(r), flush=True)

    def run(self, name: str, fn, need_s: float) -> None:
        if self.a.only and name != "build" and name.split(":")[0] not in self.a.only:
            return
        need_s = need_s if not self.a.tiny else min(need_s, 20)
        if self.left() < need_s:
            self.row(name, "-", note=f"skipped: {self.left():.0f}s of --timeout left, needs ~{need_s:.0f}s")
            return
        try:
            fn()
        except OutOfTime:
            self.row(name, "-", note="stopped: --timeout reached")
        except Exception as e:  # noqa: BLE001 - one section failing must not lose the others
            traceback.print_exc()
            self.row(name, "-", note=f"FAILED: {type(e).__name__}: {str(e)[:300]}")
        finally:
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    def device_name(self) -> str:
        if self.cuda:
            p = torch.cuda.get_device_properties(0)
            return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})"
        import platform
        return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"

    # --- model ---------------------------------------------------------------------------------
    def build(self) -> None:
        t0 = time.perf_counter()
        path = Path(tempfile.mkdtemp(prefix="latentd-bench-gpu-")) / ("tiny" if self.a.tiny else "sd15")
        if self.a.tiny:
            from devkit.tiny_model import make_tiny_sd
            make_tiny_sd(path, "sd1", safety=True, seed=0)
        else:
            build_sd15(path, self.device)
        self.folder = str(path)
        self.row("build", "random weights written", note=f"{time.perf_counter() - t0:.0f}s, {path}")

    def load(self, dtype, safety=True):
        from latentd.model.pipeline import load_pipeline
        pipe = load_pipeline(self.folder, device=str(self.device), dtype=dtype, safety=safety)
        if self.a.decode_tile is not None:
            pipe.decode_tile = self.a.decode_tile or None
        return pipe

    def requests(self, b: int, steps: int | None = None, seed0: int = 0):
        from latentd.model.pipeline import GenerationRequest
        return [GenerationRequest(prompt=PROMPT, width=self.a.size, height=self.a.size,
                                  steps=steps or self.a.steps, guidance_scale=7.5, sampler="dpmpp_2m",
                                  seed=seed0 + i) for i in range(b)]

    def timed(self, fn, reps: int = 1) -> float:
        times = []
        for _ in range(reps):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    # --- sections ------------------------------------------------------------------------------
    def sdpa(self) -> None:
        """Which attention kernels the U-Net's attention calls run on (profiled, not assumed)."""
        import torch.nn.functional as F
        if not self.cuda:
            self.row("sdpa", "cpu", note=f"CPU SDPA (flash CPU kernel in float32) - {torch.__version__}")
            return
        from torch.nn.attention import SDPBackend, sdpa_kernel
        h = 8
        tokens, d = (self.a.size // 8) ** 2, 320 // h
        q = torch.randn(2, h, tokens, d, device=self.device, dtype=self.dtype)
        ctx = torch.randn(2, h, 77, d, device=self.device, dtype=self.dtype)
        usable = []
        for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                         ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel([be]):
                    F.scaled_dot_product_attention(q, q, q)
                    F.scaled_dot_product_attention(q, ctx, ctx)
                usable.append(name)
            except RuntimeError:
                pass
        kernels = set()
        for k, v in (("self", q), ("cross", ctx)):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                F.scaled_dot_product_attention(q, v, v)
                torch.cuda.synchronize()
            names = [e.name for e in prof.events() if any(s in e.name.lower() for s in
                                                         ("flash", "fmha", "attention", "attn", "mem_eff"))]
            kernels.add(f"{k}: {names[0][:60] if names else '?'}")
        self.row("sdpa", f"{tokens} tokens, head dim {d}", note=f"usable: {', '.join(usable)}; runs "
                 + "; ".join(sorted(kernels)))

    def ensure_pipe(self):
        if self.pipe is None:
            t0 = time.perf_counter()
            self.pipe = self.load(self.dtype)
            self.row("load", f"latentd {str(self.dtype)[6:]}", note=f"{time.perf_counter() - t0:.1f}s")
        return self.pipe

    def eager(self, batches) -> None:
        self.ensure_pipe()
        for b in batches:
            self.generate_row("eager", b)

    def generate_row(self, section: str, b: int, note=lambda: "") -> None:
        pipe = self.pipe
        t0 = time.perf_counter()
        pipe.generate(self.requests(b, steps=2, seed0=1000))      # warm-up: allocator, cuDNN, compile
        self.sync()
        warm = time.perf_counter() - t0
        reqs = self.requests(b)
        self.reset_peak()
        dt = self.timed(lambda: pipe.generate(reqs), reps=2 if b == 1 else 1)
        peak = self.peak_gb()
        if section == "eager" and peak is not None:
            self.peaks[b] = peak
        self.row(section, f"batch {b}", s_per_image=dt / b, images_per_s=b / dt, peak_gb=peak,
                 note=(note() + f" warm-up {warm:.1f}s").strip())

    def syncs(self) -> None:
        if not self.cuda:
            self.row("syncs", "cpu", note="n/a on the CPU (tests/test_gpu_path.py checks no tensor is read back)")
            return
        pipe = self.ensure_pipe()
        reqs = self.requests(2, steps=4)
        states = [pipe.start(r, c) for r, c in zip(reqs, pipe.encode(reqs))]
        pipe.step(states)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            pipe.step(states)
            pipe.step(states)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        self.row("syncs", "2 steps, sync debug 'error'", note="no host sync inside the denoising loop")

    def diffusers(self, batches) -> None:
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
        t0 = time.perf_counter()
        resident = torch.cuda.memory_allocated() / 2**30 if self.cuda else 0.0   # latentd's weights
        dp = StableDiffusionPipeline.from_pretrained(self.folder, torch_dtype=self.dtype).to(self.device)
        dp.scheduler = DPMSolverMultistepScheduler.from_config(dp.scheduler.config, algorithm_type="dpmsolver++",
                                                               solver_order=2)
        dp.set_progress_bar_config(disable=True)
        self.row("load", f"diffusers {str(self.dtype)[6:]}", note=f"{time.perf_counter() - t0:.1f}s")
        try:
            for b in batches:
                def run(steps):
                    dp(prompt=[PROMPT] * b, num_inference_steps=steps, guidance_scale=7.5, height=self.a.size,
                       width=self.a.size, generator=[torch.Generator("cpu").manual_seed(i) for i in range(b)])
                run(2)
                self.reset_peak()
                dt = self.timed(lambda: run(self.a.steps), reps=2 if b == 1 else 1)
                mine = next((r for r in self.rows if r["section"] == "eager" and r["config"] == f"batch {b}"), None)
                ratio = f"; latentd eager / diffusers = {mine['s_per_image'] * b / dt:.2f}" if mine else ""
                peak = self.peak_gb()
                self.row("diffusers", f"batch {b}", s_per_image=dt / b, images_per_s=b / dt,
                         peak_gb=None if peak is None else peak - resident,
                         note="StableDiffusionPipeline, SDPA" + ratio)
        finally:
            dp = None           # free diffusers' weights before the next section

    def compile(self, mode: str, batches) -> None:
        from latentd.model import compile as compiling
        if not batches:
            return
        self.ensure_pipe()
        eager_unet = self.pipe.unet
        torch._dynamo.reset()
        cu = compiling.enable(self.pipe, mode, max_batch=max(self.a.batches))
        try:
            for b in batches:
                if self.left() < (20 if self.a.tiny else 150):
                    self.row(f"compile:{mode}", f"batch {b}", note="skipped: too little --timeout left")
                    continue
                before = cu.compiles
                self.generate_row(f"compile:{mode}", b, note=lambda: f"{cu.compiles - before} compile(s);")
        finally:
            self.pipe.unet = eager_unet

    def memory(self) -> None:
        from latentd.model.memory import measure
        cost = measure(self.ensure_pipe(), n=4)
        if cost is None:
            self.row("memory", "cpu", note="n/a on the CPU (no peak-allocation counter); formula estimate used")
            return
        pred = {b: (cost.weights_mb + cost.fixed_mb + b * cost.per_request_mb) / 1024 for b in self.peaks}
        seen = ", ".join(f"b{b}: predicted {pred[b]:.2f} GB / measured {self.peaks[b]:.2f} GB" for b in sorted(pred))
        self.row("memory", f"{cost.size[0]}x{cost.size[1]} latent", peak_gb=cost.weights_mb / 1024,
                 note=f"weights {cost.weights_mb:.0f} MB, fixed {cost.fixed_mb:.0f} MB, "
                      f"{cost.per_request_mb:.0f} MB/request; {seen}")

    def parity(self) -> None:
        req = self.requests(1)[0]
        imgs = {}
        for dtype in (self.half, torch.float32):
            own = self.pipe is not None and self.pipe.dtype == dtype
            pipe = self.pipe if own else self.load(dtype, safety=False)
            saved, pipe.safety = pipe.safety, None
            try:
                imgs[dtype] = np.asarray(pipe.generate([req])[0].image).astype(np.int16)
            finally:
                pipe.safety = saved
            del pipe
            gc.collect()
        d = np.abs(imgs[self.half] - imgs[torch.float32])
        self.row("parity", f"{str(self.half)[6:]} vs float32, 1 image",
                 note=f"max pixel diff {int(d.max())}/255, mean {d.mean():.2f}, "
                      f"{(d > 8).mean() * 100:.1f}% of values off by > 8")

    def service(self) -> None:
        from latentd.cmd_dev import DevRedis
        from devkit.api_proc import ApiProc
        from devkit.services import WorkerProc

        a = self.a
        path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
        redis = DevRedis("redis://127.0.0.1:1/0", None)
        url = redis.start()
        worker = api = None
        try:
            t0 = time.perf_counter()
            worker = WorkerProc(url, self.folder, worker_max_batch=a.clients, compile=a.service_compile,
                                safety="true")
            worker.env["PYTHONPATH"] = path
            worker.start()
            api = ApiProc(url, model=self.folder, auth="off", env="dev", rate_limit_per_s=0,
                          queue_cap=100000, sync_wait_s=3600, log_level="warning")
            api.env["PYTHONPATH"] = path
            api.start(timeout=120)
            worker.wait_ready(timeout=max(10.0, self.left() - 30))
            import httpx
            while httpx.get(api.url + "/readyz", timeout=5).status_code != 200:
                time.sleep(0.2)
            ready_s = time.perf_counter() - t0

            def post(client, seed):
                t = time.perf_counter()
                r = client.post("/v1/images/generations", json={
                    "prompt": PROMPT, "size": f"{a.size}x{a.size}", "n": 1, "steps": a.steps,
                    "guidance_scale": 7.5, "sampler": "dpmpp_2m", "seed": seed, "response_format": "b64_json"})
                return r.status_code, time.perf_counter() - t

            with api.client(timeout=3600) as c:
                code, warm = post(c, 99999)                        # warm-up, not counted
            if code != 200:
                raise RuntimeError(f"warm-up request answered {code}")
            lat, codes, lock = [], {}, threading.Lock()

            def client_thread(i):
                with api.client(timeout=3600) as c:
                    for j in range(a.requests):
                        code, dt = post(c, i * 1000 + j)
                        with lock:
                            codes[code] = codes.get(code, 0) + 1
                            if code == 200:
                                lat.append(dt)

            t0 = time.perf_counter()
            threads = [threading.Thread(target=client_thread, args=(i,), daemon=True) for i in range(a.clients)]
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.5)                 # join in slices, so --timeout's alarm can interrupt
            wall = time.perf_counter() - t0
            ok = codes.get(200, 0)
            lat.sort()
            self.row("service", f"{a.clients} clients x {a.requests} req", s_per_image=wall / max(ok, 1),
                     images_per_s=ok / wall, p50_s=pct(lat, 50), p95_s=pct(lat, 95),
                     note=f"answers {codes}; ready in {ready_s:.0f}s; first request {warm:.1f}s; "
                          f"worker compile={a.service_compile}")
        finally:
            for p in (worker, api):
                if p is not None:
                    p.stop()
            redis.stop()

    def sdxl(self) -> None:
        from bench.gpu_sdxl import sdxl_rows
        if self.pipe is not None:               # SD's weights off the device while SDXL runs
            self.pipe = None
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
        sdxl_rows(self, PROMPT)

    # --- all ------------------------------------------------------------------------------------
    def run_all(self) -> None:
        a = self.a
        print(f"latentd bench/gpu.py on {self.device_name()}; torch {torch.__version__}; "
              f"{'tiny random SD-1-style model' if a.tiny else 'SD 1.5 architecture, random weights'}, "
              f"{a.size}x{a.size}, {a.steps} steps, DPM++ 2M, CFG 7.5, safety checker on, "
              f"{str(self.dtype)[6:]}; --timeout {a.timeout:.0f}s", flush=True)
        print(" ".join(_fmt(n, w) for n, w in COLUMNS), flush=True)
        if self.cuda:
            from latentd.model.precision import tune_cuda
            tune_cuda()
        if self.folder is None and (not a.only or a.only - {"sdxl"}):
            self.run("build", self.build, 150)
        first, rest = a.batches[:1], a.batches[1:]
        self.run("sdpa", self.sdpa, 10)
        self.run("eager", lambda: self.eager(first), 90)
        self.run("syncs", self.syncs, 10)
        self.run("diffusers", lambda: self.diffusers(first), 90)
        self.run("compile", lambda: self.compile("on", a.compile_batches[:1]), 150)
        self.run("eager", lambda: self.eager(rest), 60)
        self.run("memory", self.memory, 15)
        self.run("parity", self.parity, 60)
        self.run("service", self.service, 150)
        self.run("sdxl", self.sdxl, 240)
        self.run("compile", lambda: self.compile("on", a.compile_batches[1:]), 150)
        if self.cuda:
            self.run("compile", lambda: self.compile("cudagraphs", a.compile_batches[:1]), 150)

    def report(self) -> int:
        a = self.a
        print(f"\n== latentd bench/gpu.py: {self.device_name()}, {time.monotonic() - self.start:.0f}s ==")
        print(" ".join(_fmt(n, w) for n, w in COLUMNS))
        for r in self.rows:
            print(row_text(r))
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"device": self.device_name(), "torch": torch.__version__, "args": vars(a),
                           "rows": self.rows}, f, indent=1, default=str)
        return 1 if any(str(r.get("note", "")).startswith("FAILED") for r in self.rows) else 0


def build_sd15(path: Path, device: torch.device) -> None:
    """SD 1.5's architecture with random weights (U-Net, VAE, CLIP ViT-L/14 text encoder, the
    ViT-L/14 safety checker), written in float16 in diffusers' layout. Built on `device` (seconds on
    a GPU; initialising 1.2 B parameters on a CPU takes minutes)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from devkit.sd15 import SD15_UNET, SD_VAE
    from devkit.tiny_model import SPECIAL, save_sd_folder, scheduler, tokenizer_files, write_tokenizer

    vocab, _ = tokenizer_files()
    ids = dict(bos_token_id=vocab[SPECIAL[0]], eos_token_id=vocab[SPECIAL[1]], pad_token_id=vocab[SPECIAL[1]])
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD_VAE)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                            num_hidden_layers=12, max_position_embeddings=77, projection_dim=768,
                                            hidden_act="quick_gelu", vocab_size=len(vocab), **ids))
        safety = StableDiffusionSafetyChecker(CLIPConfig(
            text_config=dict(hidden_size=64, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                             vocab_size=len(vocab), **ids),
            vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                               num_hidden_layers=24, image_size=224, patch_size=14, num_channels=3),
            projection_dim=768))
    write_tokenizer(path / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    fe = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                            do_center_crop=True, do_normalize=True, do_resize=True, do_convert_rgb=True,
                            resample=3, image_mean=[0.48145466, 0.4578275, 0.40821073],
                            image_std=[0.26862954, 0.26130258, 0.27577711])
    parts = {k: m.to(torch.float16).eval() for k, m in
             (("unet", unet), ("vae", vae), ("text_encoder", text), ("safety_checker", safety))}
    save_sd_folder(path, tokenizer=tokenizer, scheduler=scheduler("sd1"), feature_extractor=fe, **parts)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random model, 64x64, 4 steps (CPU-sized)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is there")
    ap.add_argument("--timeout", type=float, default=540.0, help="seconds for the whole run")
    ap.add_argument("--model", default=None, help="a diffusers SD folder instead of random weights")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    ap.add_argument("--only", default="", help="comma-separated sections to run (default: all)")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batches", default=None, help="latentd batch sizes, e.g. 1,4,16,32")
    ap.add_argument("--compile-batches", default=None, help="batch sizes compiled (default: --batches)")
    ap.add_argument("--clients", type=int, default=None, help="concurrent clients of the service")
    ap.add_argument("--requests", type=int, default=None, help="requests per client")
    ap.add_argument("--service-compile", default="off", help="LATENTD_COMPILE of the service's worker")
    ap.add_argument("--decode-tile", type=int, default=None,
                    help="latentd's VAE tile in latent cells (less decode memory; 0 = never tile)")
    a = ap.parse_args(argv)
    tiny = a.tiny
    a.size = a.size or (64 if tiny else 512)
    a.steps = a.steps or (4 if tiny else 50)
    a.batches = [int(x) for x in (a.batches or ("1,2" if tiny else "1,4,16,32")).split(",")]
    a.compile_batches = ([int(x) for x in a.compile_batches.split(",")] if a.compile_batches
                         else ([1] if tiny else list(a.batches)))
    a.clients = a.clients or (2 if tiny else 16)
    a.requests = a.requests or (1 if tiny else 2)
    a.only = {s for s in a.only.split(",") if s}
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    bench = Bench(a)

    def out_of_time(signum, frame):
        raise OutOfTime()

    signal.signal(signal.SIGALRM, out_of_time)
    signal.setitimer(signal.ITIMER_REAL, a.timeout)
    try:
        bench.run_all()
    except OutOfTime:
        bench.row("bench", "-", note="stopped: --timeout reached between sections")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return bench.report()


if __name__ == "__main__":
    sys.exit(main())
