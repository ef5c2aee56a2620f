"""Shared defaults of the configs in ``configs/``: one place to edit a study."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def sweep() -> ml_collections.ConfigDict:
  """The full study grid (see ``experiments.sweep``)."""
  return ml_collections.ConfigDict(
    dict(
      seeds=5,
      samples_per_weight=[0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0],
      samplers=["stratified", "systematic", "iid"],
      granularities=["per_tensor", "per_channel"],
      sorts=[False, True],
      activation_weight_samples=[1.0, 2.0, 4.0, 8.0],
      activation_samples=[0.5, 1.0, 2.0, 4.0, 8.0, 16.0],
      ensembles=[4, 16],
      ensemble_samples_per_weight=[0.25, 0.5, 1.0, 2.0],
      ensemble_bits=[2, 3, 4],
      baseline_bits=[2, 3, 4, 5, 6, 8],
      baseline_granularities=["per_tensor", "per_channel"],
      qwix=["int8", "int4"],
      qwix_activations=True,
    )
  )


def base(
  name: str, data: dict, model: dict, train: dict
) -> ml_collections.ConfigDict:
  """A run config: data, model, training recipe, sweep and output folder."""
  data_defaults = dict(
    test_fraction=0.25,
    split_seed=0,
    data_dir=config_dict.placeholder(str),
    download=False,
    manual_dir=config_dict.placeholder(str),
    train_examples=config_dict.placeholder(int),
    test_examples=config_dict.placeholder(int),
    image_size=config_dict.placeholder(int),
  )
  train_defaults = dict(
    optimizer="adamw",
    learning_rate=3e-3,
    weight_decay=1e-4,
    batch_size=128,
    epochs=30,
    warmup_steps=0,
    seed=0,
    flip=False,
    crop_pad=0,
  )
  return ml_collections.ConfigDict(
    dict(
      name=name,
      seed=0,
      output_dir=f"runs/{name}",
      cache_dir="runs/checkpoints",
      eval_batch_size=1000,
      data={**data_defaults, **data},
      model=model,
      train={**train_defaults, **train},
      # The setting every study varies around; also the library's defaults.
      reference=dict(
        sampler="systematic", granularity="per_channel", sort=False
      ),
      sweep=sweep(),
    )
  )


def imagenet(name: str, model: dict) -> ml_collections.ConfigDict:
  """An ImageNet (ILSVRC 2012) run through TFDS; the archives must be in
  ``data.manual_dir`` (TFDS cannot download them). Accelerator-scale.

  The loader keeps images in memory as uint8 at ``image_size`` 224 (150 KB
  each), so training uses a seeded subset of ``data.train_examples`` images
  (100,000 = 15 GB; raise it where memory allows) and evaluation a
  10,000-image subset of the validation split: accuracies are those of that
  recipe, not of the reference ResNet training.
  """
  config = base(
    name,
    data=dict(
      name="imagenet2012",
      image_size=224,
      train_examples=100000,
      test_examples=10000,
    ),
    model=model,
    train=dict(
      optimizer="sgd",
      learning_rate=0.1,
      weight_decay=1e-4,
      epochs=90,
      batch_size=256,
      warmup_steps=5000,
      flip=True,
    ),
  )
  config.eval_batch_size = 250
  # Sampling a 10-25M-parameter model per seed: drop the O(N)-memory iid
  # sampler and the larger ensembles from the default grid.
  config.sweep.samplers = ["stratified", "systematic"]
  config.sweep.ensembles = [4]
  return config
