"""``u-shaped``: the targets and the loss never leave the client.

Client: the *front* (embeddings / first blocks up to the cut) and the *tail* (the blocks
after the back cut and the head); server: the middle. Per batch the client sends the
cut activations (no targets), gets the middle's output back, runs its tail and the loss,
sends the gradient of the middle's output up (a BACK frame) and gets the gradient at the
cut back. Activations also travel down (with the ``up`` codec spec) and gradients up
(with the ``down`` spec), each stream with its own codec instance.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedsplit.modes.base import (
    SAMPLE_IDS,
    BadStepError,
    LocalResult,
    LoopHooks,
    Mode,
    Served,
    StepInput,
    register_mode,
)
from fedsplit.optim import run_progress, set_lr
from fedsplit.split.base import LayoutError
from fedsplit.runtime import module_device


class UShapedClient(nn.Module):
    """Front (embeddings + first layers) and tail (last layers + head) of a u-shaped client."""

    def __init__(self, front: nn.Module, tail: nn.Module) -> None:
        super().__init__()
        self.front = front
        self.tail = tail


@dataclass
class _Pending:
    """A client's forward through the middle, waiting for the gradient of its output."""

    step: int
    copy: Any  # the trainer's copy (module, optimizer, lock)
    shape: tuple[int, ...]  # of the output, which the gradient must match
    hidden: torch.Tensor  # replica: the leaf at the cut; shared: the input, re-run later
    side: dict[str, torch.Tensor]
    output: torch.Tensor | None  # replica: the graph's output; shared: None
    rng: torch.Tensor | None  # shared: the RNG state of the forward, for the re-run


