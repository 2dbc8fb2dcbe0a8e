"""Flower strategies for split learning that users can copy and extend.

Strategies register by name in ``STRATEGIES`` and are selected with ``strategy.name``
in the run config.
"""

from fedsplit.registry import Registry

STRATEGIES: Registry = Registry("strategy")

from strategies import splitfed as _splitfed  # noqa: E402,F401  (registers "splitfed")
