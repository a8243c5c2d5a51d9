"""The checkout's `kernels/` folder (shipped as `supra.kernels`) must never stand in for Hugging Face's
`kernels` package, which transformers >= 5.25 imports on every model import: Python puts the current
directory first on sys.path, so anything started in the repo root would otherwise find ours."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_in(cwd: Path, code: str, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def stand_in_kernels(site: Path) -> Path:
    """A distribution named `kernels` with its own metadata, as pip would install it."""
    package = site / "kernels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("STAND_IN = True\n")
    info = site / "kernels-0.19.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.19.1\n")
    return package


def test_repo_root_imports_the_real_kernels_package(tmp_path):
    package = stand_in_kernels(tmp_path)
    code = ("import kernels, supra.kernels\n"
            "from supra.kernels import linear_attention\n"
            "print(kernels.__file__)\n"
            "assert kernels.STAND_IN and supra.kernels.__name__ == 'supra.kernels'\n")
    result = run_in(REPO, code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(package / "__init__.py")


def test_repo_root_without_a_kernels_package_imports_an_empty_module():
    """As a folder without __init__.py would: no file, nothing in it (transformers: "not installed")."""
    result = run_in(REPO, "import sys; sys.path = [p for p in sys.path if 'site-packages' not in p]\n"
                          "import kernels\n"
                          "print(getattr(kernels, '__file__', None), [n for n in vars(kernels) if n[0] != '_'])")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None []"


def test_repo_root_imports_transformers_llama_and_supra_layers():
    """What every test, script and notebook in the checkout does first, with the installed transformers
    (>= 5.25 requires the `kernels` distribution and imports it from transformers.activations)."""
    result = run_in(REPO, "import transformers.models.llama.modeling_llama, supra.layers.attention")
    assert result.returncode == 0, result.stderr


def test_export_code_files_cannot_shadow_packages():
    """Python started in an export folder has that folder first on sys.path: no copied code file may be
    named like a package (`kernels.py`, `cache.py`, ...)."""
    from supra.export import MODELING, code_files

    names = list(code_files())
    assert "supra_kernels.py" in names and "supra_attention.py" in names
    assert all(name.startswith("supra_") and name != MODELING for name in names)
