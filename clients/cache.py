"""What a ClientApp worker process keeps from one train message to the next.

A simulation runs the ClientApp in a few Ray workers, each serving many clients one
message at a time. Without this module every message parsed the run config again,
reloaded and re-partitioned the train set, reloaded the tokenizer, rebuilt the model and
opened a new connection to the split channel: ~0.25 s per message for the digits CNN
(0.13 s of it reloading the data, 0.1 s parsing the config), where Flower's own cost per
message is ~0.08 s; for SST-2, reloading the data alone took 4 s. Now a message does only
per-message work: load the sent weights into a kept model, pick this round's samples from
a kept partition, train over a kept connection (with this round's token), reply.

Module-level caches of per-client state are what STYLE.md warns against, because Ray
reuses one worker for many clients. These are safe for three reasons:

* **Keys name everything a value depends on.** Every key starts with the run
  (:func:`run_key`: Flower's run id and a digest of the run config the server sent),
  then the config sections the value is made from (:func:`digest`) and, for a partition,
  the partition id and count. A new run, another config, another client's overrides or
  another partition never finds an entry made for something else.
* **Shared values are never changed.** Configs are read-only; raw datasets and partitions
  are Arrow-backed and only ever read (``select`` makes new views).
* **Mutable objects are lent, not shared.** A task (its tokenizer) and a model layout
  (whose tensors a client trains) are taken out of a :class:`Pool` for one message and
  put back only when that message succeeded, so two clients in one process (threads) never
  hold the same one, and one that failed half-way is dropped.

Nothing here carries a client's *state* from one round to the next (that lives in the
node's Flower context, e.g. FedBN's BatchNorm layers, or on the server: data cursors):
with or without the cache, a message gives the same reply, bit for bit
(``tests/strategy/test_client_cache.py``). Every cache is a bounded LRU, so a worker
serving 1,000 clients does not grow without limit. ``FEDSPLIT_CLIENT_CACHE=0`` in the
workers' environment turns it off.

What is *not* kept: this round's encoded samples (tokenized text, decoded images: a
client encodes only the samples it trains this round, and a kept decoded CIFAR partition
would be 15 MB a client), the optimizer and the sent weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

from omegaconf import DictConfig, OmegaConf

V = TypeVar("V")


def digest(value: Any) -> str:
    """A short digest of a config section, a mapping or a string (the same content gives
    the same digest, in any process)."""
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class LRU(Generic[V]):
    """At most ``maxsize`` values, the least recently used dropped first (thread-safe).

    ``maxsize=0`` keeps nothing: every :meth:`get` makes its value.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable, make: Callable[[], V]) -> V:
        """The value kept under ``key``, else ``make()`` (kept from now on)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
        value = make()  # outside the lock: a slow load does not hold up other keys
        self.put(key, value)
        return value

    def put(self, key: Hashable, value: V) -> None:
        with self._lock:
            if self.maxsize <= 0:
                return
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.hits = self.misses = 0


class Pool(Generic[V]):
    """Idle mutable objects by key, each lent to one user at a time (thread-safe).

    :meth:`borrow` takes an idle object for ``key`` (or makes one) and gives it back when
    the body ends without an exception; at most ``maxsize`` idle objects are kept in all,
    the least recently returned dropped first (``maxsize=0``: none).
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._idle: OrderedDict[tuple[Hashable, int], V] = OrderedDict()
        self._lock = threading.Lock()
        self._serial = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._idle)

    @contextmanager
    def borrow(self, key: Hashable, make: Callable[[], V]) -> Iterator[V]:
        with self._lock:
            slot = next((s for s in reversed(self._idle) if s[0] == key), None)
            idle = [self._idle.pop(slot)] if slot is not None else []
            self.hits += len(idle)
            self.misses += 1 - len(idle)
        value = idle[0] if idle else make()
        yield value  # an exception in the body drops it (it may be half-changed)
        with self._lock:
            if self.maxsize <= 0:
                return
            self._serial += 1
            self._idle[(key, self._serial)] = value
            while len(self._idle) > self.maxsize:
                self._idle.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()
            self.hits = self.misses = 0


def run_key(run_id: int, run_config_json: str) -> tuple[int, str]:
    """The run a message belongs to: Flower's run id and the run config it carries (a
    rerun under the same id with another config is another run)."""
    return (int(run_id), digest(run_config_json))


class WorkerCache:
    """The caches of one ClientApp process (see the module docstring for the keys).

    Sizes: a few configs per run (one per distinct client override and plan), two raw
    train sets (a run's, and the next run's while the old one ages out), four
    partitioners (the split of a train set over the clients, computed once), 1,024 raw
    partitions (an index view over the train set each, ~4 KB: a worker serving 1,000
    clients keeps all of theirs), eight tasks, four model layouts (a whole unsplit model
    each, ~90 MB for MiniLM) and four gRPC channels.
    """

    def __init__(self, enabled: bool = True) -> None:
        on = int(enabled)
        self.configs: LRU[Any] = LRU(64 * on)
        self.train_sets: LRU[Any] = LRU(2 * on)
        self.partitioners: LRU[Any] = LRU(4 * on)
        self.partitions: LRU[Any] = LRU(1024 * on)
        self.tasks: Pool[Any] = Pool(8 * on)
        self.layouts: Pool[Any] = Pool(4 * on)
        # Connections to split-channel servers; one dropped here closes once unused.
        self.channels: LRU[Any] = LRU(4 * on)

    @classmethod
    def from_env(cls) -> WorkerCache:
        """On unless ``FEDSPLIT_CLIENT_CACHE`` is ``0``/``false``/``off``."""
        flag = os.environ.get("FEDSPLIT_CLIENT_CACHE", "1").strip().lower()
        return cls(enabled=flag not in ("0", "false", "off", "no"))

    def clear(self) -> None:
        for part in (self.configs, self.train_sets, self.partitioners, self.partitions,
                     self.tasks, self.layouts, self.channels):
            part.clear()


CACHE = WorkerCache.from_env()  # this process's (tests swap it for another)
