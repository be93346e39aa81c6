"""ssl_xcit.cli: a known error is one line on stderr with exit status 2; a bug keeps its traceback."""
from __future__ import annotations

import errno
import subprocess
import sys

import pytest

from ssl_xcit import cli
from ssl_xcit.errors import UserError
from ssl_xcit.train.config import ConfigError


def _raise(err: BaseException):
    def main(argv):
        raise err
    return main


@pytest.mark.parametrize("err, expected", [
    (ConfigError("lr must be finite"), "lr must be finite"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "a/b.pth"), "a/b.pth: No such file or directory"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "runs/x"), "runs/x: Is a directory"),
    (OSError(errno.ENOSPC, "No space left on device", "out/c.pth"), "no space left on the device writing out/c.pth"),
])
def test_known_error_is_one_line_and_exit_2(err, expected, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.run(_raise(err), [], prog="tool")
    assert stop.value.code == 2
    err_text = capsys.readouterr().err
    assert err_text == f"tool: error: {expected}\n"


def test_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        cli.run(_raise(ZeroDivisionError("x")), [], prog="tool")


def test_debug_flag_shows_traceback_and_is_removed_from_argv():
    seen = []

    def main(argv):
        seen.append(list(argv))
        raise UserError("bad")
    with pytest.raises(UserError):
        cli.run(main, ["--a", "--debug", "1"], prog="tool")
    assert seen == [["--a", "1"]]


def test_debug_env_shows_traceback(monkeypatch):
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(UserError):
        cli.run(_raise(UserError("bad")), [], prog="tool")


def test_main_given_as_string_is_imported_lazily(capsys):
    assert cli.run("ssl_xcit.errors:UserError", ["x"]).args == (["x"],)


def test_one_line_in_a_real_process():
    code = ("from ssl_xcit import cli\n"
            "from ssl_xcit.errors import UserError\n"
            "def main(argv): raise UserError('checkpoint runs/x.pth holds arch A, config says B')\n"
            "cli.run(main, [], prog='tool')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["tool: error: checkpoint runs/x.pth holds arch A, config says B"]


@pytest.mark.parametrize("script, argv", [
    ("eval/report.py", ["--no-such-option"]),
    ("eval/report.py", []),
    ("eval/visualize_attention.py", ["--checkpoint", "x"]),
    ("eval/visualize_attention.py", ["--checkpoint", "x", "--images", "y", "--out", "z", "--layer", "one"]),
])
def test_usage_mistakes_are_one_line(script, argv):
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / script), *argv], capture_output=True, text=True, cwd=repo)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0] and "--help" in lines[0], proc.stderr


def test_a_library_error_about_a_setting_names_the_parameter_and_a_command_its_flag(capsys):
    """errors.named: the library's message names its Python parameters; cli.run with ``flags`` puts the
    command's options in their places (each one, also a second setting), and without an option for the
    setting the message stays the library's."""
    from ssl_xcit.errors import SETTING, named

    def bad(argv):
        raise named(UserError, f"one task per GPU: {SETTING} (2) must equal {{gpus_per_node}} (8)",
                    "tasks_per_node", "gpus_per_node")
    try:
        bad([])
    except UserError as err:
        assert str(err) == "one task per GPU: tasks_per_node (2) must equal gpus_per_node (8)"
    flags = {"tasks_per_node": "--tasks-per-node", "gpus_per_node": "--gpus-per-node"}
    for words, expected in ((flags, "one task per GPU: --tasks-per-node (2) must equal --gpus-per-node (8)"),
                            ({"other": "--other"},
                             "one task per GPU: tasks_per_node (2) must equal gpus_per_node (8)")):
        with pytest.raises(SystemExit):
            cli.run(bad, [], prog="demo", flags=words)
        assert capsys.readouterr().err == f"demo: error: {expected}\n"


def test_flags_of_a_parser_are_its_first_spellings_by_destination():
    p = cli.ArgumentParser(prog="demo")
    p.add_argument("--crop-size", "--crop_size", type=int)
    p.add_argument("--timeout", dest="timeout_min", type=int)
    p.add_argument("path")
    assert cli.flags_of(p) == {"crop_size": "--crop-size", "timeout_min": "--timeout"}
