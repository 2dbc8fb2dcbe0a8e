"""Attacks on what crosses the cut, as an honest-but-curious server runs them.

* :mod:`~fedsplit.privacy.attacks.whitebox`: input reconstruction with the client
  segment's weights (images: TV prior; text: relaxed one-hot tokens);
* :mod:`~fedsplit.privacy.attacks.inversion`: a learned inverse network (images);
* :mod:`~fedsplit.privacy.attacks.labels`: label inference from u-shaped gradients;
* :mod:`~fedsplit.privacy.attacks.scores`: SSIM, PSNR, token recovery, AUC;
* :mod:`~fedsplit.privacy.attacks.harness`: all of them on a config's real split model.
"""

from fedsplit.privacy.attacks.harness import (
    attack_images,
    attack_labels,
    attack_tokens,
    observation,
    trained_layout,
)
from fedsplit.privacy.attacks.inversion import InverseNet, train_inversion
from fedsplit.privacy.attacks.labels import label_inference, ushaped_gradients
from fedsplit.privacy.attacks.scores import auc, psnr, ssim, token_recovery
from fedsplit.privacy.attacks.whitebox import reconstruct_images, reconstruct_tokens

__all__ = [
    "InverseNet", "attack_images", "attack_labels", "attack_tokens", "auc", "label_inference",
    "observation", "psnr", "reconstruct_images", "reconstruct_tokens", "ssim", "token_recovery",
    "trained_layout", "train_inversion", "ushaped_gradients",
]
