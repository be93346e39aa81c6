"""The evaluation tools, the quickstart and the SLURM launcher as a demanding new user meets them:
``--help`` answers before torch loads and says each default once; a bad input (missing or
incomplete data folder, missing / folder / corrupt checkpoint, bad numbers, unknown names) is one
line on stderr and exit status 2, never a traceback (issue 9)."""
from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssl_xcit import cli
from ssl_xcit.commands import options

REPO = Path(__file__).resolve().parents[1]
ARCH = "xcit_nano_12_p16"
SCRIPTS = sorted(f"{d}/{p.name}" for d in ("eval", "launch") for p in (REPO / d).glob("*.py"))  # every tool


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}


@pytest.fixture(scope="module")
def torch_import_seconds() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True, env=_env(), timeout=300)
    return time.perf_counter() - start


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_answers_before_torch_loads_and_says_each_default_once(script, torch_import_seconds, tmp_path):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", str(REPO / script), "--help"], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line]
    assert "torch" not in imported, f"{script} --help imported torch"
    # wall time is noisy on a shared machine: only ask for clearly less than importing torch alone
    assert seconds < 0.7 * torch_import_seconds, (seconds, torch_import_seconds)
    text = " ".join(proc.stdout.split())
    assert not re.search(r"\(default[^()]*(\([^()]*\))?[^()]*\)\s*\(default", text), f"default said twice:\n{text}"
    assert "(default: None)" not in text and "(default: False)" not in text, text


@pytest.mark.parametrize("parser", [options.knn_parser, options.linear_parser, options.export_parser,
                                    options.classification_parser, "ssl_xcit.commands.quickstart:build_parser",
                                    "ssl_xcit.commands.submit:build_parser"])
def test_every_option_says_its_default_at_most_once(parser):
    if isinstance(parser, str):
        module, _, name = parser.partition(":")
        parser = getattr(importlib.import_module(module), name)
    p = parser()
    formatter = p._get_formatter()
    for action in p._actions:
        if action.help and action.help is not argparse.SUPPRESS:
            text = formatter._expand_help(action)
            assert len(re.findall(r"\(default\b", text)) <= 1, (action.option_strings, text)


# options the command layer turns into something else before the library sees them: --no-progress and
# --no-verify (progress, verify), DINO's --patch_size (folded into the arch), DINO's ignored words
COMMAND_ONLY = {"help", "no_progress", "no_verify", "patch_size", "dino_ignored", "num_labels"}


@pytest.mark.parametrize("tool, module, settings", [
    ("eval_knn", "knn", "KnnSettings"), ("eval_linear", "linear", "LinearSettings"),
    ("export_features", "export", "ExportSettings"), ("eval_classification", "classification", "ClassificationConfig")])
def test_every_option_of_a_tool_reaches_its_library_settings(tool, module, settings):
    """A tool's options fill the library's parameters by name (options.settings): an option with no field
    of that name would be dropped without a word, so each one must have its field."""
    import dataclasses
    import importlib
    fields = {f.name for f in dataclasses.fields(getattr(importlib.import_module(f"ssl_xcit.evaluate.{module}"),
                                                         settings))}
    dests = {a.dest for a in options.TOOLS[tool][1]()._actions}
    assert dests - COMMAND_ONLY <= fields, sorted(dests - COMMAND_ONLY - fields)


# ------------------------------------------------------------------------------ one line, exit status 2
def _one_line_error(capsys, call, prog: str) -> str:
    with pytest.raises(SystemExit) as stop:
        call()
    assert stop.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def _tool_main(script: str):
    return importlib.import_module(script.removesuffix(".py").replace("/", ".")).main


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    corrupt = root / "corrupt.pth"
    corrupt.write_bytes(b"\x00not a checkpoint" * 10)
    run_dir = root / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pth").write_bytes(b"")
    bad_tar = root / "images.tar.gz"
    bad_tar.write_bytes(b"\x1f\x8b not really gzip" * 20)
    no_splits = root / "images"
    (no_splits / "cat").mkdir(parents=True)
    return {"corrupt": corrupt, "run_dir": run_dir, "no_splits": no_splits, "bad_tar": bad_tar, "root": root}


