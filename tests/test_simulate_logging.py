"""``python -m fedsplit.simulate`` prints each log line once.

Flower's ``flwr`` logger has its own console handler and propagates to the root logger; a
root handler (``logging.basicConfig``) printed every Flower line twice. The scenario runs
``fedsplit.simulate.main`` in a fresh interpreter (as the command line does; under pytest
the root logger already has pytest's handlers), with ``simulate`` replaced by a stand-in
that logs the way a run does: Flower's logger (INFO, DEBUG, a deprecation warning),
fedsplit's module loggers, and a third-party library's INFO start-up chatter.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Flower prints "<colour>INFO <reset>:      message"; the same record through a root handler
# is the bare message: compare lines without colours and level prefix.
_DECORATION = re.compile(r"\x1b\[[0-9;]*m")
_LEVEL = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s*")

SCENARIO = r'''
import logging
import sys
from pathlib import Path

import fedsplit.simulate as sim
from flwr.common import log
from flwr.common.logger import warn_deprecated_feature


def fake_simulate(config, overrides, clients, cpus_per_client, gpus_per_client=0.0,
                  ray_address=None):
    log(logging.INFO, "flwr-info-line")
    log(logging.DEBUG, "flwr-debug-line")
    warn_deprecated_feature("flwr-deprecated-line")
    logging.getLogger("fedsplit").info("fedsplit-info-line")
    logging.getLogger("fedsplit.channel.server").info("fedsplit-child-line")
    logging.getLogger("fedsplit.ray_runtime").warning("fedsplit-warning-line")
    logging.getLogger("alembic.runtime.plugins").info("thirdparty-info-line")
    logging.getLogger("some.library").warning("thirdparty-warning-line")
    return Path("run-dir")


sim.simulate = fake_simulate
sys.exit(sim.main(["--clients", "2"]))
'''


def _run_scenario() -> str:
    proc = subprocess.run([sys.executable, "-c", SCENARIO], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_simulate_prints_each_log_line_once():
    out = _run_scenario()
    lines = [_LEVEL.sub("", _DECORATION.sub("", line).strip()) for line in out.splitlines()]
    lines = [line for line in lines if line]
    repeated = {line: n for line, n in Counter(lines).items() if n > 1}
    assert not repeated, f"lines printed more than once: {repeated}\n--- output ---\n{out}"

    def count(marker: str) -> int:
        return sum(marker in line for line in lines)

    # what a run shows, exactly once each
    for marker in ("flwr-info-line", "fedsplit-info-line", "fedsplit-child-line",
                   "fedsplit-warning-line", "thirdparty-warning-line", "run directory: run-dir"):
        assert count(marker) == 1, f"{marker!r} printed {count(marker)} times:\n{out}"
    # Flower's deprecation warning: once (its text spans lines; the name appears once)
    assert count("flwr-deprecated-line") == 1, out
    # and what it no longer shows: Flower's DEBUG records, libraries' INFO chatter
    assert count("flwr-debug-line") == 0, out
    assert count("thirdparty-info-line") == 0, out


def test_configure_logging_is_idempotent():
    import logging

    from fedsplit.simulate import configure_logging

    logger = logging.getLogger("fedsplit")
    before = list(logger.handlers)
    propagate, level = logger.propagate, logger.level
    try:
        configure_logging()
        configure_logging()
        added = [h for h in logger.handlers if h not in before]
        assert len(added) == 1
        assert logger.propagate is False
    finally:
        for handler in logger.handlers[:]:
            if handler not in before:
                logger.removeHandler(handler)
        logger.propagate, logger.level = propagate, level
