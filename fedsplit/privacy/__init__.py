"""Privacy of what crosses the cut: defenses with computed guarantees, and attacks.

Defenses (config section ``privacy``; docs/privacy.md):

* DP on the cut activations: :class:`ActivationDP` (per-sample clipping + Gaussian
  noise), applied by :class:`PrivateChannel` to everything a client's channel sends,
  accounted with Opacus's RDP accountant (:mod:`fedsplit.privacy.accounting`);
* DP-SGD on the client segment: :class:`~fedsplit.privacy.dpsgd.SegmentDPSGD` (Opacus
  per-sample gradients from the server's cut gradient, clipped and noised), accounted
  together with the activations;
* NoPeek: a distance-correlation term in the client's loss (:mod:`fedsplit.privacy.nopeek`).

Attacks, as an honest-but-curious server runs them: :mod:`fedsplit.privacy.attacks`.
"""

from fedsplit.privacy.accounting import client_metrics, epsilon, round_metrics, steps_before
from fedsplit.privacy.channel import (
    ClientPrivacy,
    PrivacyConfigError,
    PrivateChannel,
    privacy_metrics,
    wrap_channel,
)
from fedsplit.privacy.mechanism import ActivationDP, clip_per_sample

__all__ = [
    "ActivationDP", "ClientPrivacy", "PrivacyConfigError", "PrivateChannel", "client_metrics", "clip_per_sample",
    "epsilon", "privacy_metrics", "round_metrics", "steps_before", "wrap_channel",
]
