"""Checks that need more than the schema, run before anything trains or starts.

``load_config`` validates keys, types and ranges; this looks at the world the config
points to: data files exist, are readable and load (columns, labels, a decodable first
image), the model folder loads, the cut fits the model, the bottleneck rank fits the split
layer. All problems are reported together, each naming the key, what is wrong and how to
fix it.
"""

from __future__ import annotations

import os
from typing import Any

from fedsplit.config import ConfigError


def _check_files(key: str, paths: list[str], problems: list[str]) -> None:
    for path in paths:
        if not (os.path.isfile(path) or os.path.isdir(path)):  # a folder: images by class
            problems.append(f"`{key}`: {path} does not exist (relative paths resolve against "
                            "the current folder, then the project root); fix the path or the "
                            "working directory")
        elif not os.access(path, os.R_OK):
            problems.append(f"`{key}`: {path} is not readable (check its permissions)")


def _check_data(cfg: Any, problems: list[str], clients: int | None = None) -> None:
    """Load the data ``cfg`` names, as the ServerApp will (through the task), and report
    what fails: a file the builders cannot read, a missing column, a split the task's
    :meth:`~fedsplit.tasks.Task.check_split` refuses (classification: labels that do not
    fit ``model.num-labels``), an image column whose first image does not decode. Loads
    are cached by ``datasets``, so the ServerApp's own load afterwards is cheap."""
    from fedsplit.data import DataError, decode_images, is_image_dataset
    from fedsplit.tasks import build_task

    def report(key: str, where: str, exc: Exception) -> None:
        msg = str(exc)
        problems.append(msg if msg.startswith(f"`{key}`") else f"`{key}` ({where}): {msg}")

    d = cfg.data
    task = build_task(cfg)
    try:
        train, test = task.load_splits()
    except Exception as exc:  # noqa: BLE001 - DataError, or a builder's own failure
        msg = str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
        problems.append(msg if msg.startswith("`data.") else f"`data`: {msg}")
        return
    image = d.name != "digits" and is_image_dataset(train, d)
    for split, ds in (("train", train), ("test", test)):
        paths = list(d.train if split == "train" else d.test)
        if d.name == "files" or (d.name == "hub" and split == "test" and paths):
            key, where = f"data.{split}", ", ".join(map(str, paths))
        else:
            key = "data.hub-name" if d.name == "hub" else "data.name"
            where = f"{d.hub_name or d.name}, {split} split"
        try:
            task.check_split(ds)
        except DataError as exc:
            report(key, where, exc)
        if image and len(ds):
            try:
                decode_images(ds.select([0]), d.image_column,
                              in_channels=cfg.model.in_channels, image_size=d.image_size)
            except DataError as exc:
                report(key, where, exc)
    if clients:  # the split over the clients, drawn as every client will draw it
        try:
            task.partitioner(train, clients).load_partition(0)
        except DataError as exc:
            report("data.partitioner", f"{d.partitioner} over {clients} clients", exc)


def preflight(cfg: Any, clients: int | None = None) -> None:
    """Raise :class:`ConfigError` listing every problem found (``cfg`` resolved);
    ``clients``: the number of clients, when known (simulation), to draw their split."""
    from fedsplit.paths import with_resolved_paths

    cfg = with_resolved_paths(cfg)
    problems: list[str] = []
    if cfg.data.name == "files":
        _check_files("data.train", list(cfg.data.train), problems)
        _check_files("data.test", list(cfg.data.test), problems)
    if not problems:  # missing files are reported once, above
        _check_data(cfg, problems, clients)
    try:
        from fedsplit.models import build_model
        from fedsplit.tasks import build_task

        # Architecture only (no weights): cheap, and enough to check cut and rank.
        build_model(cfg.model, pretrained=False)
        build_task(cfg).split(pretrained=False)
    except Exception as exc:  # noqa: BLE001 - every model/split problem is reported alike
        key = "model.path" if "ModelLoadError" in type(exc).__name__ else "model.cut"
        if "bottleneck" in str(exc):
            key = "model.bottleneck-rank"
        problems.append(f"`{key}`: {exc}")
    if problems:
        raise ConfigError(problems)
