"""Classifier guidance in the engine (model/classifier.py, Dhariwal & Nichol 2021): the gradient
points up log p(y), a guided step raises the classifier's log-probability of the target, guided
and unguided requests batched together give each their solo result bit for bit, and bad targets
are refused naming the field. Random tiny networks (devkit/tiny_model.py) plus a random classifier."""
from __future__ import annotations

import shutil

import pytest
import torch

from latentd.model.classifier import ClassifierConfig, LatentClassifier, log_prob_grad, save_classifier
from latentd.model.errors import InvalidRequest

HEADS = {"color": ("red", "green", "blue"), "shape": ("circle", "square")}


def _classifier(seed: int = 0, channels: int = 4) -> LatentClassifier:
    torch.manual_seed(seed)
    return LatentClassifier(ClassifierConfig(heads=HEADS, in_channels=channels, block_out_channels=(16, 32),
                                             norm_num_groups=8, sample_size=8)).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def pipe(tiny_model, tmp_path_factory):
    from latentd.model.pipeline import load_pipeline
    folder = tmp_path_factory.mktemp("tiny_cg") / "m"
    shutil.copytree(tiny_model, folder)
    save_classifier(_classifier(), folder / "classifier")
    return load_pipeline(str(folder), safety=False)


def _logp(clf, z, t, targets):
    logits = clf(z, t)
    return sum(torch.log_softmax(logits[h], -1)[:, y].sum() for h, y in targets.items())


def test_gradient_points_up_log_p():
    clf = _classifier()
    z, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([500.0])
    targets = {"color": 2, "shape": 0}
    g = log_prob_grad(clf, z, t, targets)
    assert g.shape == z.shape and g.abs().sum() > 0
    with torch.no_grad():
        base = _logp(clf, z, t, targets)
        assert _logp(clf, z + 1e-2 * g / g.norm(), t, targets) > base
        assert _logp(clf, z - 1e-2 * g / g.norm(), t, targets) < base


def _req(**kw):
    from latentd.model.pipeline import GenerationRequest
    base = dict(prompt="a red cat", steps=4, guidance_scale=1.0, sampler="ddim", seed=3, width=64, height=64)
    return GenerationRequest(**{**base, **kw})


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_a_guided_step_moves_the_latent_up_log_p(pipe, sampler):
    """From the same latent, the guided step differs from the plain one by a move that raises
    log p(y | z_t, t) at the step's own t: the eps shift enters the update of a VE (Euler) and a
    VP (DPM-Solver++) sampler with the right sign. A small scale keeps the comparison in the
    linear regime. (DDIM/DDPM clip x0 to [-1, 1] on this scheduler config, which is not linear.)"""
    from latentd.model.samplers import step_coeffs
    y = {"color": HEADS["color"].index("blue")}
    states = {}
    for name, kw in (("plain", {}), ("guided", dict(classifier_targets=(("color", "blue"),), classifier_scale=0.05))):
        r = pipe.validate(_req(sampler=sampler, **kw))
        st = pipe.start(r, pipe.encode([r])[0])
        x_start = st.latent.clone()
        pipe.step([st])
        states[name] = st
    k = step_coeffs([states["plain"].plan], [0])
    t = k["t"].view(-1)
    z0 = (k["c_in"] * x_start).float()                                  # what the U-Net and classifier saw
    dz = k["c_in"] * (states["guided"].latent - states["plain"].latent)   # the guidance's move, in z
    assert dz.abs().sum() > 0
    with torch.no_grad():
        assert _logp(pipe.classifier, z0 + dz, t, y) > _logp(pipe.classifier, z0, t, y)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_mixed_batch_equals_solo(pipe, sampler):
    reqs = [_req(sampler=sampler, seed=1, classifier_targets=(("color", "red"),), classifier_scale=5.0),
            _req(sampler=sampler, seed=2),
            _req(sampler=sampler, seed=3, guidance_scale=3.0,
                 classifier_targets=(("color", "green"), ("shape", "square")), classifier_scale=2.0)]
    batched = pipe.generate(reqs)
    for r, b in zip(reqs, batched):
        (solo,) = pipe.generate([r])
        assert solo.image.tobytes() == b.image.tobytes(), r


def test_bad_targets_are_refused_naming_the_field(pipe, tiny_model):
    from latentd.model.classifier_spec import resolve
    with pytest.raises(InvalidRequest) as e:
        pipe.validate(_req(classifier_targets=(("color", "purple"),), classifier_scale=1.0))
    assert e.value.field == "classifier_guidance.color" and "red, green, blue" in e.value.message
    with pytest.raises(InvalidRequest) as e:
        resolve(HEADS, {"size": "big"})
    assert e.value.field == "classifier_guidance" and "color, shape" in e.value.message
    with pytest.raises(InvalidRequest) as e:
        resolve(HEADS, {"color": "red", "scale": -1})
    assert e.value.field == "classifier_guidance.scale"
    with pytest.raises(InvalidRequest) as e:
        resolve(None, {"color": "red"})
    assert "no classifier" in e.value.message
    assert resolve(HEADS, {"shape": "square", "color": "red", "background": None} | {"scale": 2}) == \
        ((("color", "red"), ("shape", "square")), 2.0)
    assert resolve(HEADS, None) == ((), 0.0)
    from latentd.model.pipeline import load_pipeline
    plain = load_pipeline(str(tiny_model), safety=False)             # no classifier/ folder
    assert plain.classifier is None
    with pytest.raises(InvalidRequest):
        plain.validate(_req(classifier_targets=(("color", "red"),), classifier_scale=1.0))
