"""mcq_jax: instant post-training quantization by Monte Carlo sampling.

The public API is flat; implementation lives in private modules.
"""

from mcq_jax._activations import quantize_activations
from mcq_jax._apply import COVERED_LAYERS, mcq_apply
from mcq_jax._baselines import round_to_nearest, stochastic_rounding
from mcq_jax._checkpoint import load, quantize_checkpoint, save
from mcq_jax._checkpoint_format import CheckpointFormatError
from mcq_jax._native import NativeBuildError, NativeStatus, native_status
from mcq_jax._nnx import NNX_COVERED_LAYERS, mcq_call
from mcq_jax._qarray import QArray, dequantize
from mcq_jax._quantize import quantize
from mcq_jax._reports import ApplyReport, LayerReport
from mcq_jax._runtime_checks import checked
from mcq_jax._sampling import (
  ALL_SAMPLERS,
  SAMPLERS,
  num_samples,
  sample_counts,
)
from mcq_jax._summary import (
  LeafSummary,
  Summary,
  bit_width,
  entropy_bits,
  summary,
)
from mcq_jax._validation import GRANULARITIES

__version__ = "0.9.0"

__all__ = (
  "ApplyReport",
  "COVERED_LAYERS",
  "CheckpointFormatError",
  "LayerReport",
  "GRANULARITIES",
  "LeafSummary",
  "NNX_COVERED_LAYERS",
  "NativeBuildError",
  "NativeStatus",
  "QArray",
  "SAMPLERS",
  "ALL_SAMPLERS",
  "Summary",
  "bit_width",
  "checked",
  "dequantize",
  "entropy_bits",
  "mcq_apply",
  "load",
  "mcq_call",
  "native_status",
  "num_samples",
  "quantize",
  "quantize_activations",
  "quantize_checkpoint",
  "round_to_nearest",
  "sample_counts",
  "save",
  "stochastic_rounding",
  "summary",
)
