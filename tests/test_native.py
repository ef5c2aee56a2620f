"""The native CPU kernels: built, used, and the same integers as XLA's."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mcq_jax
from mcq_jax import _native, _sampling

_BOUNDED = ("systematic", "stratified", "deterministic")


def _xla(values, draws, amount, sampler, dtype, groups_first):
  return _sampling._xla_counts_of_layout(
    values,
    draws,
    amount,
    sampler,
    np.dtype(dtype),
    groups_first,
    _sampling._whole_groups(),
  )


def _native_or_xla(values, draws, amount, sampler, dtype, groups_first):
  return _sampling.counts_of_layout(
    values, draws, amount, sampler, np.dtype(dtype), groups_first
  )


def _awkward(kind: str, shape: tuple[int, int], seed: int) -> np.ndarray:
  """Signed float32 groups that stress the fixed point and its edges."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape)
  if kind == "cauchy":  # a few values hold most of the mass
    x = rng.standard_cauchy(shape)
  elif kind == "sparse":  # mostly zeros, -0.0 among them, trailing zeros
    x[rng.random(shape) < 0.8] = -0.0
    x[..., -3:] = 0.0
  elif kind == "flush":  # values around 2**-40 of the largest: some flushed
    x = x * np.where(rng.random(shape) < 0.3, 2.0**-40, 1.0)
    x = x * 2.0 ** rng.integers(-3, 3, shape)
  elif kind == "range":  # magnitudes from 1e-30 to 1e30 across groups
    x = x * 10.0 ** rng.integers(-30, 30, (shape[0], 1))
  elif kind == "zero_groups":  # whole groups of zeros
    x[::2] = 0.0
  return x.astype(np.float32)


_AMOUNTS = {
  "N=1": 1,
  "N=7": 7,
  "N=K*n": None,  # one sample per value
  "N near 2**31": _sampling.MAX_SAMPLES - 5000,
  "4 bits": 4,
  "8 bits": 8,
}


def _amount(name: str, group_size: int):
  value = _AMOUNTS[name]
  if name.endswith("bits"):
    return _sampling.bit_budget(value, group_size)
  return group_size if value is None else value


def test_the_kernels_build_and_run_on_this_machine():
  # The test machines have a C++ compiler: the fast path must be the one
  # under test, not silently the fallback.
  status = mcq_jax.native_status()
  assert status.available, status.reason
  assert os.path.exists(status.library)
  values = _sampling.pack(jnp.ones((100, 3)))
  draws = _sampling.group_words(jax.random.split(jax.random.key(0), 3))
  text = (
    jax.jit(_native_or_xla, static_argnums=(2, 3, 4, 5))
    .lower(values, draws, 10, "systematic", np.int8, False)
    .compile()
    .as_text()
  )
  assert _native.MASS_TARGET in text and _native.COUNTS_TARGET in text


@pytest.mark.parametrize("sampler", _BOUNDED)
@pytest.mark.parametrize("groups_first", [False, True])
@pytest.mark.parametrize(
  "kind", ["gaussian", "cauchy", "sparse", "flush", "range", "zero_groups"]
)
@pytest.mark.parametrize("amount", list(_AMOUNTS))
def test_same_integers_and_scales_as_the_xla_program(
  sampler, groups_first, kind, amount
):
  # Shapes with padding (n not a multiple of 32), single values, one group.
  seed = hash((sampler, groups_first, kind, amount)) % 2**32
  for groups, n in ((5, 1), (1, 3001), (6, 77), (33, 640)):
    x = _awkward(kind, (groups, n), seed)
    values = _sampling.pack(
      jnp.asarray(x if groups_first else x.T), groups_first
    )
    keys = jax.random.split(jax.random.key(seed), groups)
    draws = _sampling.group_words(keys)
    size = _amount(amount, n)
    dtype = np.int32 if amount.startswith("N") else np.int8
    args = (size, sampler, dtype, groups_first)
    want = jax.jit(_xla, static_argnums=(2, 3, 4, 5))(values, draws, *args)
    got = jax.jit(_native_or_xla, static_argnums=(2, 3, 4, 5))(
      values, draws, *args
    )
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    assert got[0].dtype == want[0].dtype
    np.testing.assert_array_equal(
      np.asarray(got[1]).view(np.uint32), np.asarray(want[1]).view(np.uint32)
    )


