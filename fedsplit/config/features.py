"""Schema sections of the optional features: pruning, quantization, LoRA, privacy.

Part of the configuration schema (:mod:`fedsplit.config.schema` assembles the sections);
each key is documented by its field's help, rendered into the README.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsplit.config.fields import _f


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


# LoRA adapters (fedsplit/models/lora.py)
@dataclass
class LoRAConfig:
    rank: int = _f(0, "LoRA rank r of the adapters injected (with `peft`) into the target "
                   "modules of the global model, on the server and every client alike; "
                   "0 = no LoRA.", lo=0)
    alpha: float = _f(16.0, "LoRA scaling numerator: the update is (alpha / rank) * B A.",
                      lo=0.0)
    dropout: float = _f(0.0, "Dropout on the adapters' input.", lo=0.0, hi=1.0)
    target_modules: list = _f([], "Module names (or suffixes) that get adapters; empty = the "
                              "family's default from peft (q_proj/v_proj for Llama and Qwen2, "
                              "c_attn for GPT-2, query/value for BERT).")
    freeze_a: bool = _f(False, "FFA-LoRA (Sun et al. 2024): keep every A at its shared seeded "
                        "initialisation and train only B, so averaging B over clients is "
                        "exactly averaging the updates B A (docs/lora.md).")


# Privacy defenses (fedsplit/privacy, docs/privacy.md)
@dataclass
class PrivacyConfig:
    act_clip: float = _f(0.0, "DP on the cut activations: each sample's whole activation "
                         "tensor is clipped to this L2 norm on the client, before the codec; "
                         "0 = off.", lo=0.0)
    act_noise: float = _f(0.0, "Noise multiplier sigma: N(0, (sigma * act-clip)^2) is added to "
                          "every clipped activation value; > 0 reports epsilon (needs "
                          "act-clip > 0).", lo=0.0)
    delta: float = _f(1e-5, "delta of the (epsilon, delta) the clients report.", lo=0.0, hi=1.0)
    neighbours: str = _f("zero-out", "Neighbouring datasets of the guarantee: `zero-out` (one "
                         "sample's activations replaced by zeros: sensitivity act-clip) or "
                         "`replace-one` (sensitivity 2 x act-clip).",
                         choices=("zero-out", "replace-one"))
    sgd_clip: float = _f(0.0, "DP-SGD on the client segment: each sample's gradient of the "
                         "client's trainable parameters is clipped to this L2 norm (Opacus); "
                         "0 = off.", lo=0.0)
    sgd_noise: float = _f(0.0, "DP-SGD noise multiplier: N(0, (sigma * sgd-clip)^2) on the sum of "
                          "the clipped gradients of each step; > 0 reports epsilon, composed "
                          "with act-noise (docs/privacy.md).", lo=0.0)
    nopeek: float = _f(0.0, "NoPeek: weight of the distance correlation between each batch's "
                       "inputs (vectors; text: one-hot token sequences) and cut activations "
                       "added to the client's loss; a heuristic, no epsilon; 0 = off.", lo=0.0)
    label_epsilon: float = _f(0.0, "Label DP: each training label is replaced once by "
                              "randomized response with this epsilon (classification); 0 = off.",
                              lo=0.0)
