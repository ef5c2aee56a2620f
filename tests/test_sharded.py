"""Sharded leaves: bit-identical to one device, sharding kept, no gathering.

The suite runs on one CPU device; these tests run their checks in a fresh
interpreter with eight (``JAX_NUM_CPU_DEVICES`` must be set before JAX is
imported), which prints one JSON line of findings for the test to assert on.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

# Shared by every script: a (4, 2) mesh of either axis type, and helpers.
_PRELUDE = """
import json, os, re, itertools
os.environ["JAX_NUM_CPU_DEVICES"] = "8"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P, AxisType
import mcq_jax

def make_mesh(mode):
  kind = AxisType.Auto if mode == "auto" else AxisType.Explicit
  return jax.make_mesh((4, 2), ("a", "b"), axis_types=(kind, kind))

def same(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
    np.asarray(u).dtype == np.asarray(v).dtype
    and np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(la, lb))

def data(shape, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.standard_t(3, size=shape) * (rng.random(shape) > 0.3)
  return w.astype(np.float32)
"""


def _run(body: str) -> dict:
  code = _PRELUDE + textwrap.dedent(body)
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_quantize_is_bit_identical_to_one_device_and_keeps_the_sharding():
  found = _run(
    """
    cases = [
      ((64, 48), P("a", None)),          # input axis: one segment per group
      ((64, 48), P(None, "a")),          # channels: no communication
      ((64, 48), P("a", "b")),
      ((64, 48), P(("a", "b"), None)),   # two mesh axes on one array axis
      ((3, 3, 16, 8), P(None, None, "a", "b")),  # conv, input channels
      ((4, 3, 16, 8), P("b", None, "a", None)),  # segments per tap row
      ((40, 8), P("a", None)),           # groups of 40: layout not aligned
    ]
    # Every layout and granularity with the default sampler, eagerly on an
    # auto mesh or under jit on an explicit one, in turn (both run the same
    # shard_map program); four under jit on an auto mesh (where only the
    # partitioner knows the sharding); the other samplers and a bit budget
    # (each group's N from its whole mass and largest value, combined over
    # devices) on two layouts each.
    modes = (("auto", False), ("explicit", True))
    grans = ("per_channel", "per_tensor")
    runs = [(case, gran, "systematic", modes[(i + j) % 2], None)
            for i, case in enumerate(cases) for j, gran in enumerate(grans)]
    runs += [(case, grans[i % 2], "systematic", ("auto", True), None)
             for i, case in enumerate(cases[:4])]
    runs += [(cases[2], "per_channel", "stratified", ("explicit", False), None),
             (cases[4], "per_tensor", "stratified", ("explicit", False), None),
             (cases[2], "per_tensor", "iid", ("explicit", False), None),
             (cases[4], "per_channel", "iid", ("explicit", False), None)]
    runs += [(cases[0], "per_channel", "systematic", ("explicit", True), 4),
             (cases[5], "per_tensor", "systematic", ("explicit", True), 4),
             (cases[0], "per_tensor", "systematic", ("auto", True), 4),
             (cases[5], "per_channel", "stratified", ("auto", False), 3)]
    checks, bad = 0, []
    for (shape, spec), gran, sampler, (mode, jitted), bits in runs:
      w = data(shape)
      opts = dict(where="k", granularity=gran, sampler=sampler, bits=bits)
      fn = lambda p: mcq_jax.quantize(p, jax.random.key(0), **opts)
      ref = fn({"k": jnp.asarray(w)})["k"]
      mesh = make_mesh(mode)
      leaf = jax.device_put(w, NamedSharding(mesh, spec))
      with jax.set_mesh(mesh):
        q = (jax.jit(fn) if jitted else fn)({"k": leaf})["k"]
      checks += 1
      # Under jit the values keep the dtype that holds N (eagerly, the
      # narrowest that holds them): compare the integers.
      equal = np.array_equal(np.asarray(q.values), np.asarray(ref.values))
      from mcq_jax._dtypes import smallest_int_dtype
      bound = q.samples if bits is None else 2 ** (bits - 1) - 1
      dtype = smallest_int_dtype(bound) if jitted else ref.values.dtype
      equal &= q.values.dtype == dtype
      kept = q.values.sharding.spec == leaf.sharding.spec
      if not (equal and same(q.scale, ref.scale) and kept):
        bad.append([str(shape), str(spec), gran, sampler, mode, jitted,
                    bits, bool(equal), bool(kept)])
    print(json.dumps({"checks": checks, "bad": bad}))
    """
  )
  assert found["bad"] == []
  assert found["checks"] == 7 * 2 + 4 + 4 + 4  # every run was made


def test_baselines_dequantize_and_mcq_apply_match_one_device():
  found = _run(
    """
    import flax.linen as nn

    class MLP(nn.Module):
      @nn.compact
      def __call__(self, x):
        return nn.Dense(16)(nn.relu(nn.Dense(48)(x)))

    model = MLP()
    x = jax.random.normal(jax.random.key(2), (8, 64))
    params = model.init(jax.random.key(1), x)["params"]
    calls = {
      "dequantize": lambda p, x: mcq_jax.dequantize(
        mcq_jax.quantize(p, jax.random.key(0))),
      "round_to_nearest": lambda p, x: mcq_jax.round_to_nearest(p, bits=4),
      "stochastic_rounding": lambda p, x: mcq_jax.stochastic_rounding(
        p, jax.random.key(0), bits=4),
      "mcq_apply": lambda p, x: mcq_jax.mcq_apply(
        model, {"params": mcq_jax.quantize(p, jax.random.key(0))}, x,
        key=jax.random.key(3)),
    }
    ref = {(name, jitted): (jax.jit(fn) if jitted else fn)(params, x)
           for name, fn in calls.items() for jitted in (False, True)}
    # Layouts the float model itself runs with on both mesh types (column-
    # then row-parallel kernels, say, is one that explicit mode rejects for
    # model.apply too: an ambiguous reduction).
    layouts = [
      ({"Dense_0": P(None, "a"), "Dense_1": P(None, "a")}, P("b", None)),
      ({"Dense_0": P("a", None), "Dense_1": P("a", None)}, P("b", None)),
      ({"Dense_0": P(), "Dense_1": P("a", None)}, P(None, None)),
    ]
    # Eager calls on two layouts of an auto mesh, jit on the first, and jit
    # on the second of an explicit mesh (test_quantize_... covers explicit
    # eager calls).
    runs = [("auto", 0, False), ("auto", 2, False), ("auto", 0, True)]
    runs += [("explicit", 1, True)]
    spec_of = lambda a: tuple(a.sharding.spec) + (None,) * (
      a.ndim - len(a.sharding.spec))
    checks, bad, kept = 0, [], []
    for mode, layout, jitted in runs:
      mesh = make_mesh(mode)
      kernels, x_spec = layouts[layout]
      put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))
      p = {k: {"kernel": put(v["kernel"], kernels[k]), "bias": v["bias"]}
           for k, v in params.items()}
      xs = put(x, x_spec)
      for name, fn in calls.items():
        with jax.set_mesh(mesh):
          out = (jax.jit(fn) if jitted else fn)(p, xs)
        checks += 1
        if not same(out, ref[name, jitted]):
          bad.append([mode, layout, name, jitted])
        if name == "dequantize" and not jitted:
          for k in p:
            kept.append(spec_of(out[k]["kernel"]) == spec_of(p[k]["kernel"]))
    print(json.dumps({"checks": checks, "bad": bad, "kept": kept}))
    """
  )
  assert found["bad"] == []
  assert found["checks"] == 4 * 4
  assert found["kept"] and all(found["kept"])


def test_compiled_quantize_exchanges_only_per_group_totals():
  # The HLO of jit(quantize) on a sharded leaf: every collective's operand is
  # far smaller than the leaf (per-group maxima, masses, segment totals). The
  # control, a reshard to replicated, shows the check sees a gather.
  found = _run(
    """
    w = data((1024, 512))
    pattern = re.compile(
      r"= (\\w+)\\[([\\d,]*)\\][^ ]* (all-gather|all-to-all|all-reduce|"
      r"collective-permute|reduce-scatter)\\(")

    def collectives(mesh, fn, *args):
      with jax.set_mesh(mesh):
        text = jax.jit(fn).lower(*args).compile().as_text()
      out = []
      for _, dims, op in pattern.findall(text):
        size = int(np.prod([int(d) for d in dims.split(",") if d]))
        out.append([op, size])
      return out

    rows = []
    for mode in ("explicit", "auto"):
      mesh = make_mesh(mode)
      for spec in (P("a", None), P(None, "a"), P("a", "b"),
                   P(("a", "b"), None)):
        leaf = jax.device_put(w, NamedSharding(mesh, spec))
        for gran in ("per_channel", "per_tensor"):
          ops = collectives(mesh,
            lambda p: mcq_jax.quantize(p, jax.random.key(0), where="k",
                                       granularity=gran), {"k": leaf})
          rows.append([mode, str(spec), gran, ops])
    mesh = make_mesh("explicit")
    control = collectives(mesh, lambda x: jax.sharding.reshard(x, P()),
                          jax.device_put(w, NamedSharding(mesh, P("a", None))))
    print(json.dumps({"rows": rows, "control": control, "size": w.size}))
    """
  )
  size = found["size"]
  assert any(op == "all-gather" and n >= size for op, n in found["control"])
  assert len(found["rows"]) == 2 * 4 * 2
  for mode, spec, gran, ops in found["rows"]:
    biggest = max((n for _, n in ops), default=0)
    assert biggest * 16 <= size, (mode, spec, gran, ops)
    if spec.startswith("P('a'") or spec.startswith("P(('a'"):
      # Split within groups: the segments' totals must be exchanged.
      assert any(op == "all-gather" for op, _ in ops), (mode, spec, gran)


def test_errors_name_the_leaf():
  found = _run(
    """
    mesh = make_mesh("auto")
    w = jax.device_put(data((64, 48)), NamedSharding(mesh, P("a", None)))
    errors = {}
    raw_key = jax.device_put(jax.random.key_data(jax.random.key(0)),
                             NamedSharding(mesh, P("b")))
    attempts = {
      "split_key": lambda: mcq_jax.quantize({"k": w}, raw_key, where="k"),
      "sort": lambda: mcq_jax.quantize({"k": w}, jax.random.key(0), where="k",
                                       sort=True),
    }
    for name, attempt in attempts.items():
      try:
        attempt()
        errors[name] = None
      except ValueError as e:
        errors[name] = str(e)
    print(json.dumps(errors))
    """
  )
  assert (
    "'k'" in found["split_key"] and "split over devices" in found["split_key"]
  )
  assert "'k'" in found["sort"] and "sort=True" in found["sort"]


def test_a_mesh_axis_that_does_not_divide_its_axis_is_named():
  # JAX refuses to build such arrays today; the check guards what it is
  # given (a sharding read off a trace or a file) all the same.
  from mcq_jax import _sharded

  _sharded.check_divisible((12, 8), (("a",), ()), {"a": 4}, "leaf 'w'")
  with pytest.raises(ValueError, match=r"leaf 'w'.*\('a', 'b'\).*axis 0"):
    _sharded.check_divisible(
      (12, 8), (("a", "b"), ()), {"a": 4, "b": 2}, "leaf 'w'"
    )


_TWO_PROCESS_WORKER = """
import json, os, sys
process_id, port = int(sys.argv[1]), sys.argv[2]
os.environ["JAX_NUM_CPU_DEVICES"] = "4"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=2,
                           process_id=process_id)
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P, AxisType
import mcq_jax

