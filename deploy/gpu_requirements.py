"""Print the service's requirements for the CUDA image: every dependency but the CPU
``onnxruntime``, plus the ``gpu`` extra (onnxruntime-gpu). The two wheels install the same
``onnxruntime`` module, so they must never be installed together.

    python deploy/gpu_requirements.py pyproject.toml > requirements-gpu.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def requirement_name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def gpu_requirements(pyproject: Path) -> list[str]:
    project = tomllib.loads(Path(pyproject).read_text(encoding="utf-8"))["project"]
    gpu = project.get("optional-dependencies", {}).get("gpu")
    if not gpu:
        raise SystemExit(f"{pyproject}: no [project.optional-dependencies] gpu extra")
    base = [d for d in project["dependencies"] if requirement_name(d) != "onnxruntime"]
    return base + list(gpu)


if __name__ == "__main__":
    print("\n".join(gpu_requirements(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"))))
