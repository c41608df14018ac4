"""The documentation site (docs/, mkdocs.yml) is the user's manual: it builds with --strict, every command block
marked runnable composes as the README's do, every console script has a page, the config reference is read from
conf/, and a real browser shows the pages' figures."""

import functools
import http.server
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urljoin

import pytest
from hydra import compose, initialize_config_dir

from glint_lightning.utils.config_dir import CONFIG_DIR
from tests.helpers import REPO
from tests.test_readme import _composable

DOCS = REPO / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)
RUNNABLE = "<!-- runnable -->"  # put on the line before a ```bash block whose every line must compose
SCRIPTS = dict(re.findall(r'^(glint-[\w-]+) = "([\w.]+):main"', (REPO / "pyproject.toml").read_text(), re.MULTILINE))


def _load(name: str, path: Path):
    """A script of docs/ (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def _hook():
    return _load("glint_docs_hook", DOCS / "hooks" / "glint_docs.py")


def runnable_lines() -> list[tuple[str, str]]:
    """(page, command) for every line of every fenced block that follows a `<!-- runnable -->` line."""
    found = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines[:-1]):
            if line.strip() != RUNNABLE:
                continue
            assert lines[i + 1].startswith("```"), f"{page.name}:{i + 2}: {RUNNABLE} must be followed by a ``` block"
            for body in lines[i + 2 :]:
                if body.startswith("```"):
                    break
                command = body.split(" #")[0].strip()
                if command:
                    found.append((str(page.relative_to(DOCS)), command))
    return found


def _hydra_config(script: str) -> str | None:
    """The primary config a console script's Hydra app composes (None for argparse tools)."""
    module_file = REPO / (SCRIPTS[script].replace(".", "/") + ".py")
    match = re.search(r'@hydra_app\("(\w+)"\)', module_file.read_text())
    return match[1] if match else None


def check_command(command: str) -> None:
    """What the README test checks, for any command of the docs: the overrides compose, the tools exist."""
    argv = shlex.split(command)
    if argv[0] == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.MULTILINE)
        assert argv[1] in targets, f"make {argv[1]}: no such target in the Makefile"
        args = [a.split("=", 1)[1] for a in argv[2:] if a.startswith("ARGS=")]
        argv = ["glint-train", *(shlex.split(args[0]) if args else [])]
    if argv[0] == "sbatch":
        script = next(a for a in argv if a.endswith(".sh"))
        assert (REPO / script).is_file(), f"{script} does not exist"
        argv = ["glint-train", *argv[argv.index(script) + 1 :]]
    if argv[:2] == ["python", "-m"]:
        assert importlib.util.find_spec(argv[2]) is not None, f"no module {argv[2]}"
        return
    assert argv[0] in SCRIPTS, f"{argv[0]}: not a console script of pyproject.toml (nor make, sbatch, python -m)"
    config = _hydra_config(argv[0])
    if config is None:  # an argparse tool: its flags must be ones it defines
        source = (REPO / (SCRIPTS[argv[0]].replace(".", "/") + ".py")).read_text()
        for flag in (a for a in argv[1:] if a.startswith("--")):
            assert f'"{flag}"' in source, f"{argv[0]} defines no option {flag}"
        return
    overrides = _composable([a for a in argv[1:] if not a.startswith("--")])
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config, overrides=overrides)
    assert cfg is not None


@pytest.mark.parametrize("page,command", runnable_lines(), ids=lambda x: x[:70])
def test_runnable_command_blocks_compose(page, command):
    check_command(command)


def test_the_runnable_check_refuses_what_would_not_run():
    check_command("glint-eval split=val tta=flip")  # a sound one passes
    for wrong in (
        "glint-train tresholt=0.3",  # a mistyped key
        "glint-eval splitt=val",
        "glint-ckpt-info last.ckpt --jsn",
        "glint-nothing x=1",
        "make trian",
        "python -m glint_lightning.no_such_module",
    ):
        with pytest.raises(Exception):  # noqa: B017 - Hydra's override errors or our assertion
            check_command(wrong)


def test_docs_have_runnable_blocks_on_every_how_to_page():
    pages = {page for page, _ in runnable_lines()}
    how_to = {str(p.relative_to(DOCS)) for p in (DOCS / "how-to").glob("*.md")} - {"how-to/own-code.md"}
    assert how_to <= pages, f"how-to pages without a runnable block: {sorted(how_to - pages)}"
    assert len(runnable_lines()) >= 40


def test_every_console_script_has_a_page():
    nav = (REPO / "mkdocs.yml").read_text()
    assert len(SCRIPTS) >= 10
    for script, module in SCRIPTS.items():
        page = DOCS / "commands" / f"{script}.md"
        assert page.is_file(), f"{script} has no page docs/commands/{script}.md"
        assert f"commands/{script}.md" in nav, f"docs/commands/{script}.md is not in mkdocs.yml's nav"
        assert f"python -m {module}" in page.read_text(), f"{page.name} does not name its module {module}"