CORRUPT_MESSAGE = re.compile(r"corrupt\.pth.{0,4}(is )?not a (PyTorch|torch) checkpoint")
KNN = ["--crop-size", "32", "--num-workers", "0", "--device", "cpu", "--no-progress"]
# (script, argv, part of the one-line message); DATA, MISSING, CORRUPT, RUN_DIR, NO_SPLITS stand for
# CIFAR-10 (200 / 100 images), a path that does not exist, garbage bytes named .pth, a run folder
# holding checkpoint.pth, and a folder of class folders without train/ and val/; BAD_TAR is garbage
# named .tar.gz (tarfile's error about it spans several lines)
CASES = [
    ("eval/eval_knn.py", ["--checkpoint", ARCH, "--data-path", "MISSING"], "--data-path MISSING: no such folder"),
    ("eval/eval_knn.py", ["--checkpoint", ARCH, "--data-path", "NO_SPLITS"], "has no train/ or val/ folder"),
    ("eval/eval_knn.py", ["--checkpoint", "MISSING.pth", "--data-path", "DATA"], "MISSING.pth: no such file"),
    ("eval/eval_knn.py", ["--checkpoint", "RUN_DIR", "--data-path", "DATA"],
     "is a folder; give the checkpoint file in it (it holds checkpoint.pth)"),
    ("eval/eval_knn.py", ["--checkpoint", "CORRUPT", "--data-path", "DATA", *KNN], CORRUPT_MESSAGE),
    ("eval/eval_knn.py", ["--checkpoint", ARCH, "--data-path", "DATA", "--batch-size", "-4"],
     "--batch-size must be positive, got -4"),
    ("eval/eval_knn.py", ["--checkpoint", ARCH, "--data-path", "DATA", "--nb-knn", "0", "5"],
     "--nb-knn values must be positive"),
    ("eval/eval_knn.py", ["--checkpoint", ARCH, "--data-path", "DATA", "--arch", "xcit_tiny_99_p16"],
     "--arch: unknown model name 'xcit_tiny_99_p16'"),
    ("eval/eval_knn.py", ["--checkpoint", "xcit_nano_12_p61", "--data-path", "DATA"],
     "neither an existing file nor a model name"),
    ("eval/eval_knn.py", ["--checkpoint", ARCH, "--data-path", "DATA", "--nb-knn", "x"],
     "argument --nb-knn/--nb_knn: invalid int value: 'x'"),
    ("eval/eval_knn.py", ["--checkpoint", ARCH, "--data-path", "DATA", *KNN, "--crop-size", "40"],
     "--crop-size 40 is not divisible by the patch size 16"),
    ("eval/eval_knn.py", ["--data-path", "DATA"], "--checkpoint and --data-path are required"),
    ("eval/eval_knn.py", ["--checkpoint", ARCH, "--data-path", "DATA", "--output-dir", "CORRUPT"],
     "--output-dir CORRUPT is a file; give a folder"),
    ("eval/eval_knn.py", ["--checkpoint", ARCH, "--data-path", "DATA", "--dump-features", "CORRUPT"],
     "--dump-features CORRUPT is a file"),
    ("eval/eval_knn.py", ["--checkpoint", ARCH, "--data-path", "DATA", "--temperature", "inf"],
     "--temperature must be a finite number, got inf"),
    ("eval/eval_knn.py", ["--checkpoint", ARCH, "--data-path", "BAD_TAR", *KNN], "BAD_TAR is not a readable tar"),
    ("eval/eval_linear.py", ["--checkpoint", ARCH, "--data-path", "DATA", "--holdout", "1.5"], "--holdout"),
    # non-finite numbers are refused as training refuses them (inf weight decay: NaN loss, chance accuracy)
    *[("eval/eval_linear.py", ["--checkpoint", ARCH, "--data-path", "DATA", *KNN, "--epochs", "1", flag, *values],
       f"{flag}{' values' if 'grid' in flag else ''} must be a finite number, got {values[-1]}")
      for flag, values in (("--weight-decay", ["inf"]), ("--weight-decay", ["nan"]), ("--wd-grid", ["0", "inf"]),
                           ("--lr-grid", ["1e-3", "inf"]), ("--lr", ["nan"]))],
    # more last blocks than the backbone has (XCiT: 2 class-attention blocks carry the CLS token)
    ("eval/eval_linear.py", ["--checkpoint", ARCH, "--data-path", "DATA", *KNN, "--epochs", "1", "--n-last-blocks",
                             "3"], f"--n-last-blocks 3: this backbone ({ARCH}) has 2 block(s) carrying a CLS token"),
    ("eval/eval_linear.py", ["--checkpoint", ARCH, "--data-path", "DATA", *KNN, "--epochs", "1", "--mode", "full",
                             "--n-last-blocks", "4"], "--n-last-blocks 4: this backbone"),
    ("eval/export_features.py", ["--checkpoint", ARCH, "--data-path", "DATA", "--split", "val", "--out", "MISSING",
                                 *KNN, "--n-last-blocks", "5"], "--n-last-blocks 5: this backbone"),
    ("eval/eval_linear.py", ["--checkpoint", "RUN_DIR", "--data-path", "DATA"], "is a folder"),
    ("eval/eval_linear.py", ["--checkpoint", "CORRUPT", "--data-path", "DATA", *KNN], CORRUPT_MESSAGE),
    ("eval/eval_linear.py", ["--checkpoint", ARCH, "--data-path", "DATA", "--resize", "16", "--crop-size", "32"],
     "--resize 16 is smaller than --crop-size 32"),
    ("eval/export_features.py", ["--checkpoint", ARCH, "--data-path", "DATA", "--out", "MISSING"],
     "pass --split train or --split val"),
    ("eval/export_features.py", ["--checkpoint", "RUN_DIR", "--data-path", "DATA", "--split", "val",
                                 "--out", "MISSING"], "is a folder"),
    ("eval/export_features.py", ["--checkpoint", ARCH, "--data-path", "MISSING", "--out", "MISSING"],
     "no such folder or archive"),
    ("eval/export_features.py", ["--checkpoint", ARCH, "--data-path", "DATA", "--split", "test", "--out",
                                 "MISSING"], "has no test/ folder"),
    ("eval/eval_classification.py", ["--model", "xcit_nano_12_p61", "--checkpoint", "none", "--data-path",
                                     "DATA"], "--model: unknown model name"),
    ("eval/eval_classification.py", ["--model", ARCH, "--checkpoint", "RUN_DIR", "--data-path", "DATA"],
     "is a folder"),
    ("eval/eval_classification.py", ["--model", ARCH, "--checkpoint", "CORRUPT", "--data-path", "DATA"],
     CORRUPT_MESSAGE),
    ("eval/eval_classification.py", ["--model", ARCH, "--checkpoint", "none", "--data-path", "DATA",
                                     "--batch-size", "0"], "--batch-size must be positive"),
    ("eval/eval_classification.py", ["--model", ARCH, "--checkpoint", "none", "--data-path", "MISSING"],
     "folder not found"),
    ("eval/eval_classification.py", ["--model", ARCH, "--checkpoint", "none", "--data-path", "DATA",
                                     "--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ("launch/quickstart.py", ["--data", "MISSING"], "or leave --data out to use or download CIFAR-10"),
    ("launch/quickstart.py", ["--data", "DATA", "--output", "CORRUPT"], "--output CORRUPT is a file"),
    ("eval/export_features.py", ["--checkpoint", ARCH, "--data-path", "DATA", "--split", "val", "--out",
                                 "CORRUPT"], "--out CORRUPT is a file"),
    ("launch/quickstart.py", ["--data", "DATA", "--knn-k", "0"], "--knn-k values must be positive"),
    ("launch/quickstart.py", ["--data", "DATA", "lr=inf"], "optim.lr must be a finite number"),
    ("launch/quickstart.py", ["--data", "NO_SPLITS"], "has no train/ or val/ folder"),
]


@pytest.mark.parametrize("script, argv, expected", CASES,
                         ids=[f"{Path(c[0]).stem}-{getattr(c[2], 'pattern', c[2])[:30]}" for c in CASES])
def test_bad_input_is_one_line_and_exit_status_2(script, argv, expected, cifar_small, bad_files, capsys,
                                                 monkeypatch):
    words = {"DATA": str(cifar_small), "MISSING": "nowhere", "BAD_TAR": str(bad_files["bad_tar"]),
             "CORRUPT": str(bad_files["corrupt"]),
             "RUN_DIR": str(bad_files["run_dir"]), "NO_SPLITS": str(bad_files["no_splits"])}

    def real(word: str) -> str:
        return re.sub("|".join(words), lambda m: words[m.group(0)], word)
    monkeypatch.chdir(bad_files["root"])
    line = _one_line_error(capsys, lambda: cli.run(_tool_main(script), [real(w) for w in argv], prog=script),
                           script)
    if isinstance(expected, re.Pattern):
        assert expected.search(line), line
    else:
        assert real(expected) in line, line


def test_nb_knn_larger_than_the_train_set_fails_before_extraction(cifar_small, capsys, monkeypatch):
    from ssl_xcit.evaluate import features

    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted before k was checked")
    monkeypatch.setattr(features, "extract_features", no_extraction)
    argv = ["--checkpoint", ARCH, "--data-path", str(cifar_small), "--nb-knn", "20", "500", "--crop-size", "32",
            "--num-workers", "0", "--device", "cpu", "--no-progress"]
    line = _one_line_error(capsys, lambda: cli.run(_tool_main("eval/eval_knn.py"), argv, prog="eval_knn"),
                           "eval_knn")
    assert "--nb-knn 500 exceeds the 200 train images" in line, line


def test_runtime_library_errors_name_the_tools_flags(cifar_small, tiny_features, capsys, tmp_path):
    """Errors the library raises once the work has begun name Python parameters (errors.named/hinted);
    each tool's command line says its own flags instead."""
    half = tmp_path / "half"
    half.mkdir()
    (half / "trainfeat.pth").write_bytes(b"")
    line = _one_line_error(capsys, lambda: cli.run(_tool_main("eval/eval_knn.py"), ["--load-features", str(half)],
                                                   prog="eval_knn"), "eval_knn")
    assert "lacks" in line and "give --load-features a folder written by --dump-features" in line, line
    line = _one_line_error(capsys, lambda: cli.run(_tool_main("eval/eval_knn.py"),
                                                   ["--load-features", str(tiny_features), "--nb-knn", "500"],
                                                   prog="eval_knn"), "eval_knn")
    assert "--nb-knn 500 exceeds the" in line and "nb_knn" not in line, line
    argv = ["--checkpoint", ARCH, "--data-path", str(cifar_small), "--mode", "full", "--crop-size", "32",
            "--batch-size", "50", "--num-workers", "0", "--device", "cpu", "--epochs", "2", "--lr", "1e38",
            "--no-progress", "--output-dir", str(tmp_path / "lin")]
    with pytest.raises(SystemExit):   # full mode lists the folders with a progress bar even so: the last line
        cli.run(_tool_main("eval/eval_linear.py"), argv, prog="eval_linear")
    line = capsys.readouterr().err.strip().splitlines()[-1].split("\r")[-1].strip()
    assert "the linear probe diverged in epoch 0" in line and line.endswith("; lower --lr"), line


@pytest.fixture
def tiny_features(tmp_path):
    """A dump of 4 train and 2 val features, as --dump-features writes it."""
    from ssl_xcit.evaluate.knn import dump_features
    folder = tmp_path / "feats"
    dump_features(folder, torch.eye(4), torch.tensor([0, 1, 0, 1]), torch.eye(4)[:2], torch.tensor([0, 1]),
                  {"classes": ["a", "b"], "normalized": True})
    return folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("script, argv", [
    ("eval/eval_knn.py", ["--checkpoint", ARCH, "--data-path", "DATA", "--device", "cuda"]),
    ("eval/eval_classification.py", ["--model", ARCH, "--checkpoint", "none", "--data-path", "DATA",
                                     "--device", "cuda:0"]),
])
def test_cuda_without_a_gpu_is_one_line(script, argv, cifar_small, capsys):
    argv = [str(cifar_small) if w == "DATA" else w for w in argv]
    line = _one_line_error(capsys, lambda: cli.run(_tool_main(script), argv, prog=script), script)
    assert "torch sees no CUDA GPU" in line, line


@pytest.mark.parametrize("script, argv, expected", [
    ("eval/eval_knn.py", ["--checkpoint", "nowhere/checkpoint.pth", "--data-path", "."], "no such file"),
    ("eval/eval_linear.py", ["--checkpoint", ARCH, "--data-path", "nowhere"], "no such folder"),
    ("eval/export_features.py", ["--checkpoint", ARCH, "--data-path", ".", "--out", "x", "--batch-size", "0"],
     "--batch-size must be positive"),
    ("eval/eval_classification.py", ["--model", ARCH, "--checkpoint", "none"], "required: --data-path"),
    ("launch/quickstart.py", ["--knn-k", "ten"], "invalid int value: 'ten'"),
    ("launch/submit.py", ["eval_knnn", "--checkpoint", "c.pth"], "did you mean 'eval_knn'?"),
])
def test_scripts_print_one_line_and_exit_2(script, argv, expected, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / script), *argv], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "eval" / "eval_knn.py"), "--debug", "--checkpoint",
                           "nowhere/c.pth", "--data-path", "."], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "MissingPathError" in proc.stderr


