"""Aggregates a run's rows into results.json, results.csv, report.md, plots."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments.sweep import Setting

PLOTS = (
  "accuracy_vs_samples",
  "bits_vs_samples",
  "sparsity_vs_samples",
  "accuracy_vs_bits",
  "activations",
  "ensembles",
)
_FIELDS = tuple(f for f in Setting.__dataclass_fields__)


def aggregate(
  settings: Sequence[Setting],
  rows: Sequence[dict[str, Any]],
  quality: Sequence[str] = ("accuracy",),
) -> list[dict]:
  """Mean and standard deviation over seeds, one record per setting, of the
  ``quality`` metrics (a classifier's accuracy; a language model's bits per
  byte) and the storage ones."""
  by_id: dict[str, list[dict]] = {}
  for row in rows:
    by_id.setdefault(row["setting"], []).append(row)
  out = []
  for s in settings:
    got = sorted(by_id.get(s.id, []), key=lambda r: r["seed"])
    if not got:
      continue
    record = {"id": s.id, "label": s.label, **s.to_dict(), "seeds": len(got)}
    for metric in (
      *quality,
      "bits",
      "entropy_bits",
      "sparsity",
      "weight_error",
    ):
      values = [r[metric] for r in got if r.get(metric) is not None]
      record[metric] = float(np.mean(values)) if values else None
      record[f"{metric}_std"] = (
        float(np.std(values, ddof=1))
        if len(values) > 1
        else 0.0
        if values
        else None
      )
    for extra in ("integer_layers", "error"):
      if any(extra in r for r in got):
        record[extra] = got[0].get(extra)
    out.append(record)
  return out


def _percent(r: dict) -> str:
  if r["accuracy"] is None:
    error = r.get("error", "no result")
    return f"failed ({error[:90]}{'...' if len(error) > 90 else ''})"
  spread = f" ± {r['accuracy_std']:.2%}" if r["seeds"] > 1 else ""
  return f"{r['accuracy']:.2%}{spread}"


def _num(x: float | None, fmt: str = ".2f") -> str:
  return "-" if x is None else format(x, fmt)


def table(records: Sequence[dict], columns: Sequence[tuple[str, Any]]) -> str:
  head = "| " + " | ".join(name for name, _ in columns) + " |"
  rule = "|" + "---|" * len(columns)
  body = [
    "| " + " | ".join(str(get(r)) for _, get in columns) + " |" for r in records
  ]
  return "\n".join([head, rule, *body])


COLUMNS = (
  ("method", lambda r: r["label"]),
  ("K", lambda r: _num(r["samples_per_weight"], "g")),
  (
    "K_a",
    lambda r: (
      _num(r["activation_samples"], "g") if r["method"] == "mcq" else "-"
    ),
  ),
  ("bits (max count)", lambda r: _num(r["bits"])),
  ("bits (entropy)", lambda r: _num(r["entropy_bits"])),
  ("zeros", lambda r: "-" if r["sparsity"] is None else f"{r['sparsity']:.1%}"),
  ("test accuracy", _percent),
)


def _is_ref(r: dict, ref: Any) -> bool:
  return (
    r["sampler"] == ref.sampler
    and r["granularity"] == ref.granularity
    and r["sort"] == ref.sort
  )


def headline(records: Sequence[dict], config: Any) -> list[dict]:
  """Float, the reference MCQ sweep, MCQ weights + activations at K = K_a,
  and the baselines at the reference granularity."""
  ref = config.reference
  out = []
  for r in records:
    if r["ensemble"] != 1:
      continue
    if r["method"] == "float":
      out.append(r)
    elif (
      r["method"] == "mcq"
      and _is_ref(r, ref)
      and (
        r["activation_samples"] is None
        or r["activation_samples"] == r["samples_per_weight"]
      )
    ):
      out.append(r)
    elif r["method"] in ("round_to_nearest", "stochastic_rounding") and (
      r["granularity"] == ref.granularity
    ):
      out.append(r)
    elif r["method"] == "qwix":
      out.append(r)
  return out


def equal_storage(records: Sequence[dict], config: Any) -> list[tuple]:
  """For each round-to-nearest row, the weights-only reference MCQ row closest
  in max-count bits and the one closest in entropy bits."""
  ref = config.reference
  mcq = [
    r
    for r in records
    if r["method"] == "mcq"
    and _is_ref(r, ref)
    and r["activation_samples"] is None
    and r["ensemble"] == 1
  ]
  out = []
  for r in records:
    if (
      r["method"] != "round_to_nearest"
      or r["granularity"] != ref.granularity
      or not mcq
    ):
      continue
    by_bits = min(mcq, key=lambda m: abs(m["bits"] - r["bits"]))
    by_entropy = min(
      mcq, key=lambda m: abs(m["entropy_bits"] - r["entropy_bits"])
    )
    out.append((r, by_bits, by_entropy))
  return out


def equal_bits(records: Sequence[dict]) -> list[tuple]:
  """``((bits, granularity), {method: record})`` for every bit-width and
  granularity at which MCQ ran with a bit budget, with the grid baselines of
  the same width and granularity (single quantizations, not ensembles)."""
  cells: dict[tuple, dict[str, dict]] = {}
  for r in records:
    if (
      r["method"] in ("mcq_bits", "round_to_nearest", "stochastic_rounding")
      and r["ensemble"] == 1
    ):
      cells.setdefault((r["grid_bits"], r["granularity"]), {})[r["method"]] = r
  return sorted((key, by) for key, by in cells.items() if "mcq_bits" in by)


def _single_member_of_ensemble_study(r: dict, config: Any) -> bool:
  """The M = 1 rows the ensembles are compared with."""
  sweep, ref = config.sweep, config.reference
  if r["ensemble"] != 1 or r["activation_samples"] is not None:
    return False
  if r["method"] == "mcq":
    return (
      _is_ref(r, ref)
      and r["samples_per_weight"] in sweep.ensemble_samples_per_weight
    )
  return (
    r["method"] == "stochastic_rounding"
    and r["granularity"] == ref.granularity
    and r["grid_bits"] in sweep.ensemble_bits
  )


def markdown(
  records: Sequence[dict], config: Any, context: dict[str, Any]
) -> str:
  """The full Markdown report of a run."""
  ref = config.reference
  lines = [
    f"# {config.name}: MCQ on {context['dataset']}",
    "",
    f"Model `{config.model.name}` ({context['parameters']:,} parameters, "
    f"{context['quantized']:,} quantized), trained {context['train_note']}. "
    f"Quantized weights: kernels and embeddings; biases and normalisation stay "
    f"float. Accuracy is on the {context['test_examples']} test examples, "
    f"mean ± standard deviation over {config.sweep.seeds} seeds (one "
    f"quantization per seed; deterministic methods have one). Reference "
    f"setting: "
    f"{ref.sampler}, {ref.granularity.replace('_', ' ')}, sort={ref.sort}. "
    "Bits: *max count* is the signed integer width the values need; *entropy* "
    "is their empirical entropy, what an entropy coder would store.",
    "",
    "## Headline",
    "",
    table(headline(records, config), COLUMNS),
    "",
  ]
  pairs = equal_storage(records, config)
  if pairs:
    lines += [
      "## At equal storage: round-to-nearest against the nearest MCQ",
      "",
      "| round-to-nearest | bits / entropy | accuracy"
      " | MCQ K (nearest bits) | bits | accuracy"
      " | MCQ K (nearest entropy) | entropy | accuracy |",
      "|---|---|---|---|---|---|---|---|---|",
    ]
    for r, b, e in pairs:
      lines.append(
        f"| {r['bits']:.0f}-bit"
        f" | {r['bits']:.2f} / {r['entropy_bits']:.2f} | {_percent(r)}"
        f" | {b['samples_per_weight']:g} | {b['bits']:.2f} | {_percent(b)}"
        f" | {e['samples_per_weight']:g} | {e['entropy_bits']:.2f}"
        f" | {_percent(e)} |"
      )
    lines.append("")
  rows = equal_bits(records)
  if rows:
    lines += [
      "## At equal bits: MCQ with a bit budget against the grids",
      "",
      "MCQ draws in each group the largest `N` whose counts fit the signed"
      " bit-width (`quantize(..., bits=b)`); weights only.",
      "",
      "| bits | granularity | round-to-nearest | stochastic rounding"
      " | MCQ (bits=b) | MCQ entropy |",
      "|---|---|---|---|---|---|",
    ]
    for (bits, granularity), by_method in rows:
      cells = [
        _percent(by_method[m]) if m in by_method else "-"
        for m in ("round_to_nearest", "stochastic_rounding", "mcq_bits")
      ]
      mcq = by_method.get("mcq_bits")
      entropy = _num(mcq["entropy_bits"]) if mcq else "-"
      lines.append(
        f"| {bits} | {granularity.replace('_', ' ')} | "
        + " | ".join(cells)
        + f" | {entropy} |"
      )
    lines.append("")
  studies = [
    (
      "Samplers, granularity and sort (weights only)",
      [
        r
        for r in records
        if r["method"] == "mcq"
        and r["activation_samples"] is None
        and r["ensemble"] == 1
      ],
    ),
    (
      "Weights and activations (`mcq_apply`, integer layers)",
      [
        r
        for r in records
        if r["method"] == "mcq" and r["activation_samples"] is not None
      ],
    ),
    (
      "Monte Carlo ensembles (logits averaged over M quantizations)",
      [
        r
        for r in records
        if r["ensemble"] > 1 or _single_member_of_ensemble_study(r, config)
      ],
    ),
    (
      "Baselines, and MCQ at the same bit-widths",
      [
        r
        for r in records
        if r["method"]
        in ("round_to_nearest", "stochastic_rounding", "qwix", "mcq_bits")
        and r["ensemble"] == 1
      ],
    ),
  ]
  for title, subset in studies:
    if not subset:
      continue
    columns = list(COLUMNS)
    if any("integer_layers" in r for r in subset):
      columns.insert(
        -1, ("integer layers", lambda r: r.get("integer_layers", "-"))
      )
    lines += [f"## {title}", "", table(subset, columns), ""]
  lines += ["## Plots", ""]
  lines += [f"![{name}]({name}.png)" for name in context.get("plots", ())]
  lines += [
    "",
    f"Produced by `{context['command']}` "
    f"({context['seconds']:.0f} s of evaluation, summed over its rows, on"
    f" {context['device']}).",
  ]
  return "\n".join(lines) + "\n"


def write_tables(
  out_dir: str,
  records: Sequence[dict],
  rows: Sequence[dict],
  context: dict[str, Any],
  config: Any,
  quality: Sequence[str] = ("accuracy",),
) -> None:
  """``results.json`` (config, context, records, rows) and ``results.csv``
  (one line per setting)."""
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(
      {
        "config": json.loads(config.to_json_best_effort()),
        "context": context,
        "results": records,
        "rows": list(rows),
      },
      f,
      indent=1,
    )
  columns = [
    "id",
    "label",
    *_FIELDS,
    "seeds",
    *(f"{m}{std}" for m in quality for std in ("", "_std")),
    "bits",
    "bits_std",
    "entropy_bits",
    "entropy_bits_std",
    "sparsity",
    "sparsity_std",
    "weight_error",
    "weight_error_std",
    "integer_layers",
    "error",
  ]
  with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)


def _errorbar(ax, points, **kwargs):
  points = [p for p in points if p[1] is not None]
  if not points:
    return
  x, y, e = zip(*points)
  ax.errorbar(
    x,
    np.asarray(y) * 100,
    yerr=np.asarray(e) * 100,
    capsize=2,
    marker="o",
    markersize=3,
    **kwargs,
  )


def plots(out_dir: str, records: Sequence[dict], config: Any) -> list[str]:
  """Writes the PNG plots; returns their names."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ref = config.reference
  float_acc = next(r["accuracy"] for r in records if r["method"] == "float")
  weights = [
    r
    for r in records
    if r["method"] == "mcq"
    and r["activation_samples"] is None
    and r["ensemble"] == 1
  ]
  variants = sorted(
    {(r["sampler"], r["granularity"], r["sort"]) for r in weights}
  )

  def label(v):
    return f"{v[0]}, {v[1].replace('_', ' ')}" + (", sorted" if v[2] else "")

  def curve(v, metric):
    rs = sorted(
      (r for r in weights if (r["sampler"], r["granularity"], r["sort"]) == v),
      key=lambda r: r["samples_per_weight"],
    )
    return [
      (r["samples_per_weight"], r[metric], r[f"{metric}_std"] or 0.0)
      for r in rs
    ]

  def finish(fig, ax, name, xlabel, ylabel, logx=True):
    if logx:
      ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"{name}.png"), dpi=110)
    plt.close(fig)

  title = f"{config.name}"

  def accuracy_plot(name, subtitle, xlabel, curves):
    """Accuracy curves (label, [(x, accuracy, std)]) against the float model."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for curve_label, points in curves:
      _errorbar(ax, points, label=curve_label)
    ax.axhline(float_acc * 100, color="k", ls=":", label="float32")
    ax.set_title(f"{title}: {subtitle}")
    finish(fig, ax, name, xlabel, "test accuracy (%)")

  accuracy_plot(
    "accuracy_vs_samples",
    "accuracy vs samples per weight",
    "samples per weight K",
    [(label(v), curve(v, "accuracy")) for v in variants],
  )

  for metric, name, ylabel in (
    ("bits", "bits_vs_samples", "bits per weight"),
    ("sparsity", "sparsity_vs_samples", "fraction of zeros"),
  ):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for v in variants:
      if v[2] != ref.sort:
        continue
      pts = curve(v, metric)
      ax.plot(
        [p[0] for p in pts],
        [p[1] for p in pts],
        marker="o",
        markersize=3,
        label=f"{label(v)}" + (" (max count)" if metric == "bits" else ""),
      )
      if metric == "bits":
        ent = curve(v, "entropy_bits")
        ax.plot(
          [p[0] for p in ent],
          [p[1] for p in ent],
          ls="--",
          marker="x",
          markersize=3,
          label=f"{label(v)} (entropy)",
        )
    ax.set_title(f"{title}: {ylabel} vs samples per weight")
    finish(fig, ax, name, "samples per weight K", ylabel)

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for ax, metric, xlabel in (
    (axes[0], "bits", "bits per weight (max count)"),
    (axes[1], "entropy_bits", "bits per weight (entropy)"),
  ):
    for v in variants:
      if v[0] != ref.sampler or v[2] != ref.sort:
        continue
      rs = sorted(
        (
          r for r in weights if (r["sampler"], r["granularity"], r["sort"]) == v
        ),
        key=lambda r: r[metric],
      )
      _errorbar(
        ax,
        [(r[metric], r["accuracy"], r["accuracy_std"]) for r in rs],
        label=f"MCQ {label(v)}",
      )
    for method in ("round_to_nearest", "stochastic_rounding"):
      for gran in config.sweep.baseline_granularities:
        rs = sorted(
          (
            r
            for r in records
            if r["method"] == method
            and r["granularity"] == gran
            and r["ensemble"] == 1
          ),
          key=lambda r: r[metric],
        )
        _errorbar(
          ax,
          [(r[metric], r["accuracy"], r["accuracy_std"] or 0.0) for r in rs],
          ls="--",
          label=f"{method.replace('_', ' ')}, {gran.replace('_', ' ')}",
        )
    for r in records:
      if (
        r["method"] == "qwix"
        and r["accuracy"] is not None
        and not r["activation_samples"]
      ):
        ax.plot(
          [r[metric]],
          [r["accuracy"] * 100],
          marker="*",
          markersize=9,
          ls="none",
          label=f"qwix PTQ {r['qtype']}",
        )
    ax.axhline(float_acc * 100, color="k", ls=":", label="float32")
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("test accuracy (%)")
  axes[0].set_ylim(bottom=max(0.0, min(float_acc * 100 - 30, 100)))
  axes[1].legend(fontsize=7)
  fig.suptitle(f"{title}: accuracy vs bit-width, MCQ against the baselines")
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "accuracy_vs_bits.png"), dpi=110)
  plt.close(fig)

  names = [
    "accuracy_vs_samples",
    "bits_vs_samples",
    "sparsity_vs_samples",
    "accuracy_vs_bits",
  ]
  acts = [
    r
    for r in records
    if r["method"] == "mcq" and r["activation_samples"] is not None
  ]
  if acts:

    def by_activation_samples(k):
      rs = sorted(
        (r for r in acts if r["samples_per_weight"] == k),
        key=lambda r: r["activation_samples"],
      )
      return [
        (r["activation_samples"], r["accuracy"], r["accuracy_std"]) for r in rs
      ]

    accuracy_plot(
      "activations",
      "integer layers on sampled activations",
      "samples per activation K_a",
      [
        (f"K = {k:g} samples per weight", by_activation_samples(k))
        for k in sorted({r["samples_per_weight"] for r in acts})
      ],
    )
    names.append("activations")
  ens = [r for r in records if r["ensemble"] > 1]
  if ens:

    def ensemble_curve(m):
      rs = sorted(
        (
          r
          for r in records
          if r["method"] == "mcq"
          and r["ensemble"] == m
          and r["activation_samples"] is None
          and _is_ref(r, ref)
          and r["samples_per_weight"]
          in config.sweep.ensemble_samples_per_weight
        ),
        key=lambda r: r["samples_per_weight"],
      )
      return [
        (r["samples_per_weight"], r["accuracy"], r["accuracy_std"]) for r in rs
      ]

    accuracy_plot(
      "ensembles",
      "Monte Carlo ensembles of M quantizations",
      "samples per weight K",
      [
        (f"MCQ, M = {m}", ensemble_curve(m))
        for m in sorted({1, *(r["ensemble"] for r in ens)})
      ],
    )
    names.append("ensembles")
  return names
