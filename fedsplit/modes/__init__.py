"""Training modes (see :mod:`fedsplit.modes.base`): ``split``, ``local-loss``,
``u-shaped``, ``full``; one registry, :data:`MODES`."""

from fedsplit.modes.base import (
    MODES,
    SAMPLE_IDS,
    BadStepError,
    LocalResult,
    LoopHooks,
    Mode,
    Served,
    StepInput,
    register_mode,
)

# Registration happens where each mode is defined.
from fedsplit.modes import full as _full  # noqa: E402,F401
from fedsplit.modes import local_loss as _local_loss  # noqa: E402,F401
from fedsplit.modes import split as _split  # noqa: E402,F401
from fedsplit.modes import ushaped as _ushaped  # noqa: E402,F401
from fedsplit.modes.local_loss import AuxHead, LocalLossClient
from fedsplit.modes.ushaped import UShapedClient

__all__ = ["MODES", "SAMPLE_IDS", "AuxHead", "BadStepError", "LocalLossClient", "LocalResult",
           "LoopHooks", "Mode", "Served", "StepInput", "UShapedClient", "register_mode"]
