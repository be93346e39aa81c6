"""Each packaged recipe resolves to the same ``config.yaml``, byte for byte, as the golden files in
``tests/data/recipe_configs/`` (written from the code before the engine/command restructuring of
issue 32): moving the code, or writing a recipe as a base file plus a few lines, changes no value,
no key order and no recipe=auto comment. (Intended changes since: issue 33 added fine-tuning's
``time_budget_minutes``, ``head_init``, ``backbone_lr_scale`` and ``freeze_norm_stats`` keys, regenerated as said below.)

The DINO recipes and the quickstart go through ``launch/train.py``'s config path, the fine-tuning
ones through ``launch/finetune.py``'s. The data is a fixed folder of plain-colour images made here
(so the image count and sizes recipe=auto reads are the same on every machine), and the two paths
that differ per machine (the data and the output folder) read ``DATA`` and ``OUT``.

The fast test stops each run when it writes ``config.yaml`` (the text the loop hands the run), so
no model trains; the heavy one runs each command for one step and reads the file it wrote.
Regenerate the goldens (only for an intended change): ``SSL_XCIT_WRITE_GOLDEN=1 pytest
tests/test_recipe_configs.py``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (REPO / "ssl_xcit" / "configs").glob("*.yaml"))
GOLDEN = REPO / "tests" / "data" / "recipe_configs"
# what each command is given besides its recipe: a CPU, one step of 2 images, no worker processes
SMALL = ["device=cpu", "batch_size_per_gpu=2", "max_steps=1", "num_workers=0", "tensorboard=false"]
CASES = [(name, "small") for name in RECIPES] + [("quickstart", "as_is")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """40 train and 4 val images (two classes, 32 px, plain colours): the same files everywhere."""
    root = tmp_path_factory.mktemp("recipe_data")
    for split, n in (("train", 20), ("val", 2)):
        for c, cls in enumerate(("a", "b")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32), (8 * i, 100 * c, 255 - 8 * i)).save(folder / f"{i:02d}.png")
    return root


def command_line(name: str, variant: str, data: Path, out: Path) -> list[str]:
    extra = SMALL if variant == "small" else ["device=cpu", "num_workers=0", "tensorboard=false"]
    return ["--config", name, f"data_path={data}", f"output_dir={out}", *extra]


def entry_point(name: str):
    from ssl_xcit.commands import train as entry
    return entry.finetune_main if name.startswith("finetune") else entry.main


def blanked(text: str, data: Path, out: Path) -> str:
    return text.replace(str(out), "OUT").replace(str(data), "DATA")


def check_golden(name: str, variant: str, text: str) -> None:
    golden = GOLDEN / f"{name}.{variant}.yaml"
    if os.environ.get("SSL_XCIT_WRITE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"no golden file {golden}"
    assert text == golden.read_text(), f"{name} ({variant}) resolves to another config.yaml than {golden}"


class _Written(BaseException):
    """Raised by the patched ``write_config``: the run stops there, before any model trains."""


@pytest.mark.parametrize("name,variant", CASES)
def test_recipe_resolves_to_the_golden_config_yaml(name, variant, data, tmp_path, monkeypatch, capsys):
    from ssl_xcit.engine.run import Run
    written: list[str] = []

    def write_config(self, text: str) -> None:
        written.append(text)
        raise _Written

    monkeypatch.setattr(Run, "write_config", write_config)
    out = tmp_path / "run"
    with pytest.raises(_Written):
        entry_point(name)(command_line(name, variant, data, out))
    check_golden(name, variant, blanked(written[0], data, out))


@pytest.mark.heavy
@pytest.mark.parametrize("name,variant", [case for case in CASES if case[1] == "small"])
def test_a_one_step_run_writes_the_golden_config_yaml(name, variant, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert entry_point(name)(command_line(name, variant, data, out)) == 0
    check_golden(name, variant, blanked((out / "config.yaml").read_text(), data, out))


def test_the_golden_files_are_the_recipes():
    """One golden file per case, none left over from a recipe that is gone."""
    assert sorted(p.name for p in GOLDEN.glob("*.yaml")) == sorted(f"{n}.{v}.yaml" for n, v in CASES)
