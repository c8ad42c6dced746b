"""docs/tutorial.ipynb runs from top to bottom (fewer cells and epochs: SCPROTO_TUTORIAL_FAST)."""

from pathlib import Path

import nbclient
import nbformat

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "tutorial.ipynb"


def test_the_tutorial_notebook_executes(monkeypatch, tmp_path):
    monkeypatch.setenv("SCPROTO_TUTORIAL_FAST", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    notebook = nbformat.read(TUTORIAL, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    printed = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream"
    )
    assert "label transfer accuracy on the query study" in printed
