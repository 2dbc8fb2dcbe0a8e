"""The attacks on fedsplit's real split models, as an honest-but-curious server runs them.

The model is the one a config describes (``fedsplit.models.build_model`` +
``client_layout``), optionally with the weights of a finished run (its
``checkpoint.pt``), so the same code attacks a model trained with or without a defense.
What the server sees is modelled by :func:`observation`: the client's defense from the
config's ``privacy`` section (clipping + noise with a fresh seed), then the configured
``codec.up`` from a sender to a receiver, stateful codecs in the state the client's earlier
batches of the round left them in (codecs as implicit defenses).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fedsplit.codecs.link import Link
from fedsplit.privacy.attacks.inversion import Observe, train_inversion, train_token_inversion
from fedsplit.privacy.attacks.labels import label_inference, ushaped_gradients
from fedsplit.privacy.attacks.scores import psnr, ssim, token_recovery
from fedsplit.privacy.attacks.whitebox import reconstruct_images, reconstruct_tokens
from fedsplit.privacy.mechanism import ActivationDP
from fedsplit.pruning import token_embedding
from fedsplit.tensors import cat_padded



def trained_layout(cfg: Any, run_dir: str | Path | None = None, pretrained: bool = True) -> Any:
    """The ``ModelLayout`` of ``cfg``'s model; with ``run_dir``, holding the weights of that
    run's last checkpoint (global client segment and server segment at ``model.cut``)."""
    from fedsplit.models import build_model
    from fedsplit.split.layout import client_layout

    torch.manual_seed(cfg.run.seed)
    layout = client_layout(build_model(cfg.model, pretrained=pretrained), cfg)
    if run_dir is not None:
        from fedsplit.server import checkpoint

        saved = checkpoint.load(Path(run_dir))
        split = layout.split(cfg.model.cut)
        split.client.load_state_dict(saved["client_segment"])
        split.server.load_state_dict(saved["server_trainer"]["segment"])
    layout.root.eval()  # attacks see the deterministic model (no dropout)
    return layout


def codec_spec(cfg: Any, direction: str) -> Any:
    """The plain (YAML-free) spec of ``codec.up``/``codec.down``, as the server reads it."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.codec, resolve=True)[direction]


def _identity(spec: Any) -> bool:
    return spec in ("identity", "", None, [])


def observation(cfg: Any, spec: Any = None,
                warmup: Iterable[tuple[torch.Tensor, Mapping[str, torch.Tensor]]] = (),
                stream: bool = False) -> Observe:
    """``observe(hidden, side)``: what the server decodes for activations ``hidden``
    (B, ...): the config's DP on the activations, then the codec ``spec`` (default
    ``codec.up``) through a sender and a receiver (:class:`~fedsplit.codecs.link.Link`).

    Stateful codecs are applied as in training, where the observed batch is not the
    round's first: the link first carries ``warmup``, the client's own earlier batches of
    the round (``(hidden, side)`` pairs, defended the same way), so ``klt`` has fitted its
    basis from the client's rows. Then every observation is the next message after the
    warm-up (from a copy of the warmed link: the attacker simulates the client's codec
    with the state it received, e.g. the basis) or, with ``stream``, the stream goes on
    (each call the next message of the round)."""
    privacy = cfg.privacy
    dp = ActivationDP(privacy.act_clip, privacy.act_noise) if privacy.act_clip > 0 else None
    spec = codec_spec(cfg, "up") if spec is None else spec

    def defend(hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return dp(hidden) if dp is not None else hidden.detach()

    if _identity(spec):
        return lambda hidden, side: defend(hidden)
    link = Link(spec, cfg.run.seed)
    for hidden, side in warmup:
        link(defend(hidden), side)

    def observe(hidden: torch.Tensor, side: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return (link if stream else copy.deepcopy(link))(defend(hidden), side)

    return observe


def image_bounds(cfg: Any, channels: int) -> tuple[torch.Tensor, torch.Tensor,
                                                   torch.Tensor, torch.Tensor]:
    """(mean, std, lo, hi), each (1, C, 1, 1): the normalization of ``data.mean/std``
    (none: 0 and 1) and the normalized values of pixels 0 and 1."""
    mean = torch.tensor(list(cfg.data.mean) or [0.0] * channels).reshape(1, -1, 1, 1)
    std = torch.tensor(list(cfg.data.std) or [1.0] * channels).reshape(1, -1, 1, 1)
    return mean, std, (0 - mean) / std, (1 - mean) / std


def attack_images(layout: Any, cut: int, victims: torch.Tensor, aux: Sequence[torch.Tensor],
                  cfg: Any, *, steps: int = 500, inversion_epochs: int = 20,
                  input_key: str = "x",
                  warmup: Sequence[torch.Tensor] = ()) -> dict[str, float]:
    """White-box and learned reconstruction of ``victims`` (B, C, H, W, normalized) from
    what the server observes at ``cut``; SSIM/PSNR on pixels in [0, 1]. ``aux``: the
    attacker's own image batches (a split no client uses); ``warmup``: the client's
    image batches sent before the victims' in the round (stateful codecs)."""
    segment = layout.split(cut).client
    mean, std, lo, hi = image_bounds(cfg, victims.shape[1])
    with torch.no_grad():
        sent = [(segment({input_key: x}).hidden, {}) for x in warmup]
    observe = observation(cfg, warmup=sent)
    with torch.no_grad():
        observed = observe(segment({input_key: victims}).hidden, {})  # (B, ...) at the cut
    clip = cfg.privacy.act_clip or None
    rec = reconstruct_images(segment, observed, tuple(victims.shape), input_key=input_key,
                             steps=steps, clip=clip, bounds=(lo, hi), seed=cfg.run.seed)
    net = train_inversion(segment, aux, lambda h: observe(h, {}), input_key=input_key,
                          epochs=inversion_epochs, seed=cfg.run.seed)
    with torch.no_grad():
        inv = net(observed)

    def pixels(x: torch.Tensor) -> torch.Tensor:
        return (x * std + mean).clamp(0, 1)

    truth = pixels(victims)
    return {"ssim": float(ssim(pixels(rec), truth).mean()),
            "psnr": float(psnr(pixels(rec), truth).mean()),
            "inv_ssim": float(ssim(pixels(inv), truth).mean()),
            "inv_psnr": float(psnr(pixels(inv), truth).mean())}


