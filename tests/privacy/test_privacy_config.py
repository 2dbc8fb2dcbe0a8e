"""The privacy section's checks: each problem named with its fix."""

from __future__ import annotations

import pytest

from fedsplit.config import ConfigError, load_config


def test_privacy_settings_are_validated():
    cfg = load_config(overrides={"privacy.act-clip": 2.0, "privacy.act-noise": 0.8,
                                 "privacy.nopeek": 0.5, "privacy.label-epsilon": 1.0})
    assert (cfg.privacy.act_clip, cfg.privacy.act_noise) == (2.0, 0.8)
    with pytest.raises(ConfigError, match="privacy.act-clip > 0"):
        load_config(overrides={"privacy.act-noise": 1.0})
    with pytest.raises(ConfigError, match="privacy.neighbours"):
        load_config(overrides={"privacy.neighbours": "add-remove"})
    with pytest.raises(ConfigError, match="classification only"):
        load_config(overrides={"privacy.label-epsilon": 1.0, "task.name": "causal-lm"})
