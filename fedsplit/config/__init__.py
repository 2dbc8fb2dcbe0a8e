"""Run configuration: schema (:mod:`~fedsplit.config.schema`), reading and validation
(:mod:`~fedsplit.config.load`), cross-key and registry checks
(:mod:`~fedsplit.config.checks`).

A configuration is layered, later layers winning: the schema's defaults, a YAML file under
``configs/`` (kebab-case keys), then ``section.key=value`` overrides (or Flower's run
config, where ``""`` keeps the YAML file's value). Everything is checked before any
training starts, and every problem is reported at once, each naming the key, what was
found and what is allowed.
"""

from fedsplit.config.checks import register_check
from fedsplit.config.load import (
    build_config,
    load_config,
    parse_overrides,
    read_flat,
    resolve_config_path,
    to_flat,
    to_yaml,
)
from fedsplit.config.schema import (
    AUGMENTATIONS,
    CONFIG_FILE_KEY,
    RENAMED,
    UNSET,
    ChannelConfig,
    CodecConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    FedsplitConfig,
    FleetConfig,
    ModelConfig,
    PruneConfig,
    QuantConfig,
    RunConfig,
    ServerConfig,
    StrategyConfig,
    TaskConfig,
    TrainConfig,
    default_flat,
    kebab,
    schema_fields,
    sections,
    snake,
)
from fedsplit.paths import project_root, resolve_path

__all__ = [
    "AUGMENTATIONS", "CONFIG_FILE_KEY", "RENAMED", "UNSET", "ChannelConfig", "CodecConfig",
    "ConfigError", "DataConfig", "EvalConfig", "FedsplitConfig", "FleetConfig", "ModelConfig",
    "PruneConfig", "QuantConfig", "RunConfig", "ServerConfig", "StrategyConfig", "TaskConfig",
    "TrainConfig",
    "build_config", "default_flat", "kebab", "load_config", "parse_overrides", "project_root",
    "read_flat", "register_check", "resolve_config_path", "resolve_path", "schema_fields",
    "sections", "snake", "to_flat", "to_yaml",
]