@pytest.mark.parametrize("sampler", _BOUNDED)
@pytest.mark.parametrize("groups_first", [False, True])
@pytest.mark.parametrize("sort", [False, True])
def test_groups_read_unpadded_give_the_xla_programs_integers(
  monkeypatch, sampler, groups_first, sort
):
  # grouped_counts hands the kernels the groups as they are (no padded
  # layout); with the kernels switched off it runs the XLA program on the
  # padded layout. Group sizes off the 32-row grid, and one group alone.
  for groups, n in ((1, 1000), (7, 45), (40, 33)):
    x = _awkward("sparse" if sort else "cauchy", (groups, n), n)
    values = jnp.asarray(x if groups_first else x.T)
    keys = jax.random.split(jax.random.key(n), groups)
    budget = _sampling.bit_budget(6, n)
    results = []
    for mode in ("auto", "0"):
      monkeypatch.setenv("MCQ_JAX_NATIVE", mode)
      fn = jax.jit(  # a new function: traced under this setting
        lambda v, k, b=budget: _sampling.grouped_counts(
          v, k, b, sampler, sort, np.dtype(np.int8), groups_first
        )
      )
      results.append(fn(values, keys))
      text = fn.lower(values, keys).as_text()
      assert (_native.COUNTS_TARGET in text) == (mode == "auto")
    (got, got_scale), (want, want_scale) = results
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(got_scale), np.asarray(want_scale))


@pytest.mark.parametrize("groups_first", [False, True])
def test_calls_cut_into_parts_for_threads_give_the_same_integers(
  groups_first,
):
  # Calls of more than 2**17 values run as slabs of groups on XLA's thread
  # pool (or blocks of a vmapped batch): the counts must not depend on the
  # cut. Group counts that do not divide evenly, and a batch of blocks.
  for groups, n, batch in ((3, 70_001, 1), (1000, 300, 1), (7, 9000, 3)):
    x = _awkward("cauchy", (batch, groups, n), groups)
    keys = jax.random.split(jax.random.key(groups), (batch, groups))

    def both(x, keys, n=n):
      values = x if groups_first else x.T
      values = _sampling.pack(values, groups_first)
      draws = _sampling.group_words(keys)
      args = (_sampling.bit_budget(8, n), "stratified", np.int8, groups_first)
      return _native_or_xla(values, draws, *args), _xla(values, draws, *args)

    (got, got_scale), (want, want_scale) = jax.jit(jax.vmap(both))(
      jnp.asarray(x), keys
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(got_scale), np.asarray(want_scale))


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32])
def test_every_count_dtype(dtype):  # int64 (x64) in the test below
  x = _awkward("gaussian", (300, 4), 1)
  values = _sampling.pack(jnp.asarray(x))
  draws = _sampling.group_words(jax.random.split(jax.random.key(1), 4))
  args = (100, "stratified", dtype, False)
  want = _xla(values, draws, *args)
  got = _native_or_xla(values, draws, *args)
  assert got[0].dtype == dtype
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))


def test_int64_counts_with_x64(fresh_python):
  code, err = fresh_python(
    """
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp, numpy as np
    from mcq_jax import _sampling
    x = jnp.asarray(np.random.default_rng(0).standard_normal((300, 4)),
                    jnp.float32)
    values = _sampling.pack(x)
    draws = _sampling.group_words(jax.random.split(jax.random.key(1), 4))
    got = _sampling.counts_of_layout(values, draws, 1000, "systematic",
                                     np.dtype(np.int64))
    want = _sampling._xla_counts_of_layout(
      values, draws, 1000, "systematic", np.dtype(np.int64), False,
      _sampling._whole_groups())
    assert got[0].dtype == np.int64, got[0].dtype
    assert (np.asarray(got[0]) == np.asarray(want[0])).all()
    assert int(np.abs(np.asarray(got[0])).sum()) == 4000  # hits per group: N
    """
  )
  assert code == 0, err


def test_vmap_batches_the_kernels():
  # vmap hands the kernels a leading batch axis: every example must get the
  # counts it gets alone (and the XLA program's).
  x = jnp.asarray(_awkward("cauchy", (4, 5, 200), 3))
  keys = jax.random.split(jax.random.key(3), (4, 5))

  def one(x, keys):
    values = _sampling.pack(x, True)
    return _native_or_xla(
      values, _sampling.group_words(keys), 64, "stratified", np.int16, True
    )

  counts, scales = jax.jit(jax.vmap(one))(x, keys)
  for i in range(4):
    alone = jax.jit(one)(x[i], keys[i])
    want = _xla(
      _sampling.pack(x[i], True),
      _sampling.group_words(keys[i]),
      64,
      "stratified",
      np.int16,
      True,
    )
    np.testing.assert_array_equal(np.asarray(counts[i]), np.asarray(alone[0]))
    np.testing.assert_array_equal(np.asarray(counts[i]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(scales[i]), np.asarray(want[1]))


def test_other_platforms_get_the_xla_program():
  # The kernels exist for the CPU only: a program lowered for a GPU (or
  # TPU) must hold the XLA sampler and no call to them.
  fn = jax.jit(
    lambda v, d: _native_or_xla(v, d, 10, "systematic", np.int8, False)
  )
  values = _sampling.pack(jnp.ones((100, 3)))
  draws = _sampling.group_words(jax.random.split(jax.random.key(0), 3))
  for platform, native in (("cpu", True), ("cuda", False), ("tpu", False)):
    exported = jax.export.export(
      fn,
      platforms=[platform],
      disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call(_native.MASS_TARGET),
        jax.export.DisabledSafetyCheck.custom_call(_native.COUNTS_TARGET),
      ],
    )(values, draws)
    text = exported.mlir_module()
    assert (_native.COUNTS_TARGET in text) == native, platform
    assert ("stablehlo.while" in text) != native, platform


