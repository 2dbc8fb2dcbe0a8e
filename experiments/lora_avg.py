"""How wrong is FedAvg of LoRA factors? avg(B) avg(A) against avg(B A), with and without A frozen.

    python experiments/lora_avg.py                       # table to stdout (~2 min, 2 busy cores)
    python experiments/lora_avg.py --clients 2 8 --steps 1 10 40   # experiments/results/lora_avg.md

Every row starts from one global model (a tiny random Llama, 4 layers, hidden 64, LoRA
r=8 on q_proj/v_proj as ``fedsplit.split.layout.client_layout`` injects it, the same seed
everywhere) whose B factors were first moved away from zero by a few shared warm-up steps
(as after earlier rounds; at B = 0 the first round's cross term starts at zero). Each of
``K`` clients then trains ``S`` local AdamW steps on its own non-IID data (random tokens
from its own slice of the vocabulary) and the same clients' factors are aggregated
both ways, per LoRA module, with equal weights::

    exact  = mean_i (B_i A_i)               what FedAvg of the updates would give
    factor = mean_i(B_i) mean_i(A_i)        what FedAvg of the factors gives

Columns: ``rel. error`` = sum over modules of ||factor - exact||_F / sum of ||exact -
B_0 A_0||_F (the error relative to the size of the round's update); ``loss exact`` /
``loss factor``: the mean loss on held-out batches of every client, of the global model
whose LoRA modules compute ``W x + (alpha / r) P x`` for each aggregate ``P`` (added to
the frozen base weight, adapters zeroed), i.e. what the error costs. With ``lora.freeze-a`` (FFA-LoRA) every A_i is the
shared A_0, so both aggregates are the same matrix and the error is 0 up to rounding.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from fedsplit.config import load_config  # noqa: E402
from fedsplit.models.lora import lora_pairs  # noqa: E402
from fedsplit.optim import make_optimizer  # noqa: E402
from fedsplit.split.layout import client_layout  # noqa: E402

VOCAB, T, BATCH = 128, 16, 8


def tiny_llama(seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T,
        tie_word_embeddings=False))


def batches(client: int, clients: int, n: int, seed: int) -> list[torch.Tensor]:
    """``n`` batches (B, T) of token ids from client ``client``'s slice of the vocabulary
    (non-IID: each client's own tokens, plus a shared low range; client -1: the shared
    range only, for the warm-up)."""
    g = torch.Generator().manual_seed(seed * 1009 + client)
    width = VOCAB // (clients + 1)
    lo = width * (client + 1)
    out = []
    for _ in range(n):
        own = torch.randint(lo, lo + width, (BATCH, T), generator=g)
        shared = torch.randint(0, width, (BATCH, T), generator=g)
        out.append(torch.where(torch.rand(BATCH, T, generator=g) < 0.7, own, shared))
    return out


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def with_products(model: nn.Module, products: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose LoRA modules compute ``W x + P x`` for the given
    ``P = scale * B A`` (adapters zeroed, ``P`` added to the base weight)."""
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    with torch.no_grad():
        for prefix, p in products.items():
            layer = modules[prefix]
            layer.base_layer.weight.add_(p)
            layer.lora_B["default"].weight.zero_()
    return out


def local_factors(glob: nn.Module, data: list[torch.Tensor], cfg, at: set[int],
                  ) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """One client's LoRA factors after each number of local steps in ``at``."""
    model = copy.deepcopy(glob)
    opt = make_optimizer(model.parameters(), cfg.train)
    out = {}
    for step, ids in enumerate(data, 1):
        opt.zero_grad()
        lm_loss(model, ids).backward()
        opt.step()
        if step in at:
            out[step] = lora_pairs({k: v.detach().clone() for k, v in
                                    model.state_dict().items()})
    return out


def aggregate(glob: nn.Module, start: dict, local: list[dict], held_out: list[torch.Tensor],
              scale: float) -> dict[str, float]:
    """Relative error of avg(B) avg(A) against avg(B A), and the loss of each."""
    err = size = 0.0
    exact, factor = {}, {}
    for prefix, (a0, b0) in start.items():
        a = torch.stack([c[prefix][0] for c in local]).double()  # (K, r, in)
        b = torch.stack([c[prefix][1] for c in local]).double()  # (K, out, r)
        exact[prefix] = (b @ a).mean(0)  # (out, in)
        factor[prefix] = b.mean(0) @ a.mean(0)
        err += float(torch.linalg.norm(factor[prefix] - exact[prefix]))
        size += float(torch.linalg.norm(exact[prefix] - b0.double() @ a0.double()))
    losses = {}
    for name, agg in (("exact", exact), ("factor", factor)):
        model = with_products(glob, {p: (scale * m).float() for p, m in agg.items()}).eval()
        with torch.no_grad():
            losses[name] = sum(float(lm_loss(model, ids)) for ids in held_out) / len(held_out)
    return {"error": err / max(size, 1e-30), "exact": losses["exact"],
            "factor": losses["factor"]}


def rows(freeze_a: bool, args) -> list[tuple[int, int, dict[str, float]]]:
    """``(clients, local steps, measures)`` for every setting, one shared global model."""
    cfg = load_config(overrides=[
        "model.cut=2", f"lora.rank={args.rank}", f"lora.alpha={2 * args.rank}",
        f"lora.freeze-a={str(freeze_a).lower()}", "train.optimizer=adamw",
        f"train.lr={args.lr}", f"run.seed={args.seed}"])
    scale = 2.0  # alpha / rank
    glob = client_layout(tiny_llama(args.seed), cfg).root
    opt = make_optimizer(glob.parameters(), cfg.train)  # the shared warm-up, in place
    for ids in batches(-1, 1, args.warmup, args.seed + 1):
        opt.zero_grad()
        lm_loss(glob, ids).backward()
        opt.step()
    start = lora_pairs({k: v.detach().clone() for k, v in glob.state_dict().items()})
    out = []
    for k in args.clients:
        at = set(args.steps)
        local = [local_factors(glob, batches(i, k, max(at), args.seed), cfg, at)
                 for i in range(k)]
        held_out = [ids for i in range(k) for ids in batches(i, k, 1, args.seed + 7)]
        for s in args.steps:
            out.append((k, s, aggregate(glob, start, [c[s] for c in local], held_out, scale)))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    began = time.perf_counter()
    lines = [f"LoRA r={args.rank}, AdamW lr={args.lr}, {args.warmup} shared warm-up steps, "
             f"seed {args.seed}", "",
             "| A | clients | local steps | rel. error of avg(B) avg(A) | loss exact | "
             "loss factor | loss diff |", "|---|---|---|---|---|---|---|"]
    for freeze_a in (False, True):
        for k, s, r in rows(freeze_a, args):
            lines.append(f"| {'frozen (FFA)' if freeze_a else 'trained'} | {k} | {s} | "
                         f"{r['error']:.2e} | {r['exact']:.4f} | {r['factor']:.4f} | "
                         f"{r['factor'] - r['exact']:+.4f} |")
            print(lines[-1], flush=True)
    lines.append("")
    lines.append(f"({time.perf_counter() - began:.1f} s)")
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(f"`python experiments/lora_avg.py "
                                  f"{' '.join(argv or sys.argv[1:])}`\n\n{text}\n")


if __name__ == "__main__":
    main()
