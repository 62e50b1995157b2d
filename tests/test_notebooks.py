"""Every notebook in notebooks/ runs from top to bottom without an error (nbclient, one kernel each).

The kernel is this interpreter (`sys.executable -m ipykernel_launcher`), started in notebooks/ with an
environment of its own: JAX on the CPU with ONE device (conftest.py's 8 fake devices are removed from
XLA_FLAGS: they would only slow the single-device notebooks down), matplotlib's Agg backend,
DSV3_FIGURES pointing at a temporary directory (so the figure-saving code runs too) and
DSV3_DEMO_WORKDIR empty, so that notebook 05 trains its short model as on a fresh checkout instead of
loading a local workdir/demo. Notebooks are stored without outputs.
"""
import json
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402
from testenv import one_device_env  # noqa: E402

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
FIGURES = {"01_tour": "01_params.png", "02_mla_cache": "02_cache.png", "03_routing_balance": "03_balance.png",
           "04_fp8_blocks": "04_fp8.png", "05_mtp_speculative": "05_mtp.png",
           "06_chat_lora": "06_sft.png"}
CELL_TIMEOUT_S = 600


def kernel_env(figures: pathlib.Path) -> dict:
    return one_device_env(MPLBACKEND="Agg", DSV3_FIGURES=str(figures), DSV3_DEMO_WORKDIR="")


def kernel_manager(tmp_path: pathlib.Path) -> KernelManager:
    """A kernel spec for this interpreter only, whatever other kernels the machine has registered."""
    spec = tmp_path / "kernels" / "dsv3-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "dsv3 test", "language": "python"}))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name="dsv3-test", kernel_spec_manager=ksm)


def test_all_notebooks_found():
    assert [p.stem for p in NOTEBOOKS] == list(FIGURES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    assert path.stat().st_size < 300_000
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code"), \
        f"{path.name} is stored with outputs; clear them before committing"
    figures = tmp_path / "figures"
    client = nbclient.NotebookClient(nb, km=kernel_manager(tmp_path), timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute(env=kernel_env(figures))  # raises CellExecutionError at the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    assert (figures / FIGURES[path.stem]).is_file()
