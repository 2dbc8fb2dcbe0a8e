"""Tasks: what a batch is and how it is scored (see :mod:`fedsplit.tasks.base`).

Registered: ``classification``, ``causal-lm``. Entry points: :func:`build_task`, :func:`evaluate`.
"""

from fedsplit.tasks.base import (
    TARGET_KEY,
    TASKS,
    Objective,
    TargetError,
    Task,
    build_task,
)
from fedsplit.tasks.evaluate import evaluate

# Registration happens where each task is defined.
from fedsplit.tasks import classification as _classification  # noqa: E402,F401
from fedsplit.tasks import causal_lm as _causal_lm  # noqa: E402,F401
from fedsplit.tasks.classification import ClassificationObjective, ClassificationTask

__all__ = ["TARGET_KEY", "TASKS", "ClassificationObjective", "ClassificationTask", "Objective",
           "TargetError", "Task", "build_task", "evaluate"]
