"""notebooks/drrl_tour.ipynb runs top to bottom: its code cells are exec'd in order in one fresh namespace (no
Jupyter kernel, no IPython needed), from the repository root, with matplotlib's Agg backend. Tiny random Llama on
the CPU; about a minute and a half on two cores, most of it the Pareto benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "drrl_tour.ipynb"
POLICIES = {"full rank", "uniform r=8", "NER tau=0.95", "ALRT safety=1.5", "random"}


def code_cells(path: Path) -> list[str]:
    notebook = json.loads(path.read_text())
    assert notebook["nbformat"] == 4
    return ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]


def test_notebook_is_valid_json_with_tiny_default_config():
    cells = code_cells(NOTEBOOK)
    assert cells[0].lstrip().startswith('TOUR = dict(model="tiny-random-llama"')
    markdown = "".join("".join(c["source"]) for c in json.loads(NOTEBOOK.read_text())["cells"]
                       if c["cell_type"] == "markdown")
    assert 'TOUR = dict(model="smollm2-135m", seq_len=1024, segment_len=128)' in markdown
    assert "docs/results.md" in markdown
    for index, source in enumerate(cells):
        compile(source, f"<cell {index}>", "exec")


@pytest.mark.slow
def test_notebook_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg", force=True)  # in case pyplot was imported (with another backend) earlier in the session
    import matplotlib.pyplot as plt

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(plt, "show", lambda *args, **kwargs: None)  # Agg's show() only warns
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # the Pareto run's mkdtemp lands in tmp_path
    namespace: dict = {"__name__": "__notebook__"}
    for index, source in enumerate(code_cells(NOTEBOOK)):
        exec(compile(source, f"{NOTEBOOK.name} code cell {index}", "exec"), namespace)

    summary = namespace["summary"]
    assert set(summary) == POLICIES
    for name, row in summary.items():
        assert set(row) == {"reward", "fidelity", "qk_saved", "rejections"}
        assert all(np.isfinite(v) for v in row.values()), name
    assert summary["full rank"]["qk_saved"] == 0.0 and summary["full rank"]["fidelity"] > 0.999
    assert summary["uniform r=8"]["qk_saved"] > 0
    n_steps = namespace["u"].config.n_segments - 1
    for steps in namespace["history"].values():
        assert len(steps) == namespace["EPISODES"] * n_steps
    frame = namespace["frame"]
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[-1] == 3

    out = namespace["OUT"]
    assert Path(out).parent == tmp_path
    for name in ("pareto.png", "results.md", "results.json"):
        assert (out / name).is_file(), name
    assert any(r.method == "full rank" for r in namespace["pareto_results"])
