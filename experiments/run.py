"""Runs an experiment config end to end: data, training, sweep, report.

Training is skipped when a checkpoint of the same config is cached.

    python -m experiments.run configs/digits_mlp.py
    python -m experiments.run configs/digits_mlp.py --config.sweep.seeds=3

Run it from the root of a checkout of the repository: ``experiments/`` and
``configs/`` are not part of the installed ``mcq_jax`` package.

A config is an ml_collections ``ConfigDict`` returned by ``get_config()`` in a
Python file; ``--config.<path>=<value>`` overrides any field (values are Python
literals, anything else is taken as a string; the field's type is enforced).
Rows are appended to ``<output_dir>/rows.jsonl`` as they are measured, so an
interrupted run resumes where it stopped; ``--fresh`` discards them.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

import mcq_jax
from experiments import (
  datasets,
  language_model,
  models,
  report,
  sweep,
  training,
)


def load_config(path: str, overrides: Sequence[str] = ()) -> Any:
  """``get_config()`` of the Python file ``path``, with ``a.b=value`` edits."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location("_mcq_jax_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} defines no get_config()")
  config = module.get_config()
  for item in overrides:
    override(config, item)
  return config


def override(config: Any, item: str) -> None:
  """Applies one ``path=value`` override in place, naming the field on error."""
  field, sep, text = (
    item.removeprefix("--").removeprefix("config.").partition("=")
  )
  if not sep:
    raise ValueError(
      f"override {item!r} is not of the form --config.<field>=<value>"
    )
  *parents, leaf = field.split(".")
  node = config
  for i, name in enumerate(parents):
    if name not in node:
      raise KeyError(
        f"override {item!r}: config has no field {'.'.join(parents[: i + 1])!r}"
      )
    node = node[name]
  if leaf not in node:
    raise KeyError(f"override {item!r}: config has no field {field!r}")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  current = node[leaf]
  if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
    value = type(current)(value)
  elif isinstance(current, (list, tuple)):
    value = type(current)([value])
  try:
    node[leaf] = value
  except TypeError as e:
    raise TypeError(f"override {item!r}: {e}") from None


def is_language_model(config: Any) -> bool:
  """Whether ``config`` runs the language-model study (``config.task``)."""
  return config.get("task", "classification") == language_model.TASK


def plan(config: Any) -> list[sweep.Setting]:
  """The settings ``config`` measures, in report order."""
  if is_language_model(config):
    return language_model.settings(config)
  return sweep.settings(config)


def _memory_mappings_near_limit(fraction: float = 0.5) -> bool:
  """Whether this process holds more than ``fraction`` of the memory mappings
  Linux allows it. Every compiled XLA executable holds some; a long sweep
  compiles hundreds and would crash in a compile past the limit."""
  try:
    with open("/proc/sys/vm/max_map_count") as f:
      limit = int(f.read())
    with open("/proc/self/maps") as f:
      used = sum(1 for _ in f)
  except OSError:  # not Linux: no such limit to watch
    return False
  return used > fraction * limit


