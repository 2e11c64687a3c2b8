"""Start-up stays light: `--help`, `--version`, every command's `--help` and usage errors
never import PyTorch (2+ s) or the other heavy libraries. Runs in a fresh interpreter,
because this test process has imported torch long ago. No timing: only which modules
are loaded, so the result does not depend on machine load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "sklearn", "torchattacks", "matplotlib", "safetensors", "PIL",
         "scipy", "skimage")

SCRIPT = r"""
import json, sys
import typer
from typer.testing import CliRunner
import pixeldefend
from pixeldefend.cli import app

def commands(group, prefix=()):
    # every command path of the Click tree, sub-groups included
    for name, cmd in sorted(group.commands.items()):
        yield prefix + (name,)
        if hasattr(cmd, "commands"):
            yield from commands(cmd, prefix + (name,))

runner = CliRunner()
root = typer.main.get_command(app)
calls = [["--help"], ["--version"], ["--threads", "1", "--help"]]
calls += [["--threads", "1", *path, "--help"] for path in commands(root)]
calls += [["score", "--no-such-option"], ["no-such-command"], ["--threads", "0", "info"]]
codes = {" ".join(args): runner.invoke(app, args).exit_code for args in calls}
print(json.dumps({"codes": codes, "loaded": sorted(m for m in HEAVY if m in sys.modules),
                  "version": pixeldefend.__version__}))
"""


def run_cli_in_fresh_interpreter() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PIXELDEFEND_THREADS", None)  # the load-dependent default path runs too
    result = subprocess.run(
        [sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{SCRIPT}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_help_version_and_usage_errors_do_not_import_heavy_libraries():
    doc = run_cli_in_fresh_interpreter()
    codes = doc["codes"]
    # the calls really ran: help and version succeed, usage errors exit 2
    assert codes["--help"] == 0 and codes["--version"] == 0
    assert codes["--threads 1 score --help"] == 0
    assert codes["--threads 1 classifier train --help"] == 0
    assert len([c for c in codes if c.endswith(" --help")]) >= 12
    assert all(code == 0 for args, code in codes.items() if args.endswith("--help"))
    assert codes["score --no-such-option"] == 2
    assert codes["no-such-command"] == 2
    assert codes["--threads 0 info"] == 2
    assert doc["loaded"] == [], f"start-up imported {doc['loaded']}"


def test_public_api_still_resolves_lazily():
    import pixeldefend
    from pixeldefend.detector import DensityDetector
    from pixeldefend.purify import purify

    assert pixeldefend.DensityDetector is DensityDetector
    # the function, not the submodule of the same name
    assert pixeldefend.purify is purify
    assert set(pixeldefend.__all__) <= set(dir(pixeldefend))


def test_threads_chosen_before_torch_loads_reach_torch():
    """--threads is applied before PyTorch is imported (see cli.app._threads): the
    count must still be the one PyTorch uses once it loads."""
    code = ("from pixeldefend.threads import apply_threads\n"
            "apply_threads(5)\n"
            "apply_threads(3)\n"
            "import importlib.util\n"
            "assert importlib.util.find_spec('torch') is not None  # a check, no import\n"
            "import torch\n"
            "print(torch.get_num_threads())\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "3"
