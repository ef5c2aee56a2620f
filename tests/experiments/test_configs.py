"""Config files, command-line overrides and ``python -m experiments.run``."""

import jax
import ml_collections
import numpy as np
import pytest

from experiments import models, run
from tests.conftest import DIGITS_MLP_CONFIG, REPO_ROOT

CONFIGS = sorted(str(p) for p in (REPO_ROOT / "configs").glob("*.py"))


def test_every_config_loads_and_plans_a_sweep():
  assert len(CONFIGS) >= 12
  for path in CONFIGS:
    config = run.load_config(path)
    assert isinstance(config, ml_collections.ConfigDict)
    assert config.name in path
    plan = run.plan(config)
    ids = [s.id for s in plan]
    assert len(ids) == len(set(ids)) and plan[0].method == "float"
    assert {s.method for s in plan} >= {
      "mcq",
      "mcq_bits",
      "round_to_nearest",
      "stochastic_rounding",
    }


@pytest.mark.parametrize("path", CONFIGS)
def test_every_config_builds_its_model(path):
  config = run.load_config(path)
  shapes = {
    "digits": (8, 8, 1),
    "mnist5k": (28, 28, 1),
    "mnist": (28, 28, 1),
    "fashion_mnist": (28, 28, 1),
    "cifar10": (32, 32, 3),
    "svhn_cropped": (32, 32, 3),
    "imagenet2012": (224, 224, 3),
  }
  if config.data.name == "stdlib_text":  # byte ids in, next-byte logits out
    model = models.build(config.model, 256)
    x = jax.ShapeDtypeStruct((2, config.data.context), np.int32)
    expected: tuple[int, ...] = (2, config.data.context, 256)
  else:
    classes = 1000 if config.data.name == "imagenet2012" else 10
    model = models.build(config.model, classes)
    x = jax.ShapeDtypeStruct((2, *shapes[config.data.name]), np.float32)
    expected = (2, classes)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  logits = jax.eval_shape(model.apply, variables, x)
  assert logits.shape == expected


def test_overrides_are_typed_and_name_the_field():
  config = run.load_config(
    DIGITS_MLP_CONFIG,
    [
      "--config.sweep.seeds=7",
      "config.train.learning_rate=0.5",
      "--config.sweep.samplers=['iid']",
      "--config.sweep.samples_per_weight=2.0",
      "--config.data.data_dir=/data",
      "--config.reference.sampler=systematic",
    ],
  )
  assert config.sweep.seeds == 7 and config.train.learning_rate == 0.5
  assert config.sweep.samplers == [
    "iid"
  ] and config.sweep.samples_per_weight == [2.0]
  assert (
    config.data.data_dir == "/data" and config.reference.sampler == "systematic"
  )
  with pytest.raises(KeyError, match="sweep.seed'"):
    run.load_config(DIGITS_MLP_CONFIG, ["--config.sweep.seed=3"])
  with pytest.raises(KeyError, match="'nope'"):
    run.load_config(DIGITS_MLP_CONFIG, ["--config.nope.x=3"])
  with pytest.raises(TypeError, match="sweep.seeds"):
    run.load_config(DIGITS_MLP_CONFIG, ["--config.sweep.seeds=many"])
  with pytest.raises(ValueError, match="--config.<field>=<value>"):
    run.load_config(DIGITS_MLP_CONFIG, ["--config.sweep.seeds"])
  with pytest.raises(FileNotFoundError, match="missing.py"):
    run.load_config(str(REPO_ROOT / "configs" / "missing.py"))


def test_command_line(capsys, tmp_path):
  with pytest.raises(SystemExit):
    run.main(["--help"])
  assert "usage: python -m experiments.run [-h]" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    run.main([DIGITS_MLP_CONFIG, "--bogus"])
  assert "unrecognized arguments: --bogus" in capsys.readouterr().err
  bad = tmp_path / "bad.py"
  bad.write_text("x = 1\n")
  with pytest.raises(ValueError, match="defines no get_config"):
    run.load_config(str(bad))
