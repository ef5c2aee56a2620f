"""The streaming checkpoint benchmark runs end to end (tiny sizes)."""

from experiments import bench_checkpoint


def test_benchmark_runs_every_row(tmp_path, capsys):
  rows = bench_checkpoint.main(
    ["--tensor-mb", "0.25", "--tensors", "2,4", "--workdir", str(tmp_path)]
  )
  table = [
    line
    for line in capsys.readouterr().out.splitlines()
    if line.startswith("|")
  ]
  assert len(table) == 2 + len(rows)
  assert [(r["what"], r["src"], r["dst"], r["tensors"]) for r in rows] == [
    ("stream", "safetensors", "safetensors", 2),
    ("load all", "safetensors", "safetensors", 2),
    ("stream", "orbax", "orbax", 2),
    ("stream", "orbax", "safetensors", 2),
    ("stream", "safetensors", "safetensors", 4),
    ("one tensor", "memory", "memory", 1),
  ]
  assert all(r["code"] == 0 and r["rss"] > 0 and r["wall"] > 0 for r in rows)
  assert list(tmp_path.iterdir()) == []  # the work directory is removed
