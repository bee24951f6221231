"""`latentd train-shapes`: train the bundled shapes model (training/recipe.py)."""
from __future__ import annotations

import os
import sys


def add_arguments(p) -> None:
    p.add_argument("--out", default=None, help="output model folder (default: models/shapes in the repository)")
    p.add_argument("--quick", action="store_true", help="a few steps of every stage (smoke test, < 1 min)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes-budget", type=float, default=None,
                   help="wall-clock cap for this invocation: the running stage saves its state and stops; "
                        "--resume continues")
    p.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the run in DIR (its finished stages are skipped, a stopped one resumes)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stages", default=None,
                   help="comma list: run only these stages (tokenizer,clip,vae,unet,safety) on --out")
    p.add_argument("--summary", default=None, help="also write the training summary JSON here")


def run(args) -> int:
    # Passive OpenMP waiting: on a shared CPU, spinning worker threads slow training down ~5x.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import json

    import torch

    from latentd.training import recipe

    torch.set_num_threads(args.threads)
    from latentd.model.info import BUNDLED

    out = args.resume or args.out or BUNDLED

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    summary = recipe.run(out, seed=args.seed, quick=args.quick, minutes_budget=args.minutes_budget, log=log,
                         stages=tuple(args.stages.split(",")) if args.stages else None, resume=bool(args.resume))
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=2)
    return 0
