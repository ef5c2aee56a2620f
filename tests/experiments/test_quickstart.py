"""The README's main job, run small: it trains, quantizes and reports."""

from experiments import quickstart


def test_quickstart_table_reports_float_mcq_and_baselines(capsys):
  table = quickstart.main(["--seeds", "2"])
  rows = {}
  for line in table.splitlines():
    cells = [c.strip() for c in line.strip("|").split("|")]
    if len(cells) == 6 and cells[-1].endswith("%"):
      rows[(cells[0], cells[1])] = float(cells[-1].split("%")[0]) / 100
  assert rows[("float32", "-")] > 0.93  # a real model on real digits
  # with 8 samples per weight MCQ is within 2 points of float
  assert rows[("MCQ stratified", "8")] > rows[("float32", "-")] - 0.02
  # accuracy grows with the amount of sampling
  assert rows[("MCQ stratified", "0.25")] < rows[("MCQ stratified", "2")]
  assert ("round-to-nearest 4-bit", "-") in rows
  # integer layers on sampled activations (mcq_apply) at K = K_a = 8
  assert rows[("MCQ stratified, weights + activations", "8")] > rows[("float32", "-")] - 0.02
  assert table in capsys.readouterr().out
