"""The ``granet`` command's surface: start-up cost, OpenMP's wait policy, boolean flags, help texts, closed pipes."""
from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Optional

import pytest

from granet.cli import build_parser, main
from granet.cli._parser import BoolFlag, Parser, command_parsers, plain
from granet.cli.train import bool_keys
from granet.train.config import TrainConfig, config_keys

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _python(*args: str, env: Optional[dict[str, str]] = None, **kwargs: typing.Any) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "PYTHONUNBUFFERED")}
    environ.update(env or {})
    environ["PYTHONPATH"] = SRC + os.pathsep + environ.get("PYTHONPATH", "")
    if "stdout" not in kwargs:
        kwargs["capture_output"] = True
    return subprocess.run([sys.executable, *args], env=environ, text=True, timeout=300, **kwargs)


# ---------------------------------------------------------------------------------------- start-up


def _imported(stderr: str) -> set[str]:
    """Module names from ``python -X importtime``'s report."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines()
            if line.startswith("import time:") and "imported package" not in line}


@pytest.mark.parametrize("argv", [["--help"], [], ["evaluate", "--help"], ["report", "--help"]],
                         ids=["help", "no-command", "evaluate-help", "report-help"])
def test_help_does_not_import_torch(argv):
    done = _python("-X", "importtime", "-m", "granet", *argv)
    assert done.returncode == (2 if not argv else 0), done.stderr[-2000:]
    modules = _imported(done.stderr)
    assert {"granet", "granet.cli", "argparse"} <= modules  # the report was read
    heavy = sorted(m for m in modules if m.split(".")[0] in ("torch", "numpy", "yaml", "matplotlib"))
    assert heavy == [], heavy[:5]
    assert "usage: granet" in done.stdout


def test_granet_imports_its_public_names_on_first_use():
    """`import granet` loads no torch; each name of `__all__` comes from the module the type checkers are shown."""
    import ast

    import granet

    code = "import sys, granet; print(sorted(m for m in sys.modules if m.startswith(('torch', 'granet'))))"
    done = _python("-c", code)
    assert done.stdout.strip() == "['granet']", done.stderr[-2000:]
    tree = ast.parse(Path(granet.__file__).read_text())
    checked = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    shown = {alias.name: node.module for node in checked.body if isinstance(node, ast.ImportFrom)
             for alias in node.names}
    assert shown == granet._EXPORTS and sorted(shown) == sorted(granet.__all__)
    for name, module in shown.items():
        assert getattr(granet, name) is getattr(importlib.import_module(f"granet.{module}"), name)
    assert granet.kernels.topk.__name__ == "granet.kernels.topk"  # submodules, as before
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        granet.nope  # noqa: B018


_SPY = """
import os, sys
seen = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY"))
        return None
sys.meta_path.insert(0, Spy())
from granet.cli import main
try:
    main(["--version"])  # loads the native kernels, hence torch
except SystemExit:
    pass