def test_config_reference_reads_keys_defaults_and_comments(tmp_path):
    hook = _hook()
    text = (
        "# A header line\n# @package _global_\n# and its second line.\ndefaults:\n  - h5\n  - _self_\n"
        "lr: 1.0e-3        # the learning rate\nnested:\n  width: 4        # channels of the first block;\n"
        "                  # continued here\n  plain: x\n"
        "hydra:\n  help:\n    app_name: glint-x\n  sweeper:\n    n_trials: 20   # trials\n"
    )
    rows = {o.key: (o.default, o.meaning) for o in hook.options(text, "model")}
    assert rows == {
        "model.lr": ("1.0e-3", "the learning rate"),
        "model.nested.width": ("4", "channels of the first block; continued here"),
        "model.nested.plain": ("x", ""),
        "model.hydra.sweeper.n_trials": ("20", "trials"),
    }
    assert hook.header(text) == "A header line and its second line."
    reference = hook.config_reference()
    for yaml_file in Path(CONFIG_DIR).rglob("*.yaml"):  # every option file of every group has its section
        if yaml_file.parent != Path(CONFIG_DIR):
            group = "/".join(yaml_file.relative_to(CONFIG_DIR).parent.parts)
            assert f"### `{group}={yaml_file.stem}`" in reference
    assert "| `model.base_channels` | `32` |" in reference  # conf/model/unet.yaml's value, as written


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site as `make docs` builds it (mkdocs build --strict), into a temporary folder."""
    out = tmp_path_factory.mktemp("site")
    mkdocs = Path(sys.executable).with_name("mkdocs")
    done = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(out)], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_site_builds_strict_with_the_api_reference_and_figure_captions(site):
    api = (site / "api" / "module" / "index.html").read_text()
    assert 'id="glint_lightning.module.GlintModule"' in api  # mkdocstrings resolved the class
    assert "from_checkpoint" in api
    started = (site / "getting-started" / "index.html").read_text()
    assert "make docs-figures" in started and "glint-eval ckpt_path=" in started  # captions name command and redraw
    config = (site / "reference" / "config" / "index.html").read_text()
    assert "model=deeplabv3plus" in config and "base_channels" in config


class _RecordingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[tuple[str, int]]

    def log_request(self, code="-", size="-"):
        self.requests.append((self.path.split("?")[0], int(code)))

    def log_message(self, *args):  # quiet
        pass


def _blank(png: Path) -> bool:
    from PIL import Image

    with Image.open(png) as image:
        colors = image.convert("RGB").getcolors(maxcolors=1 << 16)
    return colors is not None and len(colors) < 8


@pytest.mark.slow
@pytest.mark.parametrize("page", ["getting-started", "how-to/predict", "how-to/sweeps"])
def test_a_browser_shows_the_pages_and_their_images(site, page, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    html = (site / page / "index.html").read_text()
    images = [src for src in re.findall(r'<img[^>]+src="([^"]+)"', html) if not src.startswith(("http", "data:"))]
    assert images, f"{page} shows no image"
    requests: list[tuple[str, int]] = []
    handler = type("Handler", (_RecordingHandler,), {"requests": requests})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    shot = tmp_path / f"{page.replace('/', '_')}.png"
    try:
        subprocess.run(
            [
                chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--window-size=1280,2400",
                f"--screenshot={shot}", f"http://127.0.0.1:{server.server_address[1]}/{page}/",
            ],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    served = dict(requests)
    for src in images:
        url = urljoin(f"/{page}/", src)
        assert served.get(url) == 200, f"{page}: the browser did not load {src} ({url}: {served.get(url)})"
    assert shot.is_file() and not _blank(shot), f"{page}: the screenshot is blank"


def test_readme_links_resolve():
    """The README is short and points into docs/: every relative link must name a file that exists."""
    readme = (REPO / "README.md").read_text()
    for link in re.findall(r"\]\(([^)\s]+)\)", readme):
        target = link.split("#")[0]
        if target and not re.match(r"[a-z]+:", target):
            assert (REPO / target).exists(), f"README.md links to {link}, which does not exist"


def test_make_figures_takes_tensorboards_grid_and_lays_out_frames(tmp_path):
    """The two steps of `make docs-figures` that are its own code (the rest runs the package's commands)."""
    import h5py
    import torch
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    figures = _load("glint_make_figures", DOCS / "make_figures.py")
    with SummaryWriter(tmp_path / "run" / "tensorboard") as writer:
        writer.add_image("val/predictions", torch.zeros(3, 20, 30), global_step=1)
        writer.add_image("val/predictions", torch.ones(3, 20, 30), global_step=2)
    figures.tensorboard_grid(tmp_path / "run", tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (30, 20) and grid.convert("L").getextrema() == (255, 255)  # the last one logged
    figures.demo_frames(tmp_path / "frames.h5", n=1)
    with h5py.File(tmp_path / "frames.h5") as f:
        assert f["frames"].shape == (1, 256, 384) and f["frames"][0].max() > 250  # depth in mm, as predict reads
    with pytest.raises(SystemExit, match="no val/predictions image"):
        figures.tensorboard_grid(tmp_path / "frames-only", tmp_path / "none.png")
