"""Validation beyond types and bounds: cross-key rules and registry names.

Names are checked against the registries of the library's own pluggable kinds (models,
tasks, codecs, devices); apps add their checks with :func:`register_check` when they are
imported (strategies), so the library imports no app.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fedsplit.config.schema import AUGMENTATIONS
from fedsplit.paths import resolve_path


def task_defaults(v: Mapping[str, Any]) -> dict[str, Any]:
    """Values a config leaves empty that the task decides: ``strategy.name`` (e.g.
    ``u-shaped`` for language modelling, whose targets are the client's text)."""
    from fedsplit.tasks import TASKS

    if v["strategy.name"] or v["task.name"] not in TASKS:
        return {}
    return {"strategy.name": TASKS.get(v["task.name"]).default_strategy}


def cross_checks(v: Mapping[str, Any]) -> list[str]:
    problems = []
    from fedsplit.models import model_name_problem  # the registry fills on import
    from fedsplit.tasks.base import task_problems

    from fedsplit.runtime import device_problem

    problem = device_problem(v["run.device"])
    if problem:
        problems.append(f"`run.device`: {problem}")
    problem = model_name_problem(v["model.name"])
    if problem:
        problems.append(f"`model.name`: {problem}")
    problems += task_problems(v)  # the task's own checks (fedsplit.tasks.base)
    bad_aug = [a for a in v["data.augment"] if a not in AUGMENTATIONS]
    if bad_aug:
        problems.append(f"`data.augment`: {bad_aug} unknown; choose from "
                        f"{', '.join(AUGMENTATIONS)}")
    for key in ("data.mean", "data.std"):
        if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in v[key]):
            problems.append(f"`{key}`: expected a list of numbers (one per channel), found "
                            f"{v[key]!r}")
    if bool(v["data.mean"]) != bool(v["data.std"]) or (
            v["data.mean"] and len(v["data.mean"]) != len(v["data.std"])):
        problems.append("`data.mean` / `data.std`: give both, one value per channel (or "
                        "leave both empty to measure them on the training images)")
    elif v["data.mean"] and len(v["data.mean"]) not in (1, v["model.in-channels"]):
        problems.append(f"`data.mean`: {len(v['data.mean'])} values for "
                        f"model.in-channels={v['model.in-channels']}; give one per channel")
    if any(float(x) <= 0 for x in v["data.std"] if isinstance(x, (int, float))):
        problems.append("`data.std`: every value must be > 0")
    if v["data.name"] == "files" and not v["data.train"]:
        problems.append("`data.train`: data.name=files needs at least one train file "
                        "(e.g. data.train=[../shared/data/sst2/train.tsv])")
    if v["data.name"] == "files" and not v["data.test"]:
        problems.append("`data.test`: data.name=files needs a held-out test file "
                        "(e.g. data.test=[../shared/data/sst2/test.tsv])")
    if v["data.name"] == "hub" and not v["data.hub-name"]:
        problems.append("`data.hub-name`: data.name=hub needs a dataset name")
    for key in ("codec.up", "codec.down"):
        try:
            from fedsplit.codecs import build_codec

            codec = build_codec(v[key])
        except Exception as exc:  # noqa: BLE001 - any spec error is reported the same way
            problems.append(f"`{key}`: {exc}")
            continue
        if any(getattr(c, "keep_across_rounds", False)
               for c in getattr(codec, "codecs", [codec])):
            problems.append(f"`{key}`: keep-across-rounds cannot hold on the split channel, "
                            "which gives every round fresh codecs on both sides (a client "
                            "may run in a new process each round); drop it (each round's "
                            "first sight of a sample then travels raw)")
    for t in v["prune.client-targets"]:
        if not isinstance(t, (int, float)) or not 0.0 <= float(t) < 1.0:
            problems.append(f"`prune.client-targets`: {t!r} is not a fraction in [0, 1)")
    if v["prune.usage-aware"] and not (v["prune.kind"] == "unstructured"
                                       and v["prune.embeddings"]):
        problems.append("`prune.usage-aware`: usage scores rank the token embedding, which "
                        "is pruned only with prune.kind=unstructured and prune.embeddings=true")
    if v["prune.end-round"] and v["prune.end-round"] < v["prune.start-round"]:
        problems.append("`prune.end-round` is before `prune.start-round`")
    if v["quant.compress"] and not (v["quant.update-bits"] != 32 or v["prune.kind"] != "none"
                                    or v["quant.down-int8"]):
        problems.append("`quant.compress`: there is no packed payload to compress; set "
                        "quant.update-bits to 2/4/8, prune.kind or quant.down-int8=true")
    if v["run.resume"] and not v["run.name"]:
        problems.append("`run.resume`: name the run to resume with run.name=<its directory "
                        "name> (under run.output-dir)")
    if v["train.fraction"] == 0.0:
        problems.append("`train.fraction`: 0 trains no client; use a value in (0, 1]")
    problems += _fleet_checks(v)
    from fedsplit.trainable import config_problems  # train.trainable, lora

    problems += config_problems(v)
    from fedsplit.privacy.config import config_problems as privacy_problems

    problems += privacy_problems(v)
    for check in _EXTRA_CHECKS:
        problems += check(v)
    return problems


def register_check(check: Callable[[Mapping[str, Any]], list[str]]) -> None:
    """Add a validation step run by every :func:`build_config` after the schema's checks.

    ``check(flat)`` gets the flat ``{"section.key": value}`` values and returns problems
    (``[]`` if none). Apps register their own checks when they are imported (the strategy
    apps check ``strategy.name``/``strategy.options``), so the library needs no import of
    them; a process that never imports an app (a SuperNode's ClientApp) does not run its
    check, and needs not: the server validated the config before sending it.
    """
    if check not in _EXTRA_CHECKS:
        _EXTRA_CHECKS.append(check)


_EXTRA_CHECKS: list[Callable[[Mapping[str, Any]], list[str]]] = []


def _fleet_checks(v: Mapping[str, Any]) -> list[str]:
    """The `fleet` section: the profiles file reads and names the devices and server asked
    for."""
    problems: list[str] = []
    if not v["fleet.profiles"]:
        for key in ("fleet.devices", "fleet.server"):
            if v[key]:
                problems.append(f"`{key}` names profiles, but `fleet.profiles` names no file "
                                "(e.g. fleet.profiles=configs/profiles/mixed_fleet.yaml)")
        return problems
    from fedsplit.allocation import ProfileError, load_profiles, load_servers

    path = resolve_path(v["fleet.profiles"])
    try:
        devices = load_profiles(path)
    except ProfileError as exc:
        return problems + [f"`fleet.profiles`: {'; '.join(exc.problems)}"]
    unknown = [d for d in v["fleet.devices"] if d not in devices]
    if unknown:
        problems.append(f"`fleet.devices`: {unknown} are not in {path} (devices: "
                        f"{', '.join(sorted(devices))})")
    if v["fleet.server"]:
        try:
            servers = load_servers(path)
        except ProfileError as exc:
            return problems + [f"`fleet.server`: {'; '.join(exc.problems)}"]
        if v["fleet.server"] not in servers:
            problems.append(f"`fleet.server`: {v['fleet.server']!r} is not in {path} "
                            f"(servers: {', '.join(sorted(servers))})")
    return problems
