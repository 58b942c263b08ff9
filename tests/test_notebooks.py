"""Every notebook runs top to bottom, on its small settings, in a fresh kernel.

The notebooks live as jupytext percent scripts (``notebooks/*.py``, the reviewed
source) paired with output-free ``.ipynb`` files (what users open). The test executes
the ``.ipynb`` itself, so a stale pairing or a broken cell fails here.
"""

import json
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
SCRIPTS = sorted(NOTEBOOK_DIR.glob("*.py"))
KERNEL = "margin-regs-test"
# A committed notebook carries no outputs; this bounds the file if someone forgets.
MAX_NOTEBOOK_BYTES = 100_000
# A hung kernel fails the test instead of stalling the suite; a notebook takes well
# under a minute on its small settings.
TIMEOUT_SECONDS = 900


# Executed in a child process: the kernel's zmq sockets are closed at that process's
# exit, not inside pytest, where their ResourceWarnings would count as errors.
EXECUTE = """
import sys
import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

source, target, kernel_dir, kernel_name, cwd = sys.argv[1:]
notebook = nbformat.read(source, as_version=4)
manager = KernelManager(
    kernel_name=kernel_name, kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernel_dir])
)
NotebookClient(
    notebook, km=manager, timeout=None, resources={"metadata": {"path": cwd}}
).execute()
nbformat.write(notebook, target)
"""


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    """A kernel spec that runs this interpreter, on the notebooks' small settings.

    An installed ``python3`` spec may point at another interpreter (one without
    margin_regs); writing our own pins the kernel to the venv running the tests.
    """
    kernels = tmp_path_factory.mktemp("kernels")
    (kernels / KERNEL).mkdir()
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "margin_regs tests",
        "language": "python",
        "env": {"MARGIN_REGS_SMOKE": "1", "MPLBACKEND": "Agg"},
    }
    (kernels / KERNEL / "kernel.json").write_text(json.dumps(spec))
    return kernels


def test_every_method_has_a_notebook():
    names = {p.stem for p in NOTEBOOKS}
    expected = {
        "quickstart",
        "spectral_norm",
        "eigenvalue_decay",
        "jacobian_margin",
        "adareg",
    }
    assert expected <= names
    assert names == {p.stem for p in SCRIPTS}


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.stem)
def test_pairing_is_in_sync(path):
    script = jupytext.read(path)
    notebook = jupytext.read(path.with_suffix(".ipynb"))
    as_pairs = lambda nb: [(c.cell_type, c.source.strip()) for c in nb.cells]  # noqa: E731
    assert as_pairs(script) == as_pairs(notebook), (
        f"{path.name} and its .ipynb differ: run `jupytext --sync notebooks/*.py`"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, kernel_dir, tmp_path):
    executed = tmp_path / path.name
    args = [str(path), str(executed), str(kernel_dir), KERNEL, str(NOTEBOOK_DIR)]
    run = subprocess.run(
        [sys.executable, "-c", EXECUTE, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
    )
    assert run.returncode == 0, run.stderr[-5000:]
    notebook = nbformat.read(executed, as_version=4)
    problems = [
        out
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "error"
        or (
            out.output_type == "stream"
            and out.name == "stderr"
            and "Warning" in out.text
        )
    ]
    assert not problems, problems
