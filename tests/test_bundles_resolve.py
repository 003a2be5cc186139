"""`--bundle auto|random-tiny|PATH` resolution used by play, serve and bench."""

import pytest

from runtime import Bundle, ModelConfig
from runtime.session import resolve_bundle


def test_auto_prefers_models_default_then_falls_back(tmp_path, capsys):
    models = tmp_path / "models"
    assert resolve_bundle("auto", models_dir=models).name == "random-tiny"
    assert "no bundle under" in capsys.readouterr().err
    Bundle.random(ModelConfig.tiny(), seed=1).save(models / "a-teacher")
    Bundle.random(ModelConfig.tiny(), seed=2).save(models / "default")
    chosen = resolve_bundle("auto", models_dir=models)
    expected = Bundle.load(models / "default")
    first = next(iter(expected.model.state_dict()))
    assert chosen.model.state_dict()[first].equal(expected.model.state_dict()[first])


def test_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-bundle"):
        resolve_bundle(str(tmp_path / "no-such-bundle"))
