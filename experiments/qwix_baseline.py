"""qwix's post-training quantization as the ecosystem baseline.

Optional: ``pip install qwix`` (the ``qwix`` extra).

Weights only: ``qwix.quantize_params`` with an absmax rule on every layer
(qwix chooses per-channel scales), dequantized and run through the float model,
so it compares with MCQ weights-only on equal terms. Weights + activations:
qwix's own quantized model (dynamic-range activations), where its kernels run
on this backend; where they do not, the row records qwix's error instead of a
number.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import numpy as np

import mcq_jax


def _ptq_model(model, qtype: str):
  import qwix

  # Convolutions in qwix's PTQ need the activation type to equal the weight
  # type even to build the abstract params, so both are set.
  rule = qwix.QuantizationRule(
    module_path=".*", weight_qtype=qtype, act_qtype=qtype
  )
  return qwix.quantize_model(model, qwix.PtqProvider([rule]))


def quantize_params(
  model,
  variables: dict[str, Any],
  sample: np.ndarray,
  qtype: str,
  **call_kwargs: Any,
):
  """qwix-quantized params (a tree of qwix arrays) and the PTQ model.

  ``sample`` is one input batch (its shape builds the abstract quantized
  params); ``call_kwargs`` go to the model's ``__call__`` (``train=False``).
  """
  import qwix

  ptq = _ptq_model(model, qtype)
  abstract = jax.eval_shape(
    lambda: ptq.init(jax.random.key(0), sample, **call_kwargs)
  )["params"]
  return qwix.quantize_params(variables["params"], abstract), ptq


def _is_quantized(leaf: Any) -> bool:
  return hasattr(leaf, "array") and hasattr(leaf.array, "qvalue")


def dequantize(params_q: Any) -> Any:
  """Float params from a qwix-quantized tree (other leaves kept)."""
  import qwix

  flat = flax.traverse_util.flatten_dict(params_q)
  return flax.traverse_util.unflatten_dict(
    {
      path: qwix.dequantize(leaf.array) if _is_quantized(leaf) else leaf
      for path, leaf in flat.items()
    }
  )


def storage(params_q: Any) -> dict[str, float]:
  """Value-weighted bits (the qtype's width), entropy bits and sparsity."""
  sizes, bits, entropy, zeros = [], [], [], []
  for leaf in flax.traverse_util.flatten_dict(params_q).values():
    if not _is_quantized(leaf):
      continue
    values = np.asarray(leaf.array.qvalue).astype(np.int64)
    sizes.append(values.size)
    bits.append(jax.numpy.iinfo(leaf.array.qvalue.dtype).bits)
    entropy.append(mcq_jax.entropy_bits(values))
    zeros.append(float(np.mean(values == 0)))
  w = np.asarray(sizes, np.float64) / np.sum(sizes)
  return {
    "bits": float(w @ bits),
    "entropy_bits": float(w @ entropy),
    "sparsity": float(w @ zeros),
  }


def evaluate(evaluator: Any, setting: Any) -> dict[str, Any]:
  """One qwix row for :class:`experiments.sweep.Evaluator`."""
  sample = evaluator.batches[0][:1]
  params_q, ptq = quantize_params(
    evaluator.model, evaluator.variables, sample, setting.qtype, train=False
  )
  row = storage(params_q)
  if not setting.activation_samples:
    variables = evaluator.with_params(dequantize(params_q))
    return {**evaluator.metrics(evaluator.float_logits(variables)), **row}
  apply = jax.jit(lambda v, x: ptq.apply(v, x, train=False))
  try:
    logits = jax.numpy.concatenate(
      [apply(evaluator.with_params(params_q), x) for x in evaluator.batches]
    )
  except (
    Exception
  ) as e:  # qwix kernels missing on this backend: recorded, not hidden
    return {
      **evaluator.metrics(None),
      **row,
      "error": f"{type(e).__name__}: {str(e).splitlines()[0]}",
    }
  return {**evaluator.metrics(logits), **row}
