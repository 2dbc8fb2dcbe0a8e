"""Render the ``[tool.flwr.app.config]`` table of pyproject.toml from the config schema.

Flower rejects ``--run-config`` keys that the table lacks, so the table lists every
schema key; its values are ``""`` ("keep what the YAML file in ``config`` says").
``tests/test_pyproject.py`` checks the table is in sync:
``python -m fedsplit.tools.runconfig`` prints it.
"""

from __future__ import annotations

from fedsplit.config import CONFIG_FILE_KEY, schema_fields

DEFAULT_CONFIG_FILE = "configs/default.yaml"


def render() -> str:
    lines = [
        "[tool.flwr.app.config]",
        "# `config` picks a YAML file; any `section.key` below overrides it, e.g.",
        '#   flwr run . --run-config "config=\'configs/sst2_minilm.yaml\' train.rounds=3"',
        '# "" keeps the value from the YAML file (generated: python -m fedsplit.tools.runconfig).',
        f'{CONFIG_FILE_KEY} = "{DEFAULT_CONFIG_FILE}"',
    ]
    lines += [f'"{key}" = ""' for key in schema_fields()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
