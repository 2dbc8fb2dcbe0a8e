"""Reading a run's configuration: YAML file, command-line overrides, validation.

A configuration is layered, later layers winning:

1. the schema's defaults (:mod:`fedsplit.config.schema`),
2. a YAML file under ``configs/`` (kebab-case keys, e.g. ``num-labels``),
3. overrides: ``section.key=value`` strings, or Flower's run config
   (``flwr run . --run-config "train.lr=1e-4"``), where the value ``""`` means
   "keep what the YAML file says".

Everything is checked before any training starts, and every problem is reported at
once, each naming the key, what was found and what is allowed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_origin, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf

from fedsplit.config.checks import cross_checks, task_defaults
from fedsplit.config.schema import (
    CONFIG_FILE_KEY,
    RENAMED,
    UNSET,
    ConfigError,
    FedsplitConfig,
    default_flat,
    kebab,
    schema_fields,
    sections,
    snake,
)
from fedsplit.paths import project_root

# --------------------------------------------------------------------------- loading


def resolve_config_path(path: str | os.PathLike) -> Path:
    """Find a config file as given, relative to cwd, or relative to the project root."""
    p = Path(path).expanduser()
    for cand in (p, Path.cwd() / p, project_root() / p, project_root() / "configs" / p):
        if cand.is_file():
            return cand.resolve()
    shipped = sorted(x.name for x in (project_root() / "configs").glob("*.yaml"))
    raise ConfigError([f"config file {str(path)!r} not found (looked in the current folder "
                       f"and {project_root()}); shipped configs: {', '.join(shipped)}"])


def _parse_value(text: str) -> Any:
    """Parse a command-line value the way YAML would (``1e-4`` -> float, ``[a, b]`` -> list)."""
    if text.strip() == "":
        return ""
    try:
        val = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads `1e-4` as a string; accept it as a number.
    if isinstance(val, str):
        try:
            return float(val)
        except ValueError:
            return val
    return val


class _Cleared(str):
    """An empty command-line value (``key=`` or ``key=""``): sets the key to ``""``. In
    Flower's run config (a mapping) ``""`` means "keep the file's value" instead."""