rng = np.random.default_rng(0)
w = (rng.standard_t(3, size=(64, 48)) * (rng.random((64, 48)) > 0.3))
w = w.astype(np.float32)
local = jax.local_devices()[0]
out = {"devices": jax.device_count(), "local": jax.local_device_count(),
       "checks": 0, "bad": []}
for mode in ("auto", "explicit"):
  kind = AxisType.Auto if mode == "auto" else AxisType.Explicit
  mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(kind, kind))
  for spec in (P("a", None), P(("a", "b"), None), P("b", "a")):
    for gran in ("per_channel", "per_tensor"):
      leaf = jax.make_array_from_callback(
        w.shape, NamedSharding(mesh, spec), lambda index: w[index])
      fn = lambda p: mcq_jax.quantize(p, jax.random.key(0), where="k",
                                      granularity=gran)
      # The single-process result, on one of this process's devices.
      ref = fn({"k": jax.device_put(w, local)})["k"]
      with jax.set_mesh(mesh):
        q = (jax.jit(fn) if mode == "explicit" else fn)({"k": leaf})["k"]
      for got, want in ((q.values, ref.values), (q.scale, ref.scale)):
        want = np.asarray(want)
        for shard in got.addressable_shards:
          out["checks"] += 1
          if not np.array_equal(np.asarray(shard.data), want[shard.index]):
            out["bad"].append([mode, str(spec), gran, str(shard.index)])
