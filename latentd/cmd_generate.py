"""`latentd generate "PROMPT" --out FILE.png`: text (or an init image, and a mask) -> PNG with the
engine, no service needed (or with `--server URL`, on a running service: latentd/cmd_remote.py).
The request is resolved by model.request.resolve, as the API's are."""
from __future__ import annotations

import argparse
import os
import sys

from latentd.model.classifier_spec import DEFAULT_SCALE
from latentd.model.request import DEFAULT_STRENGTH, SAMPLERS


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--model", default=None,
                   help="diffusers folder, single-file .safetensors or hub id (default: LATENTD_MODEL, "
                        "else the bundled model in models/shapes)")
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--negative", default="", help="negative prompt (default: none = unconditional)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--sampler", choices=SAMPLERS, default=None)
    p.add_argument("--karras", action="store_true", default=None,
                   help="Karras sigmas (euler, euler_a, dpmpp_2m)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=_size, default=None, metavar="WxH", help="default: the model's native size")
    p.add_argument("--init-image", default=None, metavar="IMG",
                   help="edit this image (PNG/JPEG/WebP; img2img, or inpainting with --mask); the "
                        "output has its size unless --size says otherwise")
    p.add_argument("--mask", default=None, metavar="MASK",
                   help="inpainting mask, same size as --init-image: grayscale (white = repaint) or "
                        "RGBA (transparent = repaint)")
    p.add_argument("--strength", type=float, default=None, metavar="S",
                   help="edits: 0 < S <= 1, how much of the schedule runs (default: "
                        f"{DEFAULT_STRENGTH['img2img']} img2img, {DEFAULT_STRENGTH['inpaint']} inpainting)")
    p.add_argument("--classify", default=None, metavar="ATTR=LABEL,...",
                   help="classifier guidance toward these labels of the model's classifier, e.g. "
                        "color=red,shape=triangle (the bundled model: color, shape, background)")
    p.add_argument("--classifier-scale", type=float, default=None, metavar="S",
                   help=f"classifier guidance scale (default {DEFAULT_SCALE:g}; needs --classify)")
    p.add_argument("--no-safety", action="store_true", help="skip the safety checker")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="default: float16 on cuda, float32 on cpu")
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

    from latentd.model.errors import InvalidRequest, ModelLoadError
    from latentd.model.pipeline import GenerationRequest, load_pipeline
    from latentd.model.request import resolve

    model = args.model
    if model is None:
        from latentd.config.settings import get_settings

        model = get_settings().model
    dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    try:
        pipe = load_pipeline(model, device=args.device, dtype=getattr(torch, dtype), safety=not args.no_safety)
    except ModelLoadError as e:
        print(f"latentd generate: cannot load the model: {e}", file=sys.stderr)
        return 2
    width, height = args.size if args.size else (None, None)
    try:
        image, mask = _edit_inputs(args)
        r = resolve(pipe.info, prompt=args.prompt, negative_prompt=args.negative, width=width,
                    height=height, steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler,
                    karras=args.karras, eta=args.eta, seed=args.seed,
                    image_size=None if image is None else image.size,
                    mask_size=None if mask is None else mask.size, strength=args.strength,
                    classifier_guidance=_classify(args))
    except InvalidRequest as e:
        print(f"latentd generate: invalid {e.field}: {e.message}", file=sys.stderr)
        return 2
    req = GenerationRequest(prompt=r.prompt, negative_prompt=r.negative_prompt, width=r.width,
                            height=r.height, steps=r.steps, guidance_scale=r.guidance_scale,
                            sampler=r.sampler, karras=r.karras, eta=r.eta, seed=r.seed,
                            init_image=image, mask=mask, strength=r.strength,
                            classifier_targets=r.classifier_targets, classifier_scale=r.classifier_scale)
    from latentd.worker.cpu import ThreadGovernor
    gov = ThreadGovernor(torch.get_num_threads(), torch.set_num_threads) if args.device == "cpu" else None

    def step(i, s, total):
        bar.update(1)
        if gov is not None:
            gov.tick()

    with tqdm(total=req.run_steps, desc="denoising", unit="step") as bar:
        result = pipe.generate([req], callback=step)[0]
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


def _classify(args) -> dict | None:
    """--classify color=red,shape=triangle [--classifier-scale S] -> the API's classifier_guidance."""
    from latentd.model.errors import InvalidRequest
    if args.classify is None:
        if args.classifier_scale is not None:
            raise InvalidRequest("classifier-scale", "needs --classify ATTR=LABEL,...")
        return None
    out: dict = {}
    for part in args.classify.split(","):
        attr, sep, label = part.partition("=")
        if not sep or not attr.strip() or not label.strip():
            raise InvalidRequest("classify", f"expected ATTR=LABEL[,ATTR=LABEL...], got {args.classify!r}")
        out[attr.strip()] = label.strip()
    if args.classifier_scale is not None:
        out["scale"] = args.classifier_scale
    return out


def _edit_inputs(args):
    """(init image, L mask) from --init-image / --mask, checked like the API's uploads."""
    from latentd.model.edit_inputs import mask_to_l, open_image
    from latentd.model.errors import InvalidRequest
    from latentd.model.request import MAX_IMAGE_PIXELS

    def read(path, field):
        try:
            with open(path, "rb") as f:
                return open_image(f.read(), field, MAX_IMAGE_PIXELS)
        except OSError as e:
            raise InvalidRequest(field, f"cannot read {path}: {e.strerror or e}") from None

    if args.init_image is None:
        if args.mask is not None:
            raise InvalidRequest("mask", "needs --init-image")
        return None, None
    image = read(args.init_image, "init-image")
    mask = None if args.mask is None else mask_to_l(read(args.mask, "mask"))
    return image, mask
