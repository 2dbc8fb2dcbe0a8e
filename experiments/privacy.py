"""Privacy table (issue 17): what an honest-but-curious server recovers, per defense and cut.

    python experiments/privacy.py --task cifar10 --clients 10 --rounds 80      # the table
    python experiments/privacy.py --task sst2 --clients 10 --rounds 10
    python experiments/privacy.py --task digits --clients 2 --rounds 2 --attack-steps 100
    python experiments/privacy.py --task cifar10 --rows none dp-n1 --cuts 1      # some rows

Each row trains the task's config (``fedsplit.simulate``, the rows' overrides on top) at
each cut (``--cuts``, default the first and a deeper one), then attacks the trained
global model with the same code whatever the defense (``fedsplit.privacy.attacks``):

* images: white-box reconstruction (TV prior) and a learned inverse network trained on
  ``--aux-batches`` test batches (a split no client uses), SSIM/PSNR of ``--victims``
  training images (client data);
* text: white-box token recovery (relaxed one-hot) and a learned inversion (a per-position
  classifier trained on ``--aux-batches`` test batches), special tokens not counted;
* DP-SGD rows (``dpsgd-*``) clip each sample's gradient of the client segment to
  ``--sgd-clip`` and add noise (image models with GroupNorm, ``none-gn`` their undefended
  baseline; ``-cgn`` rows: GroupNorm in the client segment only, ``none-cgn``);
* labels: the gradients a u-shaped client (front cut = the row's cut, back cut = the last:
  the client keeps the head) would send for 10 training batches; AUC of the direction
  attack with 2 known labels per class (norm AUC in rows.json).

The server observes the activations through the row's defense: DP (clipping + noise with
a fresh seed; clip = the median per-sample activation norm of the initial model at that
cut unless ``--clip``), or the row's codec from a sender to a receiver (stateful codecs as
the client's ``WARMUP_BATCHES`` earlier training batches left them); label-DP rows train
on randomized-response labels (the label attack's gradients use them too, scored against
the true labels); NoPeek rows train with the distance-correlation term and are observed as
they are. Accuracy: the server's held-out evaluation after the last round (clean
activations; rows in ``THROUGH_CODEC``: split inference through the row's codec).
Epsilon: the largest any client reported, at delta 1e-5. Stores ``<out>/rows.json``
(runs) and ``<out>/attacks.json``; writes ``<out>/privacy.md``.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import final_accuracy, row_parser, run_rows  # noqa: E402
from fedsplit.config import load_config  # noqa: E402
from fedsplit.paths import with_resolved_paths  # noqa: E402
from fedsplit.privacy.attacks import (  # noqa: E402
    attack_images,
    attack_labels,
    attack_tokens,
    trained_layout,
)
from fedsplit.tasks import build_task  # noqa: E402

TASKS = {  # config, default cuts (first, deeper), input kind
    "cifar10": ("configs/cifar10_resnet20.yaml", (1, 4), "image"),
    "sst2": ("configs/sst2_minilm.yaml", (1, 3), "text"),
    "digits": ("configs/default.yaml", (1, 2), "image"),
}
NOISE = {"dp-n0.1": 0.1, "dp-n0.5": 0.5, "dp-n1": 1.0}  # noise multipliers of the DP rows
# Codecs as implicit defenses: row -> (codec.up, codec.down or None: the config's; text
# chains start with drop-padding). ~100x: on text the klt-ec setting of the codec table
# (experiments/codecs.py `dp-kltec136-rs20`: 104x of the cut bytes, -0.9 points); on
# ResNet-20 klt-ec stops at ~46x (its per-position scales), so 70 % random dropout of the
# values (the same positions both ways) and 1-bit Lloyd-Max codes: 106x both ways; at
# ResNet-20's deeper cut the 1-bit gradients diverge, so `-q8` sends 8-bit gradients (the
# same dropout mask) back: ~100x up, ~13x down.
TOPK = "{{name: topk-mask, k: {k}, bits: 2}}"
DROP = "{name: dropout, p: 0.7, rescale: true}"
DROP_1BIT = DROP + ", {name: lloyd, bits: 1}"
CODECS = {"topk10-2bit": (TOPK.format(k=0.1), None), "topk2-2bit": (TOPK.format(k=0.02), None),
          "kltec136-rs20": ("{name: klt-ec, bits: 1.36}",
                            "{name: row-sampling, fraction: 0.2}, rotate, sign"),
          "drop70-1bit": (DROP_1BIT, DROP_1BIT),
          "drop70-1bit-q8": (DROP_1BIT, DROP + ", {name: quantize, bits: 8}")}
CODEC_KINDS = {"kltec136-rs20": "text", "drop70-1bit": "image",
               "drop70-1bit-q8": "image"}  # the others: both
# Rows evaluated as split inference through codec.up: rescaled dropout + 1-bit codes give
# the server inputs of other statistics than the clean activations (its BatchNorm learns
# those), so the deployed model sends its test activations through the codec too.
THROUGH_CODEC = {"drop70-1bit", "drop70-1bit-q8"}
NOPEEK = {"nopeek-0.5": 0.5, "nopeek-2": 2.0}  # distance-correlation weights
LABEL_DP = {"labeldp-e2": 2.0, "labeldp-e0.5": 0.5}  # randomized-response epsilons
# DP-SGD on the client segment (per-sample gradients clipped to --sgd-clip): noise
# multipliers, and one row with DP on the activations as well (both accounted together).
# `-cgn` rows: GroupNorm in the client segment only (model.norm=client-group), BatchNorm
# on the server.
# `-fwe` rows (text): the word embeddings frozen (pre-trained, never sent), so per-sample
# gradients skip the (vocabulary x hidden) table.
DPSGD = {"dpsgd-n0.7": 0.7, "dpsgd-n1": 1.0, "dpsgd-n1-dp-n1": 1.0,
         "dpsgd-n0.7-cgn": 0.7, "dpsgd-n1-cgn": 1.0, "dpsgd-n1-fwe": 1.0,
         "dpsgd-n2-fwe": 2.0}
FROZEN_WORDS = ["train.trainable=[layer.*, head, '*.position_embeddings.*', "
                "'*.token_type_embeddings.*', '*.embeddings.LayerNorm.*']"]
# Image rows with DP-SGD use GroupNorm (BatchNorm mixes samples); `none-gn` / `none-cgn`
# are the undefended models with the same norms, to tell the norm's cost from DP-SGD's.
GROUP_NORM = ["none-gn", "none-cgn"]
# Training batches of 32 a client sends before the victims' batch (klt's default
# fit-rows is 1024 rows: ~2 text batches, 1/32 of an image batch at ResNet-20's cuts).
WARMUP_BATCHES = 4
ROW_NAMES = ["none", *NOISE, *NOPEEK, *LABEL_DP, *CODECS, *DPSGD, *GROUP_NORM]


def row_overrides(row: str, cut: int, clip: float, kind: str,
                  sgd_clip: float = 1.0) -> list[str]:
    """The overrides of ``row`` at ``cut`` (``clip``: the activation-DP rows' clipping
    bound; ``sgd_clip``: the DP-SGD rows' per-sample gradient bound)."""
    out = [f"model.cut={cut}"]
    norm = row_norm(row, kind)
    out += [f"model.norm={norm}"] if norm else []
    if row in DPSGD:
        out += [f"privacy.sgd-clip={sgd_clip:.6g}", f"privacy.sgd-noise={DPSGD[row]}"]
        if row.endswith("-dp-n1"):
            out += [f"privacy.act-clip={clip:.6g}", "privacy.act-noise=1.0"]
        out += FROZEN_WORDS if row.endswith("-fwe") else []
    if row in NOISE:
        out += [f"privacy.act-clip={clip:.6g}", f"privacy.act-noise={NOISE[row]}"]
    elif row in LABEL_DP:
        out += [f"privacy.label-epsilon={LABEL_DP[row]}"]
    elif row in NOPEEK:
        out += [f"privacy.nopeek={NOPEEK[row]}"]
    elif row in CODECS:
        first = "drop-padding, " if kind == "text" else ""
        out += [f"codec.{way}=[{first}{chain}]"
                for way, chain in zip(("up", "down"), CODECS[row], strict=True) if chain]
        out += ["eval.through-codec=true"] if row in THROUGH_CODEC else []
    return out


def applies(row: str, kind: str) -> bool:
    """Whether ``row`` is a row of ``kind`` models (norm baselines and ``-cgn`` rows:
    images; frozen word embeddings: text; codecs: :data:`CODEC_KINDS`)."""
    if row in GROUP_NORM or row.endswith("-cgn"):
        return kind == "image"
    if row in CODEC_KINDS:
        return kind == CODEC_KINDS[row]
    return not row.endswith("-fwe") or kind == "text"


def row_norm(row: str, kind: str) -> str | None:
    """The ``model.norm`` of an image row with DP-SGD or of its baseline (None: the
    config's own)."""
    if kind != "image" or (row not in DPSGD and row not in GROUP_NORM):
        return None
    return "client-group" if row.endswith("-cgn") else "group"


def as_overrides(values: dict[str, Any]) -> list[str]:
    """``{"section.key": value}`` as ``section.key=value`` words (values as JSON/YAML)."""
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


class Data:
    """The attacker's and the victims' samples: ``victims`` (one batch of training
    samples), ``warmup`` (the next training batches: what the victims' client sent before
    them in the round, for stateful codecs), ``aux`` (test batches), ``label_batches``
    (training batches of 32), and ``prepared``: what the server derives from the training
    set (image normalization)."""

    def __init__(self, config: str, overrides: list[str], victims: int,
                 aux_batches: int) -> None:
        task = build_task(with_resolved_paths(load_config(config, overrides)))
        train, test = task.datasets()
        self.prepared = as_overrides(task.prepare_config(train))
        self.cfg = with_resolved_paths(load_config(config, [*overrides, *self.prepared]))
        self.task = task = build_task(self.cfg)
        task.attach(train)

        def batches(ds: Any, n: int, size: int) -> list[dict[str, torch.Tensor]]:
            rows = ds.select(range(min(n * size, len(ds))))
            return list(task.loader(task.encode(rows), size, shuffle=False))

        def inputs(bs: list[dict[str, torch.Tensor]]) -> list[Any]:  # images: the pixels
            return [b["x"] for b in bs] if "x" in self.victims else bs

        self.victims = batches(train, 1, victims)[0]
        self.warmup = inputs(batches(train.select(range(victims, len(train))),
                                     WARMUP_BATCHES, 32))
        # the attacker's own samples: the test split
        self.aux = inputs(batches(test, aux_batches, 64))
        self.label_batches = batches(train, 10, 32)


def median_norm(config: str, overrides: list[str], cut: int,
                batch: dict[str, torch.Tensor]) -> float:
    """Median per-sample L2 norm of the initial model's activations at ``cut``."""
    layout = trained_layout(load_config(config, [*overrides, f"model.cut={cut}"]))
    with torch.no_grad():
        hidden = layout.split(cut).client(batch).hidden
    return statistics.median(hidden.flatten(1).norm(dim=1).tolist())


def attack_row(run_dir: Path, cut: int, kind: str, data: Data, args: Any) -> dict[str, float]:
    """Every attack on the trained model of ``run_dir`` (its own config: defense, codec)."""
    cfg = with_resolved_paths(load_config(run_dir / "config.yaml"))
    layout = trained_layout(cfg, run_dir, pretrained=False)
    out: dict[str, float] = {}
    if kind == "image":
        out.update(attack_images(layout, cut, data.victims["x"], data.aux, cfg,
                                 steps=args.attack_steps,
                                 inversion_epochs=args.inversion_epochs, warmup=data.warmup))
    else:
        tok = data.task.tokenizer
        ignore = set(tok.all_special_ids) if tok is not None else set()
        out.update(attack_tokens(layout, cut, data.victims, cfg, steps=args.attack_steps,
                                 ignore=ignore, aux=data.aux,
                                 inversion_epochs=args.inversion_epochs, warmup=data.warmup))
    classes = cfg.model.num_labels
    out.update(attack_labels(layout, cut, layout.hi, data.label_batches,
                             data.task.objective, classes, cfg))
    return out


def cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def accuracy_cell(rounds: list[dict]) -> str:
    """The final accuracy; for a row evaluated through its codec (split inference), that
    accuracy and the clean activations' one."""
    clean = f"{100 * final_accuracy(rounds):.2f}%"
    if not any(r.get("codec_accuracy") is not None for r in rounds):
        return clean
    return f"{100 * final_accuracy(rounds, 'codec_accuracy'):.2f}% through codec ({clean} clean)"


def epsilon_cell(eps: list[float], entry: dict) -> str:
    """The DP epsilon (activations and/or DP-SGD; largest any client reported), or the
    label epsilon."""
    if eps:
        return format(max(eps), ".3g")
    labels = [c["privacy-label-epsilon"] for c in entry.get("clients_rows", [])
              if "privacy-label-epsilon" in c]
    return f"labels: {max(labels):g}" if labels else "-"


def table(stored: dict, attacks: dict, names: list[str], kind: str, header: str) -> list[str]:
    cols = ("SSIM | PSNR | inv. SSIM | inv. PSNR" if kind == "image"
            else "token recovery | inv. token recovery")
    lines = [header, "", f"| row | cut | clip | accuracy | epsilon (δ=1e-5) | cut bytes up / "
             f"sample | {cols} | label AUC (direction) | label acc. |",
             "|---|---:|---:|---:|---:|---:|" + "---:|" * (4 if kind == "image" else 2)
             + "---:|---:|"]
    for name in names:
        if name not in stored or name not in attacks:
            continue
        rounds, a = stored[name]["rounds"], attacks[name]
        eps = [r["privacy_epsilon"] for r in rounds if r.get("privacy_epsilon") is not None]
        examples = sum(r.get("examples") or 0 for r in rounds)
        up = sum(r["cut_bytes_up"] for r in rounds) / max(examples, 1)
        if kind == "image":
            scores = (f"{a['ssim']:.3f} | {a['psnr']:.1f} | {a['inv_ssim']:.3f} | "
                      f"{a['inv_psnr']:.1f}")
        else:
            inv = a.get("inv_token_recovery")
            scores = (f"{100 * a['token_recovery']:.1f}% | "
                      + ("-" if inv is None else f"{100 * inv:.1f}%"))
        lines.append(f"| {name.rsplit('-cut', 1)[0]} | {a['cut']} | {cell(a.get('clip'), '.3g')}"
                     f" | {accuracy_cell(rounds)} | "
                     f"{epsilon_cell(eps, stored[name])} | {up:,.0f} | {scores} | "
                     f"{a['direction_auc']:.3f} | {100 * a['direction_accuracy']:.1f}% "
                     f"(chance {100 * a['chance_accuracy']:.1f}%) |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = row_parser(__doc__, ROW_NAMES)
    parser.add_argument("--task", choices=sorted(TASKS), default="digits")
    parser.add_argument("--cuts", type=int, nargs="*", default=None)
    parser.add_argument("--clip", type=float, default=0.0,
                        help="clipping bound of the DP rows (0: the median activation norm)")
    parser.add_argument("--sgd-clip", type=float, default=1.0,
                        help="per-sample gradient bound of the DP-SGD rows")
    parser.add_argument("--victims", type=int, default=16)
    parser.add_argument("--aux-batches", type=int, default=20)
    parser.add_argument("--attack-steps", type=int, default=500)
    parser.add_argument("--inversion-epochs", type=int, default=20)
    parser.add_argument("--render", action="store_true",
                        help="run and attack nothing: the table of every row stored in "
                        "<out>/rows.json and attacked in <out>/attacks.json (e.g. rows from "
                        "earlier sessions whose run folders are gone)")
    parser.set_defaults(config=None, out=None)
    args = parser.parse_args(argv)
    config, cuts, kind = TASKS[args.task]
    config = args.config or config
    cuts = args.cuts or list(cuts)
    out = Path(args.out or f"runs/privacy-{args.task}")
    if args.render:
        return render(out, config, kind, args)
    data = Data(config, args.overrides, args.victims, args.aux_batches)
    rows: dict[str, list[str]] = {}
    clips: dict[str, float] = {}
    norms: dict[tuple[int, str | None], float] = {}
    for cut in cuts:
        for row in args.rows:
            if not applies(row, kind):
                print(f"[privacy] {row}: not a row of {kind} models; skipped")
                continue
            # The clip of the activation-DP rows: the median activation norm of the row's
            # own initial model (GroupNorm for the image rows with DP-SGD).
            norm = row_norm(row, kind)
            if (cut, norm) not in norms:
                norms[cut, norm] = args.clip or median_norm(
                    config, [*args.overrides, *data.prepared,
                             *([f"model.norm={norm}"] if norm else [])], cut, data.victims)
            clip = norms[cut, norm]
            name = f"{row}-cut{cut}"
            rows[name] = row_overrides(row, cut, clip, kind, args.sgd_clip)
            clips[name] = clip if row in NOISE or row.endswith("-dp-n1") else None
    names = list(rows)
    stored = run_rows(rows, names, config, args.clients, args.rounds, out, args.overrides,
                      fresh=args.fresh, collect=args.collect)
    path = out / "attacks.json"
    attacks = json.loads(path.read_text()) if path.exists() else {}
    for name in names:
        run_dir = out / name
        if name in attacks and attacks[name].get("run_mtime") == \
                (run_dir / "metrics.jsonl").stat().st_mtime:
            continue  # this run was attacked already
        cut = int(name.rsplit("-cut", 1)[1])
        result = attack_row(run_dir, cut, kind, data, args)
        attacks[name] = {**result, "cut": cut, "clip": clips[name],
                         "run_mtime": (run_dir / "metrics.jsonl").stat().st_mtime}
        path.write_text(json.dumps(attacks, indent=1))
        print(f"[privacy] {name}: {result}", flush=True)
    return write_table(out, table(stored, attacks, names, kind,
                                  header(config, kind, args, args.clients, args.rounds)))


def header(config: str, kind: str, args: Any, clients: Any, rounds: Any) -> str:
    """The table's first line (``clients`` / ``rounds``: what the rows ran)."""
    return (f"{config}, {clients} clients, {rounds} rounds; attacks on the "
            f"trained global model ({args.attack_steps} white-box steps"
            + (f", inverse network {args.inversion_epochs} epochs on {args.aux_batches} "
               "test batches" if kind == "image" else "") + ").")


def write_table(out: Path, lines: list[str]) -> int:
    (out / "privacy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def render(out: Path, config: str, kind: str, args: Any) -> int:
    """The table of every stored and attacked row, by cut, then in :data:`ROW_NAMES` order."""
    paths = [out / "rows.json", out / "attacks.json"]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise SystemExit(f"--render: {', '.join(missing)} not found; run rows first (or copy "
                         "the stored rows_privacy_*.json / attacks_privacy_*.json there).")
    stored, attacks = (json.loads(p.read_text()) for p in paths)

    def order(name: str) -> tuple[int, int]:
        row, cut = name.rsplit("-cut", 1)
        return int(cut), ROW_NAMES.index(row) if row in ROW_NAMES else len(ROW_NAMES)

    names = sorted((n for n in stored if n in attacks and "-cut" in n), key=order)

    def ran(values: set) -> str:  # rows stored by different commands may differ
        return " / ".join(str(v) for v in sorted(values)) or "-"

    clients = ran({stored[n].get("clients", args.clients) for n in names})
    rounds = ran({len(stored[n]["rounds"]) for n in names})
    return write_table(out, table(stored, attacks, names, kind,
                                  header(config, kind, args, clients, rounds)))


if __name__ == "__main__":
    sys.exit(main())
