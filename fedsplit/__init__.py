"""fedsplit: federated split learning on Flower.

Layout: ``split`` cuts models into client/server segments; ``channel`` carries per-batch
activations and gradients; ``codecs`` compress them; ``server`` trains the server
segment; ``data``, ``models``, ``config`` and ``metrics`` are the supporting pieces.
Strategies live in the top-level ``strategies`` package, client logic in ``clients``.
"""

__version__ = "0.1.0"
