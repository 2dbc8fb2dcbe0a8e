"""Command lines, ports and run-config files of a fedsplit deployment (no processes).

The pieces :class:`fedsplit.deploy.federation.Deployment` assembles: free ports, the
``flower-superlink`` / ``flower-supernode`` command lines, node-config and run-config
formatting as flwr parses them, and the absolute paths a SuperLink-side ServerApp needs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsplit.deploy.certs import CertPaths

CONNECTION = "fedsplit"  # name of the SuperLink connection in flwr-home/config.toml
DEFAULT_SUPERLINK_PORT = 8000  # flwr's default (supercore.constant)
DEFAULT_SUPERNODE_PORT = 9094


class DeployError(RuntimeError):
    """A deployment step failed; the message says which, why, and where the log is."""


# --------------------------------------------------------------------------- helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def connect_host(host: str) -> str:
    """The address to dial for a server bound to ``host`` (wildcards -> loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def format_config_value(value: Any) -> str:
    """A value as flwr's ``key=value`` config parser reads it (TOML scalars)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if "'" not in text:
        return f"'{text}'"  # a TOML literal string: no escapes needed
    if '"' not in text and "\\" not in text:
        return f'"{text}"'
    raise DeployError(f"cannot pass {text!r} on flwr's command line: it holds both quote "
                      "kinds; use a file path without quotes")


def format_node_config(node_config: Mapping[str, Any]) -> str:
    """``{"partition-id": 0, "data-path": "/d"}`` -> ``partition-id=0 data-path='/d'``."""
    for key in node_config:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", key):
            raise DeployError(f"node config key {key!r} must be letters, digits, '-', '_' "
                              "or '.'")
    return " ".join(f"{k}={format_config_value(v)}" for k, v in node_config.items())


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` -> (key, value): TOML scalars keep their type, anything else
    (e.g. a YAML codec list) travels as a string that fedsplit's config parses."""
    if "=" not in text:
        raise DeployError(f"override {text!r} must look like section.key=value, "
                          "e.g. train.rounds=3")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return key.strip(), raw
    if isinstance(value, (bool, int, float, str)):
        return key.strip(), value
    return key.strip(), raw


def run_config_toml(overrides: Mapping[str, Any]) -> str:
    """A TOML file body that ``flwr run --run-config FILE.toml`` reads as flat keys."""
    lines = []
    for key, value in overrides.items():
        if isinstance(value, bool):
            rendered = "true" if value else "false"
        elif isinstance(value, (int, float)):
            rendered = repr(value)
        else:
            rendered = json.dumps(str(value))  # a TOML basic string
        lines.append(f"{json.dumps(key)} = {rendered}")
    return "\n".join(lines) + "\n"


def _absolute(path: str, app_dir: Path) -> str:
    """``path`` made absolute against the current folder, then ``app_dir``, if it exists
    there; absolute paths, ``python:`` references and paths found nowhere unchanged."""
    if not path or path.startswith("python:") or Path(path).expanduser().is_absolute():
        return path
    for base in (Path.cwd(), app_dir):
        if (base / path).exists():
            return str((base / path).resolve())
    return path


def absolute_path_overrides(app_dir: str | os.PathLike,
                            overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides that turn the run config's relative data files (``data.train``,
    ``data.test``) and local model folder (``model.path``) into absolute paths.

    The SuperLink runs the ServerApp from its own installed copy of the app
    (``flwr-home/apps/<app>/``), so a path the YAML config gives relative to the project
    folder (``../shared/data/sst2/train.tsv``) would resolve there and not exist. Here
    they are resolved like fedsplit resolves them (the current folder, then the project
    folder, here ``app_dir``). Paths found in neither place, and config files that
    cannot be read, are left alone: the ServerApp's preflight then names the problem.
    (The layers are read, not validated: the ServerApp validates the config it runs.)
    """
    from fedsplit.config import ConfigError, read_flat

    app_dir = Path(app_dir).resolve()
    path = str(overrides.get("config", "") or "")
    if not path:
        try:
            app_config = tomllib.loads((app_dir / "pyproject.toml").read_text())
            path = str(app_config["tool"]["flwr"]["app"]["config"].get("config", ""))
        except (OSError, KeyError, AttributeError, tomllib.TOMLDecodeError):
            path = ""
    if path and not Path(path).expanduser().is_absolute():
        found = [f for f in (app_dir / path, app_dir / "configs" / path, Path.cwd() / path)
                 if f.is_file()]
        path = str(found[0]) if found else path
    plain = {k: v for k, v in overrides.items() if k != "config"}
    try:
        values, _ = read_flat(path or None, plain)
    except ConfigError:
        values = dict(plain)  # an unreadable config file: preflight names the problem
    out: dict[str, Any] = {}
    for key in ("data.train", "data.test"):
        raw = values.get(key) or []
        paths = [x.strip() for x in raw.split(",")] if isinstance(raw, str) else \
            [str(x) for x in raw]
        resolved = [_absolute(x, app_dir) for x in paths if x]
        if resolved != [x for x in paths if x]:
            out[key] = ",".join(resolved)  # fedsplit reads a string list as `a, b`
    model_path = str(values.get("model.path") or "")
    resolved_model = _absolute(model_path, app_dir)
    if resolved_model != model_path and Path(resolved_model).is_dir():
        out["model.path"] = resolved_model
    return out


def superlink_command(certs: CertPaths, host: str, port: int, database: str | None,
                      program: str = "flower-superlink") -> list[str]:
    """The ``flower-superlink`` command line of a deployment."""
    cmd = [program,
           "--ssl-ca-certfile", str(certs.ca_cert),
           "--ssl-certfile", str(certs.server_cert),
           "--ssl-keyfile", str(certs.server_key),
           "--enable-supernode-auth",
           "--disable-runtime-dependency-installation",
           "--host", host, "--port", str(port)]
    if database:
        cmd += ["--database", database]
    return cmd


def supernode_command(superlink: str, root_certificates: str, private_key: str,
                      node_config: Mapping[str, Any], port: int = DEFAULT_SUPERNODE_PORT,
                      max_wait_time: float | None = None,
                      program: str = "flower-supernode") -> list[str]:
    """The ``flower-supernode`` command line of one device.

    Parameters
    ----------
    superlink : str
        ``host:port`` of the SuperLink as the device reaches it.
    root_certificates : str
        The deployment's ``ca.crt`` on the device.
    private_key : str
        The device's SuperNode private key (OpenSSH format); its ``.pub`` must be
        registered with ``fedsplit-deploy register``.
    node_config : mapping
        E.g. ``partition-id``, ``num-partitions``, ``data-path``, ``device-profile``,
        ``root-certificates`` (the CA for the split channel).
    port : int
        The SuperNode's own Runtime API port (distinct per SuperNode on one machine).
    max_wait_time : float | None
        Give up connecting after this many seconds (default: retry forever).
    """
    cmd = [program, "--superlink", superlink, "--root-certificates", root_certificates,
           "--auth-supernode-private-key", private_key, "--port", str(port)]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", str(max_wait_time)]
    if node_config:
        cmd += ["--node-config", format_node_config(node_config)]
    return cmd


def shell_join(cmd: Sequence[str]) -> str:
    """A command line to paste into a shell; arguments holding single quotes (node
    configs) are double-quoted, which keeps them readable."""
    parts = []
    for arg in cmd:
        if "'" in arg and not any(c in arg for c in '"$`\\!'):
            parts.append(f'"{arg}"')
        else:
            parts.append(shlex.quote(arg))
    return " ".join(parts)


def _json_in(text: str) -> Any:
    """The JSON document in a CLI's stdout (flwr may print a line before it)."""
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        raise ValueError("no JSON in output")
    return json.loads(text[start:])
