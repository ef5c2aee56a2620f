"""The streaming checkpoint benchmark runs end to end (tiny sizes)."""

from experiments import bench_checkpoint


def test_benchmark_prints_a_row_per_run(tmp_path, capsys):
  rows = bench_checkpoint.main(
    ["--tensor-mb", "1", "--tensors", "2,4", "--workdir", str(tmp_path)]
  )
  out = capsys.readouterr().out
  assert out.startswith("command: ")
  table = [line for line in out.splitlines() if line.startswith("|")]
  header, body = table[0], table[2:]
  assert "peak RSS MiB" in header and "exit" in header
  assert [(r["what"], r["src"], r["dst"], r["tensors"]) for r in rows] == [
    ("stream", "safetensors", "safetensors", 2),
    ("load all", "safetensors", "safetensors", 2),
    ("stream", "orbax", "orbax", 2),
    ("stream", "orbax", "safetensors", 2),
    ("stream", "safetensors", "safetensors", 4),
    ("one tensor", "memory", "memory", 1),
    ("imports", "-", "-", 0),
  ]
  assert len(body) == len(rows)
  for line, row in zip(body, rows):
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:4] == [str(row[k]) for k in ("what", "src", "dst", "tensors")]
    gib, wall, mbps, rss, per_tensor, _, vs_first = map(float, cells[4:11])
    assert wall > 0 and rss > 0 and per_tensor > 0 and vs_first > 0
    if row["what"] != "one tensor" and row["tensors"]:
      assert gib > 0 and mbps > 0
    assert cells[11] == "0"  # every run exited 0
  assert list(tmp_path.iterdir()) == []  # the work directory is removed
