"""Loading: diffusers folders, single-file checkpoints with original key names, and bad input."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentd.model.errors import ModelLoadError
from latentd.model.loader import load_components, load_tokenizer, load_unet, load_vae, read_json
from devkit.tiny_model import make_single_file


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(params=["sd1", "sd2"])
def variant_folder(request, tiny_model, tiny_model_sd2):
    return tiny_model if request.param == "sd1" else tiny_model_sd2


# -- folder ------------------------------------------------------------------------------------

def test_folder_components(tiny_model):
    from transformers import CLIPTextModel

    c = load_components(tiny_model)
    assert c.unet_config.cross_attention_dim == 32 and c.vae_config.scaling_factor == 0.18215
    assert c.scheduler_config["_class_name"] == "PNDMScheduler"
    assert c.model_index["_class_name"] == "StableDiffusionPipeline"
    assert c.feature_extractor_config["crop_size"] == {"height": 32, "width": 32}
    assert "concept_embeds" in c.safety_state and c.safety_config.projection_dim == 32
    assert c.name == tiny_model.name
    ref = CLIPTextModel.from_pretrained(tiny_model / "text_encoder").eval()
    ids = torch.tensor([c.tokenizer("a red cat", padding="max_length", max_length=77).input_ids])
    with torch.no_grad():
        assert torch.equal(ref(ids).last_hidden_state, c.text_encoder(ids).last_hidden_state)
    assert load_components(tiny_model, safety=False).safety_state is None


def test_tokenizer_json_only_folder(tiny_model, tmp_path):
    """SD repositories ship vocab.json + merges.txt; transformers 5 writes tokenizer.json only."""
    bpe = load_tokenizer(tiny_model / "tokenizer")
    bpe.save_pretrained(tmp_path / "tok")
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "tok" / name).unlink(missing_ok=True)
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    fast = load_tokenizer(tmp_path / "tok")
    text = "The cat and the red dog!"
    assert bpe(text).input_ids == fast(text).input_ids
    assert bpe(text).input_ids[1:-1] == [513, 517, 515, 513, 521, 519, 256 + 33]   # merges; "!</w>" = byte 33 + 256


# -- single file -------------------------------------------------------------------------------

def test_single_file_is_original_format_per_diffusers(variant_folder, tmp_path):
    """diffusers' own converter maps our original-format file back onto the folder's weights."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)

    state = load_file(make_single_file(variant_folder, tmp_path / "m.safetensors"))
    for part, convert in (("unet", convert_ldm_unet_checkpoint), ("vae", convert_ldm_vae_checkpoint)):
        ref = load_file(variant_folder / part / "diffusion_pytorch_model.safetensors")
        got = convert(state, read_json(variant_folder / part / "config.json"))
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k].reshape(ref[k].shape), ref[k]) for k in ref)
    if not any(k.startswith("cond_stage_model.model.") for k in state):
        text = convert_ldm_clip_checkpoint(state)
        ref = load_file(variant_folder / "text_encoder" / "model.safetensors")
        assert {k.removeprefix("text_model.") for k in text} == {k.removeprefix("text_model.") for k in ref}


