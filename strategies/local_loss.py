"""Local-loss split learning: clients never wait for the server's gradient.

Each client trains its segment on its *own* loss, computed by a small auxiliary head
(:class:`~fedsplit.split.layout.AuxHead`: pool the cut activations, then a linear
classifier), and sends the cut activations and labels to the server in the background
as it goes; the server trains its segment on whatever arrives and answers with the loss
only (a LOSS frame: no gradient is computed or sent, so the downlink carries ~16 bytes
per batch). The aux heads (one per cut) are global modules averaged like the layers.

After Han et al., "Accelerating Federated Learning with Split Learning on Locally
Generated Losses" (ICML FL workshop, 2021).
"""

from __future__ import annotations

import torch
from torch import nn

from fedsplit.split.base import Batch
from fedsplit.split.layout import AuxHead, ClientPlan, ModelLayout
from strategies import STRATEGIES
from strategies.splitfed import SplitFedAvg


@STRATEGIES.register("local-loss")
class LocalLossSFL(SplitFedAvg):
    """Split learning with client-side auxiliary losses (no gradient downlink)."""

    mode = "local-loss"

    def setup(self, layout: ModelLayout, sample_batch: Batch) -> None:
        """Create one aux head per cut, sized by a two-sample probe of that cut."""
        super().setup(layout, sample_batch)
        probe = {k: v[:2] for k, v in sample_batch.items()}
        # A generator of its own: the aux heads must not shift the run's random stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.run.seed)
            for cut in layout.cuts:
                name = f"aux-head.{cut}"
                if name not in self.extras:
                    self.extras[name] = AuxHead.probe(layout.split(cut).client, probe,
                                                      self.cfg.model.num_labels)

    def aux_head(self, plan: ClientPlan) -> nn.Module | None:
        return self.extras[f"aux-head.{plan.cut}"]
