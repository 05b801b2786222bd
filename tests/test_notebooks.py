"""Execute every notebook in notebooks/ (jupytext percent-format .py files) with a fresh kernel.

The notebooks run at a small size (``HEEDFUL_NB_SMALL=1``, unless the environment sets it) and write
their files under the test's temporary folder (``HEEDFUL_NB_OUT``). Each executed notebook prints one
line to the test log, even under ``pytest -q``: its name, its size and its wall time. Set
``HEEDFUL_NB_EXECUTED=DIR`` to keep the executed ``.ipynb`` files (outputs included) in DIR.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
CELL_TIMEOUT_S = 600


def test_notebooks_exist() -> None:
    names = [p.stem for p in NOTEBOOKS]
    for want in ("01_quickstart", "02_identifiability", "03_posterior_diagnostics", "04_priors_from_config"):
        assert want in names


def test_no_stored_outputs() -> None:
    """Notebooks are kept as percent scripts; any committed .ipynb must carry no outputs."""
    import json
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "notebooks"], cwd=ROOT, capture_output=True, text=True).stdout
    for name in tracked.split():
        if name.endswith(".ipynb"):
            cells = json.loads((ROOT / name).read_text(encoding="utf-8")).get("cells", [])
            assert all(not c.get("outputs") for c in cells), f"{name} has stored outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture) -> None:
    jupytext = pytest.importorskip("jupytext", reason="pip install -e '.[notebooks]'")
    nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[notebooks]'")
    pytest.importorskip("ipykernel", reason="pip install -e '.[notebooks]'")

    small = os.environ.get("HEEDFUL_NB_SMALL", "1")
    monkeypatch.setenv("HEEDFUL_NB_SMALL", small)
    monkeypatch.setenv("HEEDFUL_NB_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = jupytext.read(path)
    # diff-friendly source: a percent-format script, no stored outputs
    assert nb.metadata.get("jupytext", {}).get("text_representation", {}).get("format_name") == "percent"
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    finally:
        kept = os.environ.get("HEEDFUL_NB_EXECUTED")
        if kept:
            import nbformat

            Path(kept).mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, Path(kept) / f"{path.stem}.ipynb")
    elapsed = time.perf_counter() - t0
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    images = sum("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", []))
    with capsys.disabled():
        print(f"\nnotebook {path.name}: executed {len(code)} code cells, {images} figures, "
              f"{'small' if small == '1' else 'full'} size, {elapsed:.1f} s")
