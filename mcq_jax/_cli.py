"""The ``mcq-jax`` command line of the installed library.

    mcq-jax --help
    mcq-jax --version
    mcq-jax info            # versions, platform and devices, for a bug report
    mcq-jax quantize SRC DST [options]  # a checkpoint in, a quantized one out
    mcq-jax inspect PATH    # the summary table of a (quantized) checkpoint

Only the library's own dependencies (jax, flax, numpy, orbax-checkpoint,
safetensors, tqdm) are used, and they are imported inside the subcommand that
needs them, so ``--help`` and an unknown
command answer without initialising a backend, and no optional package
(ml_collections, tensorflow_datasets, scikit-learn, qwix) is ever imported: a
plain ``pip install mcq_jax`` runs every subcommand.

Each subcommand is one function that adds its parser to the subparsers and
sets ``handler`` (``Namespace -> exit code``); listing it in ``_COMMANDS`` is
all it takes to plug one in.

The experiment runner is not part of the library: it lives with ``configs/``
in a checkout of the repository and runs from its root as
``python -m experiments.run configs/<name>.py``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
from collections.abc import Callable, Sequence

PROG = "mcq-jax"
REPOSITORY = "https://github.com/mcq-jax/mcq_jax"
RUNNER_HINT = (
  "The experiment runner (experiments/, configs/) is not installed with the\n"
  f"library: it lives in a checkout of the repository, {REPOSITORY},\n"
  "and runs from the checkout's root:\n\n"
  "    python -m experiments.run configs/<name>.py\n"
)

Handler = Callable[[argparse.Namespace], int]
# One function per subcommand: it adds its parser and sets ``handler``.
AddCommand = Callable[
  ["argparse._SubParsersAction[argparse.ArgumentParser]"], None
]


def _version(distribution: str) -> str:
  """Installed version of ``distribution``, read from its metadata (no import).

  Args:
    distribution: the name the package is installed under, e.g. ``"jaxlib"``.

  Returns:
    The version string, or ``"not installed"``.
  """
  try:
    return importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def info_lines() -> list[tuple[str, str]]:
  """What a bug report needs: versions, platform, backend, devices and
  whether the native kernels run.

  Imports jax (which initialises its backends), flax and numpy.

  Returns:
    ``(name, value)`` pairs in display order.

  Examples:
    >>> dict(info_lines())["backend"] in ("cpu", "gpu", "tpu", "cuda", "rocm")
    True
  """
  import flax
  import jax
  import numpy as np

  import mcq_jax

  lines = [
    ("mcq_jax", mcq_jax.__version__),
    ("jax", jax.__version__),
    # From the metadata: jaxlib's own version attribute moved between releases.
    ("jaxlib", _version("jaxlib")),
    ("flax", flax.__version__),
    ("numpy", np.__version__),
    ("opt_einsum", _version("opt_einsum")),
    ("orbax-checkpoint", _version("orbax-checkpoint")),
    ("safetensors", _version("safetensors")),
    ("python", f"{platform.python_version()} ({sys.executable})"),
    ("platform", platform.platform()),
  ]
  # A misconfigured backend (e.g. JAX_PLATFORMS=cuda without a GPU) is what a
  # report is often about, so it is reported rather than raised; jax raises
  # RuntimeError, or a bare AssertionError when no plugin provides a platform
  # named in JAX_PLATFORMS, hence the breadth.
  try:
    devices = jax.devices()
    lines.append(("backend", jax.default_backend()))
    lines.append(
      (
        "devices",
        ", ".join(f"{d.platform}:{d.id} ({d.device_kind})" for d in devices),
      )
    )
  except Exception as e:  # noqa: BLE001
    reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    lines.append(("backend", f"unavailable ({reason})"))
  # Whether the native CPU kernels run (built here if needed).
  try:
    native = mcq_jax.native_status()
    lines.append(
      (
        "native kernels",
        f"yes ({native.library})"
        if native.available
        else f"no ({native.reason.splitlines()[0]})",
      )
    )
    if native.available:
      lines.append(
        (
          "native int8 products",
          "yes (AVX512-VNNI)"
          if native.int8_matmul
          else "no (this CPU has no AVX512-VNNI: XLA's products run)",
        )
      )
  except (mcq_jax.NativeBuildError, ValueError) as e:
    lines.append(("native kernels", f"no ({str(e).splitlines()[0]})"))
  lines += [
    (name, value)
    for name, value in sorted(os.environ.items())
    if name.startswith(("JAX_", "XLA_", "MCQ_JAX_"))
  ]
  return lines


def _info(args: argparse.Namespace) -> int:
  """Prints :func:`info_lines`, one ``name: value`` per line."""
  del args  # takes no options
  lines = info_lines()
  width = max(len(name) for name, _ in lines)
  for name, value in lines:
    print(f"{name + ':':<{width + 1}} {value}")
  return 0


def _add_info(
  subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
  """Adds ``mcq-jax info``."""
  parser = subparsers.add_parser(
    "info",
    help="print versions, platform and devices (for a bug report)",
    description="Prints the versions of mcq_jax and its dependencies, Python,"
    " the platform, the JAX backend and its devices.",
  )
  parser.set_defaults(handler=_info)


def _axes(text: str) -> int | tuple[int, ...]:
  """``--channel-axis`` and ``--stack-axes``: one axis (``-1``) or several
  (``0,2``)."""
  try:
    axes = tuple(int(a) for a in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(
      f"expected an integer axis or a comma-separated list, got {text!r}"
    ) from None
  return axes[0] if len(axes) == 1 else axes


def _integer(low: int, high: int | None = None) -> Callable[[str], int]:
  """An argparse type: an integer in ``[low, high]`` (no upper bound when
  ``high`` is ``None``)."""

  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < low or (high is not None and value > high):
      bound = f">= {low}" if high is None else f"in [{low}, {high}]"
      raise argparse.ArgumentTypeError(f"must be {bound}: {text!r}")
    return value

  return parse


def _positive_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
  if not value > 0 or value == float("inf"):
    raise argparse.ArgumentTypeError(f"must be a finite number > 0: {text!r}")
  return value


# What a checkpoint command reports as a usage problem rather than a crash:
# bad paths, bad files, bad options.
_USER_ERRORS = (OSError, ValueError, TypeError)


def _fail(command: str, error: BaseException) -> int:
  sys.stderr.write(f"{PROG} {command}: error: {error}\n")
  return 1


def _quantize(args: argparse.Namespace) -> int:
  """Runs :func:`mcq_jax.quantize_checkpoint` and prints the totals."""
  import jax

  from mcq_jax import _checkpoint

  try:
    report = _checkpoint.quantize_checkpoint(
      args.src,
      args.dst,
      jax.random.key(args.seed),
      samples_per_weight=args.samples_per_weight,
      bits=args.bits,
      sampler=args.sampler,
      granularity=args.granularity,
      where=args.where,
      channel_axis=args.channel_axis,
      stack_axes=args.stack_axes,
      sort=args.sort,
      refit_scale=args.refit_scale,
      group_size=args.group_size,
      format=args.format,
      overwrite=args.overwrite,
      progress=not args.no_progress,
    )
  except _USER_ERRORS as e:
    return _fail("quantize", e)
  quantized = report.quantized
  print(
    f"wrote {args.dst}: {len(quantized)} of {len(report.leaves)} tensors"
    " quantized"
  )
  print(report.totals)
  return 0


def _inspect(args: argparse.Namespace) -> int:
  """Prints the summary table of a checkpoint."""
  from mcq_jax import _checkpoint

  try:
    report = _checkpoint.checkpoint_summary(args.path)
  except _USER_ERRORS as e:
    return _fail("inspect", e)
  print(report)
  return 0


def _add_quantize(
  subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
  """Adds ``mcq-jax quantize``."""
  from mcq_jax import _sampling, _validation

  parser = subparsers.add_parser(
    "quantize",
    help="quantize a checkpoint (orbax or safetensors), tensor by tensor",
    description="Reads SRC one tensor at a time, quantizes the selected"
    " tensors by MCQ and writes DST, a quantized checkpoint that"
    " mcq_jax.load reads back (and any safetensors reader can open). Peak"
    " memory is set by the largest tensor, not by the checkpoint. The output"
    " is written to a temporary name and renamed when complete.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument(
    "src",
    metavar="SRC",
    help="an orbax checkpoint directory, a .safetensors file, or a directory"
    " of .safetensors shards (with or without an index)",
  )
  parser.add_argument(
    "dst",
    metavar="DST",
    help="the output: a .safetensors file, or any other name for an orbax"
    " checkpoint directory (see --format)",
  )
  amount = parser.add_mutually_exclusive_group()
  amount.add_argument(
    "--samples-per-weight",
    type=_positive_float,
    default=None,
    metavar="K",
    help="samples per weight: more gives more bits and fewer zeros"
    " (default: 2, unless --bits is given)",
  )
  amount.add_argument(
    "--bits",
    type=_integer(2, 32),
    default=None,
    metavar="B",
    help="instead of K: signed B-bit integers; each group draws the largest"
    " number of samples whose counts are guaranteed to fit",
  )
  parser.add_argument(
    "--sampler", choices=_sampling.ALL_SAMPLERS, default="systematic"
  )
  parser.add_argument(
    "--granularity", choices=_validation.GRANULARITIES, default="per_channel"
  )
  parser.add_argument(
    "--where",
    metavar="REGEX",
    default=None,
    help="quantize the tensors whose name matches REGEX (default: float"
    " tensors of rank >= 2 not named bias/scale/mean/var)",
  )
  parser.add_argument(
    "--channel-axis",
    type=_axes,
    default=None,
    metavar="A",
    help="output-channel axis (or comma-separated axes) for per_channel;"
    " default: 0 for safetensors input (PyTorch's [out, in] weights), -1 for"
    " orbax input (Flax's [in, out] kernels)",
  )
  parser.add_argument(
    "--stack-axes",
    type=_axes,
    default=(),
    metavar="A",
    help="axes that stack independent layers (nn.scan's leading layer axis:"
    " 0); each index is quantized as a tensor of its own. Applies to every"
    " selected tensor: combine with --where",
  )
  parser.add_argument(
    "--group-size",
    type=_integer(1),
    default=None,
    metavar="G",
    help="per_channel only: split each output channel into blocks of G"
    " consecutive values (the input axis of a [in, out] kernel), each with"
    " its own samples and scale",
  )
  parser.add_argument(
    "--refit-scale",
    action="store_true",
    help="least-squares scale per group after sampling (lower error, no"
    " longer unbiased)",
  )
  parser.add_argument(
    "--seed", type=int, default=0, help="the jax.random key's seed"
  )
  parser.add_argument(
    "--sort",
    action="store_true",
    help="build each distribution over values sorted by magnitude",
  )
  parser.add_argument(
    "--format",
    choices=("orbax", "safetensors"),
    default=None,
    help="format of DST (default: safetensors if DST ends in .safetensors,"
    " else orbax)",
  )
  parser.add_argument(
    "--overwrite", action="store_true", help="replace DST if it exists"
  )
  parser.add_argument(
    "--no-progress", action="store_true", help="no progress bar"
  )
  parser.set_defaults(handler=_quantize)


def _add_inspect(
  subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
  """Adds ``mcq-jax inspect``."""
  parser = subparsers.add_parser(
    "inspect",
    help="print the summary table of a checkpoint",
    description="Reads a checkpoint one tensor at a time, validates it and"
    " prints each tensor's shape, dtype, groups, samples, bits, entropy,"
    " zeros and bytes, with totals against float32.",
  )
  parser.add_argument(
    "path", metavar="PATH", help="a checkpoint (quantized or not)"
  )
  parser.set_defaults(handler=_inspect)


# The subcommands, in help order.
_COMMANDS: tuple[AddCommand, ...] = (_add_quantize, _add_inspect, _add_info)


def build_parser() -> tuple[argparse.ArgumentParser, list[str]]:
  """The top-level parser with every subcommand of ``_COMMANDS``.

  Returns:
    The parser and the names of its subcommands.
  """
  import mcq_jax  # already imported: this module is part of the package

  parser = argparse.ArgumentParser(
    prog=PROG,
    description="mcq_jax: instant post-training quantization by Monte Carlo"
    " importance sampling.",
    epilog=RUNNER_HINT,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument(
    "--version", action="version", version=f"mcq_jax {mcq_jax.__version__}"
  )
  subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
  for add in _COMMANDS:
    add(subparsers)
  return parser, list(subparsers.choices)


def _unknown_command(command: str, commands: Sequence[str]) -> str:
  """The message for a subcommand the library does not have."""
  if command == "run":
    return (
      f"{PROG}: 'run' is not a command of the installed library.\n{RUNNER_HINT}"
    )
  return (
    f"{PROG}: unknown command {command!r} (commands: {', '.join(commands)});"
    f" see '{PROG} --help'.\n"
  )


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the ``mcq-jax`` command line.

  Args:
    argv: the arguments after the program name; ``sys.argv[1:]`` if ``None``.

  Returns:
    The exit code: 0 on success, 2 on a usage error.

  Examples:
    >>> main(["--version"])  # doctest: +ELLIPSIS
    mcq_jax ...
    0
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  parser, commands = build_parser()
  # The top level takes only flags, so the first other word is the command;
  # it is checked here so that 'run' gets its hint rather than argparse's
  # "invalid choice".
  command = next((a for a in argv if not a.startswith("-")), None)
  if command is not None and command not in commands:
    sys.stderr.write(_unknown_command(command, commands))
    return 2
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:  # --help, --version and usage errors
    return e.code if isinstance(e.code, int) else int(e.code is not None)
  if args.command is None:
    parser.print_help(sys.stderr)
    return 2
  handler: Handler = args.handler
  return handler(args)


if __name__ == "__main__":
  sys.exit(main())
