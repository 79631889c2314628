"""Every notebook in notebooks/ runs top to bottom with its tiny default settings (CPU, offline).

Each notebook is executed in a fresh Jupyter kernel (nbclient, kernel "python3", which jupyter_client
starts with this interpreter, sys.executable; the test checks that) from the notebooks/ folder, so a
failing cell fails the test with its traceback. The notebooks must be stored clean (no outputs, no
execution counts). The kernels get:
  * one CPU device (the 8 fake devices of conftest.py are for the unit tests; a notebook is a
    single-device user session) and conftest's fast-compile XLA flags;
  * the persistent compilation cache of conftest.py (JAX_COMPILATION_CACHE_DIR), so a rerun is faster;
  * offline Hugging Face settings and KAVA_NOTEBOOK_DIR = a pytest tmp dir for their run directories.
Equivalent from the command line: `pytest --nbmake notebooks/`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ("01_quickstart", "02_inside_the_kv_cache", "03_real_model")
CELL_TIMEOUT_S = 600
_PROBE = "import sys; print('KERNEL_EXECUTABLE=' + sys.executable)"


def kernel_env(run_dir: Path) -> dict[str, str]:
    """The test process's environment, adjusted for a notebook kernel (see the module docstring)."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env["KAVA_NOTEBOOK_DIR"] = str(run_dir)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYDEVD_DISABLE_FILE_VALIDATION="1")
    return env


def test_all_notebooks_present():
    assert tuple(p.stem for p in NOTEBOOKS) == EXPECTED, f"notebooks/ holds {[p.name for p in NOTEBOOKS]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_clean_and_well_formed(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernelspec must be python3"
    first = nb.cells[0]
    assert first.cell_type == "markdown", f"{path.name}: the first cell must be the title + Colab badge"
    url = f"https://colab.research.google.com/github/kava-jax/kava-jax/blob/main/notebooks/{path.name}"
    assert url in first.source, f"{path.name}: the Open-in-Colab badge must link to {url}"
    assert "kava_jax" in nb.cells[1].source and "pip install" in nb.cells[1].source, \
        f"{path.name}: the second cell must be the install cell"
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs / execution counts; save the notebook cleared"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(_PROBE))  # in memory only: which interpreter runs the kernel
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute(env=kernel_env(tmp_path / "runs"))
    except nbclient.exceptions.CellExecutionError as e:  # message: the failing cell and its traceback
        pytest.fail(f"{path.name}: a cell failed\n{e}", pytrace=False)
    probe = "".join(o.get("text", "") for o in nb.cells[0].outputs)
    assert f"KERNEL_EXECUTABLE={sys.executable}" in probe, f"kernel ran {probe.strip()!r}, expected {sys.executable}"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    if path.stem in ("01_quickstart", "02_inside_the_kv_cache"):
        images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
        assert len(images) >= 2, f"{path.name}: expected its plots in the outputs, got {len(images)} images"
