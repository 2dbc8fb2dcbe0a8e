"""The fedsplit ClientApp: one Flower train message = one client's whole local round.

The message carries the part of the global model this client trains, its plan (cut and
training mode: split, local-loss, u-shaped or full), the resolved run config with this
client's overrides, the split channel's address and this client's token and seed. The
client loads its data partition, trains (against the channel, or alone in ``full``
mode), and replies with what it trained and its metrics.

What is the same for every message of a run (the parsed config, the raw train set and
its partitions, the task with its tokenizer, the built model) is kept by this worker
process between messages (:mod:`clients.cache`), so a message does only its own work.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import cache
from clients.lightweight import SegmentCompression
from clients.memory import MemoryMeter
from clients.trainer import Cursor, schedule, with_sample_ids
from fedsplit.channel import SplitChannelClient
from fedsplit.channel.client import open_channel
from fedsplit.config import load_config
from fedsplit.deploy.data import NODE_DATA_PATH, load_device_partition
from fedsplit.models import build_model
from fedsplit.modes import AuxHead, LoopHooks
from fedsplit.optim import make_optimizer, run_progress, set_lr
from fedsplit.protocol import (
    KEY_ADDRESS,
    KEY_CLIENT,
    KEY_CODECS,
    KEY_CURSOR,
    KEY_DEVICE,
    KEY_FROZEN_DIGEST,
    KEY_OVERRIDES,
    KEY_NUM_EXAMPLES,
    KEY_PARTITION,
    KEY_PLAN,
    KEY_ROUND,
    KEY_RUN_CONFIG,
    KEY_SEED,
    KEY_TOKEN,
    array_record_bytes,
)
from fedsplit.privacy import ClientPrivacy
from fedsplit.pruning import token_counts, token_embedding
from fedsplit.runtime import resolve_device
from fedsplit.split.layout import ClientPlan, ModelLayout, client_layout
from fedsplit.split.norm import load_norm_state, norm_state
from fedsplit.sync import BASE_MISMATCH, decode_global, load_segment
from fedsplit.trainable import apply_trainable, freezes_base
from fedsplit.tasks import Task, build_task

# Config sections only the server reads: a client need not have the strategy's code
# (a user's `package.module:Class`) or the fleet's profile file.
SERVER_SECTIONS = ("strategy.", "fleet.")

NORM_STATE = "fedsplit-batch-norm"  # context.state record of model.batch-norm=local

app = ClientApp()


def partition_of(context: Context) -> tuple[int, int]:
    """(partition id, number of partitions) from the node config."""
    node = context.node_config
    try:
        return int(node["partition-id"]), int(node["num-partitions"])
    except KeyError:
        raise KeyError(
            "node config needs `partition-id` and `num-partitions` (the simulation sets "
            "them; for a real SuperNode pass --node-config \"partition-id=0 num-partitions=2\")"
        ) from None


RunKey = tuple[int, str]


def client_partition(task: Task, context: Context, run: RunKey) -> Any:
    """This node's raw training data (kept per run, data config and partition).

    Deployment: node config ``data-path`` names a partition written by
    ``fedsplit-deploy prepare-data`` and copied to the device; it is loaded as it is
    (the device never sees the rest of the train set).
    Simulation: partition ``partition-id`` of ``num-partitions`` of the configured train
    set (node config set by the simulation).
    """
    cfg, kept = task.cfg, cache.CACHE
    data_path = str(context.node_config.get(NODE_DATA_PATH, "") or "")
    if data_path:
        return kept.partitions.get((run, "device", data_path, cache.digest(cfg.data)),
                                   lambda: load_device_partition(data_path, cfg))
    pid, num_partitions = partition_of(context)
    # What Task.datasets/partition read: the data and task sections, seed, label count.
    data_key = (run, type(task).__name__, cache.digest(cfg.data), cache.digest(cfg.task),
                cfg.run.seed, cfg.model.num_labels)
    train_set = kept.train_sets.get(data_key, lambda: task.datasets()[0])
    task.attach(train_set)

    def split() -> Any:  # the split over all clients, computed once (then only read)
        partitioner = task.partitioner(train_set, num_partitions)
        partitioner.load_partition(0)
        return partitioner

    partitioner = kept.partitioners.get((data_key, num_partitions), split)
    return kept.partitions.get((data_key, pid, num_partitions),
                               lambda: partitioner.load_partition(pid))


def build_layout(cfg: Any) -> ModelLayout:
    """The model ``model`` describes and its layout, weights to be loaded. Built outside
    the client's random stream: a message's dropout draws must not depend on whether
    this worker had the model already.

    A run that freezes parameters (``lora``, ``train.trainable``) builds the pre-trained
    weights here, seeded as the server seeds its build, because frozen parameters are not
    sent (the server sends their digest; see :func:`fedsplit.sync.load_segment`)."""
    with torch.random.fork_rng(devices=[]):
        frozen = freezes_base(cfg)
        if frozen:
            torch.manual_seed(cfg.run.seed)  # as fedsplit.server.app seeds its build
        return client_layout(build_model(cfg.model, pretrained=frozen), cfg)


def root_certificates(cfg: Any, context: Context) -> bytes | None:
    """CA certificate to verify a TLS split channel (node config wins over run config)."""
    path = str(context.node_config.get("root-certificates", "") or cfg.channel.root_cert)
    return Path(path).expanduser().read_bytes() if path else None


def client_key(context: Context) -> str:
    """A stable name for this client: node config `name`, else its partition id."""
    node = context.node_config
    return str(node.get("name") or f"partition-{node.get('partition-id', 0)}")


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server who this client is (asked once per run, see SplitFedAvg.discover):
    its stable key, its device kind (node config ``device-profile``) and partition id."""
    node = context.node_config
    info = ConfigRecord({KEY_CLIENT: client_key(context),
                         KEY_DEVICE: str(node.get("device-profile", "") or ""),
                         KEY_PARTITION: int(node.get("partition-id", -1))})
    return Message(content=RecordDict({"info": info}), reply_to=msg)


