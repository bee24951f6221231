"""The request flags of `latentd generate`, derived from the request declaration (jobs/request.py,
surface "cli"), and reading them back into request fields: shared by the local engine
(latentd/cmd_generate.py) and `--server` (latentd/cmd_remote.py), so both send the same request."""
from __future__ import annotations

import argparse
import os

from latentd.jobs.request import ADAPTERS, REQUIRED, on

SCALE_FLAG = "--classifier-scale"   # classifier_guidance's scale, beside --classify's targets
_TYPES = {int: int, float: float, str: str}
_METAVARS = {"size": "WxH", "image": "IMG", "mask": "MASK", "classifier_guidance": "ATTR=LABEL,...",
             "strength": "S", "model": "MODEL", "loras": "NAME_OR_PATH[:SCALE]"}


def add_request_arguments(p: argparse.ArgumentParser) -> None:
    for f in on("cli"):
        help_ = f.help if f.default in (None, REQUIRED) else f"{f.help} (default: {f.default_text()})"
        if f.flag == "":
            p.add_argument(f.name, help=help_)
        elif f.type is bool:
            p.add_argument(f.cli_flag, dest=f.name, action="store_true", default=None, help=help_)
        elif f.type == ADAPTERS:
            p.add_argument(f.cli_flag, dest=f.name, action="append", default=None,
                           metavar=_METAVARS.get(f.name), help=help_)
        else:
            p.add_argument(f.cli_flag, dest=f.name, default=None, type=_TYPES.get(f.type, str),
                           metavar=_METAVARS.get(f.name), help=help_)
    from latentd.model.classifier_spec import DEFAULT_SCALE
    p.add_argument(SCALE_FLAG, dest="classifier_scale", type=float, default=None, metavar="S",
                   help=f"classifier guidance scale (default {DEFAULT_SCALE:g}; needs --classify)")


def request_values(args: argparse.Namespace) -> dict:
    """Request field -> value (None: not given) of every "cli" field; image and mask are paths.
    Raises InvalidRequest naming the flag for --classify syntax."""
    values = {f.name: getattr(args, f.name) for f in on("cli")}
    values["classifier_guidance"] = _classify(args)
    values["loras"] = _loras(args)
    return values


def _loras(args) -> list[dict] | None:
    """--lora NAME_OR_PATH[:SCALE] (repeated) -> the API's loras; a name is one in the adapter
    folders (LATENTD_LORA_DIR, the model's loras/), a path a .safetensors file."""
    from latentd.model.errors import InvalidRequest
    out = []
    for text in getattr(args, "loras", None) or ():
        name, sep, scale = text.rpartition(":")
        if not sep or not name or os.path.isfile(text):        # no scale (a path may hold ':')
            name, scale = text, None
        entry = {"name": name}
        if scale is not None:
            try:
                entry["scale"] = float(scale)
            except ValueError:
                raise InvalidRequest("lora", f"expected NAME_OR_PATH[:SCALE], got {text!r}") from None
        out.append(entry)
    return out or None


def _classify(args) -> dict | None:
    """--classify color=red,shape=triangle [--classifier-scale S] -> the API's classifier_guidance."""
    from latentd.model.errors import InvalidRequest
    text = getattr(args, "classifier_guidance", None)
    if text is None:
        if args.classifier_scale is not None:
            raise InvalidRequest("classifier-scale", "needs --classify ATTR=LABEL,...")
        return None
    out: dict = {}
    for part in text.split(","):
        attr, sep, label = part.partition("=")
        if not sep or not attr.strip() or not label.strip():
            raise InvalidRequest("classify", f"expected ATTR=LABEL[,ATTR=LABEL...], got {text!r}")
        out[attr.strip()] = label.strip()
    if args.classifier_scale is not None:
        out["scale"] = args.classifier_scale
    return out


def read_file(path: str, flag: str) -> bytes:
    from latentd.model.errors import InvalidRequest
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise InvalidRequest(flag, f"cannot read {path}: {e.strerror or e}") from None
