"""Principle 1: the web app serves with onnxruntime + tokenizers only; torch and transformers stay in the trainer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_serving_imports_no_torch_or_transformers(tmp_path: Path) -> None:
    code = (
        "import sys, wsgi, webapp.serving.inference, webapp.serving.registry, webapp.api\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "DATA_DIR": str(tmp_path)},
    )
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_serving_requirements_exclude_the_training_stack() -> None:
    pins = (REPO / "requirements.txt").read_text().lower()
    for package in ("torch", "transformers", "scikit-learn"):
        assert f"\n{package}==" not in pins, f"{package} must not be in requirements.txt"
