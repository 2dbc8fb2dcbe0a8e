"""The server side of a run: global split model, split channel, strategy, output."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid
from omegaconf import DictConfig, OmegaConf

from fedsplit.channel import SplitChannelServer
from fedsplit.metrics import RunWriter
from fedsplit.models import build_model
from fedsplit.runtime import (
    default_num_threads,
    resolve_device,
    seed_everything,
    to_device,
    torch_threads,
)
from fedsplit.server import checkpoint
from fedsplit.server.trainer import ServerTrainer
from fedsplit.split.layout import client_layout
from fedsplit.prepare import prepare_run
from fedsplit.privacy.accounting import round_metrics as privacy_round_metrics
from fedsplit.tasks import evaluate
from fedsplit.tasks.evaluate import reusable_batches

# ``build_strategy(channel, cfg)``: the composition root (fedsplit.server_app) passes the
# strategy factory, so this library module imports no app.
StrategyFactory = Callable[[SplitChannelServer, DictConfig], Any]

log = logging.getLogger("fedsplit")


def channel_credentials(channel_cfg: Any) -> grpc.ServerCredentials | None:
    """TLS credentials for the split channel when ``channel.tls-cert``/``tls-key`` are set."""
    if not channel_cfg.tls_cert and not channel_cfg.tls_key:
        return None
    if not (channel_cfg.tls_cert and channel_cfg.tls_key):
        raise ValueError("set both channel.tls-cert and channel.tls-key to serve TLS "
                         "(or neither for plain loopback simulation)")
    key = Path(channel_cfg.tls_key).expanduser().read_bytes()
    cert = Path(channel_cfg.tls_cert).expanduser().read_bytes()
    return grpc.ssl_server_credentials([(key, cert)])


def serve(grid: Grid, cfg: DictConfig, build_strategy: StrategyFactory) -> RunWriter:
    """Run ``cfg.train.rounds`` rounds of split federated learning over ``grid``.

    ``build_strategy(channel, cfg)`` returns the run's strategy (a ``SplitFedAvg``);
    :mod:`fedsplit.server_app` passes :func:`strategies.build_strategy` for the strategy
    ``strategy.name`` names.

    The server's thread count is set for the run (``run.num-threads``, else
    :func:`default_num_threads`), never inherited: CPU matmuls and reductions round
    differently with another count, so a run served in a process that some earlier code
    left at another count (``simulate`` in a test process, after an in-process benchmark
    set one thread) would not repeat a fresh process's run, or its resume, bit for bit.
    """
    with torch_threads(cfg.run.num_threads or default_num_threads()):
        return _serve(grid, cfg, build_strategy)


def _serve(grid: Grid, cfg: DictConfig, build_strategy: StrategyFactory) -> RunWriter:
    cfg, task, train_set, test_set = prepare_run(cfg)
    seed_everything(cfg.run.seed)
    device = resolve_device(cfg.run.device)
    # The global model, and the modules each side trains for any cut and mode.
    layout = client_layout(build_model(cfg.model, pretrained=True), cfg)
    layout.root.to(device)
    split = layout.split(cfg.model.cut)
    encoded_test = task.encode(test_set)
    test_loader = reusable_batches(task.loader(encoded_test, cfg.eval.batch_size,
                                               shuffle=False))
    trainer = ServerTrainer(split.server, cfg.train, task.objective, layout=layout,
                            batch_clients=cfg.server.batch_clients)
    # One real batch of the training batch size: the strategy's probe (aux-head sizes,
    # frame bytes), and, at every cut, what the channel should expect activations to look like.
    sample_batch = to_device(
        next(iter(task.loader(encoded_test, cfg.train.batch_size, shuffle=False))), device)
    # The probes run the global model in training mode (as a client will; its dropout
    # draws are part of the run's random stream) but must not change it: BatchNorm
    # statistics and counters are put back.
    untouched = {k: v.clone() for k, v in layout.root.state_dict().items()}
    with torch.no_grad():
        for cut in layout.cuts:
            probe = layout.split(cut).client({k: v[:2] for k, v in sample_batch.items()})
            trainer.expect_like(probe.hidden, variable_length="attention_mask" in probe.side,
                                cut=cut)
        layout.root.load_state_dict(untouched)
    del untouched  # a whole copy of the model's weights (540 MB for SmolLM2-135M)
    writer = RunWriter(cfg, resume=cfg.run.resume)
    log.info("fedsplit run directory: %s", writer.dir)
    writer.write_classes(train_set, cfg.data.label_column)
    initial = ArrayRecord({k: v.cpu() for k, v in split.client.state_dict().items()})
    start_round, saved = 1, None
    if cfg.run.resume:
        saved = checkpoint.load(writer.dir)
        start_round = saved["round"] + 1
        initial = ArrayRecord(saved["client_segment"])
        trainer.load_state_dict(saved["server_trainer"])
        writer.restore(saved["metrics"], saved["round"])
        log.info("resuming %s after round %d", writer.dir, saved["round"])
        threads = saved.get("num_threads")
        if threads is not None and threads != torch.get_num_threads():
            log.warning("the interrupted run trained with %d torch threads, this one with %d: "
                        "the remaining rounds will not repeat it bit for bit (set "
                        "run.num-threads=%d to match)", threads, torch.get_num_threads(),
                        threads)

    codec_up = OmegaConf.to_container(cfg.codec, resolve=True)["up"]
    codec_down = OmegaConf.to_container(cfg.codec, resolve=True)["down"]
    with SplitChannelServer(trainer, cfg.channel, codec_up, codec_down,
                            credentials=channel_credentials(cfg.channel)) as channel:
        strategy = build_strategy(channel, cfg)
        strategy.setup(layout, sample_batch)
        if saved is not None:
            strategy.load_state_dict(saved["strategy"])
            checkpoint.set_rng_state(saved["rng"])

        def on_round_end(server_round: int, arrays: ArrayRecord) -> None:
            if cfg.run.checkpoint:
                checkpoint.save(writer.dir, {
                    "round": server_round, "client_segment": arrays.to_torch_state_dict(),
                    "server_trainer": trainer.state_dict(), "strategy": strategy.state_dict(),
                    "metrics": writer.rows, "rng": checkpoint.rng_state(),
                    "num_threads": torch.get_num_threads()})

        scorer = task.held_out_scorer(test_set)  # e.g. generation + BLEU (causal-lm)

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0:
                return None  # no round-0 evaluation: the plot starts at round 1
            stats = strategy.rounds[server_round]
            row: dict[str, Any] = {"round": server_round, "accuracy": None, "loss": None}
            last = server_round == cfg.train.rounds
            if server_round % cfg.eval.every == 0 or last:
                split.client.load_state_dict(arrays.to_torch_state_dict())
                row.update(strategy.evaluate_round(server_round, split, test_loader))
                every = cfg.eval.generate_every
                if scorer is not None and (last or (every and server_round % every == 0)):
                    row.update(scorer(split))
                if cfg.eval.through_codec:  # split inference: activations cross codec.up
                    inferred = evaluate(split, test_loader, task.objective, up_codec=codec_up,
                                        seed=cfg.run.seed)
                    row["eval_bytes_up"] = inferred.pop("bytes_up")
                    inferred.pop("examples", None)  # the same test set
                    row.update({f"codec_{k}": v for k, v in inferred.items()})  # + perplexity
            seconds = time.monotonic() - stats.started
            row.update({
                "bytes_up": stats.cut_bytes_up + stats.sync_bytes_up,
                "bytes_down": stats.cut_bytes_down + stats.sync_bytes_down,
                "seconds": seconds,
                "train_seconds": stats.trained - stats.started,
                "time": time.time(),  # when the round ended (wall clock, Unix seconds)
                "examples": stats.examples,
                "cut_bytes_up": stats.cut_bytes_up,
                "cut_bytes_down": stats.cut_bytes_down,
                "sync_bytes_up": stats.sync_bytes_up,
                "sync_bytes_down": stats.sync_bytes_down,
                "client_cut_bytes_up": stats.client_cut_bytes_up,
                "client_cut_bytes_down": stats.client_cut_bytes_down,
                "clients": len(stats.clients),
                "failures": stats.failures,
                "train_loss": stats.train_metrics.get("train-loss"),
                "train_accuracy": stats.train_metrics.get("train-accuracy"),
                "client_seconds_per_batch": stats.train_metrics.get("client-seconds-per-batch"),
                "server_seconds_per_batch": stats.server_seconds_per_batch,
                "batches": sum(t.steps for t in stats.traffic.values()),
                **stats.server_metrics,
                **strategy.round_metrics(server_round),
                **privacy_round_metrics(stats.clients_metrics),  # DP epsilon
            })
            writer.add(row, clients=[{"round": server_round, **m} for m in stats.clients_metrics])
            acc = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.2f}%"
            loss = "-" if row["loss"] is None else f"{row['loss']:.4f}"
            print(f"[fedsplit] round {server_round}/{cfg.train.rounds}  accuracy {acc}  "
                  f"loss {loss}  bytes up {row['bytes_up']:,}  bytes down {row['bytes_down']:,}"
                  f"  {seconds:.1f}s", flush=True)
            return MetricRecord({k: float(v) for k, v in row.items()
                                 if isinstance(v, (int, float)) and v is not None})

        strategy.start(grid, initial, num_rounds=cfg.train.rounds,
                       timeout=cfg.train.round_timeout, evaluate_fn=evaluate_fn,
                       start_round=start_round, on_round_end=on_round_end)
    writer.close()
    return writer
