"""Split the train set over clients with flwr-datasets partitioners.

``data.partitioner`` picks the scheme:

``iid``
    Uniform random shards (:class:`ShuffledIidPartitioner`). flwr-datasets'
    ``IidPartitioner`` cuts contiguous shards and relies on ``FederatedDataset`` to
    shuffle first; fedsplit assigns datasets directly, so the shuffle happens here.
``dirichlet``
    Label skew: each class is spread over clients with Dirichlet(``data.alpha``)
    proportions (``DirichletPartitioner``; smaller alpha, stronger skew). When no draw
    gives every client the minimum (many small clients), a floored split
    (:mod:`fedsplit.data.dirichlet`) takes over, with a warning.
``natural``
    One client per distinct value of ``data.partition-by`` (e.g. the Amazon domain in
    the ``source`` column), or ``k`` IID clients per value when the number of clients
    is ``k`` times the number of values (:class:`NaturalIdShardPartitioner`).
``classes``
    Pathological label skew (McMahan et al. 2017): each client holds samples of
    ``data.classes-per-client`` classes of ``data.partition-by``
    (:class:`ClassShardPartitioner`).

Partitions are pure functions of (train set, number of partitions, seed), so every
client process computes the same split without coordination.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import datasets
import numpy as np
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

from fedsplit.data.dirichlet import floored_dirichlet
from fedsplit.data.load import DataError

log = logging.getLogger(__name__)

# Flower's default: a Dirichlet client must get at least this many examples.
MIN_PARTITION_SIZE = 10


class ShuffledIidPartitioner(IidPartitioner):
    """IID partitions of a seeded random permutation of the dataset.

    Partition ``i`` holds the ``i``-th of ``num_partitions`` near-equal slices of the
    permutation (sizes differ by at most one), in dataset order.
    """

    def __init__(self, num_partitions: int, seed: int) -> None:
        super().__init__(num_partitions)
        self._seed = seed
        self._shards: list[np.ndarray] | None = None

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        """Load partition ``partition_id`` (0-based)."""
        _check_partition_id(partition_id, self.num_partitions)
        if self._shards is None:
            n = self.dataset.num_rows
            if n < self.num_partitions:
                raise DataError(f"cannot split {n} train examples over "
                                f"{self.num_partitions} clients; use fewer clients or "
                                "more data (`data.max-train-samples`=0 keeps all)")
            perm = np.random.default_rng(self._seed).permutation(n)
            self._shards = np.array_split(perm, self.num_partitions)
        return self.dataset.select(np.sort(self._shards[partition_id]))


class _DirichletPartitioner(DirichletPartitioner):
    """``DirichletPartitioner`` whose failures are :class:`DataError` with a way out."""

    def __init__(self, num_partitions: int, partition_by: str, alpha: float,
                 min_partition_size: int, seed: int) -> None:
        super().__init__(num_partitions=num_partitions, partition_by=partition_by,
                         alpha=alpha, min_partition_size=min_partition_size,
                         self_balancing=True, shuffle=True, seed=seed)
        # Own copies for the error message (the parent's attributes are private).
        self._settings = (num_partitions, partition_by, alpha, min_partition_size)
        self._seed = seed
        self._floor_shards: list[np.ndarray] | None = None

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        num_partitions, partition_by, alpha, min_size = self._settings
        _check_partition_id(partition_id, num_partitions)
        _require_column(self.dataset, partition_by)
        if self._floor_shards is not None:
            return self.dataset.select(self._floor_shards[partition_id])
        try:
            with warnings.catch_warnings():
                # It warns on every rejected draw before giving up; the error says enough.
                warnings.simplefilter("ignore", UserWarning)
                return super().load_partition(partition_id)
        except ValueError as exc:
            if isinstance(exc, DataError):
                raise
            floored = self._floored()
            if floored is not None:
                return self.dataset.select(floored[partition_id])
            raise DataError(
                f"Dirichlet partitioning of {self.dataset.num_rows} examples by "
                f"{partition_by!r} over {num_partitions} clients with alpha={alpha} "
                f"failed: {exc} Each client needs at least {min_size} examples; raise "
                f"`data.alpha` (e.g. {max(1.0, 2 * alpha):g}) or use fewer clients") from exc


    def _floored(self) -> list[np.ndarray] | None:
        """After flwr-datasets' draw failed: :func:`floored_dirichlet` with the same
        minimum, when the train set holds it for every client (computed once, logged)."""
        num_partitions, partition_by, alpha, min_size = self._settings
        if self.dataset.num_rows < min_size * num_partitions:
            return None
        if self._floor_shards is None:
            log.warning("Dirichlet(alpha=%g) over %d clients: no draw gave every client %d "
                        "examples; each client gets %d at random and the rest is split with "
                        "Dirichlet proportions (fedsplit.data.dirichlet)", alpha,
                        num_partitions, min_size, min_size)
            self._floor_shards = floored_dirichlet(self.dataset[partition_by], num_partitions,
                                                   alpha, min_size, self._seed)
        return self._floor_shards


class _ShardPartitioner(Partitioner):
    """A partitioner whose partitions are index shards computed once by ``_build``."""

    def __init__(self, partition_by: str, num_partitions: int, seed: int) -> None:
        super().__init__()
        if num_partitions <= 0:
            raise DataError(f"the number of partitions must be positive, found {num_partitions}")
        self._partition_by = partition_by
        self._num_partitions = num_partitions
        self._seed = seed
        self._shards: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        """Total number of partitions."""
        return self._num_partitions

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        """Load partition ``partition_id`` (0-based)."""
        _check_partition_id(partition_id, self._num_partitions)
        self._build()
        assert self._shards is not None
        return self.dataset.select(self._shards[partition_id])

    def _build(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class NaturalIdShardPartitioner(_ShardPartitioner):
    """One or several IID clients per distinct value of a column ("natural id").

    With ``G`` distinct values (sorted) and ``num_partitions = k * G``, partition ``p``
    holds shard ``p % k`` of value ``p // k``: a seeded random permutation of that
    value's rows cut into ``k`` near-equal shards. ``k = 1`` is flwr-datasets'
    ``NaturalIdPartitioner`` (same id order).

    Parameters
    ----------
    partition_by : str
        Column holding the natural id (e.g. ``source``).
    num_partitions : int
        Number of clients; a multiple of the number of distinct ids.
    seed : int
        Seed of the shuffle inside each natural group (``k > 1``).
    """

    def __init__(self, partition_by: str, num_partitions: int, seed: int) -> None:
        super().__init__(partition_by, num_partitions, seed)
        self._ids: list[Any] | None = None

    @property
    def partition_id_to_natural_id(self) -> dict[int, Any]:
        """Partition id -> the natural id (value of ``partition_by``) it holds."""
        self._build()
        assert self._ids is not None
        k = self._num_partitions // len(self._ids)
        return {p: self._ids[p // k] for p in range(self._num_partitions)}

    def _build(self) -> None:
        if self._shards is not None:
            return
        _require_column(self.dataset, self._partition_by)
        values = np.asarray(self.dataset[self._partition_by])
        ids = sorted(set(values.tolist()))
        groups, k = len(ids), self._num_partitions // max(len(ids), 1)
        if groups == 0 or self._num_partitions % groups != 0:
            raise DataError(
                f"natural partitioning by {self._partition_by!r} needs the number of "
                f"clients to be a multiple of its {groups} distinct values "
                f"({', '.join(map(str, ids[:20]))}), found {self._num_partitions} clients; "
                f"use {groups} (one client per value) or {2 * groups}, {3 * groups}, ... "
                "(several clients per value)")
        rng = np.random.default_rng(self._seed)
        shards: list[np.ndarray] = []
        for natural_id in ids:
            rows = np.flatnonzero(values == natural_id)
            if k > 1:
                rows = rng.permutation(rows)
            if len(rows) < k:
                raise DataError(f"value {natural_id!r} of {self._partition_by!r} has "
                                f"{len(rows)} rows, too few for {k} clients each; use "
                                "fewer clients")
            shards.extend(np.sort(s) for s in np.array_split(rows, k))
        self._ids, self._shards = ids, shards


class ClassShardPartitioner(_ShardPartitioner):
    """Each client holds the samples of ``classes_per_client`` classes.

    With ``C`` classes (the sorted distinct values of ``partition_by``), a seeded
    permutation ``order`` of them and ``k = classes_per_client``, client ``i`` holds the
    classes ``order[(i * k + j) % C]`` for ``j < k``: ``k`` distinct classes, and every
    class held by as many clients as any other, give or take one. Each class's rows,
    shuffled with the same seed, are cut into near-equal shards, one per client holding
    it (in client order), so every row belongs to exactly one client.

    Parameters
    ----------
    partition_by : str
        The label column.
    num_partitions : int
        Number of clients; at least ``ceil(C / k)`` so that every class is used.
    classes_per_client : int
        Classes per client, at most ``C``.
    seed : int
        Seed of the class assignment and of the shuffle inside each class.
    """

    def __init__(self, partition_by: str, num_partitions: int, classes_per_client: int,
                 seed: int) -> None:
        super().__init__(partition_by, num_partitions, seed)
        if classes_per_client <= 0:
            raise DataError("`data.classes-per-client` must be positive, found "
                            f"{classes_per_client}")
        self._k = classes_per_client
        self._classes: list[list[Any]] | None = None

    @property
    def partition_id_to_classes(self) -> dict[int, list[Any]]:
        """Partition id -> the classes (values of ``partition_by``) it holds."""
        self._build()
        assert self._classes is not None
        return dict(enumerate(self._classes))

    def _build(self) -> None:
        if self._shards is not None:
            return
        _require_column(self.dataset, self._partition_by)
        values = np.asarray(self.dataset.with_format("arrow")[self._partition_by].to_pylist())
        classes = sorted(set(values.tolist()))
        n_classes, k, clients = len(classes), self._k, self._num_partitions
        if k > n_classes:
            raise DataError(f"`data.classes-per-client`={k} but {self._partition_by!r} has only "
                            f"{n_classes} classes; set data.classes-per-client to at most "
                            f"{n_classes}")
        if clients * k < n_classes:
            need = -(-n_classes // k)
            raise DataError(f"{clients} clients x {k} classes each cover only {clients * k} of "
                            f"the {n_classes} classes of {self._partition_by!r}, so some "
                            f"samples would be used by no client; use at least {need} clients "
                            "or raise `data.classes-per-client`")
        rng = np.random.default_rng(self._seed)
        order = rng.permutation(n_classes)
        slots = [[int(order[(i * k + j) % n_classes]) for j in range(k)] for i in range(clients)]
        holders: dict[int, list[int]] = {c: [] for c in range(n_classes)}
        for client, held in enumerate(slots):
            for c in held:
                holders[c].append(client)
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for c in range(n_classes):
            rows = rng.permutation(np.flatnonzero(values == classes[c]))
            if len(rows) < len(holders[c]):
                raise DataError(f"class {classes[c]!r} of {self._partition_by!r} has "
                                f"{len(rows)} sample(s), too few for the {len(holders[c])} "
                                "clients holding it (every client must get samples of each of "
                                "its classes); use fewer clients or lower "
                                "`data.classes-per-client`")
            for client, shard in zip(holders[c], np.array_split(rows, len(holders[c]))):
                parts[client].append(shard)
        self._classes = [[classes[c] for c in sorted(held)] for held in slots]
        self._shards = [np.sort(np.concatenate(p)) for p in parts]


def make_partitioner(data_cfg: Any, num_partitions: int, seed: int, *,
                     min_partition_size: int = MIN_PARTITION_SIZE) -> Partitioner:
    """Build the partitioner named by ``data_cfg.partitioner``.

    Assign the train set with ``partitioner.dataset = train`` before calling
    ``load_partition``.

    Parameters
    ----------
    data_cfg : DataConfig
        Uses ``partitioner``, ``alpha``, ``partition_by`` and ``classes_per_client``.
    num_partitions : int
        Number of clients.
    seed : int
        Seed of the random split.
    min_partition_size : int
        Fewest examples a Dirichlet client may get (redrawn up to 10 times otherwise).
    """
    if num_partitions <= 0:
        raise DataError(f"the number of clients must be positive, found {num_partitions}")
    if data_cfg.partitioner == "iid":
        return ShuffledIidPartitioner(num_partitions, seed)
    if data_cfg.partitioner == "dirichlet":
        return _DirichletPartitioner(
            num_partitions=num_partitions, partition_by=data_cfg.partition_by,
            alpha=float(data_cfg.alpha), min_partition_size=min_partition_size, seed=seed)
    if data_cfg.partitioner == "natural":
        return NaturalIdShardPartitioner(data_cfg.partition_by, num_partitions, seed)
    if data_cfg.partitioner == "classes":
        return ClassShardPartitioner(data_cfg.partition_by, num_partitions,
                                     int(data_cfg.classes_per_client), seed)
    raise DataError(f"`data.partitioner`: unknown partitioner {data_cfg.partitioner!r}; "
                    "choose one of iid, dirichlet, natural, classes")


def assigned_partitioner(data_cfg: Any, train: datasets.Dataset, num_partitions: int,
                         seed: int) -> Partitioner:
    """The partitioner ``data_cfg`` names, over ``train``: its ``load_partition(i)`` is
    :func:`load_partition` of client ``i``, for every ``i`` (the split is computed on the
    first call, then only looked up: keep one for all the clients of a run).

    For small train sets the Dirichlet minimum client size drops below
    :data:`MIN_PARTITION_SIZE` (to a twentieth of the average client size, at least 1) so
    that a draw stays possible.
    """
    min_size = max(1, min(MIN_PARTITION_SIZE, len(train) // (20 * num_partitions)))
    partitioner = make_partitioner(data_cfg, num_partitions, seed, min_partition_size=min_size)
    partitioner.dataset = train
    return partitioner


def load_partition(data_cfg: Any, train: datasets.Dataset, partition_id: int,
                   num_partitions: int, seed: int) -> datasets.Dataset:
    """The train examples of client ``partition_id`` out of ``num_partitions``.

    Deterministic in (``train``, ``num_partitions``, ``seed``); see
    :func:`assigned_partitioner`.
    """
    _check_partition_id(partition_id, num_partitions)
    return assigned_partitioner(data_cfg, train, num_partitions, seed).load_partition(
        partition_id)


def _check_partition_id(partition_id: int, num_partitions: int) -> None:
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition id {partition_id} is out of range for {num_partitions} "
                        f"clients; expected 0..{num_partitions - 1}")


def _require_column(ds: datasets.Dataset, column: str) -> None:
    if column not in ds.column_names:
        raise DataError(f"cannot partition by {column!r}: the train set has no such column "
                        f"(found {', '.join(map(repr, ds.column_names))}); set "
                        "`data.partition-by`")