def test_kernels_reject_operands_of_the_wrong_size():
  # The kernels check what they are handed (the library always hands them
  # consistent operands): an error that names the operand, not a bad read.
  assert mcq_jax.native_status().available  # built and registered
  values = jnp.ones((10, 3))
  mass = jax.ffi.ffi_call(
    _native.MASS_TARGET, jax.ShapeDtypeStruct((3, 6), jnp.uint32)
  )
  with pytest.raises(Exception, match="power has 2 entries"):
    jax.block_until_ready(mass(values, jnp.ones(2), groups_first=False))
  counts = jax.ffi.ffi_call(
    _native.COUNTS_TARGET, jax.ShapeDtypeStruct((10, 3), jnp.int8)
  )
  per_group = jnp.ones(3)
  n = jnp.full(3, 5, jnp.int32)
  for words, sampler, message in (
    (jnp.zeros(3, jnp.uint32), 0, "words has 3 entries"),
    (jnp.zeros((3, 2), jnp.uint32), 7, "unknown sampler 7"),
  ):
    with pytest.raises(Exception, match=message):
      jax.block_until_ready(
        counts(
          values,
          *(per_group,) * 3,
          n,
          words,
          sampler=np.int32(sampler),
          groups_first=False,
        )
      )


def test_switches_and_build_failures(monkeypatch, tmp_path):
  # MCQ_JAX_NATIVE=0 turns the kernels off; a failed build is reported (auto)
  # or raised (1); an unknown setting is an error. This process's own status
  # (built and registered, cached) is left as it was.
  assert mcq_jax.native_status().available
  assert _native._status.__wrapped__("0") == _native.NativeStatus(
    False, "", "disabled by MCQ_JAX_NATIVE=0"
  )
  with monkeypatch.context() as m:
    m.setenv("MCQ_JAX_CACHE_DIR", str(tmp_path))
    m.setenv("CXX", "no-such-compiler-mcq")
    status = _native._status.__wrapped__("auto")
    assert not status.available
    assert "no-such-compiler-mcq" in status.reason
    with pytest.raises(_native.NativeBuildError, match="no-such-compiler"):
      _native._status.__wrapped__("1")
    m.setenv("CXX", "false")  # on PATH, and fails
    with pytest.raises(_native.NativeBuildError, match="failed to build"):
      _native._status.__wrapped__("1")
    assert not list(tmp_path.iterdir()), "a failed build left files behind"
    m.setenv("MCQ_JAX_NATIVE", "yes")
    with pytest.raises(ValueError, match="MCQ_JAX_NATIVE='yes'"):
      mcq_jax.native_status()
  assert mcq_jax.native_status().available


def test_a_fresh_cache_builds_once_and_is_reused(
  fresh_python, monkeypatch, tmp_path
):
  # A new cache directory: the first process builds the library, a second
  # one finds it (the same file; no compiler needed); with the kernels off,
  # a third draws the same integers by the XLA program.
  code = """
    import os, sys, jax, numpy as np, mcq_jax
    status = mcq_jax.native_status()
    w = jax.random.normal(jax.random.key(0), (64, 48))
    q = mcq_jax.quantize({"k": w}, jax.random.key(1), where="k")["k"]
    np.save(os.environ["OUT"], np.asarray(q.values))
    print(status.available, status.library, file=sys.stderr)
  """
  monkeypatch.setenv("MCQ_JAX_CACHE_DIR", str(tmp_path / "cache"))
  runs = (
    {},
    {"CXX": "no-such-compiler-mcq"},
    {"MCQ_JAX_NATIVE": "0"},
  )
  results = []
  for i, env in enumerate(runs):
    out = tmp_path / f"q{i}.npy"
    with monkeypatch.context() as m:
      m.setenv("OUT", str(out))
      for name, value in env.items():
        m.setenv(name, value)
      rc, err = fresh_python(code)
    assert rc == 0, err
    results.append((err.strip().splitlines()[-1], np.load(out)))
  (first, a), (second, b), (off, c) = results
  assert first.startswith("True ") and first == second
  assert off == "False"
  assert len(list((tmp_path / "cache").glob("*.so"))) == 1
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, c)
