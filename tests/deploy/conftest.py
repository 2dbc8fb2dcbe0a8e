"""Shared pieces of the real-deployment tests: a loopback federation of SuperNodes.

A federation here is real processes (flower-superlink with TLS and SuperNode
authentication, one flower-supernode per device with its own data partition), all in a
temporary folder on free ports. Leaving the ``with`` block stops every process of the
deployment (and its children), also when a test fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import ContextManager

import pytest

from fedsplit.config import load_config
from fedsplit.deploy.data import prepare_device_data
from fedsplit.deploy.federation import Deployment
from fedsplit.deploy.commands import free_port

APP = Path(__file__).resolve().parents[2]  # the Flower App: the repository root


@contextmanager
def loopback_federation(folder: Path, nodes: Sequence[str],
                        extra_keys: Sequence[str] = ()) -> Iterator[SimpleNamespace]:
    """A SuperLink and one registered, online SuperNode per name in ``nodes``.

    Parameters
    ----------
    folder : Path
        The deployment folder (outside the app folder, e.g. a pytest tmp dir).
    nodes : sequence of str
        SuperNode names; node ``i`` gets partition ``i`` of ``len(nodes)`` of the
        default config's data (digits), written to ``folder/data``.
    extra_keys : sequence of str
        Further SuperNode key pairs to make but not register (e.g. a rogue device).

    Yields
    ------
    SimpleNamespace
        ``dep`` (the :class:`Deployment`), ``parts`` (the written partitions, in node
        order), ``supernodes`` (name -> :class:`fedsplit.deploy.procs.Started`) and
        ``examples`` (all partitions' examples).
    """
    dep = Deployment.create(folder, port=free_port(), channel_port=free_port(),
                            node_keys=[*nodes, *extra_keys])
    parts = prepare_device_data(load_config(APP / "configs" / "default.yaml"), len(nodes),
                                folder / "data")
    try:
        dep.start_superlink()
        for name in nodes:
            dep.register(name, dep.folder / "keys" / f"{name}.pub")
        supernodes = {
            name: dep.start_supernode(name, {"partition-id": i, "num-partitions": len(nodes),
                                             "data-path": str(parts[i].path)})
            for i, name in enumerate(nodes)}
        dep.wait_online(nodes, timeout=120)
        yield SimpleNamespace(dep=dep, parts=parts, supernodes=supernodes,
                              examples=sum(p.examples for p in parts))
    finally:
        dep.stop()


@pytest.fixture(scope="session")
def make_federation() -> Callable[..., ContextManager[SimpleNamespace]]:
    """``with make_federation(folder, ["node0", "node1"]) as fed:`` (see
    :func:`loopback_federation`); a fixture so that test modules need not import
    this conftest."""
    return loopback_federation