def _read_rows(path: str, model_key: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # a row cut short by an interruption
        continue
      if row.get("model") == model_key:
        rows.append(row)
  return rows


def run(
  config: Any,
  *,
  command: str = "<config>",
  fresh: bool = False,
  progress: bool = True,
  echo: bool = True,
) -> dict[str, Any]:
  """Runs ``config``; returns the aggregated records, report and its paths."""
  from tqdm.auto import tqdm

  out_dir = config.output_dir
  os.makedirs(out_dir, exist_ok=True)
  rows_path = os.path.join(out_dir, "rows.jsonl")
  if fresh and os.path.exists(rows_path):
    os.remove(rows_path)

  data = datasets.load(config.data, progress=progress)
  model = models.build(config.model, data.num_classes)
  trained = training.train_or_restore(model, data, config, progress=progress)
  if echo:
    how = (
      f"restored from {config.cache_dir}/{trained.key}"
      if trained.cached
      else f"trained in {trained.train_seconds:.1f} s"
    )
    print(
      f"{data.describe()}; {config.model.name} {how}"
      f" (final loss {trained.final_loss:.3g})",
      file=sys.stderr,
    )

  is_lm = is_language_model(config)
  if is_lm:
    evaluator: sweep.Evaluator = language_model.Evaluator(
      model,
      trained.variables,
      data,
      config.eval_batch_size,
      jax.random.key(config.seed),
      stacked=config.stacked,
      per_token=True,
    )
  else:
    evaluator = sweep.Evaluator(
      model,
      trained.variables,
      data,
      config.eval_batch_size,
      jax.random.key(config.seed),
    )
  settings = plan(config)
  if importlib.util.find_spec("qwix") is None and any(
    s.method == "qwix" for s in settings
  ):
    settings = [s for s in settings if s.method != "qwix"]
    print(
      "qwix is not installed (pip install -e '.[qwix]'): its baseline rows are"
      " left out of this run",
      file=sys.stderr,
    )
  rows = _read_rows(rows_path, trained.key)
  done = {(r["setting"], r["seed"]) for r in rows}
  tasks = [
    (s, seed)
    for s in settings
    for seed in range(1 if s.deterministic else config.sweep.seeds)
    if (s.id, seed) not in done
  ]
  previous = None
  with (
    open(rows_path, "a") as f,
    tqdm(tasks, desc=config.name, disable=not progress) as bar,
  ):
    for s, seed in bar:
      bar.set_postfix_str(s.id, refresh=False)
      if s.id != previous and _memory_mappings_near_limit():  # once per setting
        evaluator.clear_caches()
      previous = s.id
      t0 = time.perf_counter()
      metrics = evaluator.evaluate(s, seed)
      row = {
        "model": trained.key,
        "setting": s.id,
        "seed": seed,
        **s.to_dict(),
        **metrics,
        "seconds": time.perf_counter() - t0,
      }
      f.write(json.dumps(row) + "\n")
      f.flush()
      rows.append(row)
  # Rows of settings no longer in the config (an earlier sweep) stay in
  # rows.jsonl but not in this run's results.
  planned = {s.id for s in settings}
  rows = [r for r in rows if r["setting"] in planned]
  seconds = sum(r.get("seconds", 0.0) for r in rows)

  params = trained.variables["params"]
  quantized = mcq_jax.summary(mcq_jax.round_to_nearest(params, bits=8))
  context = {
    "dataset": data.describe(),
    "parameters": int(
      sum(np.size(x) for x in jax.tree_util.tree_leaves(params))
    ),
    "quantized": int(
      sum(math.prod(leaf.shape) for leaf in quantized.leaves if leaf.quantized)
    ),
    "train_note": (
      f"with {config.train.optimizer} for {config.train.epochs} epochs"
      f" ({trained.train_seconds:.0f} s, final loss {trained.final_loss:.3g})"
    ),
    "test_examples": len(data.y_test),
    "command": command,
    "seconds": seconds,
    "device": jax.devices()[0].device_kind,
    "model_key": trained.key,
    "model_note": ", ".join(
      f"{k}={v}" for k, v in config.model.items() if k != "name"
    ),
  }
  if is_lm:
    records, text, table = language_model.write(
      out_dir, settings, rows, context, config
    )
  else:
    records = report.aggregate(settings, rows)
    context["plots"] = report.plots(out_dir, records, config)
    report.write_tables(out_dir, records, rows, context, config)
    text = report.markdown(records, config, context)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
      f.write(text)
    table = report.table(report.headline(records, config), report.COLUMNS)
  if echo:
    print(
      f"{config.name}: {data.describe()}, model {config.model.name}\n\n"
      f"{table}\n\n"
      f"Full report: {os.path.join(out_dir, 'report.md')}"
    )
  return {
    "records": records,
    "table": table,
    "report": text,
    "out_dir": out_dir,
    "context": context,
    "trained": {
      "key": trained.key,
      "cached": trained.cached,
      "train_seconds": trained.train_seconds,
      "final_loss": trained.final_loss,
    },
  }


PROG = "python -m experiments.run"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """``python -m experiments.run CONFIG [options] [--config.<f>=<v> ...]``."""
  parser = argparse.ArgumentParser(
    prog=PROG,
    description=__doc__.splitlines()[0],
    epilog="Any other --config.<field>=<value> overrides that config field.",
  )
  parser.add_argument(
    "config", help="path to a config file, e.g. configs/digits_mlp.py"
  )
  parser.add_argument(
    "--output_dir", help="where results go (default: the config's)"
  )
  parser.add_argument(
    "--fresh", action="store_true", help="discard rows of an earlier run"
  )
  parser.add_argument("--quiet", action="store_true", help="no progress bars")
  args, rest = parser.parse_known_args(argv)
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  config = load_config(args.config, rest)
  if args.output_dir:
    config.output_dir = args.output_dir
  command = " ".join(
    [
      PROG,
      args.config,
      *(["--output_dir", args.output_dir] if args.output_dir else []),
      *rest,
    ]
  )
  return run(config, command=command, fresh=args.fresh, progress=not args.quiet)


if __name__ == "__main__":
  main()
