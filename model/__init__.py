"""latentd's latent diffusion engine (pure PyTorch; no service code).

Import-light: importing `model` does not import torch. `model.load_pipeline`,
`model.GenerationRequest` and `model.GeneratedImage` are resolved lazily from model.pipeline;
the torch-free pieces are model.info (ModelInfo, read_model_info) and model.errors.
"""
from __future__ import annotations

__all__ = ["load_pipeline", "GenerationRequest", "GeneratedImage"]


def __getattr__(name: str):
    if name in __all__:
        from latentd.model import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
