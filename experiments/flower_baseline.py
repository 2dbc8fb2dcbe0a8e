"""Plain Flower FedAvg on scikit-learn's digits: the baseline of ``experiments/scale.py``.

No fedsplit code is on this app's path: the model, the data and its partitioning are
written here in plain torch, numpy and scikit-learn, laid out as Flower's
quickstart-pytorch example lays out an app (a ClientApp that trains the received model on
its partition, a ServerApp running ``flwr.serverapp.strategy.FedAvg`` with a centralized
``evaluate_fn``). It trains what fedsplit's default config trains:

* model: fedsplit's ``cnn-digits`` (the same four blocks, unsplit);
* data: the digits scaled to [0, 1], a stratified held-out 20 % (``random_state`` = seed),
  the train set split IID over the clients as fedsplit's ``iid`` partitioner splits it
  (near-equal slices of one seeded permutation, each in dataset order);
* local work: one epoch, batches of 32, SGD (lr 0.05, momentum 0.9), the whole client
  model on the client (no split, no channel);
* rounds: ``fraction`` of the nodes sampled uniformly, FedAvg weighted by examples, the
  global model evaluated on the held-out set after every round.

As in Flower's example, a process loads the data set once (the clients' process keeps
it between messages); each message builds its model, takes its partition and trains.

The ServerApp appends one JSON line per round to ``out``: round, accuracy, loss and
``time`` (Unix seconds when the round's evaluation ended), as fedsplit's metrics.jsonl.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn

TEST_FRACTION = 0.2


def digits_cnn(num_labels: int = 10) -> nn.Sequential:
    """The digits CNN (fedsplit's ``cnn-digits``, written out again)."""
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU()),  # (B, 16, 8, 8)
        nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),  # (B, 32, 4, 4)
        nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU()),  # (B, 64)
        nn.Linear(64, num_labels),  # (B, num_labels)
    )


@functools.lru_cache(maxsize=2)
def digits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: images (N, 1, 8, 8) in [0, 1], labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    train, test = train_test_split(np.arange(len(labels)), test_size=TEST_FRACTION,
                                   random_state=seed, stratify=labels)
    train, test = np.sort(train), np.sort(test)
    return images[train], labels[train], images[test], labels[test]


def partition(n: int, partition_id: int, num_partitions: int, seed: int) -> np.ndarray:
    """Row indices of one IID partition: a slice of a seeded permutation, sorted."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(np.array_split(perm, num_partitions)[partition_id])


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model for one epoch on this node's partition."""
    config = msg.content["config"]
    seed, pid = int(config["seed"]), int(context.node_config["partition-id"])
    x_train, y_train, _, _ = digits(seed)
    rows = partition(len(y_train), pid, int(context.node_config["num-partitions"]), seed)
    x, y = torch.from_numpy(x_train[rows]), torch.from_numpy(y_train[rows])

    model = digits_cnn()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=float(config["lr"]),
                                momentum=float(config["momentum"]))
    batch = int(config["batch-size"])
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + pid))
    model.train()
    loss_sum = 0.0
    for start in range(0, len(y), batch):
        idx = order[start:start + batch]
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach()) * len(idx)
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"train-loss": loss_sum / max(len(y), 1),
                                 "num-examples": len(y)}),
    })
    return Message(content=content, reply_to=msg)


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Accuracy and mean loss of ``model`` on ``(x, y)``."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x))  # (N, 10)
        targets = torch.from_numpy(y)
        loss = float(nn.functional.cross_entropy(logits, targets))
        accuracy = float((logits.argmax(1) == targets).float().mean())
    return accuracy, loss


def make_server_app(out: str | Path, rounds: int, fraction: float, min_clients: int,
                    seed: int = 0) -> ServerApp:
    """A ServerApp running ``rounds`` of FedAvg, one JSON line per round into ``out``."""
    server_app = ServerApp()
    out = Path(out)

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(seed)
        model = digits_cnn()
        _, _, x_test, y_test = digits(seed)
        strategy = FedAvg(fraction_train=fraction, fraction_evaluate=0.0,
                          min_train_nodes=min_clients, min_available_nodes=min_clients)
        out.write_text("")

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            accuracy, loss = evaluate(model, x_test, y_test)
            row = {"round": server_round, "accuracy": accuracy, "loss": loss,
                   "time": time.time()}
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            return MetricRecord({"accuracy": accuracy, "loss": loss})

        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                       num_rounds=rounds,
                       train_config=ConfigRecord({"lr": 0.05, "momentum": 0.9,
                                                  "batch-size": 32, "seed": seed}),
                       evaluate_fn=evaluate_fn)

    return server_app
