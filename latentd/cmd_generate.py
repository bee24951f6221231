"""`latentd generate "PROMPT" --out FILE.png`: text (or an init image, and a mask) -> PNG with the
engine, no service needed (or with `--server URL`, on a running service: latentd/cmd_remote.py).

The request flags are derived from the request declaration (jobs/request.py, surface "cli"), and
`request_values` (latentd/cli_request.py) reads them back into request fields, for both paths: locally they are resolved
once (jobs/request_resolve.py, as the API resolves its bodies), with `--server` they become the
POST /v1/jobs body, so both run the same request and draw the same image."""
from __future__ import annotations

import argparse
import io
import os
import sys

from latentd.cli_request import add_request_arguments, read_file, request_values

def add_arguments(p: argparse.ArgumentParser) -> None:
    add_request_arguments(p)
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--no-safety", action="store_true", help="skip the safety checker (local engine)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (local engine)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="default: float16 on cuda, float32 on cpu (local engine)")
    p.add_argument("--server", default=None, metavar="URL",
                   help="run on a latentd service (e.g. http://127.0.0.1:8000) instead of the local "
                        "engine; progress comes from the job's event stream")
    p.add_argument("--key", default=os.environ.get("LATENTD_API_KEY"),
                   help="API key for --server (default: $LATENTD_API_KEY)")


def run(args: argparse.Namespace) -> int:
    if args.server:
        from latentd.cmd_remote import run_remote

        return run_remote(args)
    from latentd.worker import cpu
    from latentd.config.settings import get_settings
    cpu.configure(get_settings().cpu_threads)     # before torch is imported
    import torch
    from tqdm import tqdm

    from latentd.jobs.request_resolve import resolve
    from latentd.jobs.spec import image_request_kwargs
    from latentd.model.errors import InvalidRequest, ModelLoadError
    from latentd.model.info import BUNDLED
    from latentd.model.pipeline import GenerationRequest, load_pipeline

    try:
        values = request_values(args)
    except InvalidRequest as e:
        print(f"latentd generate: invalid {e.field}: {e.message}", file=sys.stderr)
        return 2
    model = values.pop("model") or get_settings().model
    dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    try:
        pipe = load_pipeline(model, device=args.device, dtype=getattr(torch, dtype), safety=not args.no_safety)
    except ModelLoadError as e:
        print(f"latentd generate: cannot load the model: {e}", file=sys.stderr)
        return 2
    model_dir = model or BUNDLED
    model_dir = model_dir if os.path.isdir(model_dir) else None
    try:
        image, mask = _edit_inputs(values.pop("image"), values.pop("mask"))
        r = resolve(pipe.info, **values, image_size=None if image is None else image.size,
                    mask_size=None if mask is None else mask.size, lora_check=LocalAdapters(model_dir))
    except InvalidRequest as e:
        print(f"latentd generate: invalid {e.field}: {e.message}", file=sys.stderr)
        return 2
    init = _as_stored(image, mask, r.width, r.height)
    try:
        loras = _loras(pipe, model_dir, r.loras)
    except ValueError as e:
        print(f"latentd generate: invalid lora: {e}", file=sys.stderr)
        return 2
    # the engine request as a worker builds it from the job, so both draw the same image
    req = GenerationRequest(**image_request_kwargs(r, 0), loras=loras, **init)
    from latentd.worker.cpu import ThreadGovernor
    gov = ThreadGovernor(torch.get_num_threads(), torch.set_num_threads) if args.device == "cpu" else None

    def step(i, s, total):
        bar.update(1)
        if gov is not None:
            gov.tick()

    with tqdm(total=req.run_steps, desc="denoising", unit="step") as bar:
        result = pipe.run([req], callback=step)[0]      # resolved above: nothing to resolve again
    result.image.save(args.out, format="PNG")
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if result.nsfw:
        print("warning: the safety checker flagged the image; a black image was written", file=sys.stderr)
    t = result.timings
    edit = f" strength={req.strength:g}" if req.init_image is not None else ""
    print(f"{args.out}: {result.image.width}x{result.image.height} seed={result.seed} "
          f"sampler={req.sampler}{'+karras' if req.karras else ''} steps={req.steps} "
          f"guidance={req.guidance_scale:g}{edit} in {t['total']:.2f}s (denoise {t['denoise']:.2f}s)")
    return 0


def _loras(pipe, model_dir: str | None, loras) -> tuple:
    """--lora files and names (in LATENTD_LORA_DIR, then the model folder's loras/) loaded as the
    worker loads them (model/lora_library.py); LoraFormatError names the one that cannot be used."""
    if not loras:
        return ()
    from latentd.config.settings import get_settings
    from latentd.model.lora_library import LoraLibrary

    s = get_settings()
    out = LoraLibrary(pipe, model_dir, s.lora_dir or "", s.lora_cache_mb).resolve(loras)
    names = [a.name for a, _ in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:                              # a file and a name (or two files) that are one adapter
        raise ValueError(f"adapter {twice[0]!r} is asked for twice")
    return out


class LocalAdapters:
    """The resolver's lora_check for the local engine (the API's is app/loras.py Checker): an
    adapter is a name in the adapter folders or a .safetensors path; `meant_for()` gives what the
    folders' adapters and the ones named say they are meant for (the few-step gate)."""

    def __init__(self, model_dir: str | None):
        from latentd.config.settings import get_settings
        from latentd.model import lora_catalog

        self.dirs = lora_catalog.folders(model_dir, get_settings().lora_dir or "")
        self.named: dict[str, dict] = {}

    def __call__(self, name: str) -> str | None:
        from latentd.model import lora_catalog

        try:
            _, path = lora_catalog.locate(name, self.dirs)
            self.named[name] = lora_catalog.describe(path, name).meant_for
        except lora_catalog.LoraFormatError as e:
            return str(e)
        return None

    def meant_for(self) -> dict[str, dict]:
        from latentd.model import lora_catalog

        listed = {n: lo.meant_for for n, lo in lora_catalog.listing(self.dirs).items()
                  if isinstance(lo, lora_catalog.LoraInfo)}
        return {n: m for n, m in {**listed, **self.named}.items() if m}


def _edit_inputs(image_path: str | None, mask_path: str | None):
    """(init image, L mask) from --init-image / --mask, checked like the API's uploads."""
    from latentd.jobs.request import MAX_IMAGE_PIXELS
    from latentd.model.edit_inputs import mask_to_l, open_image
    from latentd.model.errors import InvalidRequest

    if image_path is None:
        if mask_path is not None:
            raise InvalidRequest("mask", "needs --init-image")
        return None, None
    image = open_image(read_file(image_path, "init-image"), "init-image", MAX_IMAGE_PIXELS)
    mask = None if mask_path is None else mask_to_l(open_image(read_file(mask_path, "mask"), "mask",
                                                               MAX_IMAGE_PIXELS))
    return image, mask


def _as_stored(image, mask, width: int, height: int) -> dict:
    """The init image and mask exactly as the service stores an edit's (RGB / L, resized to the
    output size, through PNG), so a local edit draws what `--server` draws."""
    from PIL import Image

    from latentd.model.edit_inputs import normalised_png

    if image is None:
        return {}
    out = {"init_image": Image.open(io.BytesIO(normalised_png(image, width, height, "RGB"))).convert("RGB")}
    if mask is not None:
        out["mask"] = Image.open(io.BytesIO(normalised_png(mask, width, height, "L"))).convert("L")
    return out
