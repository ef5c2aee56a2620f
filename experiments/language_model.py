"""The language-model study: MCQ against round-to-nearest at bit budgets and
group sizes, on a byte-level decoder-only Transformer.

A config with ``task="language_model"`` (``configs/stdlib_lm.py``) runs
through ``python -m experiments.run`` like the classifiers: the data are the
standard library's sources (:mod:`experiments.text`), the model a
``decoder_lm`` whose layers are one ``nn.scan`` stack, quantized one tensor
per layer (``stack_axes=0``). Quality is test **bits per byte** (the mean
next-byte cross-entropy in bits; lower is better) and next-byte accuracy.

The sweep (``config.sweep``):

- ``samples_per_weight``: MCQ at a number of samples per weight ``K``
  (reference sampler, per channel, weights only);
- ``bits`` x ``group_sizes``: at each bit budget and group size (``None``:
  per channel), round-to-nearest, stochastic rounding and MCQ at the budget
  (``quantize(..., bits=b, group_size=g)``) for each of ``variants``
  (a sampler name, ``+refit`` for the least-squares scale);
- ``activation_weight_bits`` x ``group_sizes`` x ``activation_bits``: MCQ
  weights at a budget with sampled per-token activations at a budget
  (``mcq_apply``, integer layers);
- ``qwix``: qwix's post-training quantization, where it runs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax

from experiments import report
from experiments.sweep import Evaluator as _ClassifierEvaluator
from experiments.sweep import Setting

TASK = "language_model"
QUALITY = ("bits_per_byte", "accuracy")
PLOTS = ("bits_per_byte_vs_bits", "bits_per_byte_vs_samples")


class Evaluator(_ClassifierEvaluator):
  """The sweep's evaluator with a language model's metrics."""

  def metrics(self, logits: jnp.ndarray | None) -> dict[str, float | None]:
    """Test bits per byte and next-byte accuracy of ``(windows, length,
    vocab)`` logits."""
    if logits is None:
      return {"bits_per_byte": None, "accuracy": None}
    nats = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), jnp.asarray(self.data.y_test, jnp.int32)
    )
    return {
      "bits_per_byte": float(jnp.mean(nats) / math.log(2.0)),
      "accuracy": self.accuracy(logits),
    }


def _variant(
  name: str, bits: int, group: int | None, granularity: str
) -> Setting:
  """``"<sampler>"`` or ``"<sampler>+refit"`` at a bit budget."""
  sampler, _, extra = name.partition("+")
  if extra not in ("", "refit"):
    raise ValueError(
      f"variant {name!r}: expected '<sampler>' or '<sampler>+refit'"
    )
  return Setting(
    "mcq_bits",
    sampler=sampler,
    granularity=granularity,
    grid_bits=bits,
    group_size=group,
    refit_scale=extra == "refit",
  )


def settings(config: Any) -> list[Setting]:
  """The settings of a language-model config, in report order."""
  sweep, ref = config.sweep, config.reference
  granularity = ref.granularity
  out = [Setting("float")]
  for k in sweep.samples_per_weight:
    out.append(
      Setting("mcq", float(k), sampler=ref.sampler, granularity=granularity)
    )
  for bits in sweep.bits:
    for group in sweep.group_sizes:
      for method in ("round_to_nearest", "stochastic_rounding"):
        out.append(
          Setting(
            method, granularity=granularity, grid_bits=bits, group_size=group
          )
        )
      for name in sweep.variants:
        out.append(_variant(name, bits, group, granularity))
  for bits in sweep.activation_weight_bits:
    for group in sweep.group_sizes:
      for activation_bits in sweep.activation_bits:
        out.append(
          Setting(
            "mcq_bits",
            sampler=ref.sampler,
            granularity=granularity,
            grid_bits=bits,
            group_size=group,
            activation_bits=activation_bits,
          )
        )
  for qtype in sweep.qwix:
    out.append(Setting("qwix", qtype=qtype))
    if sweep.get("qwix_activations", False):
      out.append(Setting("qwix", qtype=qtype, activation_samples=1.0))
  return out


# -- the report ----------------------------------------------------------------


def _bpb(r: dict | None) -> str:
  if r is None:
    return "-"
  if r["bits_per_byte"] is None:
    return f"failed ({r.get('error', 'no result')[:80]})"
  spread = f" ± {r['bits_per_byte_std']:.3f}" if r["seeds"] > 1 else ""
  return f"{r['bits_per_byte']:.3f}{spread}"


def _groups(group: int | None) -> str:
  return "per channel" if group is None else f"{group}"


def _find(records: Sequence[dict], **fields: Any) -> dict | None:
  for r in records:
    if all(r.get(k) == v for k, v in fields.items()):
      return r
  return None


def _variant_records(
  records: Sequence[dict], name: str, bits: int, group: int | None
) -> dict | None:
  sampler, _, extra = name.partition("+")
  return _find(
    records,
    method="mcq_bits",
    sampler=sampler,
    grid_bits=bits,
    group_size=group,
    refit_scale=extra == "refit",
    activation_bits=None,
  )


def _variant_label(name: str) -> str:
  sampler, _, extra = name.partition("+")
  return f"MCQ {sampler}" + (", LS scale" if extra else "")


def equal_bits(records: Sequence[dict], config: Any) -> list[dict]:
  """One row per (bits, group size): round-to-nearest, stochastic rounding
  and each MCQ variant, and the best MCQ variant's margin over RTN (negative:
  MCQ is better, since lower bits per byte is better)."""
  out = []
  for bits in config.sweep.bits:
    for group in config.sweep.group_sizes:
      rtn = _find(
        records, method="round_to_nearest", grid_bits=bits, group_size=group
      )
      sr = _find(
        records, method="stochastic_rounding", grid_bits=bits, group_size=group
      )
      variants = {
        name: _variant_records(records, name, bits, group)
        for name in config.sweep.variants
      }
      done = [
        (r["bits_per_byte"], name)
        for name, r in variants.items()
        if r is not None and r["bits_per_byte"] is not None
      ]
      best = min(done) if done else None
      margin = (
        None
        if best is None or rtn is None or rtn["bits_per_byte"] is None
        else best[0] - rtn["bits_per_byte"]
      )
      out.append(
        dict(
          bits=bits,
          group=group,
          rtn=rtn,
          sr=sr,
          variants=variants,
          best=None if best is None else best[1],
          margin=margin,
        )
      )
  return out


def _equal_bits_table(rows: list[dict], config: Any) -> str:
  names = list(config.sweep.variants)
  head = (
    "| bits | groups | round-to-nearest | stochastic rounding | "
    + " | ".join(_variant_label(n) for n in names)
    + " | best MCQ - RTN |"
  )
  lines = [head, "|" + "---|" * (len(names) + 5)]
  for row in rows:
    margin = "-" if row["margin"] is None else f"{row['margin']:+.3f}"
    lines.append(
      f"| {row['bits']} | {_groups(row['group'])} | {_bpb(row['rtn'])}"
      f" | {_bpb(row['sr'])} | "
      + " | ".join(_bpb(row["variants"][n]) for n in names)
      + f" | {margin} |"
    )
  return "\n".join(lines)


def _error_table(rows: list[dict], config: Any) -> str:
  """Each quantizer's relative squared weight error, as a multiple of
  round-to-nearest's at the same bits and group size."""
  names = list(config.sweep.variants)
  lines = [
    "| bits | groups | round-to-nearest | stochastic rounding | "
    + " | ".join(_variant_label(n) for n in names)
    + " |",
    "|" + "---|" * (len(names) + 4),
  ]

  def ratio(r: dict | None, rtn: float | None) -> str:
    if r is None or r.get("weight_error") is None or not rtn:
      return "-"
    return f"{r['weight_error'] / rtn:.2f}x"

  for row in rows:
    rtn = None if row["rtn"] is None else row["rtn"].get("weight_error")
    if rtn is None:
      continue
    lines.append(
      f"| {row['bits']} | {_groups(row['group'])} | {rtn:.2e} |"
      f" {ratio(row['sr'], rtn)} | "
      + " | ".join(ratio(row["variants"][n], rtn) for n in names)
      + " |"
    )
  return "\n".join(lines)


