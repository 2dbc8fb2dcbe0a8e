"""Run configuration: schema, YAML loading, command-line overrides, validation.

A configuration is layered, later layers winning:

1. the defaults below (the schema),
2. a YAML file under ``configs/`` (kebab-case keys, e.g. ``num-labels``),
3. overrides: ``section.key=value`` strings, or Flower's run config
   (``flwr run . --run-config "train.lr=1e-4"``), where the value ``""`` means
   "keep what the YAML file says".

Everything is checked before any training starts, and every problem is reported at
once, each naming the key, what was found and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, get_origin, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf

# The run-config key naming the YAML file; it is not part of the schema.
CONFIG_FILE_KEY = "config"
UNSET = ""  # Run-config value meaning "keep the YAML file's value".


class ConfigError(ValueError):
    """The configuration has one or more problems; the message lists all of them."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            "Invalid fedsplit configuration:\n" + "\n".join(f"  - {p}" for p in problems)
        )


def _f(default: Any, help: str, *, choices: tuple | None = None, lo: float | None = None,
       hi: float | None = None) -> Any:
    meta = {"help": help, "choices": choices, "lo": lo, "hi": hi}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    seed: int = _f(0, "Seed for model init, sampling, partitioning and data order.")
    output_dir: str = _f("runs", "Folder under which each run writes its own directory.")
    name: str = _f("", "Run directory name; empty means a timestamp.")
    num_threads: int = _f(0, "torch threads per process (0 = torch's default).", lo=0)
    progress: bool = _f(True, "Show progress bars for long work.")
    checkpoint: bool = _f(True, "Write <run dir>/checkpoint.pt after every round (atomic).")
    resume: bool = _f(False, "Continue the run named run.name from its last checkpoint.")


@dataclass
class ModelConfig:
    name: str = _f("cnn-digits", "Model builder (registry `fedsplit.models.MODELS`).")
    path: str = _f("", "Hugging Face hub name or local folder for `from_pretrained`; "
                   "`python:<module>/<sub/dir>` points inside an installed package.")
    num_labels: int = _f(10, "Number of classes.", lo=2)
    cut: int = _f(2, "Cut point: the client holds the first `cut` blocks (CNN) or "
                  "embeddings + `cut` transformer layers (HF encoders).", lo=1)
    max_length: int = _f(64, "Max tokens per text (dynamic padding below that).", lo=8)
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


@dataclass
class DataConfig:
    name: str = _f("digits", "Dataset loader: `digits` (scikit-learn, offline), `files` "
                   "(local TSV/CSV/JSON/parquet) or `hub` (a Hugging Face dataset name).",
                   choices=("digits", "files", "hub"))
    train: list = _f([], "Train files (name=files) or hub name (name=hub). Relative paths "
                     "resolve against the project root.")
    test: list = _f([], "Held-out test files; empty + name=hub uses the hub's test split.")
    hub_name: str = _f("", "Hugging Face dataset name (name=hub).")
    text_column: str = _f("sentence", "Column holding the text (text datasets).")
    label_column: str = _f("label", "Column holding the integer label.")
    csv_quoting: str = _f("minimal", "CSV/TSV quoting: `minimal` (standard) or `none` "
                          "(SST-2: quotes are text).", choices=("minimal", "none"))
    source_column: str = _f("source", "Column added with each file's parent folder name "
                            "(e.g. the Amazon domain), usable for natural partitioning.")
    partitioner: str = _f("iid", "How the train set is split over clients.",
                          choices=("iid", "dirichlet", "natural"))
    alpha: float = _f(0.5, "Dirichlet concentration (partitioner=dirichlet).", lo=1e-6)
    partition_by: str = _f("label", "Column for dirichlet (the label) or natural partitioning.")
    test_fraction: float = _f(0.2, "Held-out share when the dataset has no test split "
                              "(digits).", lo=0.01, hi=0.9)
    max_train_samples: int = _f(0, "Cap on train samples before partitioning (0 = all).", lo=0)
    max_test_samples: int = _f(0, "Cap on test samples (0 = all).", lo=0)


@dataclass
class TrainConfig:
    rounds: int = _f(5, "Federated rounds.", lo=1)
    mode: str = _f("sflv1", "Server-segment training: `sflv1` (replica per client, "
                   "averaged) or `sflv2` (one segment, arrival order).",
                   choices=("sflv1", "sflv2"))
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
    round_timeout: float = _f(3600.0, "Seconds the server waits for a round's replies; "
                              "tokens expire then.", lo=1.0)


