"""`latentd train-shapes --quick`: the whole recipe (tokenizer, CLIP, safety checker, VAE, U-Net)
runs end to end for a few steps and writes a folder the engine loads and generates from."""
from __future__ import annotations

import os


def test_quick_recipe_writes_a_loadable_model(tmp_path):
    from latentd.cli import main
    from model.pipeline import GenerationRequest, load_pipeline

    out = tmp_path / "shapes"
    assert main(["train-shapes", "--quick", "--out", str(out), "--seed", "3"]) == 0
    for sub in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json",
                "safety_checker/config.json", "safety_checker/model.safetensors",
                "feature_extractor/preprocessor_config.json"):
        assert (out / sub).is_file(), sub
    assert not any(f.endswith((".bin", ".ckpt", ".pt")) for _, _, fs in os.walk(out) for f in fs)
    pipe = load_pipeline(str(out))
    assert (pipe.info.native_width, pipe.info.native_height, pipe.info.vae_factor) == (64, 64, 4)
    (img,) = pipe.generate([GenerationRequest(prompt="a red circle on a white background", steps=2, seed=1)])
    assert img.image.size == (64, 64)


def test_tokenizer_gives_whole_words(tmp_path):
    from model.training import bpe, data
    bpe.build_tokenizer(str(tmp_path))
    tok = bpe.load_tokenizer(str(tmp_path))
    for cap in data.CAPTIONS:
        ids = tok(cap).input_ids
        assert len(ids) == len(cap.split()) + 2            # <|startoftext|> words <|endoftext|>
        assert tok.convert_ids_to_tokens(ids)[1:-1] == [w + "</w>" for w in cap.split()]
    assert bpe.tokenize(tok, ["a red circle"]).shape == (1, 77)


def test_data_is_deterministic_and_in_spec():
    import torch
    from model.training import data
    a = data.sample(64, torch.Generator().manual_seed(0))
    b = data.sample(64, torch.Generator().manual_seed(0))
    assert torch.equal(a.images, b.images) and a.images.shape == (64, 3, 64, 64)
    r = a.params["r"] / 64
    assert bool(((r >= 0.15) & (r <= 0.35)).all())
    assert bool(((a.params["cx"] - a.params["r"]) >= 0).all() and ((a.params["cx"] + a.params["r"]) <= 64).all())
    assert len(data.CAPTIONS) == 54 and data.CAPTIONS[0] == "a red circle on a white background"
