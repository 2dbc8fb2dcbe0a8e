"""Gradient probe: what does a down codec's error do to the client's parameter gradient?

    python experiments/grad_probe.py                             # a default set
    python experiments/grad_probe.py --specs "[drop-padding, rotate, sign]"

Loads a finished run's global model and, for training batches of the run's batch size,
computes the cut-layer gradient of the loss (the server segment's backward), sends it
through each down codec (encode, exact bytes, decode; one sender and one receiver, the
batches as one round) and backpropagates what arrives through the client segment. Reported
per codec: bits per real (unpadded) value, the relative squared error of the client's
parameter gradient against the uncompressed one and their cosine, averaged over the
batches after ``--skip`` (warm-up messages of stateful codecs), and its *bias*: the
relative squared error of the mean of ``--repeats`` encodings of the same batch (other
steps, so other random draws). An unbiased codec's bias column falls as 1/repeats; a
deterministic or truncating one keeps its error there, and over many steps that is the
part that does not average out (per-step error alone has not predicted training
accuracy: ``klt`` at 0.5 bits has little per-step error and trained worst). The network's adaptation
and the up direction are left out; ``cut_probe.py`` is the up direction's probe.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from experiments.common import FinishedModel, add_row, probe_parser, write_table  # noqa: E402
from fedsplit.codecs.base import CodecContext, build_codec  # noqa: E402

DEFAULT_SPECS = [
    "[drop-padding, {name: quantize, bits: 8, scale: per-token}]",
    "[drop-padding, rotate, sign]",
    "[drop-padding, {name: row-sampling, fraction: 0.2}, rotate, sign]",
    "[drop-padding, {name: klt, bits: 0.5, fit-rows: 400}]",
    "[drop-padding, {name: klt-ec, bits: 0.15, rounding: stochastic, fit-rows: 400, "
    "basis-dtype: adaptive}]",
    "[drop-padding, {name: klt-ec, bits: 0.15, rounding: stochastic, fit-rows: 400, "
    "basis-dtype: adaptive, min-bits: 0}]",
    "[drop-padding, {name: klt-ec, bits: 0.3, rounding: stochastic, fit-rows: 400, "
    "basis-dtype: adaptive}]",
]


def main(argv: list[str] | None = None) -> int:
    parser = probe_parser(__doc__)
    parser.add_argument("--specs", nargs="+", default=DEFAULT_SPECS)
    parser.add_argument("--batches", type=int, default=40, help="training batches (a round)")
    parser.add_argument("--skip", type=int, default=8,
                        help="first batches left out of the averages (codec warm-up)")
    parser.add_argument("--repeats", type=int, default=8,
                        help="encodings of each batch averaged for the bias column")
    args = parser.parse_args(argv)

    model = FinishedModel(args.config, args.checkpoint)
    task, client, server = model.task, model.split.client, model.split.server
    batch_size = int(task.cfg.train.batch_size)
    loader = task.loader(task.encode(model.train), batch_size, shuffle=True, seed=0)
    batches = [b for _, b in zip(range(args.batches), loader, strict=False)]
    params = [p for p in client.parameters() if p.requires_grad]
    grads = []  # the cut gradient of each batch, uncompressed
    for b in batches:
        cut = client(b)
        hidden = cut.hidden.detach().requires_grad_()
        loss = torch.nn.functional.cross_entropy(server(hidden, cut.side), b["labels"])
        grads.append(torch.autograd.grad(loss, hidden)[0])

    lines = [f"{model.header}, {len(batches)} training batches of {batch_size} as one round "
             f"(first {args.skip} left out of the averages), down direction only.", "",
             "| down codec | bits per real value | parameter-gradient relative error | "
             f"cosine | bias (mean of {args.repeats}) |", "|---|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for spec in args.specs:
        plain = OmegaConf.to_container(OmegaConf.create(spec))
        tx, rx = build_codec(plain), build_codec(plain)
        sent = values = 0
        rel, cos, bias = [], [], []
        for step, (b, g) in enumerate(zip(batches, grads, strict=True)):
            mask = b["attention_mask"]
            ctx = CodecContext(direction="down", step=step, seed=3, attention_mask=mask)
            data = tx.encode(g, ctx)
            arrived = rx.decode(data, ctx)
            sent += len(data)
            values += int(mask.sum()) * g.shape[-1]
            if step < args.skip:
                continue
            mean = arrived.clone()
            for r in range(1, args.repeats):  # the same batch at other steps
                again = CodecContext(direction="down", step=10_000 * r + step, seed=3,
                                     attention_mask=mask)
                mean += rx.decode(tx.encode(g, again), again)
            mean /= args.repeats
            hidden = client(b).hidden
            a, c, m = (torch.cat([t.double().flatten() for t in torch.autograd.grad(
                hidden, params, grad_outputs=out, retain_graph=True)])
                for out in (g, arrived, mean))
            energy = a.square().sum()
            rel.append(float((c - a).square().sum() / energy))
            cos.append(float(torch.nn.functional.cosine_similarity(a, c, dim=0)))
            bias.append(float((m - a).square().sum() / energy))
        add_row(lines, f"| `{spec}` | {8 * sent / values:.3f} | {sum(rel) / len(rel):.3f} | "
                       f"{sum(cos) / len(cos):.3f} | {sum(bias) / len(bias):.3f} |")
    write_table(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
