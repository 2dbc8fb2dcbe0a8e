"""Inference probe: what does a cut codec's *forward* error cost a fine-tuned model?

    python experiments/cut_probe.py                              # a default set
    python experiments/cut_probe.py --specs "[drop-padding, rotate, {name: sign}]" pq:8:1024

Loads a finished run's global model, sends the test split's cut activations through each
codec (encode, exact bytes, decode) and evaluates the server segment on what arrives. No
retraining, up direction only: the gradient direction and the network's adaptation to
the noise are left out. In this project's runs this probe has predicted the 10-round
training accuracy of a codec to within about a point, in a minute instead of a run.

A spec is a codec spec as in ``codec.up`` (YAML), or ``pq:<m>:<k>``: product quantization
(not a registered codec; a yardstick for what a learned codebook buys), the 384-wide
activation split into sub-vectors of ``m`` values, each replaced by the nearest of ``k``
centroids fitted by k-means on training-split activations (log2(k)/m bits per value; the
codebook itself is not counted, padding is dropped).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from experiments.common import FinishedModel, add_row, probe_parser, write_table  # noqa: E402
from fedsplit.codecs.base import CodecContext, build_codec  # noqa: E402

DEFAULT_SPECS = [
    "[drop-padding, {name: quantize, bits: 8, scale: per-token}]",
    "[drop-padding, {name: quantize, bits: 4, scale: per-token}]",
    "[drop-padding, rotate, {name: quantize, bits: 2, scale: per-token}]",
    "[drop-padding, rotate, {name: sign}]",
    "[drop-padding, rotate, {name: sign, keep: 0.8}]",
    "[drop-padding, {name: lloyd, bits: 2}]",
    "[drop-padding, rotate, {name: lloyd, bits: 3}]",
    "[drop-padding, rotate, {name: lloyd, bits: 2}]",
    "[drop-padding, rotate, {name: lloyd, bits: 2, keep: 0.75}]",
    "[drop-padding, rotate, {name: lloyd, bits: 1}]",
    "pq:4:256", "pq:8:1024", "pq:8:256",
    "[drop-padding, {name: klt, bits: 1}]",
    "[drop-padding, {name: klt, bits: 1.5}]",
    "[drop-padding, {name: klt, bits: 2}]",
]


def kmeans(x: torch.Tensor, k: int, iters: int = 25) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    centroids = x[torch.randperm(len(x), generator=gen)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float()[:, None]
        refill = x[torch.randint(len(x), (k,), generator=gen)]
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), refill)
    return centroids


class ProductQuantizer:
    def __init__(self, sample: torch.Tensor, m: int, k: int) -> None:
        if sample.shape[-1] % m:
            raise SystemExit(f"pq: sub-vector size {m} must divide the width "
                             f"{sample.shape[-1]}")
        self.m, self.k = m, k
        self.books = [kmeans(sample[:, j:j + m], k) for j in range(0, sample.shape[-1], m)]

    def round_trip(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
        out = h.clone()
        for i, book in enumerate(self.books):
            sub = h[..., i * self.m:(i + 1) * self.m].reshape(-1, self.m)
            out[..., i * self.m:(i + 1) * self.m] = book[torch.cdist(sub, book).argmin(1)].view(
                *h.shape[:-1], self.m)
        real_values = int(mask.sum()) * h.shape[-1]
        return out, math.ceil(real_values * math.log2(self.k) / self.m / 8)


def main(argv: list[str] | None = None) -> int:
    parser = probe_parser(__doc__)
    parser.add_argument("--specs", nargs="+", default=DEFAULT_SPECS)
    parser.add_argument("--calibration-batches", type=int, default=40,
                        help="training batches (of 64) whose activations fit pq codebooks")
    args = parser.parse_args(argv)

    model = FinishedModel(args.config, args.checkpoint)
    task = model.task
    sent = [0, 0, 0]  # bytes sent, bytes of the float32 tensors, real (unpadded) values

    reference = []  # the uncompressed predictions, for the KL column
    base = model.accuracy(on_logits=lambda step, logits: reference.append(
        torch.log_softmax(logits, -1)))

    def probe(round_trip) -> tuple[float, float, float, float, float]:
        """Accuracy, ratio, bits per real value, relative squared error of the real
        tokens' activations and mean KL(uncompressed || compressed) of the predictions
        (nats)."""
        sent[:] = [0, 0, 0]
        err = [0.0, 0.0, 0.0]  # squared error, squared deviation from the mean, KL

        def hidden_of(step, batch, cut):
            hidden, nbytes = round_trip(step, cut.hidden, batch["attention_mask"])
            sent[0] += nbytes
            sent[1] += cut.hidden.numel() * 4
            real = batch["attention_mask"].bool()
            sent[2] += int(real.sum()) * cut.hidden.shape[-1]
            x = cut.hidden[real]
            err[0] += float((hidden[real] - x).square().sum())
            err[1] += float((x - x.mean(0)).square().sum())
            return hidden

        def kl_of(step, logits):
            logp, ref = torch.log_softmax(logits, -1), reference[step]
            err[2] += float((ref.exp() * (ref - logp)).sum())
        acc = model.accuracy(hidden_of, kl_of)
        n = sum(len(b["labels"]) for b in model.batches)
        return acc, sent[1] / sent[0], 8 * sent[0] / sent[2], err[0] / err[1], err[2] / n

    calibration: torch.Tensor | None = None
    lines = [f"{model.header}, activations only, no retraining; uncompressed accuracy "
             f"{base:.2f} %.", "",
             "Relative error: squared error of the real tokens' activations over their "
             "variance; KL: mean KL divergence of the predictions from the uncompressed "
             "ones (nats; more sensitive than accuracy on 872 test sentences).", "",
             "| up codec | ratio vs fp32 (up) | bits per real value | accuracy | difference | "
             "relative error | KL |", "|---|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for spec in args.specs:
        if spec.startswith("pq:"):
            m, k = (int(v) for v in spec.split(":")[1:])
            if calibration is None:
                loader = task.loader(task.encode(model.train), 64, shuffle=True, seed=0)
                rows = []
                with torch.no_grad():
                    for i, b in enumerate(loader):
                        if i >= args.calibration_batches:
                            break
                        rows.append(model.split.client(b).hidden[b["attention_mask"].bool()])
                calibration = torch.cat(rows)
            pq = ProductQuantizer(calibration, m, k)
            acc, ratio, bpv, rel, kl = probe(lambda step, h, mask, pq=pq: pq.round_trip(h, mask))
        else:
            plain = OmegaConf.to_container(OmegaConf.create(spec))
            # A sender and a receiver, as in the channel (stateful codecs keep per-side state);
            # the test split is one round.
            tx, rx = build_codec(plain), build_codec(plain)

            def round_trip(step, h, mask, tx=tx, rx=rx):
                ctx = CodecContext(direction="up", step=step, seed=1, attention_mask=mask)
                data = tx.encode(h, ctx)
                return rx.decode(data, ctx), len(data)
            acc, ratio, bpv, rel, kl = probe(round_trip)
        line = (f"| `{spec}` | {ratio:.1f}x | {bpv:.3f} | {acc:.2f} % | {acc - base:+.2f} | "
                f"{rel:.4f} | {kl:.4f} |")
        add_row(lines, line)
    write_table(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
