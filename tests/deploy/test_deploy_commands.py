"""Command lines and configs the deployment hands to flwr, parsed by flwr's own code."""

from __future__ import annotations

import shlex

import pytest
from flwr.common.config import parse_config_args
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

from fedsplit.deploy.certs import CertPaths
from fedsplit.deploy.commands import (
    DeployError,
    format_node_config,
    parse_override,
    run_config_toml,
    shell_join,
    superlink_command,
    supernode_command,
)


def test_superlink_flags_exist_in_flower():
    certs = CertPaths.under("/dep")
    cmd = superlink_command(certs, "0.0.0.0", 9093, "/dep/superlink.db")
    args = _parse_args_run_superlink().parse_args(cmd[1:])
    assert args.enable_supernode_auth and not args.insecure
    assert args.runtime_dependency_install is False
    assert (args.host, args.port, args.database) == ("0.0.0.0", 9093, "/dep/superlink.db")
    assert (args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile) == (
        "/dep/certs/ca.crt", "/dep/certs/server.pem", "/dep/certs/server.key")


def test_supernode_flags_and_node_config_round_trip():
    node_config = {"partition-id": 1, "num-partitions": 4, "data-path": "/data/device 1",
                   "device-profile": "/p/pi.json", "root-certificates": "/c/ca.crt"}
    cmd = supernode_command("10.0.0.5:8000", "/c/ca.crt", "/k/pi", node_config, port=9101,
                            max_wait_time=30)
    args = _parse_args_run_supernode().parse_args(cmd[1:])
    assert (args.superlink, args.root_certificates, args.auth_supernode_private_key,
            args.port, args.max_wait_time) == ("10.0.0.5:8000", "/c/ca.crt", "/k/pi", 9101, 30.0)
    assert not args.insecure and args.runtime_dependency_install is False
    assert parse_config_args([args.node_config]) == node_config
    # What `fedsplit-deploy supernode --print` shows pastes back into the same argv.
    assert shlex.split(shell_join(cmd)) == cmd


def test_values_with_quotes():
    assert parse_config_args([format_node_config({"q": "it's"})]) == {"q": "it's"}
    with pytest.raises(DeployError, match="quote"):
        format_node_config({"q": "it's \"both\""})
    with pytest.raises(DeployError, match="node config key"):
        format_node_config({"bad key": 1})


def test_run_config_file_is_read_flat_by_flower(tmp_path):
    overrides = {"train.rounds": 1, "train.lr": 0.05, "run.progress": False,
                 "codec.up": "[drop-padding, {name: quantize, bits: 8}]",
                 "channel.tls-cert": "/dep/certs/server.pem", "run.name": 'say "hi"'}
    path = tmp_path / "run.toml"
    path.write_text(run_config_toml(overrides))
    assert parse_config_args([str(path)]) == overrides


@pytest.mark.parametrize("text, expected", [
    ("train.rounds=3", ("train.rounds", 3)),
    ("train.lr=1e-4", ("train.lr", 1e-4)),
    ("run.progress=false", ("run.progress", False)),
    ("run.name='a b'", ("run.name", "a b")),
    ("codec.up=[drop-padding, {name: quantize, bits: 8}]",
     ("codec.up", "[drop-padding, {name: quantize, bits: 8}]")),
    ("data.train=[1, 2]", ("data.train", "[1, 2]")),  # lists travel as text
    ("model.path=/x/y", ("model.path", "/x/y")),
])
def test_parse_override(text, expected):
    assert parse_override(text) == expected


def test_deployment_state_connection_and_run_config(tmp_path, monkeypatch):
    from flwr.cli.flower_config import read_superlink_connection

    from fedsplit.deploy.certs import server_sans
    from fedsplit.deploy.federation import Deployment
    from fedsplit.deploy.commands import CONNECTION

    dep = Deployment.create(tmp_path / "fed", host="0.0.0.0", port=8443,
                            public_host="192.168.1.10", channel_port=9443, node_keys=["pi1"])
    assert (dep.folder / "keys" / "pi1.pub").is_file()
    assert {"192.168.1.10", "127.0.0.1", "localhost"} <= set(server_sans(dep.certs.server_cert))
    monkeypatch.setenv("FLWR_HOME", str(dep.flwr_home))
    conn = read_superlink_connection(None)  # the default connection, as flwr reads it
    assert (conn.name, conn.address, conn.root_certificates, conn.insecure) == (
        CONNECTION, "127.0.0.1:8443", str(dep.certs.ca_cert), False)
    again = Deployment.load(dep.folder)
    assert (again.marker, again.device_superlink_address) == (dep.marker, "192.168.1.10:8443")
    cfg = again.run_overrides({"train.rounds": 2, "channel.port": 9500}, "r")
    assert cfg["channel.address"] == "192.168.1.10:9443" and cfg["channel.port"] == 9500
    assert cfg["channel.tls-cert"] == str(dep.certs.server_cert) and cfg["train.rounds"] == 2
    with pytest.raises(DeployError, match="inside the app folder"):
        again.run(tmp_path)  # the app folder holds the deployment folder
    no_port = Deployment.create(tmp_path / "fed2", host="0.0.0.0", public_host="10.0.0.2")
    with pytest.raises(DeployError, match="--channel-port"):
        no_port.run_overrides({}, "r")
    with pytest.raises(DeployError, match="not a deployment folder"):
        Deployment.load(tmp_path / "nothing")
