"""End-to-end runs of a small config: files, resume, checkpoint cache."""

import json
import os

import pytest

from experiments import report, run
from tests.conftest import DIGITS_MLP_CONFIG

SMALL = [
  "--config.model.hidden=[64]",
  "--config.train.epochs=30",
  "--config.sweep.seeds=2",
  "--config.sweep.samples_per_weight=[0.5, 4.0]",
  "--config.sweep.samplers=['stratified', 'iid']",
  "--config.sweep.granularities=['per_tensor']",
  "--config.sweep.sorts=[False]",
  "--config.sweep.activation_weight_samples=[4.0]",
  "--config.sweep.activation_samples=[4.0]",
  "--config.sweep.ensembles=[4]",
  "--config.sweep.ensemble_samples_per_weight=[0.5]",
  "--config.sweep.ensemble_bits=[2]",
  "--config.sweep.baseline_bits=[2, 8]",
  "--config.sweep.baseline_granularities=['per_tensor']",
  "--config.sweep.qwix=['int8']",
]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("run")
  args = [
    DIGITS_MLP_CONFIG,
    "--quiet",
    "--output_dir",
    str(out / "results"),
    f"--config.cache_dir={out / 'cache'}",
    *SMALL,
  ]
  return args, out, run.main(args)


def _by_id(result):
  return {r["id"]: r for r in result["records"]}


def test_run_writes_results_report_and_plots(first_run):
  _, out, result = first_run
  files = set(os.listdir(out / "results"))
  assert {"results.json", "results.csv", "report.md", "rows.jsonl"} <= files
  assert {f"{name}.png" for name in report.PLOTS} <= files
  records = _by_id(result)
  float_acc = records["float"]["accuracy"]
  assert float_acc > 0.9  # a real model on real digits
  mcq = "mcq|K={}|stratified|per_tensor|sort=0"
  low, high = records[mcq.format(0.5)], records[mcq.format(4)]
  assert low["seeds"] == high["seeds"] == 2
  # more samples: more bits, fewer zeros, and (here) accuracy near float
  assert low["bits"] < high["bits"] and low["sparsity"] > high["sparsity"]
  assert high["accuracy"] > float_acc - 0.03
  # weights and activations through mcq_apply: every layer in integers
  wa = records[
    "mcq|K=4|systematic|per_channel|sort=0|Ka=4"
  ]  # the reference setting
  assert wa["integer_layers"] == "2/2" and wa["accuracy"] > float_acc - 0.05
  # deterministic baselines are evaluated once, stochastic ones per seed
  assert records["round_to_nearest|bits=8|per_tensor"]["seeds"] == 1
  assert records["stochastic_rounding|bits=2|per_channel|M=4"]["seeds"] == 2
  assert records["round_to_nearest|bits=8|per_tensor"]["bits"] == 8
  # MCQ at the baselines' bit-widths: counts within the budget, per seed
  budget = records["mcq_bits|bits=8|systematic|per_tensor"]
  assert budget["seeds"] == 2 and budget["bits"] <= 8
  assert budget["accuracy"] > float_acc - 0.03
  assert records["mcq_bits|bits=2|systematic|per_tensor"]["bits"] <= 2
  report_text = (out / "results" / "report.md").read_text()
  assert "## At equal bits" in report_text
  assert "| 8 | per tensor |" in report_text
  assert abs(records["qwix|int8|weights"]["accuracy"] - float_acc) < 0.02
  assert records["qwix|int8|weights"]["bits"] == 8
  # the tables agree with the records
  with open(out / "results" / "results.csv") as f:
    assert len(f.read().strip().splitlines()) == len(result["records"]) + 1
  saved = json.loads((out / "results" / "results.json").read_text())
  assert saved["results"] == json.loads(json.dumps(result["records"]))
  assert result["table"] in (out / "results" / "report.md").read_text()
  # the report names the command that reproduces it, as run from a checkout
  assert result["context"]["command"].startswith(
    f"python -m experiments.run {DIGITS_MLP_CONFIG} --output_dir "
  )


def test_rerun_resumes_from_rows_and_cached_checkpoint(first_run, capsys):
  args, out, result = first_run
  rows = (out / "results" / "rows.jsonl").read_text().splitlines()
  again = run.main(args)
  assert (
    again["table"] in capsys.readouterr().out
  )  # the headline table is printed
  assert again["trained"]["cached"]
  assert (out / "results" / "rows.jsonl").read_text().splitlines() == rows
  assert again["records"] == result["records"]


def test_interrupted_run_completes_to_the_same_numbers(first_run, tmp_path):
  args, out, result = first_run
  rows = (out / "results" / "rows.jsonl").read_text().splitlines()
  resumed = tmp_path / "resumed"
  resumed.mkdir()
  # half the rows, then a line cut short by the interruption
  (resumed / "rows.jsonl").write_text(
    "\n".join(rows[: len(rows) // 2]) + "\n" + rows[len(rows) // 2][:25]
  )
  done = run.main(args + ["--output_dir", str(resumed)])
  assert done["trained"]["cached"]
  assert [r["accuracy"] for r in done["records"]] == [
    r["accuracy"] for r in result["records"]
  ]
  assert [r["entropy_bits"] for r in done["records"]] == [
    r["entropy_bits"] for r in result["records"]
  ]


def test_changed_training_recipe_trains_afresh(first_run, tmp_path):
  args, out, result = first_run
  changed = run.main(
    args
    + [
      "--output_dir",
      str(tmp_path),
      "--config.train.epochs=1",
      "--config.sweep.samplers=['stratified']",
      "--config.sweep.qwix=[]",
    ]
  )
  assert not changed["trained"]["cached"]
  assert changed["context"]["model_key"] != result["context"]["model_key"]
  assert len(os.listdir(out / "cache")) == 2


def test_without_qwix_its_rows_are_left_out_with_a_notice(
  first_run, tmp_path, monkeypatch, capsys
):
  args, out, result = first_run
  # The first run's rows but qwix's: the other settings are evaluated as
  # they were there (same model, same keys), so they are resumed rather
  # than measured again; a qwix row would have to be measured afresh.
  rows = (out / "results" / "rows.jsonl").read_text().splitlines()
  kept = [r for r in rows if json.loads(r)["method"] != "qwix"]
  assert 0 < len(kept) < len(rows)
  (tmp_path / "rows.jsonl").write_text("\n".join(kept) + "\n")
  real = run.importlib.util.find_spec
  monkeypatch.setattr(
    run.importlib.util,
    "find_spec",
    lambda name, *a: None if name == "qwix" else real(name, *a),
  )
  without = run.main(args + ["--output_dir", str(tmp_path)])
  assert without["records"] == [
    r for r in result["records"] if r["method"] != "qwix"
  ]
  assert "qwix is not installed" in capsys.readouterr().err
  # the report and plots are written without the qwix rows too
  assert "qwix PTQ int8" in (out / "results" / "report.md").read_text()
  assert "qwix PTQ" not in (tmp_path / "report.md").read_text()
  assert {f"{name}.png" for name in report.PLOTS} <= set(os.listdir(tmp_path))