@dataclass
class EvalConfig:
    batch_size: int = _f(128, "Batch size of the server's held-out evaluation.", lo=1)
    every: int = _f(1, "Evaluate after every N rounds (the last round always).", lo=1)
    through_codec: bool = _f(False, "Also evaluate as split inference runs: the cut "
                             "activations pass through codec.up (a fresh sender and "
                             "receiver per evaluation). Adds codec_accuracy, codec_loss and "
                             "eval_bytes_up to the metrics; accuracy stays the "
                             "uncompressed model's.")


@dataclass
class ChannelConfig:
    host: str = _f("127.0.0.1", "Interface the split channel listens on "
                   "(0.0.0.0 for real devices).")
    port: int = _f(0, "Port of the split channel (0 = any free port).", lo=0, hi=65535)
    address: str = _f("", "Address clients dial (host:port); empty = host:port as bound.")
    max_message_mb: int = _f(256, "Largest request/response the channel accepts, MiB.", lo=1)
    workers: int = _f(8, "Threads serving channel requests.", lo=1)
    tls_cert: str = _f("", "Server certificate (PEM) for the channel; set with tls-key to "
                       "serve TLS (deployment).")
    tls_key: str = _f("", "Private key (PEM) of tls-cert.")
    root_cert: str = _f("", "CA certificate (PEM) clients use to verify the channel; a "
                        "SuperNode's node config `root-certificates` takes precedence.")


@dataclass
class CodecConfig:
    up: Any = _f("identity", "Codec for activations (client -> server): a registered name, "
                 "a mapping {name: ..., option: ...}, or a list of those applied in order "
                 "(see fedsplit/codecs/README.md).")
    down: Any = _f("identity", "Codec for gradients (server -> client), same forms.")


@dataclass
class PruneConfig:
    kind: str = _f("none", "Client-segment pruning: `none`, `unstructured` (dynamic magnitude "
                   "masks, recomputed every round) or `structured` (attention heads + FFN "
                   "channels / conv filters, physically smaller tensors).",
                   choices=("none", "unstructured", "structured"))
    target: float = _f(0.5, "Final sparsity (unstructured) or fraction of heads, FFN channels "
                       "and filters removed (structured).", lo=0.0, hi=0.99)
    client_targets: list = _f([], "Per-client targets indexed by partition id (cycled), for "
                              "weak devices that prune more; a SuperNode's node config "
                              "`prune-target` wins. Empty = `target` for everyone.")
    schedule: str = _f("cubic", "Sparsity ramp from 0 to the target over rounds.",
                       choices=("cubic", "linear", "constant"))
    start_round: int = _f(1, "First round of the ramp.", lo=1)
    end_round: int = _f(0, "Round the target is reached (0 = the last round).", lo=0)
    scope: str = _f("global", "Unstructured: rank weights by magnitude across the segment "
                    "(`global`), within each tensor (`layer`), or by layer-adaptive "
                    "magnitude scores across the segment (`lamp`, Lee et al. 2021).",
                    choices=("global", "layer", "lamp"))
    embeddings: bool = _f(False, "Unstructured: prune embedding matrices too.")
    usage_aware: bool = _f(False, "Unstructured with embeddings: rank the token embedding's "
                           "weights by abs(w) * sqrt(count + usage-prior), count = how often the "
                           "client's own partition uses the token (Wanda-style; the counts "
                           "never leave the client). Rows of unused tokens go first.")
    usage_prior: float = _f(1.0, "Pseudo-count added to every token's count (usage-aware "
                            "pruning): keeps the magnitude order among unseen and rare tokens.",
                            lo=0.0)


@dataclass
class QuantConfig:
    qat: bool = _f(False, "Quantization-aware training of the client segment (int8 fake quant "
                   "of weights and activations, straight-through estimator).")
    update_bits: int = _f(32, "Client -> server model update: 32 = float32 (plain FedAvg "
                          "arrays), or 2/4/8-bit stochastic quantization.",
                          choices=(2, 4, 8, 32))
    update_scheme: str = _f("per-channel", "Scales of the quantized update.",
                            choices=("per-tensor", "per-channel"))
    update_delta: bool = _f(True, "Send the change against the received global segment "
                            "(smaller range) rather than the weights.")
    down_int8: bool = _f(False, "Server -> client global segment in int8 (per channel); the "
                         "server keeps its float32 segment and adds the clients' changes "
                         "to it.")
    compress: bool = _f(False, "zlib (level 1, lossless) over the packed model-sync payloads "
                        "(quantized updates, int8 global): zero changes, e.g. the embedding "
                        "rows of tokens a client never saw, cost almost nothing. Needs "
                        "`update-bits` < 32, pruning or `down-int8`.")