print("torch saw", repr(seen[0]) if seen else "nothing", file=sys.stderr)
"""


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE"), ("passive", "passive")])
def test_openmp_wait_policy_is_passive_before_torch_loads_unless_set(given, expected):
    done = _python("-c", _SPY, env={} if given is None else {"OMP_WAIT_POLICY": given})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1] == f"torch saw {expected!r}"
    assert done.stdout.startswith("granet ")


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("", "PASSIVE"), (" ", "PASSIVE"),
                                             ("ACTIVE", "ACTIVE"), ("nonsense", "nonsense")])
def test_openmp_wait_policy_empty_counts_as_unset(given, expected):
    code = ("import contextlib, io, os, sys\nfrom granet.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    status = main([])\n"
            "print(status, repr(os.environ['OMP_WAIT_POLICY']), 'torch' in sys.modules)")
    done = _python("-c", code, env={} if given is None else {"OMP_WAIT_POLICY": given})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"2 {expected!r} False"


# ---------------------------------------------------------------------------------------- boolean flags


def _is_bool(hint: typing.Any) -> Optional[bool]:
    """``False`` for ``bool``, ``True`` for ``Optional[bool]``, else ``None`` (written here, not imported)."""
    if hint is bool:
        return False
    if hint == Optional[bool]:
        return True
    return None


BOOL_KEYS = {key.name: _is_bool(key.hint) for key in config_keys() if _is_bool(key.hint) is not None}


def test_the_boolean_keys_are_found():
    assert bool_keys() == list(BOOL_KEYS)
    assert {"overwrite", "download", "fsdp", "tensorboard"} <= set(BOOL_KEYS)


def _parse(*argv: str) -> dict[str, typing.Any]:
    args = vars(build_parser().parse_args(list(argv)))
    return {k: v for k, v in args.items() if k not in ("func", "command", "config", "verbose")}


def _refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("key", list(BOOL_KEYS))
def test_every_boolean_config_flag_takes_every_form(key, capsys):
    flag = "--" + key.replace("_", "-")
    negative = "--no-" + key.replace("_", "-")
    for argv, value in (([flag], True), ([negative], False), ([flag, "true"], True), ([flag, "false"], False),
                        ([flag, "Yes"], True), ([flag, "0"], False), ([f"{flag}=on"], True), ([f"{flag}=off"], False)):
        assert _parse("train", *argv) == {key: value}, argv
        assert TrainConfig.from_dict({key: value}).to_dict()[key] is value
    assert _parse("train", flag, "--seed", "3") == {key: True, "seed": 3}  # the next flag is not a value
    assert _parse("train", negative, "--seed", "3") == {key: False, "seed": 3}
    assert _parse("train", "--seed", "3") == {"seed": 3}  # not given: the config's default stays
    err = _refused(capsys, "train", flag, "maybe")
    assert f"argument {flag}/{negative}: expected true/false" in err and "got 'maybe'" in err
    err = _refused(capsys, "train", negative, "true")
    assert f"{negative} takes no value, got 'true'" in err
    if BOOL_KEYS[key]:  # Optional[bool]: none means the method's preset
        assert _parse("train", flag, "none") == {key: None}
    else:
        assert "got 'none'" in _refused(capsys, "train", flag, "none")


def _all_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return {"": parser, **command_parsers(parser)}


def test_every_boolean_option_is_a_bool_flag():
    found = {(name, action.dest) for name, parser in _all_parsers().items() for action in parser._actions
             if isinstance(action, BoolFlag)}
    assert found == {("", "verbose"), ("evaluate", "json"), ("flops", "json"), ("report", "plots"),
                     ("export", "drop_zero_signs")} | {("train", key) for key in BOOL_KEYS}
    stores = [(name, action.dest) for name, parser in _all_parsers().items() for action in parser._actions
              if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))]
    assert stores == []


@pytest.mark.parametrize("command, dest, default", [("evaluate", "json", False), ("report", "plots", True),
                                                    ("export", "drop_zero_signs", False)])
def test_boolean_flags_leave_positional_arguments_alone(command, dest, default, capsys):
    parser = _all_parsers()[command]
    required = [a for a in parser._actions if a.option_strings and a.required]
    before = [x for a in required for x in (a.option_strings[0], "m")]
    positional = [a.dest for a in parser._actions if not a.option_strings]
    flag, negative = "--" + dest.replace("_", "-"), "--no-" + dest.replace("_", "-")

    def parsed(*argv: str) -> tuple[object, list[object]]:
        args = build_parser().parse_args([command, *before, *argv])
        return getattr(args, dest), [getattr(args, p) for p in positional]

    run = ["RUN"] if command == "export" else [["RUN"]]
    assert parsed("RUN") == (default, run)
    assert parsed(flag, "RUN") == (True, run)
    assert parsed(negative, "RUN") == (False, run)
    assert parsed(flag, "false", "RUN") == (False, run)
    assert parsed("RUN", flag, "no") == (False, run)
    assert parsed(f"{flag}=yes", "RUN") == (True, run)
    assert "got 'x'" in _refused(capsys, command, *before, f"{flag}=x", "RUN")


def test_flops_json_flag():
    for argv, value in (([], False), (["--json"], True), (["--no-json"], False), (["--json", "true"], True)):
        assert build_parser().parse_args(["flops", "--model", "mlp", *argv]).json is value


def test_verbose_before_the_command():
    assert build_parser().parse_args(["-v", "models"]).verbose is True
    assert build_parser().parse_args(["--verbose", "false", "models"]).verbose is False
    assert build_parser().parse_args(["--no-verbose", "models"]).verbose is False
    assert build_parser().parse_args(["models"]).verbose is False


@pytest.mark.slow
def test_the_overwrite_advice_works_as_written(tmp_path, capsys):
    """The refusal says "pass --overwrite"; passing it bare replaces the run."""
    run = tmp_path / "run"
    args = ["train", "--model", "mlp", "--epochs", "1", "--max-steps", "2", "--progress", "log", "--out", str(run)]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --overwrite to replace it" in err
    assert main([*args, "--overwrite"]) == 0
    assert main([*args, "--no-overwrite"]) == 2


# ---------------------------------------------------------------------------------------- help texts

_MARKUP = re.compile(r"``|:[a-z]+:`|::\s*$", re.M)


def test_plain_renders_sphinx_markup():
    assert plain("a :class:`~granet.sparsity.config.SparsityConfig` field") == "a `SparsityConfig` field"
    assert plain("see :func:`~granet.sparsity.schedules.register_drop_decay`") == "see `register_drop_decay()`"
    assert plain(":meth:`TrainConfig.from_dict` and :py:class:`granet.Sparsifier`") == \
        "`TrainConfig.from_dict()` and `granet.Sparsifier`"
    assert plain(":doc:`the guide <guide/start>`") == "`the guide`"
    assert plain("``None`` means ``density``") == "`None` means `density`"
    assert plain("in your loop::\n\n    code\n") == "in your loop:\n\n    code\n"
    assert plain("plain `text`, 100% kept") == "plain `text`, 100% kept"


def test_every_option_of_every_command_has_plain_help():
    parsers = _all_parsers()
    assert set(parsers) == {"", "train", "evaluate", "models", "methods", "datasets", "flops", "report",
                            "plasticity", "export"}
    for name, parser in parsers.items():
        for action in parser._actions:
            assert action.help and action.help.strip(), f"granet {name}: {action.option_strings or action.dest}"
            assert not _MARKUP.search(action.help), f"granet {name} {action.option_strings}: {action.help}"
        text = parser.format_help()
        assert not _MARKUP.search(text), f"granet {name} --help: {_MARKUP.search(text)}"
        assert "list_models" not in text
    assert "model name (see `granet models`)" in parsers["flops"].format_help()


def test_subcommand_help_through_main(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: granet export") and "--drop-zero-signs [BOOL], --no-drop-zero-signs" in out
    assert not _MARKUP.search(out)


def test_parser_builds_commands_on_use():
    parser = build_parser()
    commands = {name: sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
                for name, sub in action.choices.items()}
    assert all(isinstance(sub, Parser) and len(sub._actions) == 1 for sub in commands.values())  # only -h
    parser.parse_args(["flops", "--model", "mlp"])
    assert len(commands["flops"]._actions) > 1 and len(commands["train"]._actions) == 1


# ---------------------------------------------------------------------------------------- closed pipes


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("argv", [["flops", "--model", "mlp", "--dataset", "mnist", "--json"], ["train", "--help"],
                                  ["--help"]], ids=["flops-json", "train-help", "help"])
def test_closed_pipe_ends_quietly(argv, unbuffered):
    """``granet flops --json | head -1``: the reader has gone; no traceback, status 141 (128 + SIGPIPE).

    Unbuffered, the first write fails; buffered, a long text fails when the buffer fills and a short
    one at granet's own flush.
    """
    read, write = os.pipe()
    os.close(read)  # every write fails with EPIPE, as once `head` has exited
    try:
        done = _python("-m", "granet", *argv, stdout=write, stderr=subprocess.PIPE,
                       env={"PYTHONUNBUFFERED": "1"} if unbuffered else {})
    finally:
        os.close(write)
    assert done.stderr == ""
    assert done.returncode == 141
