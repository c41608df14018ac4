"""notebooks/01_explore_and_predict.ipynb runs top to bottom (what a new user does first)."""

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(REPO / "notebooks" / "01_explore_and_predict.ipynb", as_version=4)
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum(o.get("output_type") == "display_data" for o in outputs) >= 2, (
        "tiles and the predicted frame are plotted"
    )
    assert (tmp_path / "outputs" / "notebook" / "run" / "checkpoints" / "last.ckpt").is_file()