def _samples_table(records: Sequence[dict]) -> str:
  lines = [
    "| samples per weight K | mean bits | entropy (bits) | zeros |"
    " bits per byte |",
    "|---|---|---|---|---|",
  ]
  for r in records:
    if r["method"] == "mcq" and r["activation_samples"] is None:
      lines.append(
        f"| {r['samples_per_weight']:g} | {r['bits']:.2f} |"
        f" {r['entropy_bits']:.2f} | {r['sparsity']:.1%} | {_bpb(r)} |"
      )
  return "\n".join(lines)


def _activations_table(records: Sequence[dict]) -> str:
  lines = [
    "| weight bits | groups | activation bits | weights only |"
    " weights + sampled activations | integer layers |",
    "|---|---|---|---|---|---|",
  ]
  for r in records:
    if r["method"] != "mcq_bits" or r["activation_bits"] is None:
      continue
    alone = _find(
      records,
      method="mcq_bits",
      sampler=r["sampler"],
      grid_bits=r["grid_bits"],
      group_size=r["group_size"],
      refit_scale=False,
      activation_bits=None,
    )
    lines.append(
      f"| {r['grid_bits']} | {_groups(r['group_size'])} |"
      f" {r['activation_bits']} | {_bpb(alone)} | {_bpb(r)} |"
      f" {r.get('integer_layers', '-')} |"
    )
  return "\n".join(lines)


