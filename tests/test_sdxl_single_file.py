"""SDXL single-file checkpoints (sd_xl_base_1.0.safetensors' key layout, and fine-tunes in it): the
tiny SDXL folder written as one original-format file (devkit/tiny_sdxl.py make_sdxl_single_file)
is the layout diffusers' own single-file loader reads back to the folder's weights, and loads in
latentd (with config_dir for tokenizers and configs) to a model that draws the folder's images bit
for bit; bad files are a ModelLoadError naming the keys and the file."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from devkit.tiny_sdxl import make_sdxl_single_file
from latentd.model.errors import ModelLoadError
from latentd.model.pipeline import GenerationRequest, load_pipeline

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def single(tiny_sdxl, tmp_path_factory):
    return make_sdxl_single_file(tiny_sdxl, tmp_path_factory.mktemp("sdxl_file") / "sdxl.safetensors")


def test_file_has_the_original_layout_per_diffusers(tiny_sdxl, single):
    """diffusers' from_single_file (its own converter, keyed on label_emb / conditioner.embedders)
    maps the file back onto every weight of the folder: the file is in the original layout."""
    state = load_file(str(single))
    assert "model.diffusion_model.label_emb.0.0.weight" in state
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in state
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in state
    ref = diffusers.StableDiffusionXLPipeline.from_single_file(str(single), config=str(tiny_sdxl),
                                                               local_files_only=True)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want = getattr(diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl), part).state_dict()
        got = getattr(ref, part).state_dict()
        worst = max(float((got[k] - v).abs().max()) for k, v in want.items() if not k.endswith("position_ids"))
        assert worst == 0.0, part


def test_single_file_draws_the_folders_images(tiny_sdxl, single):
    folder = load_pipeline(tiny_sdxl, safety=False)
    file = load_pipeline(single, safety=False, config_dir=tiny_sdxl)
    assert file.info.family == "sdxl" and file.conditioner.family == "sdxl"
    reqs = [GenerationRequest("a red cat", negative_prompt="blue dog", steps=5, sampler="dpmpp_2m", karras=True,
                              seed=7),
            GenerationRequest("the dog", steps=4, sampler="euler", guidance_scale=1.0, seed=8, width=64, height=32)]
    for a, b in zip(folder.generate(reqs), file.generate(reqs)):
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_single_file_needs_config_dir_with_the_unet_config(tiny_sdxl, single, tmp_path):
    with pytest.raises(ModelLoadError, match="config_dir"):
        load_pipeline(single, safety=False)
    (tmp_path / "cfg").mkdir()
    with pytest.raises(ModelLoadError, match="unet/config.json"):
        load_pipeline(single, safety=False, config_dir=tmp_path / "cfg")


BAD = [("model.diffusion_model.label_emb.0.2.weight", "model.diffusion_model.label_emb.1.weight",
        "add_embedding.linear_2.weight"),
       ("conditioner.embedders.1.model.text_projection", "conditioner.embedders.1.model.bogus.weight",
        "text_projection.weight"),
       ("conditioner.embedders.0.transformer.text_model.final_layer_norm.bias",
        "conditioner.embedders.0.transformer.text_model.bogus.weight", "final_layer_norm.bias")]


@pytest.mark.parametrize("gone,extra,named", BAD, ids=["unet", "bigG", "clip-l"])
def test_missing_and_unexpected_keys_name_keys_and_file(tiny_sdxl, single, tmp_path, gone, extra, named):
    state = load_file(str(single))
    del state[gone]
    state[extra] = torch.zeros(2)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(ModelLoadError) as e:
        load_pipeline(bad, safety=False, config_dir=tiny_sdxl)
    msg = str(e.value)
    print(msg)
    assert str(bad) in msg and "missing keys" in msg and "unexpected keys" in msg
    assert named in msg and extra.split(".")[-2] in msg
    # nothing half-loaded: the good file still loads and draws
    ok = load_pipeline(single, safety=False, config_dir=tiny_sdxl)
    assert ok.generate([GenerationRequest("cat", steps=1, seed=1)])[0].image.size == (64, 64)


def test_inpainting_fine_tune_loads_with_the_base_configs(tiny_sdxl, tmp_path):
    """A 9-channel SDXL inpainting file (its conv_in says so) with the base model's config_dir."""
    from devkit.tiny_sdxl import make_tiny_sdxl

    folder9 = make_tiny_sdxl(tmp_path / "inpaint", seed=1, in_channels=9)
    path = make_sdxl_single_file(folder9, tmp_path / "inpaint.safetensors")
    p = load_pipeline(path, safety=False, config_dir=tiny_sdxl)
    assert p.info.inpaint_unet and p.info.unet_in_channels == 9
    ref = load_pipeline(folder9, safety=False)
    r = GenerationRequest("a red cat", steps=3, seed=2)
    assert np.array_equal(np.asarray(p.generate([r])[0].image), np.asarray(ref.generate([r])[0].image))
