"""`latentd train-lora`: train the bundled star adapter (training/lora_train.py); the shared
adapter-training command (`train-lcm` uses it too)."""
from __future__ import annotations

import os
import sys


def add_arguments(p, default_name: str = "star") -> None:
    p.add_argument("--model", default=None, help="base model folder (default: the bundled shapes model)")
    p.add_argument("--out", default=None,
                   help=f"adapter file (default: loras/{default_name}.safetensors in the model folder)")
    p.add_argument("--state", default=None,
                   help="resumable training state (default: OUT with .state.pt); an existing one is continued")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's)")
    p.add_argument("--minutes-budget", type=float, default=None,
                   help="wall-clock cap: saves its state and stops; run again to continue")
    p.add_argument("--quick", action="store_true", help="3 steps of batch 8 (smoke test)")
    p.add_argument("--threads", type=int, default=2)


def train_adapter(args, name: str, make_trainer, config, meta: dict) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # spinning OpenMP threads starve a shared CPU
    import dataclasses

    import torch

    from latentd.model.info import BUNDLED
    from latentd.training.adapter_train import run

    torch.set_num_threads(args.threads)
    model = args.model or BUNDLED
    out = args.out or os.path.join(model, "loras", f"{name}.safetensors")
    state = args.state or os.path.splitext(out)[0] + ".state.pt"
    tc = config
    if args.quick:
        tc = dataclasses.replace(tc, steps=3, batch=8, warmup=1)
    if args.steps:
        tc = dataclasses.replace(tc, steps=args.steps)
    run(make_trainer(model, tc), out, state, meta, log=lambda m: print(m, file=sys.stderr, flush=True),
        minutes_budget=args.minutes_budget, what=name)
    print(out)
    return 0


def run(args) -> int:
    from latentd.training.lora_train import LoraTrainConfig, LoraTrainer
    meta = {"base_model": "shapes", "trigger": "a {color} star on a {background} background"}
    return train_adapter(args, "star", LoraTrainer, LoraTrainConfig(), meta)