@register_mode
class UShapedMode(Mode):
    name = "u-shaped"
    sends_targets = False
    needs_back_cut = True

    # ------------------------------------------------------------------ layout
    def check(self, layout: Any, plan: Any) -> None:
        assert plan.back_cut is not None
        if not plan.cut < plan.back_cut <= layout.hi:
            raise LayoutError(
                f"u-shaped back cut {plan.back_cut} must lie in {plan.cut + 1}..{layout.hi} "
                f"(after the front cut {plan.cut}; at {layout.hi} the client keeps only the "
                "head)")
        layout.check_spans()  # the model must be one whose middle and tail can be built

    def client_module(self, layout: Any, plan: Any, aux: nn.Module | None) -> nn.Module:
        return UShapedClient(layout.split(plan.cut).client, layout.tail(plan.back_cut))

    def server_module(self, layout: Any, plan: Any) -> nn.Module | None:
        return layout.middle(plan.cut, plan.back_cut)

    # ------------------------------------------------------------------ client
    def train(self, module: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
              channel: Any, optimizer: torch.optim.Optimizer, objective: Any,
              hooks: LoopHooks) -> LocalResult:
        result = LocalResult()
        start = time.perf_counter()
        module.train()
        for batch in hooks.each(batches, result):
            targets = objective.targets(batch)
            t0 = time.perf_counter()
            with hooks.counted():
                cut = module.front(batch)  # cut.hidden: (B, ...) at the front cut
                t1 = time.perf_counter()
                middle = channel.forward(cut.hidden, cut.side, batch.get(SAMPLE_IDS))
                middle = middle.to(cut.hidden.device)  # (B, ...) the server's output
                t2 = time.perf_counter()
                middle.requires_grad_(True)
                output = module.tail(middle, cut.side)  # (B, C)
            loss = objective.loss(output, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # the tail's gradients, and middle.grad
            assert middle.grad is not None
            t3 = time.perf_counter()
            grad = channel.backward(middle.grad)  # gradient at the front cut, (B, ...)
            t4 = time.perf_counter()
            cut.hidden.backward(grad.to(cut.hidden.device))
            optimizer.step()
            hooks.stepped()
            result.compute_seconds += (t1 - t0) + (t3 - t2) + (time.perf_counter() - t4)
            result.add(int(targets.shape[0]), float(loss.detach()),
                       objective.correct(output, targets), objective.count(targets))
            hooks.done()
        channel.finish()
        result.seconds = time.perf_counter() - start
        return result

    # ------------------------------------------------------------------ channel
    def open_session(self, session: Any, build_codec: Any, up: Any, down: Any) -> None:
        session.down_act, session.up_grad = build_codec(up), build_codec(down)

    def step_fields(self) -> tuple[str, ...]:
        return ("batch",)

    def serve_step(self, trainer: Any, session: Any, step: StepInput) -> Served:
        """First half: the middle layers' output for the client's activations."""
        if step.hidden.shape[0] != step.batch:
            raise BadStepError(f"`batch` says {step.batch} samples, the activations hold "
                               f"{step.hidden.shape[0]}")
        out = self.forward_middle(trainer, session.client, step.hidden, step.side, step.step)
        session.pending = step.step  # the step counts once its BACK is done
        session.pending_mask = step.side.get("attention_mask")
        return Served("MIDDLE", {"act": session.down_act.encode(out, step.ctx_down)})

    def serve_back(self, trainer: Any, session: Any, step: int, grad: bytes) -> Served:
        """Second half: the gradient of the middle's output comes up (encoded ``grad``),
        the gradient at the cut goes down."""
        from fedsplit.codecs import CodecContext

        if session.pending is None or step != session.pending:
            raise BadStepError(f"no STEP {step} awaits its gradient (replayed or out-of-order "
                               "request)")
        mask = session.pending_mask
        ctx_up = CodecContext(direction="up", step=step, seed=session.seed, attention_mask=mask)
        ctx_down = CodecContext(direction="down", step=step, seed=session.seed,
                                attention_mask=mask)
        grad_out = session.up_grad.decode(grad, ctx_up)
        cut_grad = self.backward_middle(trainer, session.client, grad_out, step)
        session.pending, session.pending_mask = None, None
        return Served("GRAD", {"grad": session.down.encode(cut_grad, ctx_down)},
                      int(cut_grad.shape[0]))

    # ------------------------------------------------------------------ server
    @staticmethod
    def forward_middle(trainer: Any, client: str, hidden: torch.Tensor,
                       side: dict[str, torch.Tensor], step: int = 0) -> torch.Tensor:
        """The middle layers' output for the client's activations (keeps what the
        gradient of that output will need)."""
        route = trainer.route(client)
        trainer.check_activations(hidden, side, route.plan.cut)
        if route.plan.mode != UShapedMode.name:
            raise BadStepError(f"client {client} is not a u-shaped client this round")
        c = trainer.copy_for(client)
        shared = route.segments == "shared"
        device = module_device(c.module)
        side = {k: v.to(device) for k, v in side.items()}
        with c.lock:
            c.module.train()
            rng = torch.get_rng_state() if shared else None
            h = hidden.detach().to(device)
            h = h if shared else h.requires_grad_(True)  # (B, ...) at the cut
            try:
                with torch.set_grad_enabled(not shared):
                    out = c.module(h, side)  # (B, ...) the middle's output
            except (RuntimeError, ValueError, IndexError) as exc:
                raise BadStepError(f"server segment cannot process activations of shape "
                                   f"{tuple(hidden.shape)}: {exc}") from None
        # The shared copy may change before the gradient comes back (other clients): keep
        # only the input and the RNG state, and re-run the forward then (no lock held
        # between the two calls, so a client that never returns blocks no one).
        trainer.pending[client] = _Pending(step, c, tuple(out.shape), h, dict(side),
                                           None if shared else out, rng)
        return out.detach()

    @staticmethod
    def backward_middle(trainer: Any, client: str, grad_output: torch.Tensor,
                        step: int = 0) -> torch.Tensor:
        """Backprop the gradient of the middle's output, update the middle layers, return
        the gradient at the cut."""
        pending = trainer.pending.get(client)
        if pending is None or pending.step != step:
            raise BadStepError(f"client {client}: no forward of step {step} awaits its gradient")
        if tuple(grad_output.shape) != pending.shape or not grad_output.is_floating_point():
            raise BadStepError(f"gradient must be floating point of the middle output's shape "
                               f"{pending.shape}, got {tuple(grad_output.shape)} "
                               f"{grad_output.dtype}")
        if not torch.isfinite(grad_output).all():
            raise BadStepError("gradient contains NaN or Inf")
        del trainer.pending[client]  # checked: from here on the step happens
        c = pending.copy
        with c.lock:
            set_lr(c.optimizer, trainer.train_cfg,
                   run_progress(trainer.train_cfg, trainer.server_round, step))
            out, h = pending.output, pending.hidden
            if out is None:  # shared: re-run the forward with the same dropout
                h = h.requires_grad_(True)
                with torch.random.fork_rng(devices=[]):
                    assert pending.rng is not None
                    torch.set_rng_state(pending.rng)
                    out = c.module(h, pending.side)
            c.optimizer.zero_grad(set_to_none=True)
            out.backward(grad_output.to(out.device, out.dtype))
            c.optimizer.step()
            c.examples += int(grad_output.shape[0])
        assert h.grad is not None
        return h.grad