def test_single_file_equals_folder(variant_folder, tmp_path):
    path = make_single_file(variant_folder, tmp_path / "model.safetensors")
    config_dir = tmp_path / "configs"              # configs + tokenizer only: no weights at all
    shutil.copytree(variant_folder, config_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copytree(variant_folder / "safety_checker", config_dir / "safety_checker", dirs_exist_ok=True)
    a = load_components(variant_folder)
    b = load_components(path, config_dir=config_dir)
    assert a.unet_config == b.unet_config and a.vae_config == b.vae_config
    assert _states_equal(a.unet, b.unet) and _states_equal(a.vae, b.vae)
    assert _states_equal(a.text_encoder, b.text_encoder)
    assert b.scheduler_config == a.scheduler_config and b.name == "model"

    # without unet/config.json in config_dir the U-Net's shape is inferred from the tensors
    (config_dir / "unet" / "config.json").unlink()
    c = load_components(path, config_dir=config_dir, safety=False)
    assert _states_equal(a.unet, c.unet)
    assert c.unet_config.block_out_channels == a.unet_config.block_out_channels
    assert c.unet_config.use_linear_projection == a.unet_config.use_linear_projection
    assert c.unet_config.down_attention == a.unet_config.down_attention
    # a VAE inferred with SD's 32 groups cannot be built at 8 channels: a load error, not a crash
    (config_dir / "vae" / "config.json").unlink()
    _raises("vae|VAE|groups", load_components, path, config_dir=config_dir, safety=False)


def test_single_file_sd2_text_matches_diffusers_open_clip(tiny_model_sd2, tmp_path):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextModel

    state = load_file(make_single_file(tiny_model_sd2, tmp_path / "m.safetensors"))
    model = CLIPTextModel.from_pretrained(tiny_model_sd2 / "text_encoder")
    ref = {k.removeprefix("text_model."): v for k, v in convert_open_clip_checkpoint(model, state).items()
           if not k.startswith("text_projection") and ".layers.3." not in k}
    from latentd.model.convert_single_file import convert_text_encoder
    ours = {k.removeprefix("text_model."): v for k, v in convert_text_encoder(state, 3).items()}
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


# -- bad input ---------------------------------------------------------------------------------

@pytest.fixture
def copy_of(tiny_model, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model, dst)
    return dst


def _raises(match, fn, *args, **kw):
    with pytest.raises(ModelLoadError, match=match) as info:
        fn(*args, **kw)
    return str(info.value)


def test_missing_folder_and_files(copy_of, tmp_path):
    _raises("not found", load_components, str(tmp_path / "nope"))
    _raises("no unet/", load_components, tmp_path)
    (copy_of / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    _raises(r"vae: no weights file", load_components, copy_of)
    (copy_of / "unet" / "config.json").unlink()
    _raises(r"unet/config\.json: file not found", load_components, copy_of)


def test_corrupt_safetensors(copy_of):
    f = copy_of / "unet" / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])                        # truncated
    _raises(r"diffusion_pytorch_model\.safetensors: not a readable safetensors", load_unet, copy_of / "unet")
    f.write_bytes(b"\x00" * 64)                                  # garbage header
    _raises("not a readable safetensors", load_unet, copy_of / "unet")


def test_mismatched_keys_and_shapes(copy_of):
    f = copy_of / "unet" / "diffusion_pytorch_model.safetensors"
    good = load_file(f)
    extra = dict(good, **{"down_blocks.0.extra.weight": torch.zeros(1)})
    save_file(extra, str(f))
    msg = _raises("unexpected keys: down_blocks.0.extra.weight", load_unet, copy_of / "unet")
    assert str(f) in msg
    missing = {k: v for k, v in good.items() if k != "conv_in.bias"}
    save_file(missing, str(f))
    _raises("missing keys: conv_in.bias", load_unet, copy_of / "unet")
    wrong = dict(good, **{"conv_in.bias": torch.zeros(7)})
    save_file(wrong, str(f))
    _raises(r"wrong shapes: conv_in\.bias \(file \(7,\), model \(32,\)\)", load_unet, copy_of / "unet")
    # a config that does not fit the weights is a shape mismatch too
    cfg = read_json(copy_of / "vae" / "config.json")
    (copy_of / "vae" / "config.json").write_text(json.dumps(cfg | {"latent_channels": 8}))
    _raises("wrong shapes", load_vae, copy_of / "vae")


def test_text_encoder_mismatch_names_key(copy_of):
    f = copy_of / "text_encoder" / "model.safetensors"
    state = load_file(f)
    state.pop(next(k for k in state if k.endswith("final_layer_norm.bias")))
    save_file(state, str(f))
    _raises(r"model\.safetensors.*missing keys: .*final_layer_norm\.bias", load_components, copy_of)


def test_pickles_refused(copy_of, tmp_path):
    ckpt = tmp_path / "sd-v1-5.ckpt"
    ckpt.write_bytes(b"not even opened")
    msg = _raises(r"pickled weights \(\.ckpt\) are refused", load_components, ckpt)
    assert "safetensors" in msg and "save_pretrained" in msg
    f = copy_of / "unet" / "diffusion_pytorch_model.safetensors"
    f.rename(f.with_suffix(".bin"))
    _raises(r"diffusion_pytorch_model\.bin: pickled weights", load_components, copy_of)


def test_single_file_needs_config_dir_and_unet(tiny_model, tmp_path):
    path = make_single_file(tiny_model, tmp_path / "m.safetensors")
    _raises("pass config_dir=", load_components, path)
    state = {k: v for k, v in load_file(path).items() if not k.startswith("model.diffusion_model.output_blocks.0.")}
    save_file(state, str(tmp_path / "cut.safetensors"))
    _raises(r"cut\.safetensors: .*missing keys: up_blocks\.0\.resnets\.0", load_components,
            tmp_path / "cut.safetensors", config_dir=tiny_model)


def test_unknown_hub_id_offline_is_a_load_error():
    _raises("fetching it as a hub model failed", load_components, "no-such-owner/no-such-model")