def parse_overrides(items: list[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """``["train.lr=1e-4", ...]`` or a mapping -> flat ``{"train.lr": 1e-4}``."""
    if not items:
        return {}
    if isinstance(items, Mapping):
        return dict(items)
    out: dict[str, Any] = {}
    problems = []
    for item in items:
        if "=" not in item:
            problems.append(f"override {item!r} is not of the form section.key=value "
                            "(e.g. train.lr=1e-4)")
            continue
        key, _, value = item.partition("=")
        parsed = _parse_value(value)
        out[key.strip()] = _Cleared("") if parsed == "" else parsed
    if problems:
        raise ConfigError(problems)
    return out


def _flatten_yaml(data: Any, problems: list[str], source: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(f"{source}: expected a mapping of sections, found {type(data).__name__}")
        return {}
    flat = {}
    for sec, body in data.items():
        if not isinstance(body, dict):
            problems.append(f"{source}: `{sec}` must be a section (a mapping of keys), "
                            f"found {body!r}")
            continue
        for key, value in body.items():
            flat[f"{kebab(str(sec))}.{kebab(str(key))}"] = value
    return flat


def _check_type(key: str, value: Any, typ: Any, problems: list[str]) -> Any:
    """Coerce ``value`` to ``typ`` where lossless, else record a problem."""
    origin = get_origin(typ) or typ
    if origin is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        problems.append(f"`{key}`: expected true or false, found {value!r}")
    elif origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        problems.append(f"`{key}`: expected an integer, found {value!r}")
    elif origin is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(float(value)):
                return float(value)
        problems.append(f"`{key}`: expected a finite number, found {value!r}")
    elif origin is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"`{key}`: expected a string, found {value!r}")
    elif origin is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return list(value)
        problems.append(f"`{key}`: expected a list (or comma-separated string), found {value!r}")
    elif typ is Any:  # structured values (codec specs): YAML text is parsed
        if isinstance(value, str):
            return _parse_value(value)
        return value
    return None


def build_config(flat: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> DictConfig:
    """Validate a flat ``{"section.key": value}`` dict on top of the defaults."""
    problems: list[str] = []
    fields_ = schema_fields()
    hints = {sec: get_type_hints(cls) for sec, cls in sections().items()}
    values = default_flat()
    for key, value in flat.items():
        k = ".".join(kebab(part) for part in key.split("."))
        where = f" (from {sources[key]})" if sources and key in sources else ""
        if k in RENAMED:
            problems.append(f"{RENAMED[k]}{where}")
            continue
        if k not in fields_:
            sec = k.split(".")[0]
            same_section = [x for x in fields_ if x.startswith(sec + ".")]
            allowed = same_section or sorted({x.split(".")[0] for x in fields_})
            problems.append(f"unknown key `{k}`{where}; allowed: {', '.join(allowed)}")
            continue
        sec, name = k.split(".")
        coerced = _check_type(k, value, hints[sec][snake(name)], problems)
        if coerced is not None:
            values[k] = coerced
    for k, f in fields_.items():
        v, meta = values[k], f.metadata
        if meta.get("choices") and v not in meta["choices"]:
            problems.append(f"`{k}`: {v!r} is not allowed; choose one of "
                            f"{', '.join(map(str, meta['choices']))}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if meta.get("lo") is not None and v < meta["lo"]:
                problems.append(f"`{k}`: {v!r} is below the minimum {meta['lo']}")
            if meta.get("hi") is not None and v > meta["hi"]:
                problems.append(f"`{k}`: {v!r} is above the maximum {meta['hi']}")
    values.update(task_defaults(values))
    problems += cross_checks(values)
    if problems:
        raise ConfigError(problems)
    nested: dict[str, dict[str, Any]] = {}
    for k, v in values.items():
        sec, name = k.split(".")
        nested.setdefault(sec, {})[snake(name)] = v
    cfg = OmegaConf.structured(FedsplitConfig)
    cfg = OmegaConf.merge(cfg, nested)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def read_flat(
    path: str | os.PathLike | None = None,
    overrides: list[str] | Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The layers a config is made of, unvalidated: ``({"section.key": value}, {key:
    where it came from})`` from the YAML file and the overrides (``""`` values skipped).

    ``overrides`` may be Flower's flat run config: its ``config`` key names the YAML file
    (unless ``path`` is given). :func:`load_config` validates the result.
    """
    over = parse_overrides(overrides)
    cfg_file = over.pop(CONFIG_FILE_KEY, None)
    path = path or (cfg_file if cfg_file not in (None, UNSET) else None)
    flat: dict[str, Any] = {}
    sources: dict[str, str] = {}
    problems: list[str] = []
    if path:
        file = resolve_config_path(path)
        try:
            data = yaml.safe_load(file.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError([f"{file}: not valid YAML: {exc}"]) from exc
        for k, val in _flatten_yaml(data, problems, str(file)).items():
            flat[k], sources[k] = val, file.name
    if problems:
        raise ConfigError(problems)
    for k, val in over.items():
        if isinstance(val, _Cleared):
            val = ""  # `key=` on the command line: really empty
        elif isinstance(val, str) and val == UNSET:
            continue
        flat[k], sources[k] = val, "overrides"
    return flat, sources


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | Mapping[str, Any] | None = None,
) -> DictConfig:
    """Load defaults <- YAML file <- overrides, validate, return a read-only DictConfig.

    ``overrides`` may be Flower's flat run config: its ``config`` key names the YAML
    file (unless ``path`` is given) and values equal to ``""`` are skipped.
    """
    return build_config(*read_flat(path, overrides))


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML with kebab-case keys (what a run directory stores)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    return yaml.safe_dump({sec: {kebab(k): v for k, v in body.items()}
                           for sec, body in plain.items()}, sort_keys=False)


def to_flat(cfg: DictConfig) -> dict[str, Any]:
    """Resolved config -> flat kebab-case dict (to ship inside a Flower message)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    return {f"{sec}.{kebab(k)}": v for sec, body in plain.items() for k, v in body.items()}
