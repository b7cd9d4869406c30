"""`experiments/quickstart.ipynb` runs headless, top to bottom, without an error (nbclient, a fresh kernel).

The kernel is the `python3` kernelspec of ipykernel; jupyter_client starts a spec whose command is `python` with
this interpreter (`sys.executable`), so the notebook sees the same environment as the test, and the checkout under
test first on its path (PYTHONPATH). Its cwd is `experiments/`, and it writes only into `$REPJAX_NOTEBOOK_WORKDIR`
(here `tmp_path`). The notebook is stored without outputs; this test checks that too.
"""

import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "experiments" / "quickstart.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for i, cell in enumerate(code):
        assert not cell.outputs and cell.execution_count is None, f"code cell {i} is stored with outputs"


def test_notebook_runs(tmp_path, monkeypatch):
    workdir = tmp_path / "workdir"
    monkeypatch.setenv("REPJAX_NOTEBOOK_WORKDIR", str(workdir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # A trailing cell proves which interpreter and which repjax the kernel ran.
    nb.cells.append(nbformat.v4.new_code_cell("import sys, repjax\nprint(sys.executable)\nprint(repjax.__file__)"))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(REPO / "experiments")}})
    client.execute()  # raises CellExecutionError (with the cell's traceback) on the first failing cell

    text = lambda cell: "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    nbformat.write(nb, tmp_path / "executed.ipynb")  # for inspection when a check below fails
    exe, package = text(nb.cells[-1]).split()
    assert pathlib.Path(exe).resolve() == pathlib.Path(sys.executable).resolve()
    assert pathlib.Path(package).resolve() == REPO / "repjax" / "__init__.py"
    out = "\n".join(text(c) for c in nb.cells[:-1] if c.cell_type == "code")
    assert "max |difference|" in out
    assert any(o.output_type == "display_data" and "image/png" in o.data
               for c in nb.cells for o in c.get("outputs", [])), "the training curves were not plotted"
    assert (workdir / "digits" / "metrics.jsonl").exists()
    assert "top-1" in out or "Skipped:" in out