def attack_tokens(layout: Any, cut: int, batch: Mapping[str, torch.Tensor], cfg: Any, *,
                  steps: int = 300, ignore: Iterable[int] = (),
                  aux: Sequence[Mapping[str, torch.Tensor]] = (),
                  inversion_epochs: int = 20,
                  warmup: Sequence[Mapping[str, torch.Tensor]] = ()) -> dict[str, float]:
    """White-box token recovery at ``cut`` on a text ``batch`` (``input_ids``,
    ``attention_mask``): the share of real tokens (not in ``ignore``) recovered exactly;
    with ``aux`` (the attacker's own text batches, a split no client uses) also the learned
    inversion's (``inv_token_recovery``). ``warmup``: the client's batches sent before
    ``batch`` in the round (stateful codecs)."""
    segment = layout.split(cut).client
    with torch.no_grad():
        sent = [(out.hidden, out.side) for out in (segment(dict(b)) for b in warmup)]
    observe = observation(cfg, warmup=sent)
    with torch.no_grad():
        cut_out = segment(dict(batch))
    observed = observe(cut_out.hidden, cut_out.side)  # (B, T, H)
    ids = reconstruct_tokens(segment, observed, cut_out.side, steps=steps,
                             clip=cfg.privacy.act_clip or None, seed=cfg.run.seed)
    mask = batch.get("attention_mask")
    out = {"token_recovery": token_recovery(ids, batch["input_ids"], mask, ignore)}
    if aux:
        vocab = token_embedding(segment)[1].num_embeddings
        net = train_token_inversion(segment, aux, vocab, observe, epochs=inversion_epochs,
                                    seed=cfg.run.seed)
        with torch.no_grad():
            guessed = net(observed).argmax(-1)  # (B, T)
        out["inv_token_recovery"] = token_recovery(guessed, batch["input_ids"], mask, ignore)
    return out


def attack_labels(layout: Any, cut: int, back_cut: int,
                  batches: Iterable[Mapping[str, torch.Tensor]], objective: Any, classes: int,
                  cfg: Any, *, known: int = 2) -> dict[str, float]:
    """Label inference from the gradients a u-shaped client with front cut ``cut`` and
    back cut ``back_cut`` sends up (through ``codec.down``, the codec of that stream),
    the middle having received the front's activations through the client's defense and
    the client training on randomized-response labels under label DP; scored against the
    true labels."""
    front, middle = layout.split(cut).client, layout.middle(cut, back_cut)
    tail = layout.tail(back_cut)
    down = codec_spec(cfg, "down")  # the client's gradient stream, batch after batch
    through = None if _identity(down) else Link(down, cfg.run.seed, "down")
    observe = observation(cfg, stream=True)  # the middle sees the front's activations as sent
    grads, labels = [], []
    relabel = None
    if cfg.privacy.label_epsilon > 0:  # the client trains on randomized-response labels
        from fedsplit.privacy.label_dp import LabelDP, new_secret

        relabel = LabelDP(cfg.privacy.label_epsilon, classes, new_secret(), objective.key)
    seen = 0
    for batch in batches:
        sent = dict(batch)
        if relabel is not None:
            b = int(objective.targets(batch).shape[0])
            sent["sample_ids"] = torch.arange(seen, seen + b)
            sent = next(relabel([sent]))
            seen += b
        g = ushaped_gradients(front, middle, tail, sent, objective, observe)  # (B, ...)
        grads.append(through(g, batch) if through is not None else g)
        labels.append(objective.targets(batch))
    return label_inference(stack_padded(grads), torch.cat(labels), classes, known=known,
                           seed=cfg.run.seed)


def stack_padded(grads: list[torch.Tensor]) -> torch.Tensor:
    """Batches of per-sample gradients as one ``(N, D)`` tensor: each sample flattened,
    zero-padded at the end to the widest batch. Text batches are padded to their own
    longest sequence, so their ``(B, T, H)`` gradients differ in ``T``; a padding position
    the batch lacks carries no gradient, so zeros are its exact value."""
    return cat_padded([g.reshape(g.shape[0], -1) for g in grads])