def augment_seed(run_seed: int, partition_id: int, server_round: int) -> int:
    """Seed of this client's train-time augmentation this round (a rerun repeats it)."""
    return (run_seed * 1_000_003 + partition_id) * 1_000_033 + server_round


def round_config(config: ConfigRecord) -> tuple[Any, ClientPlan]:
    """This client's run config (the run's, minus server-only sections, plus its own
    overrides and its plan's cut) and its plan."""
    flat = {k: v for k, v in json.loads(str(config[KEY_RUN_CONFIG])).items()
            if not k.startswith(SERVER_SECTIONS)}
    flat.update(json.loads(str(config.get(KEY_OVERRIDES, "{}"))))
    if KEY_PLAN in config:
        plan = ClientPlan.from_json(str(config[KEY_PLAN]))
    else:  # a server from before plans: split training at the run's cut
        plan = ClientPlan(int(flat.get("model.cut", 2)))
    flat["model.cut"] = plan.cut
    return load_config(overrides=flat), plan


def config_key(config: ConfigRecord, run: RunKey) -> tuple[Any, ...]:
    """What :func:`round_config` depends on: the run (its config), the client's overrides
    and its plan."""
    return (run, cache.digest(str(config.get(KEY_OVERRIDES, "{}"))),
            str(config.get(KEY_PLAN, "")))


@app.train()
def train(msg: Message, context: Context) -> Message:
    start = time.perf_counter()
    config = msg.content["config"]
    run = cache.run_key(context.run_id, str(config[KEY_RUN_CONFIG]))
    key, kept = config_key(config, run), cache.CACHE
    cfg, plan = kept.configs.get(key, lambda: round_config(config))
    with ExitStack() as lent:  # this message's own task and model, given back on success
        task = lent.enter_context(kept.tasks.borrow(key, lambda: build_task(cfg)))
        layout = lent.enter_context(kept.layouts.borrow(
            (run, cache.digest(cfg.model), cache.digest(cfg.lora), freezes_base(cfg)),
            lambda: build_layout(cfg)))
        reply = train_round(msg, context, cfg, plan, task, layout, run, start)
        layout.root.zero_grad(set_to_none=True)  # an idle model keeps no gradients
        return reply


