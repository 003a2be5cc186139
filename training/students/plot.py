"""Training curves of student runs side by side (dCM vs sCM in docs/students.md), from their metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

# The quantity each stage drives down (sCM's loss value is ~1 by construction: plot the raw tangent).
OBJECTIVE = {"causal": "loss", "dcm": "loss", "scm": "tangent_rms", "dmd": "dmd_gap"}


def load_history(run: str | Path) -> dict:
    path = Path(run) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (run a student stage with --out {run} first)")
    return json.loads(path.read_text())


def plot_runs(runs: dict[str, str], path: str) -> dict:
    """``runs``: label -> run dir (label names the stage, e.g. ``dcm`` or ``scm-lr1e-4``). Writes a PNG with
    each run's training objective and its few-step teacher-forcing eval; returns the final eval per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_obj, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    finals = {}
    for label, run in runs.items():
        history = load_history(run)
        key = OBJECTIVE.get(label.split("-")[0], "loss")
        train = [r for r in history["train"] if key in r]
        ax_obj.plot([r["step"] for r in train], [r[key] for r in train], label=f"{label}: {key}")
        for metric in sorted({k for r in history["eval"] for k in r if k.startswith(("tf_mse", "sf_"))}):
            rows = [r for r in history["eval"] if metric in r]
            ax_eval.plot([r["step"] for r in rows], [r[metric] for r in rows], marker="o", label=f"{label}: {metric}")
        finals[label] = history["eval"][-1] if history["eval"] else {}
    ax_obj.set(xlabel="step", ylabel="training objective", yscale="log", title="objective (own units)")
    ax_eval.set(xlabel="step", ylabel="latent MSE to the real frames",
                title="few-step generation under teacher forcing (held out)")
    for ax in (ax_obj, ax_eval):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return finals