print(json.dumps(out))
"""


def test_two_processes_quantize_their_own_shards():
  # jax.distributed on localhost: 2 processes of 4 CPU devices each, CPU
  # collectives over gloo; each checks the shards it holds.
  import socket

  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = str(s.getsockname()[1])
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", _TWO_PROCESS_WORKER, str(i), port],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env,
    )
    for i in range(2)
  ]
  results = []
  for proc in procs:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    results.append(json.loads(stdout.strip().splitlines()[-1]))
  for found in results:
    assert (found["devices"], found["local"]) == (8, 4)
    assert found["bad"] == []
    # 2 modes x 3 layouts x 2 granularities, values and scales: every shard
    # of the four local devices was compared.
    assert found["checks"] == 2 * 3 * 2 * 2 * 4


def test_nnx_models_and_float64_leaves_match_one_device():
  # mcq_call on an NNX model whose state is sharded; float64 leaves (x64)
  # whose magnitudes lie outside float32's range keep them, sharded or not.
  found = _run(
    """
    from flax import nnx
    jax.config.update("jax_enable_x64", True)

    class MLP(nnx.Module):
      def __init__(self, rngs):
        self.l0 = nnx.Linear(64, 48, rngs=rngs)
        self.l1 = nnx.Linear(48, 16, rngs=rngs)

      def __call__(self, x):
        return self.l1(nnx.relu(self.l0(x)))

    x = jax.random.normal(jax.random.key(2), (8, 64), jnp.float32)

    def call(shard=lambda state: state):
      graph, state = nnx.split(MLP(nnx.Rngs(1)))
      state = mcq_jax.quantize(shard(state), jax.random.key(0))
      return mcq_jax.mcq_call(nnx.merge(graph, state), x_in,
                              key=jax.random.key(3))

    x_in = x
    ref = call()
    w = data((64, 48)).astype(np.float64) * 1e200
    quantize64 = jax.jit(lambda p: mcq_jax.quantize(
      p, jax.random.key(0), where="k", granularity="per_tensor"))
    ref64 = quantize64({"k": jnp.asarray(w)})["k"]
    rows = []
    for mode in ("auto", "explicit"):
      mesh = make_mesh(mode)
      put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))
      specs = {"l0": P("a", None), "l1": P(None, "a")}

      def shard(state):
        pure = nnx.to_pure_dict(state)
        for k, s in specs.items():
          pure[k]["kernel"] = put(pure[k]["kernel"], s)
        nnx.replace_by_pure_dict(state, pure)
        return state

      x_in = put(x, P("b", None))
      with jax.set_mesh(mesh):
        out = call(shard)
        q64 = quantize64({"k": put(w, P("a", "b"))})["k"]
      rows.append([mode, bool(same(out, ref)),
                   bool(same(q64.values, ref64.values)
                        and same(q64.scale, ref64.scale)),
                   str(q64.scale.dtype), str(q64.values.dtype)])
    print(json.dumps(rows))
    """
  )
  assert found == [
    ["auto", True, True, "float64", "int16"],
    ["explicit", True, True, "float64", "int16"],
  ]