# ------------------------------------------------------------------------------ hints name the command's own options
class _RunsShell:
    """Unpickling this calls os.system: weights-only loading refuses it (nothing runs)."""

    def __reduce__(self):
        return os.system, ("true",)


@pytest.fixture(scope="module")
def hint_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hints")
    files = {name: root / f"{name}.pth" for name in ("pickled", "probe", "unknown", "no_arch")}
    torch.save({"model": {"w": torch.ones(2)}, "x": _RunsShell()}, files["pickled"])
    # what eval_linear --mode full saves as linear_checkpoint.pth
    torch.save({"epoch": 3, "probe": {"linear.weight": torch.zeros(10, 8), "linear.bias": torch.zeros(10)},
                "optimizer": {}, "scheduler": {}, "best": None, "last": None, "history": [],
                "fingerprint": {"checkpoint": "runs/s12/checkpoint.pth", "arch": None}}, files["probe"])
    torch.save({"weights": [1, 2, 3]}, files["unknown"])
    torch.save({"blocks.0.norm1.weight": torch.ones(8)}, files["no_arch"])   # timm naming, no cls_token
    return files


def _knn(checkpoint: Path, data: Path) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--data-path", str(data), *KNN]


def test_hints_name_only_options_the_command_has(hint_files, cifar_small, capsys):
    """A library error that an option gets past is worded by each command for its own options: eval_knn
    has no --allow-pickle or --format (eval_classification has both) but has --arch; a linear-probe
    checkpoint is called one instead of "pass format=", which no command has."""
    knn, cls = _tool_main("eval/eval_knn.py"), _tool_main("eval/eval_classification.py")

    def knn_line(name: str) -> str:
        return _one_line_error(capsys, lambda: cli.run(knn, _knn(hint_files[name], cifar_small), prog="eval_knn"),
                               "eval_knn")

    def cls_line(name: str) -> str:
        argv = ["--model", ARCH, "--checkpoint", str(hint_files[name]), "--data-path", str(cifar_small / "val"),
                "--device", "cpu", "--num-workers", "0"]
        return _one_line_error(capsys, lambda: cli.run(cls, argv, prog="eval_classification"),
                               "eval_classification")

    line = knn_line("pickled")
    assert "contains GLOBAL posix.system" in line and "would run code" in line, line
    assert "pickle=" not in line and "--allow-pickle" not in line, line
    line = cls_line("pickled")
    assert "if you trust the file, pass --allow-pickle" in line and "allow_pickle=" not in line, line
    line = knn_line("probe")
    assert "is a linear-probe checkpoint" in line and "not a backbone" in line, line
    assert "runs/s12/checkpoint.pth" in line and "format" not in line, line
    line = knn_line("unknown")
    assert "unknown checkpoint format" in line and "format=" not in line and "--format" not in line, line
    assert "the formats read here: official, dino_backbone" in line and "pass --format with one of them" in \
        cls_line("unknown")
    line = knn_line("no_arch")
    assert "cannot infer the XCiT architecture" in line and "pass --arch NAME" in line and "arch=" not in line, line