def _qwix_table(records: Sequence[dict]) -> str:
  lines = ["| qwix | quantized | bits | bits per byte |", "|---|---|---|---|"]
  for r in records:
    if r["method"] == "qwix":
      what = "weights + activations" if r["activation_samples"] else "weights"
      lines.append(f"| {r['qtype']} | {what} | {r['bits']:.2f} | {_bpb(r)} |")
  return "\n".join(lines)


def _findings(rows: list[dict], float_bpb: float) -> list[str]:
  """One sentence per bit budget: where the best MCQ variant stands against
  round-to-nearest, group by group, from the measured rows."""
  out = []
  for bits in sorted({r["bits"] for r in rows}):
    parts = []
    for row in (r for r in rows if r["bits"] == bits):
      if row["margin"] is None:
        continue
      best = row["variants"][row["best"]]["bits_per_byte"]
      verdict = (
        "ties RTN"
        if abs(row["margin"]) < 5e-4
        else f"beats RTN by {-row['margin']:.3f}"
        if row["margin"] < 0
        else f"trails RTN by {row['margin']:.3f}"
      )
      parts.append(
        f"{_groups(row['group'])}: {_variant_label(row['best'])} {verdict}"
        f" ({best:.3f} vs {row['rtn']['bits_per_byte']:.3f})"
      )
    if parts:
      out.append(
        f"- **{bits} bits** (float {float_bpb:.3f}), the best MCQ variant in"
        " bits per byte, by group size: " + "; ".join(parts) + "."
      )
  return out


def markdown(records: Sequence[dict], config: Any, context: dict) -> str:
  """The study's report."""
  float_r = _find(records, method="float")
  assert float_r is not None, "the float row is always measured"
  rows = equal_bits(records, config)
  seeds = config.sweep.seeds
  text = [
    f"# {config.name}: MCQ on a byte-level language model",
    "",
    f"- Data: {context['dataset']}.",
    f"- Model: {config.model.name} ({context['model_note']});"
    f" {context['parameters']:,} parameters, {context['quantized']:,} of them"
    " in quantized leaves (every kernel, the embeddings; biases and"
    " LayerNorms stay float).",
    f"- Trained {context['train_note']}.",
    f"- Float test **{float_r['bits_per_byte']:.3f} bits per byte**"
    f" (next-byte accuracy {float_r['accuracy']:.1%}).",
    f"- Command: `{context['command']}` on {context['device']}"
    f" ({context['seconds']:.0f} s of evaluation).",
    f"- Random quantizers: mean ± standard deviation over {seeds} seeds;"
    " round-to-nearest and the deterministic sampler: one.",
    "",
    "Lower bits per byte is better. Every quantizer sees the same trained"
    " weights, quantizes the `nn.scan` stack one tensor per layer"
    " (`stack_axes=0`) and the other kernels and embeddings per channel, at"
    " the same group size.",
    "",
    "## At equal bits",
    "",
    "Each cell: test bits per byte with signed integers of that width"
    " (`bits=b`: every MCQ group draws the largest number of samples whose"
    " counts fit). `groups` is the sub-channel block along the input axis"
    " (`group_size`), each with its own scale. The last column: the best MCQ"
    " variant minus round-to-nearest (negative: MCQ is better).",
    "",
    _equal_bits_table(rows, config),
    "",
    *_findings(rows, float_r["bits_per_byte"]),
    "",
    "Why: under a budget each MCQ group draws `N <= max_count / p_max`, so"
    " its step `sum|w| / N` is at least round-to-nearest's `max|w| /"
    " max_count`, and its counts round each `|w| / step` up or down to keep"
    " the group's sum, not to the nearest integer. The quantized weights'"
    " relative squared error `sum (w - w_hat)**2 / sum w**2` (over every"
    " quantized leaf; round-to-nearest's, then the others' as multiples of"
    " it, seed means):",
    "",
    _error_table(rows, config),
    "",
    "![bits per byte vs bits](bits_per_byte_vs_bits.png)",
    "",
    "## Samples per weight",
    "",
    f"MCQ {config.reference.sampler}, per channel, weights only, at a fixed"
    " number of samples per weight: the integers' width is then whatever the"
    " draws give (mean bits: the value-weighted width of each leaf's largest"
    " integer).",
    "",
    _samples_table(records),
    "",
    "![bits per byte vs samples per weight](bits_per_byte_vs_samples.png)",
    "",
  ]
  if any(r.get("activation_bits") is not None for r in records):
    text += [
      "## Sampled activations",
      "",
      "`mcq_apply` with `activation_bits`, one distribution per token: every"
      " Dense / DenseGeneral input is sampled and the layer runs in integer"
      " arithmetic (blocked kernels: one integer product per block). The"
      " attention's own products and the embedding lookup stay in float.",
      "",
      _activations_table(records),
      "",
    ]
  if any(r["method"] == "qwix" for r in records):
    text += [
      "## qwix",
      "",
      "qwix's post-training quantization (absmax, its own granularity):"
      " weights only, dequantized and run through the float model; and"
      " qwix's own quantized model with dynamic-range activations, where its"
      " kernels run on this backend (otherwise the row shows qwix's error).",
      "",
      _qwix_table(records),
      "",
    ]
  return "\n".join(text)


