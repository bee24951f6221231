"""`latentd train-shapes --quick`: the whole recipe (tokenizer, CLIP, safety checker, VAE, U-Net)
runs end to end for a few steps and writes a folder the engine loads and generates from."""
from __future__ import annotations

import os


def test_quick_recipe_writes_a_loadable_model(tmp_path):
    from latentd.cli import main
    from latentd.model.pipeline import GenerationRequest, load_pipeline

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
    from latentd.training import bpe, data
    bpe.build_tokenizer(str(tmp_path))
    tok = bpe.load_tokenizer(str(tmp_path))
    for cap in data.CAPTIONS:
        ids = tok(cap).input_ids
        assert len(ids) == len(cap.split()) + 2            # <|startoftext|> words <|endoftext|>
        assert tok.convert_ids_to_tokens(ids)[1:-1] == [w + "</w>" for w in cap.split()]
    assert bpe.tokenize(tok, ["a red circle"]).shape == (1, 77)


def test_data_is_deterministic_and_in_spec():
    import torch
    from latentd.training import data
    a = data.sample(64, torch.Generator().manual_seed(0))
    b = data.sample(64, torch.Generator().manual_seed(0))
    assert torch.equal(a.images, b.images) and a.images.shape == (64, 3, 64, 64)
    r = a.params["r"] / 64
    assert bool(((r >= 0.15) & (r <= 0.35)).all())
    assert bool(((a.params["cx"] - a.params["r"]) >= 0).all() and ((a.params["cx"] + a.params["r"]) <= 64).all())
    assert len(data.CAPTIONS) == 54 and data.CAPTIONS[0] == "a red circle on a white background"


def test_unet_training_resumes_bit_for_bit(tmp_path):
    """Two steps, save, a NEW trainer loads and takes two more == four steps straight."""
    import torch

    from latentd.training import unet_train
    from latentd.training.vae_train import AutoencoderKL, make_config

    torch.manual_seed(0)
    vae = AutoencoderKL(make_config()).eval().requires_grad_(False)
    contexts = torch.randn(55, 77, 16)
    ucfg = unet_train.make_config(16, channels=(16, 32, 32), heads=(1, 2, 2), groups=8)
    tc = unet_train.UNetTrainConfig(steps=4, batch=2, warmup=1, bf16=False)

    straight = unet_train.Trainer(vae, 1.0, contexts, ucfg, tc)
    for _ in range(4):
        straight.step()
    first = unet_train.Trainer(vae, 1.0, contexts, ucfg, tc)
    first.step(), first.step()
    first.save(str(tmp_path / "state.pt"))
    resumed = unet_train.Trainer(vae, 1.0, contexts, ucfg, tc)
    resumed.load(str(tmp_path / "state.pt"))
    assert resumed.step_no == 2
    resumed.step(), resumed.step()
    assert resumed.done
    for a, b in zip(straight.ema.model.state_dict().values(), resumed.ema.model.state_dict().values()):
        assert torch.equal(a, b)
    # and the run() driver picks the state up from the path
    again = unet_train.Trainer(vae, 1.0, contexts, ucfg, tc)
    unet_train.run(again, str(tmp_path / "state.pt"), log=lambda m: None, checkpoint_every=0)
    assert again.done and again.step_no == 4


def test_min_snr_weight_caps_low_noise_steps():
    import torch

    from latentd.training.unet_train import alphas_cumprod, min_snr_weight
    abar = alphas_cumprod()
    w = min_snr_weight(abar, 5.0)
    snr = abar / (1 - abar)
    assert torch.allclose(w[snr > 5], 5.0 / snr[snr > 5])     # low noise: down-weighted by gamma / SNR
    assert torch.all(w[snr <= 5] == 1.0)                      # high noise: unchanged
    assert torch.all(min_snr_weight(abar, 0.0) == 1.0)        # gamma 0: the plain loss


def test_recipe_resume_skips_finished_stages(tmp_path):
    """A finished run resumed does nothing again; a run told to stop at once leaves its state."""
    import json

    from latentd.training import recipe

    out = str(tmp_path / "m")
    logs: list[str] = []
    recipe.run(out, seed=1, quick=True, log=logs.append)
    state = json.load(open(tmp_path / "m" / ".train" / "state.json"))
    assert state["done"] == list(recipe.STAGES)
    assert "gate" in state["summary"]["vae"] and state["summary"]["unet"]["eval_curve"]
    logs.clear()
    recipe.run(out, seed=1, quick=True, log=logs.append, resume=True)
    assert not any(m.startswith("stage ") for m in logs), logs
    # a budget already spent: nothing runs, nothing is lost
    fresh = str(tmp_path / "n")
    logs.clear()
    recipe.run(fresh, seed=1, quick=True, log=logs.append, minutes_budget=1e-9)
    assert any("time budget" in m for m in logs), logs
    assert json.load(open(tmp_path / "n" / ".train" / "state.json"))["done"] == []


def test_adapter_recipes_write_bindable_adapters_and_resume(tmp_path):
    """`latentd train-lora --quick` and `train-lcm --quick` write adapters the bundled model binds
    (diffusers/PEFT layout with latentd's metadata); a second run on the same state continues."""
    from latentd.cli import main
    from latentd.model import lora_catalog
    from latentd.model.pipeline import GenerationRequest, load_pipeline

    pipe = load_pipeline(None, safety=False)
    for cmd, name, parts in (("train-lora", "star", ("text_encoder", "unet")), ("train-lcm", "lcm", ("unet",))):
        out = tmp_path / f"{name}.safetensors"
        assert main([cmd, "--quick", "--out", str(out), "--threads", "1"]) == 0
        info = lora_catalog.describe(out, name)
        assert info.format == "peft" and info.components == parts and info.meta["step"] == 3
        adapter = pipe.load_lora(out)
        assert pipe.generate([GenerationRequest("a red star on a white background", steps=2,
                                                loras=((adapter, 1.0),))])[0].image.size == (64, 64)
        assert main([cmd, "--quick", "--steps", "5", "--out", str(out), "--threads", "1"]) == 0
        assert lora_catalog.describe(out, name).meta["step"] == 5
