import tomllib
from pathlib import Path

from fedsplit.config import CONFIG_FILE_KEY, schema_fields
from fedsplit.tools.runconfig import render

ROOT = Path(__file__).resolve().parents[1]


def test_flower_run_config_lists_every_schema_key():
    """Flower rejects --run-config keys missing from pyproject: every key must be there."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    table = project["tool"]["flwr"]["app"]["config"]
    assert set(table) == set(schema_fields()) | {CONFIG_FILE_KEY}
    assert all(v == "" for k, v in table.items() if k != CONFIG_FILE_KEY)
    assert (ROOT / table[CONFIG_FILE_KEY]).is_file()
    assert render() in (ROOT / "pyproject.toml").read_text()


def test_flower_components_point_at_real_apps():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comps = project["tool"]["flwr"]["app"]["components"]
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    import importlib

    for key, cls in (("serverapp", ServerApp), ("clientapp", ClientApp)):
        module, attr = comps[key].split(":")
        assert isinstance(getattr(importlib.import_module(module), attr), cls)


def test_readme_config_reference_is_in_sync():
    from fedsplit.tools.configdoc import render as render_reference

    assert render_reference() in (ROOT / "README.md").read_text(), (
        "README's config reference is stale: regenerate it with python -m fedsplit.tools.configdoc")
