"""The notebooks in notebooks/: committed clean, Colab-ready, and they run."""

import re
import tomllib

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO_ROOT

# From this file, not the working directory: pytest may start anywhere.
NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
IDS = [p.name for p in NOTEBOOKS]


def _repository() -> str:
  with open(REPO_ROOT / "pyproject.toml", "rb") as f:
    url = tomllib.load(f)["project"]["urls"]["Repository"]
  return url.removeprefix("https://github.com/")


def test_there_are_the_three_notebooks():
  assert IDS == [
    "01_quickstart.ipynb",
    "02_integer_inference.ipynb",
    "03_bring_your_own_model.ipynb",
  ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_clean_and_opens_in_colab(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  # committed without outputs, so diffs show only what changed
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, path
  # the badge opens this very file of the repository in Colab
  badges = re.findall(
    r"colab\.research\.google\.com/github/([^)\s]+)", nb.cells[0].source
  )
  assert badges == [
    f"{_repository()}/blob/main/{path.relative_to(REPO_ROOT).as_posix()}"
  ]
  # the first code cell, on Colab only, clones the repository (experiments/ is
  # not in the wheel) and installs it
  install = nb.cells[1].source
  assert (
    '"google.colab" in sys.modules' in install and "%pip install" in install
  )
  assert f"git clone -q --depth 1 https://github.com/{_repository()}" in install


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_top_to_bottom(path):
  nb = nbformat.read(path, as_version=4)
  # The kernel starts in notebooks/, as Jupyter starts it, so the first cell's
  # local branch is what makes experiments/ (not installed) importable.
  client = NotebookClient(
    nb,
    timeout=600,
    kernel_name="python3",
    resources={"metadata": {"path": str(path.parent)}},
  )
  client.execute()  # raises CellExecutionError, with the cell, on any error
  text = "\n".join(
    out.get("text", "")
    for cell in nb.cells
    if cell.cell_type == "code"
    for out in cell.outputs
    if out.output_type == "stream"
  )
  assert "accuracy" in text
  images = sum(
    "image/png" in out.get("data", {})
    for cell in nb.cells
    if cell.cell_type == "code"
    for out in cell.outputs
  )
  assert images >= 1  # each notebook shows at least one plot
