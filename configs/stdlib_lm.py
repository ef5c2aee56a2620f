"""A byte-level decoder-only Transformer (4 layers in one ``nn.scan`` stack)
trained on the Python standard library's own sources, split by file: MCQ at
bit budgets 3/4/8 and group sizes 32/128/per channel against round-to-nearest
and stochastic rounding, in test bits per byte."""

import ml_collections

from experiments import defaults


def get_config():
  config = defaults.base(
    "stdlib_lm",
    data=dict(
      name="stdlib_text",
      context=128,
      test_fraction=0.2,
      # ~340 steps of 32 windows: about 6 minutes on a 2-core CPU.
      train_bytes=1_400_000,
      test_bytes=32_768,
    ),
    model=dict(
      name="decoder_lm", dim=128, depth=4, heads=4, mlp_dim=512, context=128
    ),
    train=dict(
      epochs=1,
      batch_size=32,
      learning_rate=3e-3,
      weight_decay=1e-2,
      warmup_steps=30,
    ),
  )
  config.task = "language_model"
  # The nn.scan stack: one tensor per layer (stack_axes=0).
  config.stacked = "^layers/.*/kernel$"
  config.eval_batch_size = 128
  config.sweep = ml_collections.ConfigDict(
    dict(
      seeds=3,
      samples_per_weight=[0.5, 1.0, 2.0, 4.0, 8.0, 16.0],
      bits=[3, 4, 8],
      group_sizes=[32, 128, None],
      variants=[
        "systematic",
        "deterministic",
        "systematic+refit",
        "deterministic+refit",
      ],
      activation_weight_bits=[4, 8],
      activation_bits=[8],
      qwix=["int8", "int4"],
      qwix_activations=True,
    )
  )
  return config