@dataclass
class StrategyConfig:
    name: str = _f("", "Strategy: a registered name (`sflv1`, `sflv2`, `local-loss`, "
                   "`u-shaped`, `fedavg`, `allocator`, `splitfed`, ...) or an importable "
                   "`package.module:Class` of installed code; empty = the one `train.mode` "
                   "names. See README, \"Write your own strategy\".")
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
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    channel: ChannelConfig = field(default_factory=ChannelConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)


# --------------------------------------------------------------------------- keys


def kebab(name: str) -> str:
    return name.replace("_", "-")


def snake(name: str) -> str:
    return name.replace("-", "_")


def _sections() -> dict[str, type]:
    hints = get_type_hints(FedsplitConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(FedsplitConfig)}


def schema_fields() -> dict[str, dataclasses.Field]:
    """Every leaf key as ``section.key`` (kebab-case) -> its dataclass field."""
    out = {}
    for sec, cls in _sections().items():
        for f in dataclasses.fields(cls):
            out[f"{sec}.{kebab(f.name)}"] = f
    return out


def default_flat() -> dict[str, Any]:
    """The schema defaults as a flat ``{"section.key": value}`` dict (kebab-case)."""
    cfg = FedsplitConfig()
    return {k: getattr(getattr(cfg, k.split(".")[0]), snake(k.split(".")[1]))
            for k in schema_fields()}


# --------------------------------------------------------------------------- loading


def project_root() -> Path:
    """The folder holding ``configs/`` (the repository, or the unpacked Flower App)."""
    env = os.environ.get("FEDSPLIT_ROOT")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parent.parent


def resolve_config_path(path: str | os.PathLike) -> Path:
    """Find a config file as given, relative to cwd, or relative to the project root."""
    p = Path(path).expanduser()
    for cand in (p, Path.cwd() / p, project_root() / p, project_root() / "configs" / p):
        if cand.is_file():
            return cand.resolve()
    shipped = sorted(x.name for x in (project_root() / "configs").glob("*.yaml"))
    raise ConfigError([f"config file {str(path)!r} not found (looked in the current folder "
                       f"and {project_root()}); shipped configs: {', '.join(shipped)}"])


def _parse_value(text: str) -> Any:
    """Parse a command-line value the way YAML would (``1e-4`` -> float, ``[a, b]`` -> list)."""
    if text.strip() == "":
        return ""
    try:
        val = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads `1e-4` as a string; accept it as a number.
    if isinstance(val, str):
        try:
            return float(val)
        except ValueError:
            return val
    return val


