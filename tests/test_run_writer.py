"""The run directory's writer (fedsplit.metrics.RunWriter): rows, and a plot that short
rounds do not redraw every time."""

from __future__ import annotations

from fedsplit.config import load_config
from fedsplit.metrics import RunWriter, read_metrics


def test_the_plot_is_redrawn_at_most_every_interval_and_at_the_end(tmp_path, monkeypatch):
    import fedsplit.metrics as metrics

    cfg = load_config("configs/default.yaml", [f"run.output-dir={tmp_path}", "run.name=w"])
    writer = RunWriter(cfg)
    drawn = []
    monkeypatch.setattr(metrics, "plot_accuracy",
                        lambda curves, path: drawn.append(len(curves[0][1])) or path)
    writer.plot_interval = 3600.0
    for r in range(1, 4):
        writer.add({"round": r, "accuracy": 0.1 * r, "bytes_up": 1, "bytes_down": 1})
    assert drawn == [1]  # the first round draws; the next ones fall inside the interval
    writer.close()
    assert drawn == [1, 3]  # the run's end draws every round
    writer.plot_interval = 0.0
    writer.add({"round": 4, "accuracy": 0.4, "bytes_up": 1, "bytes_down": 1})
    assert drawn == [1, 3, 4]
    assert [r["round"] for r in read_metrics(writer.dir)] == [1, 2, 3, 4]


def test_close_draws_the_plot(tmp_path):
    cfg = load_config("configs/default.yaml", [f"run.output-dir={tmp_path}", "run.name=p"])
    writer = RunWriter(cfg)
    writer.plot_interval = 3600.0
    writer.add({"round": 1, "accuracy": 0.5, "bytes_up": 10, "bytes_down": 10})
    writer.add({"round": 2, "accuracy": 0.6, "bytes_up": 10, "bytes_down": 10})
    png = writer.dir / "metrics.png"
    first = png.stat().st_mtime_ns
    writer.close()
    assert png.stat().st_mtime_ns >= first and png.stat().st_size > 0
