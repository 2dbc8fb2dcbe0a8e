"""`model.name`: a registered builder or a user's `package.module:callable`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from torch import nn

from fedsplit.config import ConfigError, load_config
from fedsplit.models import ModelBuildError, build_model, model_name_problem


def test_a_callable_of_importable_code_builds_the_model(monkeypatch, tmp_path) -> None:
    (tmp_path / "my_models.py").write_text(
        "from torch import nn\n"
        "def build(cfg):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(cfg.in_channels * 4, cfg.num_labels))\n"
        "def build_pretrained(cfg, pretrained=True):\n"
        "    m = build(cfg)\n"
        "    m.pretrained = pretrained\n"
        "    return m\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = SimpleNamespace(name="my_models:build", num_labels=3, in_channels=2)
    model = build_model(cfg)
    assert isinstance(model, nn.Sequential) and model[1].out_features == 3
    cfg.name = "my_models:build_pretrained"
    assert build_model(cfg, pretrained=False).pretrained is False  # passed when accepted
    # The config accepts it (validated by importing it), and rejects what cannot work.
    assert load_config(None, ["model.name=my_models:build"]).model.name == "my_models:build"
    assert model_name_problem("my_models:nope") is not None


@pytest.mark.parametrize(("name", "message"), [
    ("no_such_module_xyz:build", "cannot import 'no_such_module_xyz'"),
    ("fedsplit.models:NO_SUCH", "has no attribute 'NO_SUCH'"),
    ("my-pkg:build", "not of the form"),
    ("nope", "unknown model 'nope'"),
])
def test_bad_model_names_fail_config_validation_with_the_fix(name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"model.name={name}"])


def test_a_builder_that_returns_no_module_is_refused(monkeypatch, tmp_path) -> None:
    (tmp_path / "bad_models.py").write_text("def build(cfg):\n    return 'a string'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelBuildError, match="returned str, not a torch.nn.Module"):
        build_model(SimpleNamespace(name="bad_models:build", num_labels=2, in_channels=1))
