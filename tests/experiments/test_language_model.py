"""The language-model study: its model, plan, metrics and an end-to-end run."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mcq_jax
from experiments import language_model, models, run, sweep
from tests.conftest import REPO_ROOT

CONFIG = str(REPO_ROOT / "configs" / "stdlib_lm.py")


@pytest.fixture(scope="module")
def tiny_lm():
  """A small stacked decoder, its input tokens and its initial variables
  (initializing it eagerly takes seconds: the tests below share one)."""
  model = models.DecoderLM(dim=16, depth=3, heads=2, mlp_dim=32, context=8)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 256)
  return model, tokens, model.init(jax.random.key(1), tokens)


def test_decoder_is_causal_and_stacks_its_layers(tiny_lm):
  model, tokens, variables = tiny_lm
  layers = variables["params"]["layers"]
  assert layers["qkv"]["kernel"].shape == (3, 16, 48)
  assert layers["down"]["kernel"].shape == (3, 32, 16)
  logits = model.apply(variables, tokens)
  assert logits.shape == (2, 8, 256)
  # changing the last token changes no earlier prediction
  edited = tokens.at[:, -1].set((tokens[:, -1] + 1) % 256)
  other = model.apply(variables, edited)
  np.testing.assert_array_equal(logits[:, :-1], other[:, :-1])
  assert not np.array_equal(logits[:, -1], other[:, -1])
  with pytest.raises(ValueError, match="9 tokens exceed the context of 8"):
    model.apply(variables, jnp.zeros((1, 9), jnp.int32))


def test_stacked_decoder_runs_every_kernel_in_integers(tiny_lm):
  # blocked kernels (one integer product per block); the end-to-end run below
  # covers per-channel ones
  group_size = 8
  model, tokens, variables = tiny_lm
  params = variables["params"]
  q = mcq_jax.quantize(
    params,
    jax.random.key(2),
    bits=8,
    where="^layers/.*/kernel$",
    stack_axes=0,
    group_size=group_size,
  )
  q = mcq_jax.quantize(q, jax.random.key(2), bits=8, group_size=group_size)
  assert q["layers"]["up"]["kernel"].scale.shape == (3, 2, 32)
  out, report = mcq_jax.mcq_apply(
    model,
    {"params": q},
    tokens,
    key=jax.random.key(3),
    activation_bits=8,
    per_token=True,
    return_report=True,
  )
  # one entry per stacked layer (for all its iterations) and the head
  assert report.integer_layers == (
    "layers/qkv",
    "layers/out",
    "layers/up",
    "layers/down",
    "head",
  )
  floats = [(r.path, r.layer) for r in report.layers if not r.integer]
  assert floats == [("<root>", "DecoderLM"), ("embed", "Embed")]
  expected = model.apply({"params": mcq_jax.dequantize(q)}, tokens)
  # 8-bit weights and activations: close to the dequantized float model
  assert float(jnp.abs(out - expected).max()) < 0.1 * float(
    jnp.abs(expected).max()
  )


def test_plan_covers_the_study():
  config = run.load_config(CONFIG)
  plan = run.plan(config)
  ids = [s.id for s in plan]
  assert len(ids) == len(set(ids)) and plan[0].method == "float"
  cells = len(config.sweep.bits) * len(config.sweep.group_sizes)
  by_method = {
    m: [s for s in plan if s.method == m]
    for m in ("round_to_nearest", "stochastic_rounding", "mcq_bits")
  }
  assert len(by_method["round_to_nearest"]) == cells
  assert len(by_method["stochastic_rounding"]) == cells
  activations = [s for s in plan if s.activation_bits is not None]
  assert len(by_method["mcq_bits"]) == cells * len(config.sweep.variants) + len(
    activations
  )
  assert {s.group_size for s in by_method["mcq_bits"]} == {32, 128, None}
  assert any(s.refit_scale for s in plan)
  assert any(s.sampler == "deterministic" and s.deterministic for s in plan)
  assert {s.samples_per_weight for s in plan if s.method == "mcq"} == set(
    config.sweep.samples_per_weight
  )


def test_a_misspelt_variant_is_named():
  config = run.load_config(
    CONFIG, ["--config.sweep.variants=['systematic+ls']"]
  )
  with pytest.raises(ValueError, match="variant 'systematic\\+ls'"):
    run.plan(config)


def test_bits_per_byte_of_known_predictions():
  class Data:
    y_test = np.array([[0, 1], [2, 3]])

  evaluator = object.__new__(language_model.Evaluator)
  evaluator.data = Data()
  uniform = jnp.zeros((2, 2, 256))
  got = evaluator.metrics(uniform)
  assert math.isclose(got["bits_per_byte"], 8.0, rel_tol=1e-6)
  # all mass on the right byte: 0 bits; half on it: 1 bit
  sure = jax.nn.one_hot(Data.y_test, 256) * 100.0
  assert evaluator.metrics(sure)["bits_per_byte"] < 1e-6
  assert evaluator.metrics(sure)["accuracy"] == 1.0
  half = jnp.log(
    jnp.where(jax.nn.one_hot(Data.y_test, 256) > 0, 0.5, 0.5 / 255)
  )
  assert math.isclose(
    evaluator.metrics(half)["bits_per_byte"], 1.0, rel_tol=1e-5
  )
  assert evaluator.metrics(None) == {"bits_per_byte": None, "accuracy": None}


def test_weight_error_is_the_quantized_leaves_relative_squared_error():
  rng = np.random.default_rng(0)
  params = {
    "a": {"kernel": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)},
    "b": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)},
    "bias": jnp.ones(3),
  }
  q = mcq_jax.round_to_nearest(params, bits=3, where="^a/")
  w = np.asarray(params["a"]["kernel"], np.float64)
  w_hat = np.asarray(mcq_jax.dequantize(q["a"]["kernel"]), np.float64)
  expected = np.sum((w - w_hat) ** 2) / np.sum(w**2)
  assert math.isclose(sweep.weight_error(params, q), expected, rel_tol=1e-12)
  assert expected > 0
  finer = mcq_jax.round_to_nearest(params, bits=8, where="^a/")
  assert sweep.weight_error(params, finer) < expected / 100


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("lm")
  config = run.load_config(
    CONFIG,
    [
      f"--config.cache_dir={out / 'checkpoints'}",
      f"--config.output_dir={out / 'run'}",
      "--config.data.context=32",
      "--config.data.train_bytes=32768",
      "--config.data.test_bytes=2048",
      "--config.model.dim=16",
      "--config.model.depth=2",
      "--config.model.heads=2",
      "--config.model.mlp_dim=32",
      "--config.model.context=32",
      "--config.train.epochs=2",
      "--config.sweep.seeds=2",
      "--config.sweep.samples_per_weight=[2.0]",
      "--config.sweep.bits=[4, 8]",
      "--config.sweep.group_sizes=[8, None]",
      "--config.sweep.variants=['systematic', 'deterministic+refit']",
      "--config.sweep.activation_weight_bits=[8]",
      "--config.sweep.activation_bits=[8]",
      "--config.sweep.qwix=[]",
    ],
  )
  return config, run.run(config, progress=False, echo=False)


def test_end_to_end_run_reports_bits_per_byte(tiny_run):
  config, result = tiny_run
  records = {r["id"]: r for r in result["records"]}
  assert len(records) == len(run.plan(config))
  float_bpb = records["float"]["bits_per_byte"]
  # trained: better than the 8 bits of a uniform guess
  assert 0.0 < float_bpb < 7.0
  for r in records.values():
    assert r["bits_per_byte"] is not None and math.isfinite(r["bits_per_byte"])
  # at 8 bits every quantizer stays near float; seeds of random ones differ
  for r in records.values():
    if r.get("grid_bits") == 8:
      assert abs(r["bits_per_byte"] - float_bpb) < 0.05, r["id"]
  sr = records["stochastic_rounding|bits=4|per_channel|g=8"]
  assert sr["seeds"] == 2 and sr["bits_per_byte_std"] > 0
  det = records["mcq_bits|bits=4|deterministic|per_channel|g=8|refit"]
  assert det["seeds"] == 1
  # weight error: finer grids err less; random rounding about twice RTN
  rtn4 = records["round_to_nearest|bits=4|per_channel"]["weight_error"]
  rtn8 = records["round_to_nearest|bits=8|per_channel"]["weight_error"]
  assert 0 < rtn8 < rtn4 / 100
  sr4 = records["stochastic_rounding|bits=4|per_channel"]["weight_error"]
  assert 1.3 * rtn4 < sr4 < 3.0 * rtn4
  # MCQ at a budget stores integers of at most that width
  assert records["mcq_bits|bits=4|systematic|per_channel"]["bits"] <= 4.0
  # qkv, out, up, down (each once for the stack) and the head in integers;
  # the embedding and the position table (read by the root) in float
  for group in ("|g=8", ""):
    sampled = records[f"mcq_bits|bits=8|systematic|per_channel{group}|Ab=8"]
    assert sampled["integer_layers"] == "5/7"


def test_end_to_end_run_writes_report_and_plots(tiny_run):
  config, result = tiny_run
  out = result["out_dir"]
  report = result["report"]
  assert "## At equal bits" in report and "## Sampled activations" in report
  assert "relative squared error" in report
  assert "| 4 | 8 |" in report and "| 8 | per channel |" in report
  for name in language_model.PLOTS:
    assert os.path.getsize(os.path.join(out, f"{name}.png")) > 1000
  with open(os.path.join(out, "results.json")) as f:
    saved = json.load(f)
  assert {r["id"] for r in saved["results"]} == {s.id for s in run.plan(config)}
  with open(os.path.join(out, "results.csv")) as f:
    assert f.readline().count("bits_per_byte") == 2
  # the table printed on the command line is the equal-bits one
  assert result["table"].startswith("| bits | groups | round-to-nearest")
