"""The Gaussian mechanism on the cut activations: per-sample L2 clipping, then noise.

Each sample's *whole* activation tensor (``hidden[i]``, e.g. ``(T, H)`` or ``(C, H, W)``)
is scaled down to L2 norm at most ``clip``; then every value gets independent noise
``N(0, (noise * clip)^2)``. One sample's release is then a Gaussian mechanism of L2
sensitivity ``clip`` (zero-out neighbours; ``2 * clip`` for replace-one) and noise
multiplier ``noise``; :mod:`fedsplit.privacy.accounting` composes the releases.

Both steps are differentiable: the client backpropagates the server's gradient (taken at
the noisy activations) through the clipping, so training sees the true chain rule.
"""

from __future__ import annotations

import secrets

import torch


def secret_generator(device: torch.device | str = "cpu",
                     seed: int | None = None) -> torch.Generator:
    """A noise generator on ``device`` seeded from the operating system's entropy (``seed``
    only in tests): never from anything the server knows, or it could regenerate the noise
    and subtract it. torch's generator, not a cryptographically secure one."""
    gen = torch.Generator(device=device)
    gen.manual_seed(secrets.randbits(63) if seed is None else int(seed))
    return gen


def clip_per_sample(hidden: torch.Tensor, clip: float) -> torch.Tensor:
    """``hidden`` (B, ...) with each sample's tensor scaled to L2 norm <= ``clip``.

    Samples already inside the ball are unchanged (factor 1); the factor
    ``min(1, clip / ||hidden[i]||)`` is part of the autograd graph.
    """
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    b = hidden.shape[0]
    norms = hidden.reshape(b, -1).norm(dim=1)  # (B,)
    factor = (clip / norms.clamp_min(1e-12)).clamp(max=1.0)  # (B,)
    return hidden * factor.reshape(b, *([1] * (hidden.dim() - 1))).to(hidden.dtype)


class ActivationDP:
    """Clip each sample to ``clip`` and add ``N(0, (noise * clip)^2)`` to every value.

    Parameters
    ----------
    clip
        L2 bound of one sample's activation tensor (> 0).
    noise
        Noise multiplier ``sigma`` (0: clipping only, no privacy guarantee).
    seed
        Seed of the noise generator. ``None`` (what training uses) draws it from the
        operating system's entropy: the server must not be able to regenerate the noise,
        so it is never derived from anything the server knows (run seed, channel seed).
        Tests pass a seed to repeat a draw.
    """

    def __init__(self, clip: float, noise: float, seed: int | None = None) -> None:
        if clip <= 0:
            raise ValueError(f"privacy.act-clip must be > 0 to clip, got {clip}")
        if noise < 0:
            raise ValueError(f"privacy.act-noise must be >= 0, got {noise}")
        self.clip = float(clip)
        self.noise = float(noise)
        self._seed = secrets.randbits(63) if seed is None else int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    @property
    def std(self) -> float:
        """Standard deviation of the noise on each value: ``noise * clip``."""
        return self.noise * self.clip

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:  # one stream per device, each seeded from the secret seed
            gen = secret_generator(device, self._seed + len(self._generators))
            self._generators[device] = gen
        return gen

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """The released activations (B, ...) for ``hidden`` (B, ...), same dtype/device."""
        clipped = clip_per_sample(hidden, self.clip)
        if self.noise == 0:
            return clipped
        noise = torch.randn(hidden.shape, generator=self._generator(hidden.device),
                            device=hidden.device, dtype=torch.float32)
        return clipped + (noise * self.std).to(hidden.dtype)