def train_round(msg: Message, context: Context, cfg: Any, plan: ClientPlan, task: Task,
                layout: ModelLayout, run: RunKey, start: float) -> Message:
    """One local round: load the sent weights into ``layout``'s model, train this round's
    samples of the partition, reply with the trained segment and the metrics."""
    config = msg.content["config"]
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    pid = int(context.node_config.get("partition-id", 0))
    server_round = int(config[KEY_ROUND])

    torch.manual_seed(int(config[KEY_SEED]))  # client-side dropout repeats in a rerun
    device = resolve_device(cfg.run.device)
    part = client_partition(task, context, run)
    reference = decode_global(msg.content["arrays"])  # exactly what the server sent
    mode = plan.kind
    aux = AuxHead.from_state(reference, "aux.") if mode.needs_aux() else None
    held = layout.client_module(plan, aux)  # what this client trains under its plan
    if freezes_base(cfg):  # this client's own train.trainable (a shared model: every time)
        apply_trainable(layout.root, cfg)
    problem = load_segment(held, reference, str(config.get(KEY_FROZEN_DIGEST, "")))
    if problem is not None:  # frozen weights differ: train nothing, ask for the full segment
        metrics = {KEY_NUM_EXAMPLES: 0, BASE_MISMATCH: 1,
                   "sync-bytes-down": array_record_bytes(msg.content["arrays"])}
        content = RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord(metrics)})
        print(f"[fedsplit] client {pid}: {problem}; asking for the full segment", flush=True)
        return Message(content=content, reply_to=msg)
    local_norm = cfg.model.batch_norm == "local"  # FedBN: this client's own BatchNorm layers
    if local_norm and NORM_STATE in context.state:
        load_norm_state(held, context.state[NORM_STATE].to_torch_state_dict())
    light = SegmentCompression(cfg, server_round, pid, context.node_config)
    counts = None
    if light.needs_token_counts:  # usage-aware pruning: the whole partition's tokens, locally
        vocab = token_embedding(held)[1].num_embeddings
        counts = token_counts(task.loader(task.encode(part), 256, shuffle=False), vocab)
    segment = light.prepare(held, counts)  # pruned / smaller / fake-quantized this round

    # The server tracks how many samples this client consumed (it survives restarts).
    consumed = int(config.get(KEY_CURSOR, 0))
    cursor = Cursor(consumed // len(part), consumed % len(part)) if len(part) else Cursor()
    index_batches, _ = schedule(len(part), cfg.train.batch_size, cfg.train.local_steps,
                                cfg.train.local_epochs, cursor, seed=cfg.run.seed * 1_000_003 + pid)
    flat = [int(i) for b in index_batches for i in b]
    # Encode only this round's samples (tokenizing the whole partition would be wasted).
    loader = with_sample_ids(
        task.loader(task.encode(part.select(flat)), cfg.train.batch_size, shuffle=False,
                    augment_seed=augment_seed(cfg.run.seed, pid, server_round)),
        flat)  # ids: indices in the partition, the same every round (for `delta`)
    setup_seconds = time.perf_counter() - start

    segment.to(device)
    optimizer = make_optimizer(segment.parameters(), cfg.train)
    light.attach(segment, optimizer)
    meter = MemoryMeter(segment, optimizer)
    privacy = ClientPrivacy(cfg, segment, plan.uses_channel)  # NoPeek, DP
    loader = privacy.relabel(loader, context.state)  # label DP
    channel = None
    if plan.uses_channel:
        codec_up, codec_down = json.loads(str(config[KEY_CODECS]))
        address, certs = str(config[KEY_ADDRESS]), root_certificates(cfg, context)
        connection = cache.CACHE.channels.get(  # one connection per run and server
            (run, address, cache.digest(certs.hex() if certs else ""),
             cfg.channel.max_message_mb),
            lambda: open_channel(address, cfg.channel.max_message_mb, certs))
        channel = SplitChannelClient(address, str(config[KEY_TOKEN]), int(config[KEY_SEED]),
                                     codec_up, codec_down, channel=connection)
        channel = privacy.wrap(channel)  # DP on the cut activations
    progress = None
    if cfg.run.progress:
        from tqdm import tqdm

        progress = tqdm(total=len(index_batches), desc=f"client {pid} round {server_round}",
                        mininterval=10, leave=False)
    result = None
    try:
        optimizer = privacy.optimizer(optimizer)  # DP-SGD: Opacus's DPOptimizer around it

        def lr_at(step: int) -> None:
            set_lr(optimizer, cfg.train, run_progress(cfg.train, server_round, step))

        hooks = LoopHooks(lr_at=lr_at, meter=meter, progress=progress, device=device)
        result = mode.train(segment, loader, channel, optimizer, task.objective, hooks)
    finally:
        if channel is not None:
            channel.close()
        if result is None:  # training failed: the cached model keeps no DP/NoPeek hooks
            privacy.close()
        if progress is not None:
            progress.close()

    segment.cpu()  # the update is encoded from CPU tensors, whatever the device
    if local_norm:  # kept in the node's context for its next round
        context.state[NORM_STATE] = ArrayRecord(norm_state(segment))
    record, segment_metrics = light.package(segment, reference,
                                            seed=int(config[KEY_SEED]) ^ server_round)
    metrics = result.metrics()
    metrics.update({
        "cut-bytes-up": channel.bytes_up if channel is not None else 0,
        "cut-bytes-down": channel.bytes_down if channel is not None else 0,
        "sync-bytes-down": array_record_bytes(msg.content["arrays"]),
        "sync-bytes-up": array_record_bytes(record),
        "client-setup-seconds": setup_seconds,
        **segment_metrics,
        **meter.report(),
        **privacy.metrics(consumed, len(part)),  # epsilon, NoPeek (ends its hooks)
    })
    content = RecordDict({"arrays": record, "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)
