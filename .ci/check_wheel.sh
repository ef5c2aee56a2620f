#!/usr/bin/env bash
# Packaging check: the wheel holds the library only (mcq_jax/, py.typed and
# its dist-info), and installed without extras into a fresh virtual
# environment it imports and its `mcq-jax` command runs.
#
#   bash .ci/check_wheel.sh            # PYTHON=python3.12 picks the interpreter
#
# Needs the package index (the build backend, then the library's dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
SECONDS=0

# Build from a copy of the sources a checkout would have (tracked and
# untracked files, not ignored ones): setuptools reuses a build/ directory
# left in the tree, which can carry stale files into the wheel.
mkdir "$TMP/src" "$TMP/dist" "$TMP/run"
git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done \
  | tar -C "$ROOT" --null -T - -cf - | tar -C "$TMP/src" -xf -
"$PYTHON" -m pip wheel -q --no-deps -w "$TMP/dist" "$TMP/src"
WHEEL=$(echo "$TMP"/dist/mcq_jax-*.whl)
echo "built $(basename "$WHEEL")"
"$PYTHON" -m zipfile -l "$WHEEL"

# Only the library: every file under mcq_jax/ or the dist-info, with
# py.typed and the console script; the version is mcq_jax.__version__.
"$PYTHON" - "$WHEEL" "$ROOT/mcq_jax/__init__.py" <<'EOF'
import ast, re, sys, zipfile

wheel, init = sys.argv[1:]
version = next(node.value.value for node in ast.parse(open(init).read()).body
               if isinstance(node, ast.Assign)
               and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["__version__"])
dist_info = f"mcq_jax-{version}.dist-info/"
with zipfile.ZipFile(wheel) as z:
  names = z.namelist()
  entry_points = z.read(dist_info + "entry_points.txt").decode()
  metadata = z.read(dist_info + "METADATA").decode()
stray = [n for n in names if not n.startswith(("mcq_jax/", dist_info))]
assert not stray, f"files outside mcq_jax/ in the wheel: {stray}"
for required in ("mcq_jax/__init__.py", "mcq_jax/_cli.py", "mcq_jax/py.typed"):
  assert required in names, f"{required} is missing from the wheel"
assert re.search(r"^mcq-jax = mcq_jax\._cli:main$", entry_points, re.M), entry_points
requires = [re.sub(r"[-_.]+", "-", name).lower() for name in
            re.findall(r"^Requires-Dist: ([\w.-]+)(?!.*extra ==)", metadata, re.M)]
assert {"jax", "flax", "numpy", "opt-einsum", "orbax-checkpoint", "safetensors",
        "tqdm"} <= set(requires), requires
print(f"wheel contents OK: {len(names)} files, version {version},"
      f" requires {', '.join(requires)}")
EOF

# A fresh environment, no extras; commands run outside the checkout so that
# its mcq_jax/ cannot shadow the installed one.
"$PYTHON" -m venv "$TMP/venv"
"$TMP/venv/bin/python" -m pip install -q "$WHEEL"
cd "$TMP/run"
export PATH="$TMP/venv/bin:$PATH"
python -c "import mcq_jax; print(mcq_jax.__version__)"
python -c "import mcq_jax, sys; assert mcq_jax.__file__.startswith(sys.prefix), mcq_jax.__file__"
if python -c "import experiments" 2>/dev/null; then
  echo "the wheel installs a top-level 'experiments' package" >&2; exit 1
fi
mcq-jax --help
mcq-jax --version
mcq-jax info
# The native kernels build from the wheel's own source (a fresh cache).
MCQ_JAX_CACHE_DIR="$TMP/cache" MCQ_JAX_NATIVE=1 python -c "import mcq_jax; s = mcq_jax.native_status(); assert s.available and s.library.startswith('$TMP/cache'), s"
status=0
mcq-jax run configs/digits_mlp.py 2>"$TMP/run.err" || status=$?
[[ $status == 2 ]] && grep -qF "python -m experiments.run configs/<name>.py" "$TMP/run.err" \
  || { echo "mcq-jax run: expected exit 2 and the runner hint, got $status" >&2; exit 1; }
# Checkpoints in and out with no extras: a PyTorch-layout safetensors file to
# a quantized safetensors file and an orbax checkpoint, both inspected.
python - <<'PY'
import numpy as np
from safetensors.numpy import save_file
rng = np.random.default_rng(0)
save_file({"fc.weight": rng.normal(size=(16, 32)).astype(np.float32),
           "fc.bias": np.zeros(16, np.float32)}, "model.safetensors")
PY
mcq-jax quantize model.safetensors q.safetensors --no-progress
mcq-jax quantize model.safetensors q_orbax --no-progress
mcq-jax inspect q.safetensors | grep -q "^fc.weight  *16x32  *int8"
mcq-jax inspect q_orbax | grep -q "^fc.weight  *16x32  *int8"
echo "check_wheel: OK in ${SECONDS} s"