def parse_overrides(items: list[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """``["train.lr=1e-4", ...]`` or a mapping -> flat ``{"train.lr": 1e-4}``."""
    if not items:
        return {}
    if isinstance(items, Mapping):
        return dict(items)
    out: dict[str, Any] = {}
    problems = []
    for item in items:
        if "=" not in item:
            problems.append(f"override {item!r} is not of the form section.key=value "
                            "(e.g. train.lr=1e-4)")
            continue
        key, _, value = item.partition("=")
        out[key.strip()] = _parse_value(value)
    if problems:
        raise ConfigError(problems)
    return out


def _flatten_yaml(data: Any, problems: list[str], source: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(f"{source}: expected a mapping of sections, found {type(data).__name__}")
        return {}
    flat = {}
    for sec, body in data.items():
        if not isinstance(body, dict):
            problems.append(f"{source}: `{sec}` must be a section (a mapping of keys), "
                            f"found {body!r}")
            continue
        for key, value in body.items():
            flat[f"{kebab(str(sec))}.{kebab(str(key))}"] = value
    return flat


def _check_type(key: str, value: Any, typ: Any, problems: list[str]) -> Any:
    """Coerce ``value`` to ``typ`` where lossless, else record a problem."""
    origin = get_origin(typ) or typ
    if origin is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        problems.append(f"`{key}`: expected true or false, found {value!r}")
    elif origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        problems.append(f"`{key}`: expected an integer, found {value!r}")
    elif origin is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(float(value)):
                return float(value)
        problems.append(f"`{key}`: expected a finite number, found {value!r}")
    elif origin is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"`{key}`: expected a string, found {value!r}")
    elif origin is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return list(value)
        problems.append(f"`{key}`: expected a list (or comma-separated string), found {value!r}")
    elif typ is Any:  # structured values (codec specs): YAML text is parsed
        if isinstance(value, str):
            return _parse_value(value)
        return value
    return None


def build_config(flat: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> DictConfig:
    """Validate a flat ``{"section.key": value}`` dict on top of the defaults."""
    problems: list[str] = []
    fields_ = schema_fields()
    hints = {sec: get_type_hints(cls) for sec, cls in _sections().items()}
    values = default_flat()
    for key, value in flat.items():
        k = ".".join(kebab(part) for part in key.split("."))
        where = f" (from {sources[key]})" if sources and key in sources else ""
        if k not in fields_:
            sec = k.split(".")[0]
            same_section = [x for x in fields_ if x.startswith(sec + ".")]
            allowed = same_section or sorted({x.split(".")[0] for x in fields_})
            problems.append(f"unknown key `{k}`{where}; allowed: {', '.join(allowed)}")
            continue
        sec, name = k.split(".")
        coerced = _check_type(k, value, hints[sec][snake(name)], problems)
        if coerced is not None:
            values[k] = coerced
    for k, f in fields_.items():
        v, meta = values[k], f.metadata
        if meta.get("choices") and v not in meta["choices"]:
            problems.append(f"`{k}`: {v!r} is not allowed; choose one of "
                            f"{', '.join(map(str, meta['choices']))}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if meta.get("lo") is not None and v < meta["lo"]:
                problems.append(f"`{k}`: {v!r} is below the minimum {meta['lo']}")
            if meta.get("hi") is not None and v > meta["hi"]:
                problems.append(f"`{k}`: {v!r} is above the maximum {meta['hi']}")
    problems += _cross_checks(values)
    if problems:
        raise ConfigError(problems)
    nested: dict[str, dict[str, Any]] = {}
    for k, v in values.items():
        sec, name = k.split(".")
        nested.setdefault(sec, {})[snake(name)] = v
    cfg = OmegaConf.structured(FedsplitConfig)
    cfg = OmegaConf.merge(cfg, nested)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _cross_checks(v: Mapping[str, Any]) -> list[str]:
    problems = []
    from fedsplit.models import MODELS  # registry fills on import

    if v["model.name"] not in MODELS:
        problems.append(f"`model.name`: unknown model {v['model.name']!r}; "
                        f"registered: {', '.join(MODELS.names())}")
    if v["data.name"] == "files" and not v["data.train"]:
        problems.append("`data.train`: data.name=files needs at least one train file "
                        "(e.g. data.train=[../shared/data/sst2/train.tsv])")
    if v["data.name"] == "files" and not v["data.test"]:
        problems.append("`data.test`: data.name=files needs a held-out test file "
                        "(e.g. data.test=[../shared/data/sst2/test.tsv])")
    if v["data.name"] == "hub" and not v["data.hub-name"]:
        problems.append("`data.hub-name`: data.name=hub needs a dataset name")
    for key in ("codec.up", "codec.down"):
        try:
            from fedsplit.codecs import build_codec

            codec = build_codec(v[key])
        except Exception as exc:  # noqa: BLE001 - any spec error is reported the same way
            problems.append(f"`{key}`: {exc}")
            continue
        if any(getattr(c, "keep_across_rounds", False)
               for c in getattr(codec, "codecs", [codec])):
            problems.append(f"`{key}`: keep-across-rounds cannot hold on the split channel, "
                            "which gives every round fresh codecs on both sides (a client "
                            "may run in a new process each round); drop it (each round's "
                            "first sight of a sample then travels raw)")
    for t in v["prune.client-targets"]:
        if not isinstance(t, (int, float)) or not 0.0 <= float(t) < 1.0:
            problems.append(f"`prune.client-targets`: {t!r} is not a fraction in [0, 1)")
    if v["prune.usage-aware"] and not (v["prune.kind"] == "unstructured"
                                       and v["prune.embeddings"]):
        problems.append("`prune.usage-aware`: usage scores rank the token embedding, which "
                        "is pruned only with prune.kind=unstructured and prune.embeddings=true")
    if v["prune.end-round"] and v["prune.end-round"] < v["prune.start-round"]:
        problems.append("`prune.end-round` is before `prune.start-round`")
    if v["quant.compress"] and not (v["quant.update-bits"] != 32 or v["prune.kind"] != "none"
                                    or v["quant.down-int8"]):
        problems.append("`quant.compress`: there is no packed payload to compress; set "
                        "quant.update-bits to 2/4/8, prune.kind or quant.down-int8=true")
    if v["run.resume"] and not v["run.name"]:
        problems.append("`run.resume`: name the run to resume with run.name=<its directory "
                        "name> (under run.output-dir)")
    if v["train.fraction"] == 0.0:
        problems.append("`train.fraction`: 0 trains no client; use a value in (0, 1]")
    problems += _strategy_and_fleet_checks(v)
    return problems


def _strategy_and_fleet_checks(v: Mapping[str, Any]) -> list[str]:
    """The `strategy` and `fleet` sections: the strategy resolves and accepts its options,
    the profiles file reads and names the devices and server asked for."""
    from strategies import check_strategy  # the registry fills on import

    name = v["strategy.name"] or v["train.mode"]
    modes = TrainConfig.__dataclass_fields__["mode"].metadata["choices"]
    # An empty name means train.mode's strategy; a bad train.mode is reported already.
    problems = check_strategy(name, v["strategy.options"], v) if name in modes or v[
        "strategy.name"] else []
    if not v["fleet.profiles"]:
        for key in ("fleet.devices", "fleet.server"):
            if v[key]:
                problems.append(f"`{key}` names profiles, but `fleet.profiles` names no file "
                                "(e.g. fleet.profiles=configs/profiles/mixed_fleet.yaml)")
        return problems
    from fedsplit.allocation import ProfileError, load_profiles, load_servers

    path = resolve_path(v["fleet.profiles"])
    try:
        devices = load_profiles(path)
    except ProfileError as exc:
        return problems + [f"`fleet.profiles`: {'; '.join(exc.problems)}"]
    unknown = [d for d in v["fleet.devices"] if d not in devices]
    if unknown:
        problems.append(f"`fleet.devices`: {unknown} are not in {path} (devices: "
                        f"{', '.join(sorted(devices))})")
    if v["fleet.server"]:
        try:
            servers = load_servers(path)
        except ProfileError as exc:
            return problems + [f"`fleet.server`: {'; '.join(exc.problems)}"]
        if v["fleet.server"] not in servers:
            problems.append(f"`fleet.server`: {v['fleet.server']!r} is not in {path} "
                            f"(servers: {', '.join(sorted(servers))})")
    return problems


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | Mapping[str, Any] | None = None,
) -> DictConfig:
    """Load defaults <- YAML file <- overrides, validate, return a read-only DictConfig.

    ``overrides`` may be Flower's flat run config: its ``config`` key names the YAML
    file (unless ``path`` is given) and values equal to ``""`` are skipped.
    """
    over = parse_overrides(overrides)
    cfg_file = over.pop(CONFIG_FILE_KEY, None)
    path = path or (cfg_file if cfg_file not in (None, UNSET) else None)
    flat: dict[str, Any] = {}
    sources: dict[str, str] = {}
    problems: list[str] = []
    if path:
        file = resolve_config_path(path)
        try:
            data = yaml.safe_load(file.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError([f"{file}: not valid YAML: {exc}"]) from exc
        for k, val in _flatten_yaml(data, problems, str(file)).items():
            flat[k], sources[k] = val, file.name
    if problems:
        raise ConfigError(problems)
    for k, val in over.items():
        if isinstance(val, str) and val == UNSET:
            continue
        flat[k], sources[k] = val, "overrides"
    return build_config(flat, sources)


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML with kebab-case keys (what a run directory stores)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    return yaml.safe_dump({sec: {kebab(k): v for k, v in body.items()}
                           for sec, body in plain.items()}, sort_keys=False)


def to_flat(cfg: DictConfig) -> dict[str, Any]:
    """Resolved config -> flat kebab-case dict (to ship inside a Flower message)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    return {f"{sec}.{kebab(k)}": v for sec, body in plain.items() for k, v in body.items()}


def resolve_path(path: str) -> str:
    """Resolve a data/model path: absolute, ``~``, or relative to the project root."""
    if not path or path.startswith("python:"):
        return path
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    for base in (Path.cwd(), project_root()):
        if (base / p).exists():
            return str((base / p).resolve())
    return str((project_root() / p).resolve())
