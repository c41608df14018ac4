"""predict, export, convert and make_demo as Hydra apps: `--help` names every option, a typo'd key is one line,
`--cfg job` prints the config, and neither a run nor a `-m` sweep leaves anything in the working directory."""

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from subprocess import CompletedProcess

import h5py
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from glint_lightning.predict import predict_file
from glint_lightning.utils.config_dir import CONFIG_DIR
from tests.helpers import run_cli

TOOLS = {  # module: (config name, console script)
    "glint_lightning.predict": ("predict", "glint-predict"),
    "glint_lightning.export": ("export", "glint-export"),
    "glint_lightning.data.convert": ("convert", "glint-convert"),
    "glint_lightning.data.make_demo": ("make_demo", "glint-make-demo"),
}


def _options(config: str) -> list[str]:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return list(compose(config))


@pytest.fixture(scope="module")
def answers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[CompletedProcess, CompletedProcess, Path]]:
    """Each tool's `--help` and its answer to a typo'd key (`sed=1`), run from an empty folder of its own, a few
    processes at a time (each is mostly its imports); with that folder."""

    def answer(module: str) -> tuple[CompletedProcess, CompletedProcess, Path]:
        cwd = tmp_path_factory.mktemp(module.rsplit(".", 1)[1])
        return run_cli(module, "--help", cwd=cwd), run_cli(module, "sed=1", cwd=cwd), cwd

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(TOOLS, pool.map(answer, TOOLS)))


@pytest.mark.slow
@pytest.mark.parametrize("module", TOOLS)
def test_help_names_every_option_and_a_typo_is_one_line(module, answers):
    config, script = TOOLS[module]
    res, typo, cwd = answers[module]
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith(f"{script}: ") and f"Example:\n  {script} " in res.stdout
    for key in _options(config):
        assert f"\n  {key}: " in res.stdout, f"--help does not name {key}"
    assert "${glint_options" not in res.stdout and "Powered by Hydra" not in res.stdout
    assert typo.returncode == 2 and typo.stderr.count("\n") == 1, typo.stderr
    assert typo.stderr.startswith("error: Could not override 'sed'")
    assert not list(cwd.iterdir())


def test_the_console_script_runs(tmp_path):
    script = Path(sys.executable).parent / "glint-make-demo"
    if not script.is_file():
        script = shutil.which("glint-make-demo")
    if script is None:
        pytest.skip("glint-make-demo is not installed")
    args = [str(script), "out=demo", "n_train=2", "n_val=0", "n_test=0", "tile=16"]
    shown, made = tmp_path / "shown", tmp_path / "made"  # side by side: each process is mostly its imports
    for cwd in (shown, made):
        cwd.mkdir()
    procs = [subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd, cwd in (([*args, "--cfg", "job"], shown), (args, made))]  # fmt: skip
    (out, err), (made_out, made_err) = (proc.communicate(timeout=120) for proc in procs)
    assert procs[0].returncode == 0, err[-2000:]
    assert "out: demo\nn_train: 2\nn_val: 0\n" in out and not list(shown.iterdir())
    assert procs[1].returncode == 0 and made_out == "train: demo/train.h5\n", made_err[-2000:]
    assert [p.name for p in made.iterdir()] == ["demo"]


@pytest.mark.slow
def test_a_run_and_a_sweep_leave_only_their_outputs_in_the_cwd(trained_ckpt, tmp_path):
    one, many = tmp_path / "one", tmp_path / "many"  # side by side: each process is mostly its imports
    for cwd in (one, many):
        cwd.mkdir()
        with h5py.File(cwd / "frames.h5", "w") as f:
            f["frames"] = np.random.default_rng(0).uniform(600, 1400, (1, 40, 50)).astype(np.float32)
    args = [f"ckpt_path={trained_ckpt}", "input=frames.h5"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        run = pool.submit(run_cli, "glint_lightning.predict", *args, "output=one.h5", cwd=one)
        sweep = pool.submit(run_cli, "glint_lightning.predict", "-m", *args, "threshold=0.3,0.5",
                            "output=out_${threshold}.h5", cwd=many).result()  # fmt: skip
        res = run.result()
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in one.iterdir()) == ["frames.h5", "one.h5"]
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    assert sorted(p.name for p in many.iterdir()) == ["frames.h5", "out_0.3.h5", "out_0.5.h5"]
    with h5py.File(many / "out_0.3.h5") as low, h5py.File(many / "out_0.5.h5") as high:
        assert low.attrs["threshold"] == 0.3 and high.attrs["threshold"] == 0.5
        assert low["mask"][:].sum() >= high["mask"][:].sum()


def test_predict_with_tta_averages_flipped_predictions(trained_ckpt, tmp_path):
    """tta=flip in predict: the written probabilities are the mean of the four flipped frames' predictions."""
    frame = np.random.default_rng(1).uniform(600, 1400, (1, 48, 48)).astype(np.float32)
    with h5py.File(tmp_path / "frames.h5", "w") as f:
        f["frames"] = frame
    probs = {}
    for tta, source in (("none", frame), ("none", frame[:, :, ::-1]), ("flip", frame)):
        with h5py.File(tmp_path / "in.h5", "w") as f:
            f["frames"] = np.ascontiguousarray(source)
        out = f"{tta}_{len(probs)}.h5"
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("predict", overrides=[f"ckpt_path={trained_ckpt}", f"input={tmp_path / 'in.h5'}",
                                                f"output={tmp_path / out}", "mode=full", f"tta={tta}"])  # fmt: skip
        predict_file(cfg)
        with h5py.File(tmp_path / out) as f:
            probs[len(probs)] = f["prob"][0].astype(np.float32)
    plain, mirrored, flip = probs[0], probs[1][:, ::-1], probs[2]
    assert np.abs(flip - plain).mean() > 1e-4, "TTA changes the output"
    assert np.abs(flip - (plain + mirrored) / 2).mean() < np.abs(flip - plain).mean(), "it averages flipped passes"
