"""A row's state as one small serialisable value: what a request in flight needs to go on.

A RequestState (model/pipeline.py) after `step` steps is fully described by
  - latent    (1, C, h, w) float32, the chain's x in the sampler's space,
  - x0_prev   (1, C, h, w) float32, the last step's x0 estimate (DPM-Solver++ 2M's history;
              absent before the first step),
  - rng       (G,) uint8, the request's torch.Generator state (DDPM, Euler a, LCM, DDIM and TCD
              with eta > 0 draw their noise from it),
  - an edit's tensors (model/edit.py EditState): image_latent and noise (1, C, h, w) and mask
    (1, 1, h, w) for inpainting with a 4-channel U-Net, extra (1, C + 1, h, w) for an inpainting
    U-Net,
  - deep      (rows, C1, h, w) float32, DeepCache's features of the last full step (a request
              with cache_interval > 1, model/deepcache.py), so a resumed row reuses them exactly,
plus the step index. Everything else is a pure function of the request and the model: the
sampler plan (make_plan), the text conditioning (Pipeline.encode) and the added conditioning
(SDXL's pooled text + size ids), so they are recomputed, not stored. `Pipeline.resume` rebuilds
the state from this value; the resumed run then takes exactly the steps the saved one would have
(on the CPU in float32: bit for bit, whatever the batch).

Bytes (version 1), no pickle anywhere:

    b"LDRS" | u16 version | u32 n | n bytes of header JSON | payload

The header names the model (`model_identity`), the request (`request_digest`), the plan
(sampler, total steps, first row of an edit), the step, the caller's tags (`meta`: the worker
puts the job id, attempt, spec hash and image index there), the payload's CRC-32 and its blobs
in order as [name, dtype ("<f4" | "|u1"), shape]; the payload is their raw little-endian bytes.
A 512x512 SD row is about 140 KB (latent + x0_prev 64 KB each, generator state 5 KB).
"""
from __future__ import annotations

import hashlib
import json
import struct
import weakref
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

MAGIC = b"LDRS"
VERSION = 1
_HEAD = struct.Struct("<4sHI")            # magic, version, header length
MAX_HEADER = 1 << 16
EDIT_FIELDS = ("image_latent", "noise", "mask", "extra")
_DTYPES = {"<f4": (np.dtype("<f4"), torch.float32), "|u1": (np.dtype("|u1"), torch.uint8)}


class RowStateError(ValueError):
    """Bytes that are not a row state of this version, or a row that does not fit its request."""


@dataclass(frozen=True)
class RowState:
    model: str                             # model_identity() of the pipeline that ran it
    request: str                           # request_digest() of the request it belongs to
    sampler: str
    total: int                             # plan.steps (steps this request runs)
    start: int                             # plan.start (an edit's skipped rows)
    step: int                              # steps done: the next step to run
    tensors: dict[str, torch.Tensor]       # latent, [x0_prev], rng, [edit fields]; CPU
    meta: dict = field(default_factory=dict)   # caller's tags: flat str/int/float values

    # --- bytes -----------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        blobs, parts = [], []
        for name, t in self.tensors.items():
            dt = "|u1" if t.dtype == torch.uint8 else "<f4"
            a = t.detach().cpu().contiguous().numpy().astype(_DTYPES[dt][0], copy=False)
            blobs.append([name, dt, list(a.shape)])
            parts.append(a.tobytes())
        payload = b"".join(parts)
        header = json.dumps({"model": self.model, "request": self.request, "sampler": self.sampler,
                             "total": self.total, "start": self.start, "step": self.step,
                             "meta": self.meta, "crc": zlib.crc32(payload), "blobs": blobs},
                            separators=(",", ":")).encode()
        return _HEAD.pack(MAGIC, VERSION, len(header)) + header + payload

    @classmethod
    def from_bytes(cls, data: bytes) -> RowState:
        """Parse and check (magic, version, sizes, CRC); RowStateError on anything else."""
        data = bytes(data)
        if len(data) < _HEAD.size:
            raise RowStateError("row state: too short")
        magic, version, n = _HEAD.unpack_from(data)
        if magic != MAGIC:
            raise RowStateError("row state: bad magic")
        if version != VERSION:
            raise RowStateError(f"row state: version {version}, this engine reads {VERSION}")
        if n > MAX_HEADER or _HEAD.size + n > len(data):
            raise RowStateError("row state: bad header length")
        try:
            h = json.loads(data[_HEAD.size:_HEAD.size + n])
            payload = memoryview(data)[_HEAD.size + n:]
            if zlib.crc32(payload) != h["crc"]:
                raise RowStateError("row state: payload CRC mismatch")
            tensors, off = {}, 0
            for name, dt, shape in h["blobs"]:
                np_dt, t_dt = _DTYPES[dt]
                count = int(np.prod(shape)) if shape else 1
                size = count * np_dt.itemsize
                if off + size > len(payload):
                    raise RowStateError("row state: payload shorter than its blobs")
                a = np.frombuffer(payload, dtype=np_dt, count=count, offset=off).reshape(shape)
                tensors[str(name)] = torch.from_numpy(a.copy()).to(t_dt)
                off += size
            if off != len(payload):
                raise RowStateError("row state: trailing payload bytes")
            return cls(model=str(h["model"]), request=str(h["request"]), sampler=str(h["sampler"]),
                       total=int(h["total"]), start=int(h["start"]), step=int(h["step"]),
                       tensors=tensors, meta=dict(h.get("meta") or {}))
        except RowStateError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise RowStateError(f"row state: unreadable header or blobs ({type(e).__name__}: {e})") from None


