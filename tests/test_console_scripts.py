"""The installed console scripts (not `python -m`, whose `__main__` block may do what the script never does): bad
input is one `error:` line on stderr, nothing on stdout, no traceback, exit 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from glint_lightning.ckpt_info import main as ckpt_info_main
from glint_lightning.data.check import main as check_main
from tests.helpers import REPO

BIN = Path(sys.executable).parent
# pyproject's [project.scripts] (no tomllib: Python 3.10 is supported)
SECTION = (REPO / "pyproject.toml").read_text().split("[project.scripts]\n", 1)[1].split("\n\n", 1)[0]
SCRIPTS = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"$', SECTION, re.MULTILINE))
BAD_INPUT = {  # console script: (arguments, what its one line says)
    "glint-ckpt-info": (["missing.ckpt"], "error: missing.ckpt: no such file; pass a .ckpt"),
    "glint-check": (["not.h5"], "error: not.h5: not an HDF5 file"),
    "glint-train": (["ckpt_path=missing.ckpt", "trainer.accelerator=cpu"], "error: ckpt_path=missing.ckpt: no such"),
    "glint-eval": (["ckpt_path=missing.ckpt"], "error: missing.ckpt: no such file"),
    "glint-predict": (["ckpt_path=missing.ckpt", "input=x", "output=y"], "error: x: no such file or folder"),
    "glint-export": (["ckpt_path=missing.ckpt"], "error: missing.ckpt: no such file"),
    "glint-report": (["dir=missing"], "error: dir=missing: no such folder"),
    "glint-cv": (["dir=missing"], "error: dir=missing: no such folder"),
    "glint-convert": (["src=missing.h5", "out=o.h5"], "error: missing.h5: no such file or folder"),
    "glint-make-demo": (["tile=-3"], "error: tile=-3"),
    "glint-plan": (["device=tpu"], "error: device=tpu: unknown device"),
}
PLAIN = ["glint-ckpt-info", "glint-check"]  # argparse tools: their own main, not Hydra's


def _start(name: str, cwd: Path) -> subprocess.Popen:
    script = BIN / name
    assert script.is_file(), f"{script}: not installed; run make install"
    assert SCRIPTS[name].endswith(":main"), SCRIPTS[name]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    args, _ = BAD_INPUT[name]
    return subprocess.Popen(
        [str(script), *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _check(name: str, proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{err[-3000:]}"
    assert out == "" and err.count("\n") == 1 and err.startswith(BAD_INPUT[name][1]), f"{name}:\n{out}\n{err[-3000:]}"


@pytest.mark.parametrize("name", PLAIN)
def test_a_plain_tool_says_one_line_on_bad_input(name, tmp_path):
    (tmp_path / "not.h5").write_text("plain text")
    _check(name, _start(name, tmp_path))


@pytest.mark.slow
def test_every_hydra_console_script_says_one_line_on_bad_input(tmp_path):
    """All at once (each pays the torch and Lightning import; two cores share the wait)."""
    names = [n for n in BAD_INPUT if n not in PLAIN]
    assert set(names) <= set(SCRIPTS)
    procs = {}
    for name in names:
        (tmp_path / name).mkdir()
        procs[name] = _start(name, tmp_path / name)
    for name, proc in procs.items():
        _check(name, proc)


@pytest.mark.parametrize(
    ("main", "argv", "line"),
    [
        (ckpt_info_main, [], "error: glint-ckpt-info: the following arguments are required: path (see glint-ckpt-info"),
        (ckpt_info_main, ["a.ckpt", "--bogus"], "error: glint-ckpt-info: unrecognized arguments: --bogus (see "),
        (check_main, [], "error: glint-check: the following arguments are required: path (see glint-check --help)"),
    ],
)
def test_a_wrong_command_line_is_one_line(main, argv, line, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == "" and err.count("\n") == 1 and err.startswith(line), err


def test_check_reports_a_readable_file_in_full(tmp_path, capsys):
    """A file it can read gets the summary and one line per problem (with the FAILED/OK verdict), not just one."""
    import h5py
    import numpy as np

    with h5py.File(tmp_path / "t.h5", "w") as f:
        f["depth"] = np.ones((2, 8, 8), np.float32)
        f["mask"] = np.full((2, 8, 8), 3, np.uint8)
    assert check_main([str(tmp_path / "t.h5")]) == 2
    out, err = capsys.readouterr()
    assert out.startswith(f"{tmp_path / 't.h5'}: 2 tiles of 8x8") and "FAILED: 1 error(s)" in out, out
    assert err.startswith(f"error: {tmp_path / 't.h5'}: 'mask' tiles 0-1: values [3] outside"), err