def plots(out_dir: str, records: Sequence[dict], config: Any) -> list[str]:
  """``bits_per_byte_vs_bits.png`` (a panel per group size) and
  ``bits_per_byte_vs_samples.png``; returns their file names."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  float_r = _find(records, method="float")
  assert float_r is not None
  groups = list(config.sweep.group_sizes)
  fig, axes = plt.subplots(
    1, len(groups), figsize=(4.2 * len(groups), 3.6), sharey=True, squeeze=False
  )
  curves = [
    ("round-to-nearest", dict(method="round_to_nearest")),
    ("stochastic rounding", dict(method="stochastic_rounding")),
  ]
  for ax, group in zip(axes[0], groups):
    for label, fields in curves:
      points = [
        (b, _find(records, grid_bits=b, group_size=group, **fields))
        for b in config.sweep.bits
      ]
      _line(ax, points, label=label)
    for name in config.sweep.variants:
      points = [
        (b, _variant_records(records, name, b, group))
        for b in config.sweep.bits
      ]
      _line(ax, points, label=_variant_label(name))
    ax.axhline(
      float_r["bits_per_byte"], color="k", linestyle="--", label="float32"
    )
    ax.set_title(f"groups: {_groups(group)}")
    ax.set_xlabel("bits per weight (budget)")
    ax.set_xticks(list(config.sweep.bits))
  axes[0][0].set_ylabel("test bits per byte (lower is better)")
  axes[0][-1].legend(fontsize=7)
  fig.suptitle(f"{config.name}: MCQ at a bit budget against the baselines")
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "bits_per_byte_vs_bits.png"), dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(5, 3.6))
  mcq = [
    r
    for r in records
    if r["method"] == "mcq" and r["activation_samples"] is None
  ]
  _line(ax, [(r["samples_per_weight"], r) for r in mcq], label="MCQ")
  ax.axhline(
    float_r["bits_per_byte"], color="k", linestyle="--", label="float32"
  )
  for r in mcq:
    ax.annotate(
      f"{r['bits']:.1f}b",
      (r["samples_per_weight"], r["bits_per_byte"]),
      fontsize=7,
      textcoords="offset points",
      xytext=(3, 3),
    )
  ax.set_xscale("log", base=2)
  ax.set_xlabel("samples per weight K (labels: mean bits)")
  ax.set_ylabel("test bits per byte")
  ax.set_title(f"{config.name}: MCQ {config.reference.sampler}, per channel")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "bits_per_byte_vs_samples.png"), dpi=110)
  plt.close(fig)
  return [f"{name}.png" for name in PLOTS]


def _line(ax: Any, points: list[tuple[float, dict | None]], label: str) -> None:
  got = [
    (x, r["bits_per_byte"], r["bits_per_byte_std"] or 0.0)
    for x, r in points
    if r is not None and r["bits_per_byte"] is not None
  ]
  if not got:
    return
  x, y, e = (np.asarray(v) for v in zip(*got))
  ax.errorbar(x, y, yerr=e, capsize=2, marker="o", markersize=3, label=label)


def write(
  out_dir: str,
  plan: Sequence[Setting],
  rows: Sequence[dict],
  context: dict[str, Any],
  config: Any,
) -> tuple[list[dict], str, str]:
  """Aggregates the rows and writes ``results.json``, ``results.csv``, the
  plots and ``report.md``; returns ``(records, report, headline table)``."""
  records = report.aggregate(plan, rows, QUALITY)
  context["plots"] = plots(out_dir, records, config)
  report.write_tables(out_dir, records, rows, context, config, QUALITY)
  text = markdown(records, config, context)
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(text)
  return records, text, _equal_bits_table(equal_bits(records, config), config)
