"""The repository's top-level ``kernels/`` folder never shadows Hugging Face's ``kernels`` package.

transformers (≥ 5.25) runs ``from kernels import CUDAProperties``; when ``kernels/`` held an
``__init__.py``, any ``python`` started in the repository root imported our folder instead and every
model build failed. Each check runs in a fresh interpreter started in the root, as a user would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_in_root(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_kernels_folder_is_not_a_regular_package():
    assert (ROOT / "kernels").is_dir()
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_transformers_hub_kernels_imports_from_the_root():
    pytest.importorskip("kernels")  # Hugging Face's package, a dependency of transformers
    where = run_in_root("import transformers.integrations.hub_kernels, kernels; print(kernels.__file__)")
    assert Path(where).parent.name == "kernels"
    assert Path(where).resolve().parent != (ROOT / "kernels").resolve()
    assert "site-packages" in where


def test_vcrd_kernels_resolve_to_the_kernels_folder():
    where = run_in_root("import vcrd.kernels.stats as m; print(m.__file__)")
    assert Path(where).resolve() == (ROOT / "kernels" / "stats.py").resolve()


def test_nothing_in_the_project_imports_a_top_level_kernels():
    offenders = []
    for folder in ("vcrd", "kernels", "tests", "benches"):
        for path in (ROOT / folder).rglob("*.py"):
            if folder == "vcrd" and "kernels" in path.relative_to(ROOT / "vcrd").parts:
                continue  # the symlink to kernels/, scanned as kernels/
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                words = line.split()
                top_level = words[:2] in (["import", "kernels"], ["from", "kernels"])
                if top_level or line.lstrip().startswith("import kernels."):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []
