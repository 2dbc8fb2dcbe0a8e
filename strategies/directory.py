"""The clients a strategy knows, by stable identity.

Flower's node ids are random per run; a client's *key* is not (its partition id or node
name, from its node config). The directory learns each node's key, device kind and
partition id with one query message the first time it sees the node
(:meth:`ClientDirectory.discover`), so that sampling, per-client cuts, data cursors and
checkpoints are keyed by something that survives a restart.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from logging import INFO
from typing import Any

from flwr.app import Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fedsplit.protocol import KEY_CLIENT, KEY_DEVICE, KEY_PARTITION


def natural_order(key: str) -> list[Any]:
    """Sort key that puts ``partition-2`` before ``partition-10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


class ClientDirectory:
    """Stable client identities, learned by a query, and each client's data cursor.

    Parameters
    ----------
    fleet_devices
        ``fleet.devices``: device kinds cycled over the clients by index, for clients
        whose node config names none.

    Attributes
    ----------
    keys
        ``{node id: client key}`` of every node queried so far.
    infos
        ``{node id: {"device": kind | None, "partition": id | None}}``.
    cursors
        ``{client key: samples consumed so far}`` (its place in its data; checkpointed).
    """

    def __init__(self, fleet_devices: Sequence[str] = ()) -> None:
        self.fleet_devices = list(fleet_devices)
        self.keys: dict[int, str] = {}
        self.infos: dict[int, dict[str, Any]] = {}
        self.cursors: dict[str, int] = {}

    def discover(self, grid: Grid, min_nodes: int, timeout: float) -> None:
        """Wait for ``min_nodes`` connected nodes, then ask the new ones who they are.

        A node whose reply is an error (e.g. a foreign ClientApp that does not answer
        queries) is known by its node id, with no device and no partition.
        """
        while len(list(grid.get_node_ids())) < min_nodes:
            log(INFO, "Waiting for nodes to connect: %d connected (minimum required: %d).",
                len(list(grid.get_node_ids())), min_nodes)
            time.sleep(1)
        new = [n for n in grid.get_node_ids() if n not in self.keys]
        if not new:
            return
        queries = [Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n)
                   for n in new]
        for reply in grid.send_and_receive(queries, timeout=timeout):
            node = reply.metadata.src_node_id
            key = str(node)  # a foreign ClientApp's, until its reply says otherwise
            info: dict[str, Any] = {"device": None, "partition": None}
            if not reply.has_error():
                for rec in reply.content.config_records.values():
                    key = str(rec.get(KEY_CLIENT, key))
                    info["device"] = str(rec.get(KEY_DEVICE, "")) or None
                    partition = int(rec.get(KEY_PARTITION, -1))  # type: ignore[arg-type]
                    info["partition"] = partition if partition >= 0 else None
            self.keys[node] = key
            self.infos[node] = info

    def client_key(self, node_id: int) -> str:
        """The client's stable key (its node id as text if it was never queried)."""
        return self.keys.get(node_id, str(node_id))

    def client_index(self, node_id: int) -> int:
        """The client's partition id, else its place among the known clients' keys."""
        partition = self.infos.get(node_id, {}).get("partition")
        if partition is not None:
            return int(partition)
        order = sorted(self.keys.values(), key=natural_order)
        key = self.client_key(node_id)
        return order.index(key) if key in order else 0

    def device_of(self, node_id: int) -> str | None:
        """The client's device kind: its node config ``device-profile``, else
        ``fleet.devices`` at its index (cycled), else ``None``."""
        device = self.infos.get(node_id, {}).get("device")
        if device:
            return str(device)
        devices = self.fleet_devices
        return str(devices[self.client_index(node_id) % len(devices)]) if devices else None

    def profiles(self, node_ids: Sequence[int], kinds: dict[str, Any],
                 source: str) -> tuple[dict[str, Any], str]:
        """``({client key: its device profile}, problem)`` for ``node_ids``, profiles from
        ``kinds`` (read from the file ``source``); ``problem`` names the clients without
        one and the fix (``""`` when every client has one)."""
        fleet, missing = {}, []
        for n in node_ids:
            device = self.device_of(n)
            if device is None or device not in kinds:
                missing.append(f"{self.client_key(n)} ({device or 'no device'})")
            else:
                fleet[self.client_key(n)] = kinds[device]
        if not missing:
            return fleet, ""
        return fleet, (f"clients {', '.join(missing)} have no device profile in {source} "
                       f"(known: {', '.join(sorted(kinds))}); set fleet.devices or the "
                       "SuperNode's node config device-profile")

    def cursor(self, node_id: int) -> int:
        """How many samples the client consumed so far (where its next round starts)."""
        return self.cursors.get(self.client_key(node_id), 0)

    def advance(self, node_id: int, examples: int) -> None:
        """Move the client's cursor past ``examples`` samples it finished this round."""
        key = self.client_key(node_id)
        self.cursors[key] = self.cursors.get(key, 0) + examples
