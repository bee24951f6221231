"""Print the API image's requirements: the package's dependencies without the engine's.

The API never imports torch (tests/test_api_docs.py), so its image leaves out every
distribution listed under [tool.latentd] engine-only in pyproject.toml; the versions stay in one
place (pyproject.toml's dependencies). Extras named on the command line are added, e.g.
`python deploy/api_requirements.py s3` for the S3 image store.
"""
from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def dist_name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower().replace("_", "-")


def api_requirements(extras: list[str], pyproject: Path = PYPROJECT) -> list[str]:
    meta = tomllib.loads(pyproject.read_text())
    engine = {dist_name(d) for d in meta["tool"]["latentd"]["engine-only"]}
    reqs = [r for r in meta["project"]["dependencies"] if dist_name(r) not in engine]
    for e in extras:
        reqs += meta["project"]["optional-dependencies"][e]
    return reqs


if __name__ == "__main__":
    print("\n".join(api_requirements(sys.argv[1:])))
