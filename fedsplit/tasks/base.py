"""The task seam: what a batch is and how it is scored.

A :class:`Task` couples a run's data with an :class:`Objective`:

* the data side (load, partition, encode, batch) is delegated to an *input kind*
  (:mod:`fedsplit.tasks.inputs`: text, image or array), chosen from the data itself;
* the :class:`Objective` says which entry of a batch is the target, checks targets that
  arrive at the server, computes the loss and counts correct predictions.

The server trainer, the training modes' client loops and evaluation only talk to the
objective; nothing outside ``fedsplit/tasks/`` knows whether a target is a class id or
a token sequence. A new task (e.g. causal language modelling) registers a ``Task``
subclass in :data:`TASKS` with its own objective and inputs::

    @TASKS.register("my-task")
    class MyTask(Task):
        def make_objective(self) -> Objective: ...
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from fedsplit.registry import Registry

TARGET_KEY = "labels"  # the batch entry that holds the targets


class TargetError(ValueError):
    """Targets do not fit the task (shape, dtype, range); the message says what and how."""


class Objective(ABC):
    """How one task scores model outputs. Shared by server, clients and evaluation."""

    key: ClassVar[str] = TARGET_KEY

    def targets(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The batch's targets (what plain split learning sends to the server)."""
        return batch[self.key]

    @abstractmethod
    def loss(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss of ``output`` (the model's last layer) against ``targets``."""

    @abstractmethod
    def correct(self, output: torch.Tensor, targets: torch.Tensor) -> int:
        """How many scored units (samples, tokens) ``output`` predicts right."""

    def count(self, targets: torch.Tensor) -> int:
        """How many scored units ``targets`` holds (the denominator of accuracy)."""
        return int(targets.shape[0])

    @abstractmethod
    def check(self, targets: torch.Tensor, batch_size: int) -> None:
        """Raise :class:`TargetError` unless ``targets`` fit a batch of ``batch_size``
        (the server calls this on every batch a client sends)."""

    def metrics(self, summary: Mapping[str, float]) -> dict[str, float]:
        """Held-out metrics derived from evaluation's ``summary`` (``accuracy``, ``loss``
        per scored unit, ``examples`` = scored units), added to it and to the run's
        ``metrics.jsonl`` (e.g. the causal-LM task's ``perplexity``); none by default."""
        del summary
        return {}


class Task:
    """Data and objective of a run, built from its resolved config.

    Shared by the ServerApp (global model, held-out test set) and the ClientApp (client
    segment, training partition), so both sides build exactly the same thing.
    """

    name: ClassVar[str] = ""
    # The strategy a config that names none (``strategy.name`` empty) runs.
    default_strategy: ClassVar[str] = "sflv1"
    # What a mode that sends the targets to the server gives away beyond the targets
    # themselves ("" = nothing more); a strategy of such a mode warns with it.
    targets_reveal: ClassVar[str] = ""
    # Config keys only this task reads (``section.key``): another task refuses them when
    # they are set, so that a key given to the wrong task fails instead of being ignored.
    own_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.objective = self.make_objective()
        self._inputs: Any = None

    def targets_leak(self, mode: Any) -> str:
        """A warning when clients of training ``mode`` (a :class:`fedsplit.modes.Mode`)
        give away more than labels by sending their targets; ``""`` when they do not."""
        if not (self.targets_reveal and mode.sends_targets):
            return ""
        return (f"clients in mode {mode.name!r} send their targets to the server, and for "
                f"task {self.name!r} {self.targets_reveal}; strategy.name=u-shaped keeps the "
                "targets and the loss on the clients")

    def make_objective(self) -> Objective:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def config_problems(cls, flat: Mapping[str, Any]) -> list[str]:
        """Problems of the flat config ``flat`` (``{"section.key": value}``) for this task,
        each naming the key and the fix (run with the other config checks); none here."""
        del flat
        return []

    # ------------------------------------------------------------------ model
    def split(self, pretrained: bool = True) -> Any:
        """The model ``model`` describes, split at ``model.cut`` (``SplitModel``)."""
        from fedsplit.split.layout import client_layout
        from fedsplit.models import build_model

        layout = client_layout(build_model(self.cfg.model, pretrained=pretrained), self.cfg)
        return layout.split(self.cfg.model.cut)

    # ------------------------------------------------------------------ data
    @property
    def inputs(self) -> Any:
        """The input kind (text / image / array); known once a dataset was seen."""
        if self._inputs is None:
            raise RuntimeError("the task's input kind is chosen from the data: call "
                               "datasets() or attach(dataset) first")
        return self._inputs

    def attach(self, ds: Any) -> None:
        """Choose the input kind from ``ds`` (a raw dataset of this run)."""
        if self._inputs is None:
            self._inputs = self.make_inputs(ds)

    def make_inputs(self, ds: Any) -> Any:
        """The input kind of the raw dataset ``ds``: by default chosen from the data
        (:func:`fedsplit.tasks.inputs.inputs_for`); a task with its own kind overrides."""
        from fedsplit.tasks.inputs import inputs_for

        return inputs_for(ds, self.cfg)

    def load_splits(self) -> tuple[Any, Any]:
        """The raw (train, test) sets as configured, not yet checked (see :meth:`datasets`)."""
        from fedsplit.data import load_splits

        return load_splits(self.cfg.data, seed=self.cfg.run.seed)

    def check_split(self, ds: Any) -> None:
        """Raise ``DataError`` unless the raw split ``ds`` fits the task (classification:
        labels in ``[0, model.num-labels)``); the pre-flight check reports it per split."""
        from fedsplit.data import check_labels

        check_labels(ds, self.cfg.data.label_column, self.cfg.model.num_labels)

    def datasets(self) -> tuple[Any, Any]:
        """The raw (train, test) sets, each checked by :meth:`check_split`."""
        train, test = self.load_splits()
        for ds in (train, test):
            self.check_split(ds)
        self.attach(train)
        return train, test

    def partitioner(self, train: Any, num_partitions: int) -> Any:
        """How the (raw) training set is split over ``num_partitions`` clients: an object
        whose ``load_partition(i)`` is client ``i``'s share. A ClientApp worker keeps one
        per run for all the clients it serves, so a task that partitions its own way
        overrides this, not :meth:`partition`."""
        from fedsplit.data import assigned_partitioner

        return assigned_partitioner(self.cfg.data, train, num_partitions,
                                    seed=self.cfg.run.seed)

    def partition(self, train: Any, partition_id: int, num_partitions: int) -> Any:
        """This client's share of the (raw, not yet encoded) training set."""
        return self.partitioner(train, num_partitions).load_partition(partition_id)

    def encode(self, ds: Any) -> Any:
        """Model-ready rows (tokenized text, decoded images); raw rows of one split."""
        self.attach(ds)
        return self.inputs.encode(ds)

    def select(self, encoded: Any, indices: Any) -> Any:
        """The rows ``indices`` (in that order, repeats allowed) of an encoded set."""
        return self.inputs.select(encoded, indices)

    def loader(self, ds: Any, batch_size: int, shuffle: bool, seed: int = 0,
               augment_seed: int | None = None) -> Any:
        """Batches of an encoded set: dicts of tensors with the objective's target key.

        ``augment_seed`` (training batches only): seed of the train-time augmentation
        (images); ``None`` gives unaugmented batches, as evaluation needs.
        """
        return self.inputs.loader(ds, batch_size=batch_size, shuffle=shuffle, seed=seed,
                                  augment_seed=augment_seed)

    @property
    def tokenizer(self) -> Any:
        """The text tokenizer (``None`` for other inputs)."""
        return getattr(self.inputs, "tokenizer", None)

    def held_out_scorer(self, test: Any) -> Callable[[Any], dict[str, float]] | None:
        """Extra held-out scores of the global split model beyond loss and accuracy (e.g.
        generation scored with BLEU), as a function of the ``SplitModel``, built once
        from the raw test split; ``None`` (the default) when the task has none. The
        ServerApp calls it at the rounds ``eval.generate-every`` names and the last."""
        del test
        return None

    def prepare_config(self, train: Any) -> dict[str, Any]:
        """Settings the server derives from the whole training set once and ships to
        every client in the run config (e.g. measured image normalization), as flat
        ``{"section.key": value}`` overrides; ``{}`` when there are none."""
        self.attach(train)
        return self.inputs.prepare_config(train)


TASKS: Registry[type[Task]] = Registry("task")


def task_problems(flat: Mapping[str, Any]) -> list[str]:
    """Config problems of ``task.name`` (:meth:`Task.config_problems`), and keys owned by
    another task (:attr:`Task.own_keys`) set away from their defaults."""
    from fedsplit.config.schema import default_flat

    name = flat["task.name"]
    if name not in TASKS:
        return [f"`task.name`: unknown task {name!r}; registered: {', '.join(TASKS.names())}"]
    task = TASKS.get(name)
    defaults = default_flat()
    problems = [f"`{key}` is read only by task.name={other}; set task.name={other} or remove "
                f"`{key}`"
                for other in TASKS.names() if TASKS.get(other) is not task
                for key in TASKS.get(other).own_keys
                if key not in task.own_keys and flat.get(key, defaults[key]) != defaults[key]]
    return problems + task.config_problems(flat)


def build_task(cfg: Any) -> Task:
    """The task ``task.name`` names, over the resolved config ``cfg``."""
    return TASKS.get(cfg.task.name)(cfg)
