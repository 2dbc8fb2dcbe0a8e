"""Run output: a directory with the resolved config, per-round metrics and a plot.

``<output_dir>/<name>/``
    ``config.yaml``    the resolved configuration (kebab-case keys)
    ``metrics.jsonl``  one JSON object per round: round, accuracy, loss, bytes_up,
                       bytes_down, seconds, and the detailed counters
    ``clients.jsonl``  one JSON object per client per round (what each client reported)
    ``metrics.png``    accuracy against round and against cumulative bytes (redrawn at
                       most every :attr:`RunWriter.plot_interval` seconds while the run
                       goes, and at its end)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fedsplit.config import to_yaml
from fedsplit.paths import project_root


class RunWriter:
    # Drawing the plot costs ~0.3 s, as much as a whole round of 10 small clients: a run
    # of short rounds redraws it at most this often (and always at the end, :meth:`close`).
    plot_interval = 30.0

    def __init__(self, cfg: Any, resume: bool = False) -> None:
        name = cfg.run.name or time.strftime("%Y%m%d-%H%M%S")
        base = Path(cfg.run.output_dir).expanduser()
        if not base.is_absolute():
            base = Path.cwd() / base
        self.dir = base / name
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(to_yaml(cfg))
        self.metrics_path = self.dir / "metrics.jsonl"
        self.clients_path = self.dir / "clients.jsonl"
        if not resume:
            self.metrics_path.write_text("")
            self.clients_path.write_text("")
        self.rows: list[dict[str, Any]] = []
        self._plotted = -float("inf")  # time.monotonic() of the last plot

    def write_classes(self, ds: Any, label_column: str) -> Path | None:
        """``classes.json``: the class names of the label column, in label order (only
        when the data has names, e.g. string labels encoded at load time)."""
        feature = getattr(ds, "features", {}).get(label_column)
        names = getattr(feature, "names", None)
        if not names:
            return None
        path = self.dir / "classes.json"
        path.write_text(json.dumps(list(names), indent=1) + "\n")
        return path

    def restore(self, rows: list[dict[str, Any]], last_round: int) -> None:
        """Resume: keep the checkpoint's rows, drop lines of rounds after it."""
        self.rows = list(rows)
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        kept = [line for line in self.clients_path.read_text().splitlines()
                if line.strip() and json.loads(line)["round"] <= last_round]
        self.clients_path.write_text("".join(line + "\n" for line in kept))

    def add(self, row: dict[str, Any], clients: list[dict[str, Any]] = ()) -> None:
        """One round's row, and optionally each client's own metrics for the round."""
        self.rows.append(row)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        with self.clients_path.open("a") as f:
            for c in clients:
                f.write(json.dumps(c) + "\n")
        if time.monotonic() - self._plotted >= self.plot_interval:
            self.plot()

    def close(self) -> None:
        """The run ended: draw the plot of all its rounds."""
        self.plot()

    def plot(self) -> Path | None:
        rows = [r for r in self.rows if r.get("accuracy") is not None]
        if not rows:
            return None
        self._plotted = time.monotonic()
        return plot_accuracy([("fedsplit", rows)], self.dir / "metrics.png")


def plot_accuracy(curves: list[tuple[str, list[dict[str, Any]]]], path: Path,
                  title: str = "", bytes_keys: tuple[str, str] = ("bytes_up", "bytes_down"),
                  bytes_label: str = "cumulative bytes, up + down (MiB)") -> Path:
    """Accuracy against round (left) and against cumulative bytes (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    # Beyond ten curves the default colours repeat: pair each colour with its own marker.
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*Xhp"
    for i, (label, rows) in enumerate(curves):
        style = {"color": colors[i % len(colors)], "marker": markers[(i // len(colors)) % 10]}
        total, cum, rounds, acc = 0, [], [], []
        for r in rows:  # bytes of rounds without an evaluation still count
            total += r[bytes_keys[0]] + r[bytes_keys[1]]
            if r.get("accuracy") is not None:
                cum.append(total / 2**20)
                rounds.append(r["round"])
                acc.append(100 * r["accuracy"])
        ax1.plot(rounds, acc, label=label, **style)
        ax2.plot(cum, acc, label=label, **style)
    ax1.set(xlabel="round", ylabel="test accuracy (%)")
    ax2.set(xlabel=bytes_label, ylabel="test accuracy (%)")
    ax2.set_xscale("symlog")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize="small" if len(curves) > 8 else None)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


__all__ = ["RunWriter", "plot_accuracy", "read_metrics", "project_root"]
