"""LoRA adapters against diffusers (Hu et al. 2021): random adapters built with PEFT as diffusers'
own tests build them (B non-zero), on tiny random SD 1.x and SDXL weights, saved in the
diffusers/PEFT layout and converted to kohya's; diffusers' `load_lora_weights` + `set_adapters`
at scale s is the reference, latentd's engine and `latentd generate --lora FILE:s` must give the
same image (≤ 2/255). U-Net layers: attention, feed-forward, proj_in and the ResNets' 3x3 conv1
(LoCon). Text-encoder adapters go into the reference by hand (W + s·alpha/r·B·A: transformers'
own LoRA loading wants a newer PEFT than the one diffusers pins here).
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from latentd.model.lora_format import LoraFormatError
from latentd.model.pipeline import GenerationRequest, load_pipeline
from tests.diffusers_ref import PROMPT, SCHEDULERS

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
STEPS, GUIDANCE, SEED = 8, 5.0, 3


def _peft_lora(model, r: int, alpha: float, targets, seed: int):
    """A PEFT LoRA on a copy of `model`: (state dict with PEFT's names, LoraConfig)."""
    import copy

    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(seed)
    m = inject_adapter_in_model(cfg, copy.deepcopy(model))
    sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(m).items()}
    # PEFT's default init is uniform(+-1/sqrt(in)); scaled down so the image stays an image
    return {k: v * 0.5 for k, v in sd.items()}, cfg


def make_adapter(ref, tmp_path, name: str, seed: int, r: int, alpha: float, text_parts=("text_encoder",)):
    """-> {"peft": full file, "unet_only": file for diffusers, "text": {part: (sd, alpha / r)}}."""
    unet_sd, ucfg = _peft_lora(ref.unet, r, alpha, UNET_TARGETS, seed)
    files = {"unet": unet_sd}
    meta = {"unet": ucfg.to_dict()}
    text = {}
    for i, part in enumerate(text_parts):
        te_r, te_alpha = 2, 3.0 + i
        sd, tcfg = _peft_lora(getattr(ref, part), te_r, te_alpha, TEXT_TARGETS, seed + 10 + i)
        files[part] = sd
        meta[part] = tcfg.to_dict()
        text[part] = (sd, te_alpha / te_r)

    def write(path, parts):
        flat = {f"{p}.{k}": v.contiguous() for p in parts for k, v in files[p].items()}
        md = {f"{p}.{k}": (list(v) if isinstance(v, set) else v) for p in parts for k, v in meta[p].items()}
        save_file(flat, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(md, default=str)})
        return path

    full = write(tmp_path / f"{name}.safetensors", list(files))
    unet_only = write(tmp_path / f"{name}_unet.safetensors", ["unet"])
    return {"peft": full, "unet_only": unet_only, "text": text, "alpha": {"unet": alpha}, "r": r}


