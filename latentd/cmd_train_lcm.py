"""`latentd train-lcm`: distil the bundled model into a few-step LCM adapter (training/lcm_train.py)."""
from __future__ import annotations

from latentd.cmd_train_lora import add_arguments as _add, train_adapter


def add_arguments(p) -> None:
    _add(p, default_name="lcm")


def run(args) -> int:
    from latentd.training.lcm_train import LcmTrainConfig, LcmTrainer
    # what the adapter is meant for, shown by GET /v1/models and checked at admission
    meta = {"base_model": "shapes", "meant_for": {"samplers": ["lcm", "tcd"], "steps": [1, 8],
                                                  "default_steps": 4, "guidance_scale": 1.0}}
    return train_adapter(args, "lcm", LcmTrainer, LcmTrainConfig(), meta)
