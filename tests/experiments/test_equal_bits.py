"""The equal-bits comparison runs end to end (a small model, few epochs)."""

from experiments import equal_bits
from tests.conftest import DIGITS_MLP_CONFIG


def test_prints_one_row_per_method_width_and_granularity(tmp_path, capsys):
  rows = equal_bits.main(
    [
      DIGITS_MLP_CONFIG,
      "--bits",
      "3,8",
      "--granularities",
      "per_tensor,16",
      "--seeds",
      "2",
      "--config.model.hidden=[32]",
      "--config.train.epochs=5",
      f"--config.cache_dir={tmp_path}",
    ]
  )
  methods = [m[0] for m in equal_bits.METHODS]
  assert [(r["granularity"], r["bits"], r["method"]) for r in rows] == [
    (g, b, m) for g in ("per_tensor", "16") for b in (3, 8) for m in methods
  ]
  for r, (_, deterministic, _) in zip(rows, equal_bits.METHODS * 4):
    assert r["runs"] == (1 if deterministic else 2)
    assert 0.0 <= r["accuracy"] <= 1.0
  # At 8 bits every method is within a few points of float.
  for r in rows:
    if r["bits"] == 8:
      assert abs(r["accuracy"] - r["float"]) < 0.05
  out = capsys.readouterr().out
  body = [
    line
    for line in out.splitlines()
    if line.startswith("| per_tensor |") or line.startswith("| 16 |")
  ]
  assert len(body) == len(rows)
  assert "float" in out.splitlines()[0]
