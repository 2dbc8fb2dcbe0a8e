"""Attaching to a Ray cluster: the address option, the no-silent-join rule, the channel
address rule, the code shipped to the nodes (fast: no cluster; the two-node run is
tests/simulation/test_ray_cluster.py)."""

from __future__ import annotations

import logging
import socket
import zipfile
from pathlib import Path

import pytest

import clients
import fedsplit
import strategies
from fedsplit.channel.server import advertised_address, peer_host
from fedsplit.cluster import (attach_problems, channel_overrides, channel_problems,
                              cluster_address, code_runtime_env, missing_paths, shared_paths)
from fedsplit.config import ChannelConfig, ConfigError, load_config
from fedsplit.ray_runtime import private_init_args
from fedsplit.simulate import main


# ----------------------------------------------------------------- --ray-address / RAY_ADDRESS


def test_the_option_wins_over_the_environment_and_local_means_private():
    env = {"RAY_ADDRESS": "10.0.0.9:6379"}
    assert cluster_address(None, {}) is None  # neither: a private Ray
    assert cluster_address("", {"RAY_ADDRESS": " "}) is None
    assert cluster_address(None, env) == "10.0.0.9:6379"
    assert cluster_address("10.0.0.1:6380", env) == "10.0.0.1:6380"
    assert cluster_address("local", env) is None  # forces a private Ray despite RAY_ADDRESS
    assert cluster_address(None, {"RAY_ADDRESS": "local"}) is None
    assert cluster_address("auto", {}) == "auto"
    assert cluster_address("[fd00::1]:6379", {}) == "[fd00::1]:6379"
    assert cluster_address("head.cluster:6379", {}) == "head.cluster:6379"


@pytest.mark.parametrize("value, words", [
    ("ray://10.0.0.1:10001", ["Ray Client", "--ray-address HEAD_IP:6379"]),
    ("10.0.0.1", ["expected HOST:PORT", "10.0.0.1:6379"]),
    ("10.0.0.1:99999", ["expected HOST:PORT"]),
    (":6379", ["expected HOST:PORT"]),
])
def test_bad_addresses_say_what_is_expected(value, words):
    with pytest.raises(ConfigError) as err:
        cluster_address(value, {})
    assert all(w in str(err.value) for w in words), str(err.value)
    assert f"--ray-address={value}" in str(err.value)
    with pytest.raises(ConfigError, match="RAY_ADDRESS="):  # the source is named
        cluster_address(None, {"RAY_ADDRESS": value})


def test_a_private_ray_never_joins_a_cluster_started_by_hand(tmp_path, monkeypatch):
    """`ray start` records its cluster in <ray temp dir>/ray_current_cluster, and a plain
    ``ray.init()`` joins what that file (or RAY_ADDRESS) names; the private start's
    arguments make Ray's own address resolution start a new Ray instead."""
    from ray._private.services import canonicalize_bootstrap_address

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.213.250.1:6379")
    assert canonicalize_bootstrap_address(None) == "10.213.250.1:6379"  # would join it
    args = private_init_args({"num_cpus": 2})
    assert args["num_cpus"] == 2 and args["include_dashboard"] is False
    assert canonicalize_bootstrap_address(args["address"]) is None  # a new Ray
    monkeypatch.setenv("RAY_ADDRESS", "10.213.250.2:6379")
    assert canonicalize_bootstrap_address(args["address"]) is None


# ----------------------------------------------------------------- the channel address rule


def channel(**kw):
    return load_config(overrides={f"channel.{k}": v for k, v in kw.items()}).channel


def test_a_loopback_channel_is_refused_on_a_cluster_with_the_fix():
    problems = channel_problems(ChannelConfig(), "10.0.0.1:6379")  # the default: 127.0.0.1
    assert len(problems) == 1
    assert "channel.host=127.0.0.1" in problems[0] and "channel.host=0.0.0.0" in problems[0]
    for host in ("localhost", "::1", "127.0.1.1"):
        assert channel_problems(channel(host=host), "a:1"), host
    [problem] = channel_problems(channel(host="0.0.0.0", address="localhost:5000"), "a:1")
    assert "channel.address=localhost:5000" in problem and "IP:PORT" in problem
    assert channel_problems(channel(host="0.0.0.0"), "a:1") == []
    assert channel_problems(channel(host="10.0.0.4", address="10.0.0.4:5000"), "a:1") == []
    assert channel_problems(channel(host="0.0.0.0", address="[fd00::4]:5000"), "a:1") == []


def test_a_wildcard_channel_is_advertised_at_the_ray_node_ip():
    assert channel_overrides(channel(host="0.0.0.0"), "10.0.0.7") == {
        "channel.address": "10.0.0.7"}
    assert channel_overrides(channel(host="::"), "10.0.0.7") == {"channel.address": "10.0.0.7"}
    assert channel_overrides(channel(host="0.0.0.0", address="gw:5000"), "10.0.0.7") == {}
    assert channel_overrides(channel(host="10.0.0.4"), "10.0.0.7") == {}  # as bound


