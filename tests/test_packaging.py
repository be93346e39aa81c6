"""A proper package (issue 25): the wheel holds the recipes and the console commands, declares every
runtime dependency, and (heavy) ``pip install .`` into a new virtual environment works from a folder
outside the repository: each command's ``--help``, a packaged recipe by name, and the quickstart."""
from __future__ import annotations

import ast
import importlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.conftest import make_subset

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
COMMANDS = PYPROJECT["project"]["scripts"]
# import name -> distribution name, where they differ
DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml", "faiss": "faiss-cpu", "huggingface_hub": "huggingface_hub"}


def _source_copy(dest: Path) -> Path:
    """The files a build reads (package, pyproject, README), without caches: building in the
    checkout would leave build/ and egg-info there, and other workers share it."""
    shutil.copytree(REPO / "ssl_xcit", dest / "ssl_xcit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dest / name)
    return dest


def _requirement_names(specs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


def test_wheel_holds_recipes_commands_and_dependencies(tmp_path):
    src = _source_copy(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    wheel = zipfile.ZipFile(next((tmp_path / "dist").glob("ssl_xcit-*.whl")))
    names = wheel.namelist()
    for recipe in sorted((REPO / "ssl_xcit" / "configs").glob("*.yaml")):
        assert wheel.read(f"ssl_xcit/configs/{recipe.name}") == recipe.read_bytes()
    entry_points = wheel.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for command, target in COMMANDS.items():
        assert f"{command} = {target}" in entry_points
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), target
    assert {"ssl-xcit-train", "ssl-xcit-knn", "ssl-xcit-linear", "ssl-xcit-export", "ssl-xcit-submit",
            "ssl-xcit-finetune"} <= set(COMMANDS)
    metadata = wheel.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Dist: submitit<1.6,>=1.5.1" in metadata and "Requires-Dist: matplotlib>=3.8" in metadata


def test_every_imported_library_is_declared():
    """Each third-party module the package imports is a declared dependency (an optional extra for
    huggingface_hub, imported only to upload)."""
    imported = set()
    for path in (REPO / "ssl_xcit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in ("ssl_xcit", "__future__")}
    declared = _requirement_names(PYPROJECT["project"]["dependencies"])
    optional = _requirement_names([s for extra in PYPROJECT["project"]["optional-dependencies"].values()
                                   for s in extra])
    for module in third_party:
        dist = DISTRIBUTIONS.get(module, module).lower().replace("_", "-")
        assert dist in declared or (module == "huggingface_hub" and dist in optional), module


# ------------------------------------------------------------------------------------------ heavy: pip install
@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip install .`` (not editable) into a new venv whose heavy dependencies (torch, timm, ...) come
    from this interpreter's site-packages through a .pth line: nothing is downloaded."""
    tmp = tmp_path_factory.mktemp("venv")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "host_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    src = _source_copy(tmp / "src")
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", str(src)],
                   check=True, capture_output=True, timeout=600, env=_env())
    shutil.rmtree(src)   # the install must not read its source folder
    return venv


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {"OMP_NUM_THREADS": "1"}


@pytest.mark.heavy
def test_the_install_is_a_copy_in_the_new_venv(installed, tmp_path):
    out = subprocess.run([str(installed / "bin" / "python"), "-c", "import ssl_xcit; print(ssl_xcit.__file__)"],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out).is_relative_to(installed) and not Path(out).is_relative_to(REPO), out


@pytest.mark.heavy
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_answers_help_outside_the_repository(installed, command, tmp_path):
    proc = subprocess.run([str(installed / "bin" / command), "--help"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
    assert command in proc.stdout.split("\n")[0], proc.stdout[:300]


@pytest.mark.heavy
def test_quickstart_and_a_packaged_recipe_outside_the_repository(installed, cifar_root, tmp_path):
    data = make_subset(cifar_root, tmp_path / "data", 6, 3)
    tiny = ["max_steps=2", "max_images=32", "batch_size_per_gpu=8", "global_crops_size=32", "out_dim=256",
            "head_hidden_dim=64", "head_bottleneck_dim=32", "device=cpu", "report=false", "tensorboard=false"]
    proc = subprocess.run([str(installed / "bin" / "ssl-xcit-quickstart"), "--data", str(data), "--output", "qs",
                           "--knn-train-images", "40", "--knn-val-images", "20", "--knn-k", "5",
                           "--monitor-every-steps", "0", *tiny], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "qs" / "quickstart.json").is_file() and (tmp_path / "qs" / "train" / "checkpoint.pth").is_file()
    proc = subprocess.run([str(installed / "bin" / "ssl-xcit-train"), "--config", "configs/quickstart.yaml",
                           "--data_path", str(data / "train"), "--output_dir", "run", *tiny], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "arch: xcit_nano_12_p8" in (tmp_path / "run" / "config.yaml").read_text()   # the packaged recipe's


def test_the_submit_command_names_itself_as_typed():
    """Installed as ssl-xcit-submit, its usage and its one-line errors say ssl-xcit-submit, not launch/submit.py."""
    code = ("import sys; sys.argv = ['/venv/bin/ssl-xcit-submit', '--nodes', 'x']; "
            "from ssl_xcit.console import submit; submit()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("ssl-xcit-submit: error:"), proc.stderr[-500:]
    assert "launch/submit.py" not in proc.stderr
