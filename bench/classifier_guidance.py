"""Classifier guidance on the bundled model (Dhariwal & Nichol 2021): fidelity against diversity.

1. Empty prompt, guidance 1 (no classifier-free guidance), classifier guidance toward each label
   of each attribute (color, shape, background) at several scales: the procedural checker's
   accuracy on the guided attribute, and the diversity over seeds (spread of the shape's centre
   and size, mean pixel distance between images of the same target).
2. Captions with the model's default CFG, with and without classifier guidance toward the
   caption's own attributes: accuracy on all three.

    python bench/classifier_guidance.py [--seeds 8] [--scales 0 1 2 5 10 20] [--attributes shape]
                                        [--cfg-scales 0 2 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from latentd.model.info import BUNDLED


def geometry(image) -> tuple[float, float, float]:
    """(centre x, centre y, sqrt(area)) in pixels of what differs from the border colour."""
    a = np.asarray(image, dtype=np.float32)
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3),
                             a[:, -2:].reshape(-1, 3)])
    fg = np.abs(a - np.median(border, 0)).sum(-1) > 60
    if not fg.any():
        return float("nan"), float("nan"), 0.0
    ys, xs = np.nonzero(fg)
    return float(xs.mean()), float(ys.mean()), float(np.sqrt(fg.sum()))


def diversity(images) -> dict:
    g = np.array([geometry(im) for im in images])
    px = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])
    n = len(px)
    pair = [np.abs(px[i] - px[j]).mean() for i in range(n) for j in range(i + 1, n)]
    return {"centre_std_px": float(np.nanstd(g[:, 0]) + np.nanstd(g[:, 1])) / 2,
            "size_std_px": float(np.std(g[:, 2])), "pixel_distance": float(np.mean(pair)) if pair else 0.0}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=BUNDLED)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--scales", type=float, nargs="+", default=[0, 1, 2, 5, 10, 20])
    ap.add_argument("--cfg-scales", type=float, nargs="*", default=[0, 2, 5])
    ap.add_argument("--attributes", nargs="*", default=None, help="heads to guide (default: all)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from latentd.model.pipeline import GenerationRequest, load_pipeline
    from latentd.training import data, evaluate
    from latentd.training.shape_checker import classify

    pipe = load_pipeline(args.model, safety=False)
    info = pipe.info
    steps = args.steps or info.default_steps
    heads = pipe.classifier_heads
    if not heads:
        raise SystemExit(f"{args.model} has no classifier/")
    out = {"model": args.model, "steps": steps, "seeds": args.seeds, "empty_prompt": {}, "with_cfg": {}}
    print(f"empty prompt, guidance 1, {steps} steps {info.default_sampler}, {args.seeds} seeds per target; "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"{'attribute':>10} {'scale':>6} {'accuracy':>9} {'centre sd':>10} {'size sd':>8} {'pixel dist':>10}")
    for attr, labels in heads.items():
        if args.attributes is not None and attr not in args.attributes:
            continue
        for scale in args.scales:
            acc, divs = [], []
            for label in labels:
                reqs = [GenerationRequest(prompt="", guidance_scale=1.0, steps=steps, sampler=info.default_sampler,
                                          seed=2000 + k, classifier_targets=((attr, label),) if scale else (),
                                          classifier_scale=scale) for k in range(args.seeds)]
                images = [g.image for g in pipe.generate(reqs)]
                verdicts = [classify(im) for im in images]
                acc += [getattr(v, attr) == label for v in verdicts]
                divs.append(diversity(images))
            row = {"accuracy": float(np.mean(acc)),
                   **{k: float(np.mean([d[k] for d in divs])) for k in divs[0]}}
            out["empty_prompt"].setdefault(attr, {})[str(scale)] = row
            print(f"{attr:>10} {scale:>6g} {row['accuracy']:>9.1%} {row['centre_std_px']:>10.2f} "
                  f"{row['size_std_px']:>8.2f} {row['pixel_distance']:>10.3f}", flush=True)
    caps = evaluate.caption_list()
    print(f"\ncaptions x {args.seeds // 2 or 1} seeds, CFG {info.default_guidance} + classifier guidance toward "
          f"the caption's attributes")
    for scale in args.cfg_scales:
        reqs, truth = [], []
        for k in range(max(1, args.seeds // 2)):
            for c, s, b in caps:
                t = (("background", data.BG_NAMES[b]), ("color", data.COLOR_NAMES[c]), ("shape", data.SHAPES[s]))
                reqs.append(GenerationRequest(prompt=data.caption(data.COLOR_NAMES[c], data.SHAPES[s], data.BG_NAMES[b]),
                                              guidance_scale=info.default_guidance, steps=steps,
                                              sampler=info.default_sampler, seed=3000 + k,
                                              classifier_targets=t if scale else (), classifier_scale=scale))
                truth.append((c, s, b))
        images = []
        for i in range(0, len(reqs), 54):
            images += [g.image for g in pipe.generate(reqs[i:i + 54])]
        r = evaluate.judge(images, truth)
        out["with_cfg"][str(scale)] = r
        print(f"classifier scale {scale:>4g}: {evaluate.fmt(r)}  load {os.getloadavg()[0]:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