def test_pretrained_weights_missing_names_download_as_the_command_spells_it(cifar_small, tmp_path, capsys,
                                                                              monkeypatch):
    monkeypatch.setenv("SSL_XCIT_HOME", str(tmp_path / "empty_cache"))
    argv = ["--model", ARCH, "--checkpoint", "pretrained", "--data-path", str(cifar_small / "val"),
            "--device", "cpu", "--num-workers", "0"]
    line = _one_line_error(capsys, lambda: cli.run(_tool_main("eval/eval_classification.py"), argv,
                                                   prog="eval_classification"), "eval_classification")
    assert "pretrained weights for" in line and "or pass --download" in line and "download=True" not in line, line
    from ssl_xcit.models.factory import pretrained_file
    with pytest.raises(FileNotFoundError, match="download=True"):   # the Python API keeps its own words
        pretrained_file(ARCH)


def test_library_hints_never_reach_a_command_without_that_option():
    """launch/train.py and any command that passes no words for a role: the problem alone, in one line."""
    from ssl_xcit.data.sampler import ResumableDistributedSampler
    from ssl_xcit.errors import UserError, hinted
    err = hinted(UserError, "x.pth contains GLOBAL posix.system", "pass allow_pickle=True", "allow_pickle")
    assert str(err).endswith("pass allow_pickle=True")
    assert cli.describe(err) == "x.pth contains GLOBAL posix.system"
    assert cli.describe(err, {"allow_pickle": "pass --allow-pickle"}) == "x.pth contains GLOBAL posix.system; " \
                                                                         "pass --allow-pickle"
    with pytest.raises(UserError) as info:    # the training's "fewer images than one batch"
        ResumableDistributedSampler(3, 8)
    assert "drop_last" not in str(info.value) and cli.describe(info.value).endswith("lower the batch size")
    sampler = ResumableDistributedSampler(24, 4)
    with pytest.raises(ValueError) as info:    # the training wraps it in its own resume advice
        sampler.load_state_dict({**sampler.state_dict(3), "batch_size_per_rank": 5})
    assert "strict" not in str(info.value)
