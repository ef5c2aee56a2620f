"""The settings a run sweeps, and how one setting is evaluated for one seed.

A :class:`Setting` is one quantizer configuration (MCQ or a baseline). The
sweep is a union of studies, each a grid around the run's reference setting
(``config.reference``), so the number of settings stays linear in the number
of axes:

- ``weights``: samples per weight x sampler x granularity x sort (MCQ, weights
  only);
- ``activations``: samples per weight x samples per activation
  (``mcq_apply``: sampled activations, integer layers);
- ``ensembles``: the output logits averaged over M independent quantizations,
  for MCQ and stochastic rounding (the unbiased quantizers; a deterministic
  rounding's M copies would be identical);
- ``baselines``: round-to-nearest and stochastic rounding per tensor and per
  channel at each bit-width, and qwix's post-training int8/int4;
- ``equal bits``: MCQ at the same bit-widths and granularities, each group
  drawing the largest ``N`` whose counts fit (``quantize(..., bits=b)``).

Every seed draws its quantization from ``fold_in(key(config.seed), seed)``, so
rows are reproducible one by one and a resumed run gets the same numbers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import mcq_jax
from experiments.datasets import Dataset

METHODS = (
  "float",
  "mcq",
  "mcq_bits",  # MCQ at a bit budget: quantize(..., bits=grid_bits)
  "round_to_nearest",
  "stochastic_rounding",
  "qwix",
)


@dataclasses.dataclass(frozen=True)
class Setting:
  """One quantizer configuration; ``id`` names it in results and on resume."""

  method: str
  samples_per_weight: float | None = None
  activation_samples: float | None = None
  sampler: str | None = None
  granularity: str | None = None
  sort: bool = False
  ensemble: int = 1
  grid_bits: int | None = None  # the baselines' fixed bit-width
  qtype: str | None = None
  group_size: int | None = None  # sub-channel blocks (per channel only)
  refit_scale: bool = False  # MCQ's least-squares scale variant
  activation_bits: int | None = None  # sampled activations at a bit budget

  @property
  def deterministic(self) -> bool:
    """Whether every seed gives the same result (one seed is evaluated)."""
    if self.method in ("float", "round_to_nearest", "qwix"):
      return True
    return (
      self.sampler == "deterministic"
      and self.activation_samples is None
      and self.activation_bits is None
    )

  @property
  def id(self) -> str:
    parts = [self.method]
    if self.method == "mcq":
      parts += [
        f"K={self.samples_per_weight:g}",
        self.sampler,
        self.granularity,
        f"sort={int(self.sort)}",
      ]
      if self.activation_samples is not None:
        parts.append(f"Ka={self.activation_samples:g}")
    elif self.method in ("round_to_nearest", "stochastic_rounding"):
      parts += [f"bits={self.grid_bits}", self.granularity]
    elif self.method == "mcq_bits":
      parts += [f"bits={self.grid_bits}", self.sampler, self.granularity]
    elif self.method == "qwix":
      parts += [
        self.qtype,
        "weights+activations" if self.activation_samples else "weights",
      ]
    # Appended only when set, so the ids of earlier runs' rows still match.
    if self.group_size is not None:
      parts.append(f"g={self.group_size}")
    if self.refit_scale:
      parts.append("refit")
    if self.activation_bits is not None:
      parts.append(f"Ab={self.activation_bits}")
    if self.ensemble > 1:
      parts.append(f"M={self.ensemble}")
    return "|".join(parts)

  @property
  def label(self) -> str:
    """A short human-readable name for tables and legends."""
    if self.method == "float":
      return "float32"
    if self.method == "mcq":
      text = f"MCQ {self.sampler}, {self.granularity.replace('_', ' ')}"
      if self.sort:
        text += ", sorted"
      if self.activation_samples is not None:
        text += ", weights + activations"
    elif self.method == "mcq_bits":
      text = (
        f"MCQ {self.sampler} {self.grid_bits}-bit budget,"
        f" {self.granularity.replace('_', ' ')}"
      )
    elif self.method == "qwix":
      text = f"qwix PTQ {self.qtype}" + (
        ", weights + activations" if self.activation_samples else ""
      )
    else:
      name = (
        "round-to-nearest"
        if self.method == "round_to_nearest"
        else "stochastic rounding"
      )
      text = (
        f"{name} {self.grid_bits}-bit, {self.granularity.replace('_', ' ')}"
      )
    if self.group_size is not None:
      text += f", groups of {self.group_size}"
    if self.refit_scale:
      text += ", least-squares scale"
    if self.activation_bits is not None:
      text += f", {self.activation_bits}-bit sampled activations"
    if self.ensemble > 1:
      text += f", ensemble of {self.ensemble}"
    return text

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def settings(config: Any) -> list[Setting]:
  """All settings of ``config.sweep``, without duplicates, in study order."""
  sweep, ref = config.sweep, config.reference
  out: list[Setting] = [Setting("float")]

  def mcq(
    k,
    sampler=ref.sampler,
    granularity=ref.granularity,
    sort=ref.sort,
    activations=None,
    ensemble=1,
  ):
    return Setting(
      "mcq",
      float(k),
      None if activations is None else float(activations),
      sampler,
      granularity,
      bool(sort),
      ensemble,
    )

  for k in sweep.samples_per_weight:
    for sampler in sweep.samplers:
      for granularity in sweep.granularities:
        for sort in sweep.sorts:
          out.append(mcq(k, sampler, granularity, sort))
  for k in sweep.activation_weight_samples:
    for ka in sweep.activation_samples:
      out.append(mcq(k, activations=ka))
  for m in sweep.ensembles:
    for k in sweep.ensemble_samples_per_weight:
      out.append(mcq(k, ensemble=m))
    for bits in sweep.ensemble_bits:
      out.append(
        Setting(
          "stochastic_rounding",
          granularity=ref.granularity,
          grid_bits=bits,
          ensemble=m,
        )
      )
  for bits in sweep.baseline_bits:
    for granularity in sweep.baseline_granularities:
      out.append(
        Setting("round_to_nearest", granularity=granularity, grid_bits=bits)
      )
      out.append(
        Setting("stochastic_rounding", granularity=granularity, grid_bits=bits)
      )
  for bits in sweep.baseline_bits:
    for granularity in sweep.baseline_granularities:
      out.append(
        Setting(
          "mcq_bits",
          sampler=ref.sampler,
          granularity=granularity,
          grid_bits=bits,
        )
      )
  for qtype in sweep.qwix:
    out.append(Setting("qwix", qtype=qtype))
    if sweep.qwix_activations:
      out.append(Setting("qwix", qtype=qtype, activation_samples=1.0))
  seen, unique = set(), []
  for s in out:
    if s.id not in seen:
      seen.add(s.id)
      unique.append(s)
  return unique


def weight_error(params: Any, params_q: Any) -> float:
  """The quantized leaves' relative squared error, ``sum (w - w_hat)**2 /
  sum w**2`` over all of them together (float64 sums)."""
  pairs = zip(
    jax.tree_util.tree_leaves(params),
    jax.tree_util.tree_leaves(
      params_q, is_leaf=lambda x: isinstance(x, mcq_jax.QArray)
    ),
    strict=True,
  )
  error = total = 0.0
  for w, q in pairs:
    if isinstance(q, mcq_jax.QArray):
      w64 = np.asarray(w, np.float64)
      error += float(
        np.sum((w64 - np.asarray(q.dequantize(), np.float64)) ** 2)
      )
      total += float(np.sum(w64**2))
  return error / total if total else 0.0


def _quantized_stats(params: Any, params_q: Any) -> dict[str, float]:
  report = mcq_jax.summary(params_q)
  return {
    "bits": report.mean_bits,
    "entropy_bits": report.mean_entropy_bits,
    "sparsity": report.sparsity,
    "weight_error": weight_error(params, params_q),
  }


class Evaluator:
  """Evaluates settings of one trained model on the test split.

  Compiled functions are cached per setting structure, so the seeds of a
  setting share one compilation. ``batches`` holds the prepared test inputs;
  ``with_params`` and ``float_logits`` let baselines outside this module
  (``experiments.qwix_baseline``) evaluate their own parameters the same way.
  """

  def __init__(
    self,
    model: nn.Module,
    variables: dict[str, Any],
    data: Dataset,
    batch_size: int,
    key: jax.Array,
    stacked: str | None = None,
    per_token: bool = False,
  ):
    """Args: ``stacked``, a ``where`` regex of the leaves stacked by
    ``nn.scan`` (quantized with ``stack_axes=0``, one tensor per layer);
    ``per_token``, sample activations per token (``mcq_apply``'s option)."""
    self.stacked = stacked
    self.per_token = per_token
    self.model = model
    self.variables = variables
    self.data = data
    self.batch_size = batch_size
    self.key = key
    self.batches = [
      data.prepare(data.x_test[i : i + batch_size])
      for i in range(0, len(data.y_test), batch_size)
    ]
    self._apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    # One jitted integer apply per activation setting, kept by this evaluator
    # only (a functools.cache on the method would keep every evaluator alive).
    self._integer_applies: dict[Setting, Any] = {}

  # -- building blocks -------------------------------------------------------

  def with_params(self, params: Any) -> dict[str, Any]:
    return {**self.variables, "params": params}

  def float_logits(self, variables: Any) -> jnp.ndarray:
    return jnp.concatenate([self._apply(variables, x) for x in self.batches])

  def _quantize(self, setting: Setting, key: jax.Array) -> Any:
    # Eager calls: each leaf runs one jitted sampler whose compilation is shared
    # by every K (N is traced), which a jit around the whole call would undo.
    s, params = setting, self.variables["params"]
    options: dict[str, Any] = dict(
      granularity=s.granularity, group_size=s.group_size
    )
    if s.method in ("mcq", "mcq_bits"):
      amount: dict[str, Any] = (
        dict(samples_per_weight=s.samples_per_weight)
        if s.method == "mcq"
        else dict(bits=s.grid_bits)
      )
      fn = functools.partial(
        mcq_jax.quantize,
        key=key,
        sampler=s.sampler,
        sort=s.sort,
        refit_scale=s.refit_scale,
        **amount,
        **options,
      )
    elif s.method == "stochastic_rounding":
      fn = functools.partial(
        mcq_jax.stochastic_rounding, key=key, bits=s.grid_bits, **options
      )
    elif s.method == "round_to_nearest":
      fn = functools.partial(
        mcq_jax.round_to_nearest, bits=s.grid_bits, **options
      )
    else:
      raise ValueError(f"no quantizer for {s.id}")
    if self.stacked is not None:
      # The stack first, one tensor per layer; the second call keeps its
      # QArrays and quantizes the remaining kernels and embeddings.
      params = fn(params, where=self.stacked, stack_axes=0)
    return fn(params)

  def clear_caches(self) -> None:
    """Drops compiled functions (long sweeps would otherwise exhaust the
    process's memory mappings, one set per compiled executable)."""
    self._integer_applies.clear()
    jax.clear_caches()

  def _integer_apply(self, setting: Setting) -> Any:
    if setting in self._integer_applies:
      return self._integer_applies[setting]
    s = setting
    amount: dict[str, Any] = (
      dict(activation_samples=s.activation_samples)
      if s.activation_bits is None
      else dict(activation_bits=s.activation_bits)
    )
    self._integer_applies[setting] = jax.jit(
      lambda v, x, k: mcq_jax.mcq_apply(
        self.model,
        v,
        x,
        key=k,
        **amount,
        # The deterministic weight sampler has no activation counterpart.
        sampler="systematic" if s.sampler == "deterministic" else s.sampler,
        per_token=self.per_token,
        return_report=True,
        train=False,
      )
    )
    return self._integer_applies[setting]

  def accuracy(self, logits: jnp.ndarray) -> float:
    return float(
      jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(self.data.y_test))
    )

  def metrics(self, logits: jnp.ndarray | None) -> dict[str, float | None]:
    """The row's quality numbers for the test logits (``None``: a setting
    that produced none). A classifier's is its accuracy."""
    return {"accuracy": None if logits is None else self.accuracy(logits)}

  # -- one row -----------------------------------------------------------------

  def evaluate(self, setting: Setting, seed: int) -> dict[str, Any]:
    """Accuracy and storage of ``setting`` for one seed."""
    if setting.method == "float":
      return {
        **self.metrics(self.float_logits(self.variables)),
        "bits": 32.0,
        "entropy_bits": None,
        "sparsity": None,
      }
    if setting.method == "qwix":
      from experiments import qwix_baseline

      return qwix_baseline.evaluate(self, setting)
    key = jax.random.fold_in(self.key, seed)
    members = jax.random.split(key, setting.ensemble)
    total, stats, row = 0.0, None, {}
    for m in range(setting.ensemble):
      params_q = self._quantize(setting, members[m])
      if stats is None:
        stats = _quantized_stats(self.variables["params"], params_q)
      if setting.activation_samples is None and setting.activation_bits is None:
        total = total + self.float_logits(
          self.with_params(mcq_jax.dequantize(params_q))
        )
      else:
        run = self._integer_apply(setting)
        outs = []
        for b, x in enumerate(self.batches):
          logits, report = run(
            self.with_params(params_q),
            x,
            jax.random.fold_in(jax.random.fold_in(members[m], 1), b),
          )
          outs.append(logits)
        total = total + jnp.concatenate(outs)
        row["integer_layers"] = (
          f"{len(report.integer_layers)}/{len(report.layers)}"
        )
    return {**self.metrics(total / setting.ensemble), **stats, **row}