# --- identities ---------------------------------------------------------------------------------
_IDENTITY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_identity(pipe) -> str:
    """What a latent is only meaningful for: the model's name, family, parameterisation and
    channels, plus a digest of the U-Net's first and last parameters (another checkpoint under
    the same name differs there). Computed once per pipeline (a small device->host copy)."""
    got = _IDENTITY.get(pipe)
    if got is None:
        params = list(pipe.unet.parameters())
        h = hashlib.sha256()
        for p in (params[0], params[-1]):
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        i = pipe.info
        got = (f"{i.name}|{i.family}|{i.prediction_type}|{i.latent_channels}x{i.unet_in_channels}"
               f"|{h.hexdigest()[:16]}")
        _IDENTITY[pipe] = got
    return got


def request_digest(req) -> str:
    """A digest of everything in a complete GenerationRequest that shapes its image: its fields
    (the dataclass repr leaves out the images) and an edit's init image and mask pixels."""
    h = hashlib.sha256(repr(req).encode())
    for im in (req.init_image, req.mask):
        if im is not None:
            h.update(f"{im.mode}{im.size}".encode())
            h.update(im.tobytes())
    return h.hexdigest()[:24]


# --- RequestState <-> RowState -------------------------------------------------------------------
def save(pipe, state, meta: dict | None = None) -> RowState:
    """The RowState of `state` (a model.pipeline.RequestState not yet done) on `pipe`."""
    tensors = {"latent": state.latent.float()}
    if state.x0_prev is not None:
        tensors["x0_prev"] = state.x0_prev.float()
    tensors["rng"] = state.generator.get_state()
    if state.deep is not None:
        tensors["deep"] = state.deep.float()
    if state.edit is not None:
        for name in EDIT_FIELDS:
            t = getattr(state.edit, name)
            if t is not None:
                tensors[f"edit.{name}"] = t.float()
    return RowState(model=model_identity(pipe), request=request_digest(state.req),
                    sampler=state.plan.sampler, total=state.plan.steps, start=state.plan.start,
                    step=state.step, tensors=tensors, meta=dict(meta or {}))


def expected_edit(req, inpaint_unet: bool) -> set[str]:
    """The EditState fields model/edit.py start_edit gives this request."""
    if inpaint_unet:
        return {"extra"}
    if req.init_image is not None and req.mask is not None:
        return {"image_latent", "noise", "mask"}
    return set()


def check(pipe, req, plan, row: RowState, shape: tuple[int, ...]) -> None:
    """RowStateError unless `row` was saved mid-run of this very request on this model with this
    plan, and holds the tensors a state at its step has (shape: the latent's (1, C, h, w))."""
    def bad(why):
        raise RowStateError(f"row state does not fit: {why}")

    if row.model != model_identity(pipe):
        bad(f"saved on model {row.model!r}, this is {model_identity(pipe)!r}")
    if row.request != request_digest(req):
        bad("saved for another request")
    if (row.sampler, row.total, row.start) != (plan.sampler, plan.steps, plan.start):
        bad(f"plan {row.sampler}/{row.total}/{row.start}, request's {plan.sampler}/{plan.steps}/{plan.start}")
    if not 0 <= row.step < plan.steps:
        bad(f"step {row.step} outside 0..{plan.steps - 1}")
    want = {"latent", "rng"} | ({"x0_prev"} if row.step > 0 else set())
    want |= {f"edit.{n}" for n in expected_edit(req, pipe.info.inpaint_unet)}
    if getattr(req, "cache_interval", 1) > 1 and row.step > 0:
        want.add("deep")
    if set(row.tensors) != want:
        bad(f"tensors {sorted(row.tensors)}, expected {sorted(want)}")
    c = shape[1]
    shapes = {"latent": shape, "x0_prev": shape, "edit.image_latent": shape, "edit.noise": shape,
              "edit.mask": (1, 1) + tuple(shape[2:]), "edit.extra": (1, c + 1) + tuple(shape[2:])}
    if "deep" in row.tensors:
        d = row.tensors["deep"]
        if d.dim() != 4 or tuple(d.shape[2:]) != tuple(shape[2:]) or not 1 <= d.shape[0] <= 2:
            bad(f"deep has shape {tuple(d.shape)}, expected (1 or 2, C, {shape[2]}, {shape[3]})")
    for name, t in row.tensors.items():
        if name not in ("rng", "deep") and tuple(t.shape) != tuple(shapes[name]):
            bad(f"{name} has shape {tuple(t.shape)}, expected {tuple(shapes[name])}")


def restore(pipe, req, plan, row: RowState, shape: tuple[int, ...]):
    """(latent, x0_prev, generator, EditState | None, deep | None) of `row` on the pipeline's device, after
    check(); the generator is a fresh CPU Generator set to the saved state."""
    from latentd.model.edit import EditState

    check(pipe, req, plan, row, shape)
    gen = torch.Generator("cpu")
    try:
        gen.set_state(row.tensors["rng"].clone())
    except RuntimeError as e:
        raise RowStateError(f"row state does not fit: generator state: {e}") from None
    dev = pipe.device
    latent = row.tensors["latent"].to(dev)
    x0_prev = row.tensors["x0_prev"].to(dev) if "x0_prev" in row.tensors else None
    edit = None
    names = [n for n in EDIT_FIELDS if f"edit.{n}" in row.tensors]
    if names:
        edit = EditState(**{n: row.tensors[f"edit.{n}"].to(dev) for n in names})
    deep = row.tensors["deep"].to(dev, pipe.dtype) if "deep" in row.tensors else None
    return latent, x0_prev, gen, edit, deep