@pytest.mark.parametrize("address, host, expected", [
    ("", "127.0.0.1", "127.0.0.1:5005"),
    ("", "0.0.0.0", "127.0.0.1:5005"),
    ("", "10.0.0.4", "10.0.0.4:5005"),
    ("", "::1", "[::1]:5005"),
    ("10.0.0.7", "0.0.0.0", "10.0.0.7:5005"),  # a host alone: the bound port
    ("head.lan", "0.0.0.0", "head.lan:5005"),
    ("[fd00::7]", "::", "[fd00::7]:5005"),
    ("fd00::7", "::", "[fd00::7]:5005"),
    ("gw.example:443", "0.0.0.0", "gw.example:443"),  # HOST:PORT as given
    ("[fd00::7]:443", "::", "[fd00::7]:443"),
])
def test_advertised_address(address, host, expected):
    assert advertised_address(address, host, 5005) == expected


def test_the_channel_advertises_a_host_alone_with_the_port_it_bound():
    from fedsplit.channel.server import SplitChannelServer

    cfg = channel(host="0.0.0.0", address="10.213.251.1", port=0)
    server = SplitChannelServer(None, cfg)  # the trainer is used by requests only
    address = server.start()
    try:
        host, port = address.rsplit(":", 1)
        assert host == "10.213.251.1" and int(port) > 0
        with socket.create_connection(("127.0.0.1", int(port)), timeout=5):
            pass  # the advertised port is the one listening (on every interface)
    finally:
        server.stop()


def test_peer_host():
    assert peer_host("ipv4:10.213.0.2:41234") == "10.213.0.2"
    assert peer_host("ipv6:[::1]:41234") == "::1"
    assert peer_host("ipv6:%5B::1%5D:41234") == "::1"
    assert peer_host("unix:/tmp/sock") == "unix:/tmp/sock"


# ----------------------------------------------------------------- code and data on the nodes


def test_the_code_shipped_to_the_nodes_is_the_three_packages_without_caches(tmp_path):
    import importlib

    from ray._private.runtime_env.packaging import _zip_files

    env = code_runtime_env([fedsplit, clients, strategies])
    root = Path(fedsplit.__file__).resolve().parents[1]
    assert env["py_modules"] == [str(root / p) for p in ("fedsplit", "clients", "strategies")]
    # A package with byte code beside its source, zipped as Ray zips a py_module.
    pkg = tmp_path / "src" / "shipme"
    (pkg / "__pycache__").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core.py").write_text("X = 1\n")
    (pkg / "__pycache__" / "core.cpython-311.pyc").write_bytes(b"\0")
    (pkg / "stale.pyc").write_bytes(b"\0")
    monkey_path = str(tmp_path / "src")
    import sys

    sys.path.insert(0, monkey_path)
    try:
        shipme = importlib.import_module("shipme")
        [folder] = code_runtime_env([shipme])["py_modules"]
    finally:
        sys.path.remove(monkey_path)
        sys.modules.pop("shipme", None)
    out = tmp_path / "shipme.zip"
    _zip_files(folder, env["excludes"], str(out), include_gitignore=True,
               include_parent_dir=True)
    assert sorted(zipfile.ZipFile(out).namelist()) == ["shipme/__init__.py", "shipme/core.py"]
    with pytest.raises(ValueError, match="not a package"):
        code_runtime_env([socket])


def test_shared_paths_are_the_local_files_clients_read(tmp_path):
    train, test = tmp_path / "train.tsv", tmp_path / "test.tsv"
    for f in (train, test):
        f.write_text("sentence\tlabel\na\t0\n")
    cfg = load_config(overrides={"data.name": "files", "data.train": [str(train)],
                                 "data.test": [str(test)], "model.path": "org/hub-model"})
    assert shared_paths(cfg) == sorted([str(train), str(test)])  # the hub name stays out
    assert shared_paths(load_config()) == []  # digits: bundled with scikit-learn
    assert missing_paths([str(train), str(tmp_path / "gone")]) == [str(tmp_path / "gone")]


def test_attach_problems_refuse_ray_cpus():
    cfg = load_config(overrides={"channel.host": "0.0.0.0"})
    assert attach_problems(cfg, "10.0.0.1:6379") == []
    [problem] = attach_problems(cfg, "10.0.0.1:6379", ray_cpus=4)
    assert "ray start --num-cpus" in problem


# ----------------------------------------------------------------- the command line


@pytest.fixture
def fedsplit_logger_kept():
    """main() configures the ``fedsplit`` logger for a terminal; put it back afterwards."""
    logger = logging.getLogger("fedsplit")
    kept = (logger.level, logger.propagate, list(logger.handlers))
    yield
    logger.setLevel(kept[0])
    logger.propagate = kept[1]
    logger.handlers[:] = kept[2]


def test_the_command_line_refuses_a_loopback_channel_before_attaching(
        capsys, monkeypatch, fedsplit_logger_kept):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv = ["--config", "configs/default.yaml", "--ray-address", "10.213.252.1:6379"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "channel.host=127.0.0.1" in err and "channel.host=0.0.0.0" in err
    monkeypatch.setenv("RAY_ADDRESS", "ray://10.213.252.1:10001")  # the environment too
    assert main(["--config", "configs/default.yaml", "channel.host=0.0.0.0"]) == 2
    assert "RAY_ADDRESS=ray://10.213.252.1:10001" in capsys.readouterr().err