def to_kohya(peft_file, out, sdxl_unet_cfg=None):
    """The same adapter in kohya's layout: lora_unet_* (SDXL: the original block names),
    lora_te_* / lora_te1_* / lora_te2_*, lora_down / lora_up, one alpha per layer."""
    from safetensors import safe_open

    from devkit.tiny_model import to_original_names, unet_leaves
    from latentd.model.convert_single_file import UNET_PREFIX, unet_table
    with safe_open(str(peft_file), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        md = json.loads(f.metadata()["lora_adapter_metadata"])
    te_prefix = {"text_encoder": "lora_te1_" if sdxl_unet_cfg else "lora_te_", "text_encoder_2": "lora_te2_"}
    out_sd = {}
    for key, v in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        base = key[: -len(".lora_A.weight")]
        part, path = base.split(".", 1)
        if part == "unet":
            if sdxl_unet_cfg is not None:
                orig = next(iter(to_original_names({path + ".w": 0}, unet_table(sdxl_unet_cfg), "", unet_leaves)))
                path = orig[len(UNET_PREFIX):-2]
            name = "lora_unet_" + path.replace(".", "_")
        else:
            path = path if path.startswith("text_model.") else "text_model." + path   # kohya's names
            name = te_prefix[part] + path.replace(".", "_")
        out_sd[name + ".lora_down.weight"] = v
        out_sd[name + ".lora_up.weight"] = state[base + ".lora_B.weight"]
        out_sd[name + ".alpha"] = torch.tensor(float(md[f"{part}.lora_alpha"]))
    save_file(out_sd, str(out))
    return out


def reference(pipe_cls, folder, adapters, scales, **call) -> np.ndarray:
    """diffusers' image with the adapters' U-Net parts loaded and set_adapters'd at `scales`, and
    their text-encoder parts merged by hand at the same scales."""
    ref = pipe_cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    name, kw = SCHEDULERS["euler"]
    ref.scheduler = getattr(diffusers, name).from_config(ref.scheduler.config, **kw)
    names = []
    for i, (a, s) in enumerate(zip(adapters, scales)):
        ref.load_lora_weights(str(a["unet_only"].parent), weight_name=a["unet_only"].name, adapter_name=f"a{i}")
        names.append(f"a{i}")
        with torch.no_grad():
            for part, (sd, k) in a["text"].items():
                model = getattr(ref, part)
                for key, A in sd.items():
                    if not key.endswith(".lora_A.weight"):
                        continue
                    mod = model.get_submodule(key[: -len(".lora_A.weight")])
                    B = sd[key.replace("lora_A", "lora_B")]
                    mod.weight += s * k * (B @ A)
    ref.set_adapters(names, adapter_weights=list(scales))
    img = ref(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
              generator=torch.Generator("cpu").manual_seed(SEED), **call).images[0]
    return np.asarray(img).astype(np.int16)


def ours(pipe, files, scales, **kw) -> np.ndarray:
    loras = tuple((pipe.load_lora(f), s) for f, s in zip(files, scales))
    img = pipe.generate([GenerationRequest(PROMPT, steps=STEPS, guidance_scale=GUIDANCE, sampler="euler",
                                           seed=SEED, loras=loras, **kw)])[0].image
    return np.asarray(img).astype(np.int16)


def check(got, want, base, what):
    diff = int(np.abs(got - want).max())
    moved = int(np.abs(want - base).max())
    print(f"{what}: max pixel diff {diff}/255 (the adapter moves the image by {moved}/255)")
    assert want.std() > 5, "reference image is flat; the comparison would be vacuous"
    assert moved > 20, "the adapter barely changes the image; the comparison would be vacuous"
    assert diff <= 2, what


@pytest.fixture(scope="module")
def sd1(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_sd1")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None,
                                                            requires_safety_checker=False)
    a = make_adapter(ref, tmp, "a", seed=1, r=4, alpha=8.0)
    b = make_adapter(ref, tmp, "b", seed=2, r=8, alpha=4.0)
    for x in (a, b):
        x["kohya"] = to_kohya(x["peft"], tmp / (x["peft"].stem + "_kohya.safetensors"))
    pipe = load_pipeline(tiny_model, safety=False)
    base = ours(pipe, [], [])
    return {"folder": tiny_model, "pipe": pipe, "a": a, "b": b, "base": base}


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
@pytest.mark.parametrize("mix", [("a",), ("b",), ("a", "b")])
def test_sd1_matches_diffusers(sd1, fmt, mix):
    scales = {("a",): (0.8,), ("b",): (1.3,), ("a", "b"): (0.7, 0.5)}[mix]
    adapters = [sd1[m] for m in mix]
    want = reference(diffusers.StableDiffusionPipeline, sd1["folder"], adapters, scales)
    got = ours(sd1["pipe"], [a[fmt] for a in adapters], scales)
    check(got, want, sd1["base"], f"SD1 {fmt} {'+'.join(mix)} at {scales}")


def test_cli_lora_flag_matches_diffusers(sd1, tmp_path):
    a, b = sd1["a"], sd1["b"]
    want = reference(diffusers.StableDiffusionPipeline, sd1["folder"], [a, b], (0.7, 0.5))
    out = tmp_path / "cli.png"
    subprocess.run([sys.executable, "-m", "latentd.cli", "generate", PROMPT, "--model", str(sd1["folder"]),
                    "--steps", str(STEPS), "--guidance", str(GUIDANCE), "--sampler", "euler",
                    "--seed", str(SEED), "--lora", f"{a['peft']}:0.7", "--lora", f"{b['kohya']}:0.5",
                    "--no-safety", "--out", str(out)], check=True, capture_output=True)
    from PIL import Image
    check(np.asarray(Image.open(out).convert("RGB")).astype(np.int16), want, sd1["base"], "CLI --lora")


def test_scale_zero_is_the_base_model_exactly(sd1):
    assert np.array_equal(ours(sd1["pipe"], [sd1["a"]["peft"]], [0.0]), sd1["base"])


def test_sdxl_matches_diffusers(tiny_sdxl, tmp_path):
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    a = make_adapter(ref, tmp_path, "xa", seed=5, r=4, alpha=8.0, text_parts=("text_encoder", "text_encoder_2"))
    b = make_adapter(ref, tmp_path, "xb", seed=6, r=2, alpha=2.0, text_parts=("text_encoder_2",))
    pipe = load_pipeline(tiny_sdxl, safety=False)
    for x in (a, b):
        x["kohya"] = to_kohya(x["peft"], tmp_path / (x["peft"].stem + "_kohya.safetensors"), pipe.unet.config)
    base = ours(pipe, [], [])
    cls = diffusers.StableDiffusionXLPipeline
    for mix, scales in (((a,), (0.9,)), ((a, b), (0.6, 1.2))):
        want = reference(cls, tiny_sdxl, list(mix), scales)
        for fmt in ("peft", "kohya"):
            got = ours(pipe, [m[fmt] for m in mix], scales)
            check(got, want, base, f"SDXL {fmt} {len(mix)} adapter(s) at {scales}")


def test_refusals_name_the_file_and_the_reason(sd1, tiny_sdxl, tmp_path):
    pipe = sd1["pipe"]
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 2)}, str(loha))
    with pytest.raises(LoraFormatError, match="LoHa"):
        pipe.load_lora(loha)
    dora = tmp_path / "dora.safetensors"
    save_file({"unet.conv_in.lora_A.weight": torch.zeros(2, 4, 3, 3), "unet.conv_in.lora_B.weight": torch.zeros(32, 2, 1, 1),
               "unet.conv_in.lora_magnitude_vector": torch.zeros(32)}, str(dora))
    with pytest.raises(LoraFormatError, match="DoRA"):
        pipe.load_lora(dora)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(LoraFormatError, match="garbage"):
        pipe.load_lora(garbage)
    sdxl_pipe = load_pipeline(tiny_sdxl, safety=False)
    with pytest.raises(LoraFormatError, match="for sd models"):
        sdxl_pipe.load_lora(sd1["a"]["peft"])
    wrong = tmp_path / "wrong_width.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 999, 1, 1),
               "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(999, 2, 1, 1)}, str(wrong))
    with pytest.raises(LoraFormatError, match="another base model"):
        pipe.load_lora(wrong)
