"""Flax linen classifiers for experiment runs.

All take NHWC images and a ``train`` flag (batch statistics in BatchNorm) and
return logits. Every parameterised layer is a ``Dense``, ``DenseGeneral`` or
``Conv``, so ``mcq_jax.mcq_apply`` runs all of them in integer arithmetic.

- ``mlp``: flatten, ReLU hidden layers.
- ``lenet5``: LeCun et al. 1998: conv 6 - pool - conv 16 - pool - 120 - 84.
- ``vgg``: VGG-style CIFAR net (3x3 conv pairs with BatchNorm, max-pooling).
- ``resnet20``: He et al. 2016, the CIFAR ResNet (3 stages x 3 basic blocks).
- ``resnet18``, ``resnet50``: the ImageNet ResNets (basic / bottleneck blocks).
- ``transformer``: a pre-LayerNorm Transformer encoder over image patches,
  mean-pooled into a linear classifier.
- ``decoder_lm``: a byte-level decoder-only Transformer language model whose
  layers are one ``nn.scan`` stack (parameters with a leading layer axis),
  over token ids rather than images.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

MODELS = (
  "mlp",
  "lenet5",
  "vgg",
  "resnet20",
  "resnet18",
  "resnet50",
  "transformer",
  "decoder_lm",
)


def _batch_norm(train: bool):
  """BatchNorm on batch statistics in training, running averages otherwise."""
  return functools.partial(
    nn.BatchNorm, use_running_average=not train, momentum=0.9
  )


class MLP(nn.Module):
  hidden: Sequence[int] = (128, 128)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


class LeNet5(nn.Module):
  """LeNet-5 with ReLU and average pooling; SAME convolutions fit 8x8 inputs."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    for features in (6, 16):
      x = nn.relu(nn.Conv(features, (5, 5), padding="SAME")(x))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(120)(x))
    x = nn.relu(nn.Dense(84)(x))
    return nn.Dense(self.num_classes)(x)


class VGG(nn.Module):
  """VGG-style CIFAR net: ``stages`` of two 3x3 convs + BatchNorm, pooled."""

  stages: Sequence[int] = (64, 128, 256)
  dense: int = 256
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = _batch_norm(train)
    for features in self.stages:
      for _ in range(2):
        x = nn.relu(norm()(nn.Conv(features, (3, 3), use_bias=False)(x)))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.relu(nn.Dense(self.dense)(x))
    return nn.Dense(self.num_classes)(x)


class BasicBlock(nn.Module):
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = _batch_norm(train)
    y = nn.Conv(self.features, (3, 3), (self.strides,) * 2, use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
    y = norm(scale_init=nn.initializers.zeros)(y)
    if x.shape != y.shape:
      x = nn.Conv(self.features, (1, 1), (self.strides,) * 2, use_bias=False)(x)
      x = norm()(x)
    return nn.relu(x + y)


class BottleneckBlock(nn.Module):
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = _batch_norm(train)
    y = nn.relu(norm()(nn.Conv(self.features, (1, 1), use_bias=False)(x)))
    y = nn.Conv(self.features, (3, 3), (self.strides,) * 2, use_bias=False)(y)
    y = nn.relu(norm()(y))
    y = nn.Conv(4 * self.features, (1, 1), use_bias=False)(y)
    y = norm(scale_init=nn.initializers.zeros)(y)
    if x.shape != y.shape:
      x = nn.Conv(
        4 * self.features, (1, 1), (self.strides,) * 2, use_bias=False
      )(x)
      x = norm()(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet; ``stem="cifar"``: one 3x3 conv; ``"imagenet"``: 7x7/2, max-pool."""

  stage_sizes: Sequence[int]
  block: str = "basic"
  width: int = 64
  stem: str = "imagenet"
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = _batch_norm(train)
    block_cls = {"basic": BasicBlock, "bottleneck": BottleneckBlock}[self.block]
    if self.stem == "imagenet":
      x = nn.Conv(
        self.width, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False
      )(x)
      x = nn.relu(norm()(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    else:
      x = nn.relu(norm()(nn.Conv(self.width, (3, 3), use_bias=False)(x)))
    for stage, blocks in enumerate(self.stage_sizes):
      for b in range(blocks):
        strides = 2 if stage > 0 and b == 0 else 1
        x = block_cls(self.width * 2**stage, strides)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


class EncoderBlock(nn.Module):
  heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x))
    x = x + y
    y = nn.Dense(self.mlp_dim)(nn.LayerNorm()(x))
    y = nn.Dense(x.shape[-1])(nn.gelu(y))
    return x + y


class Transformer(nn.Module):
  """Encoder classifier over non-overlapping ``patch`` x ``patch`` patches."""

  patch: int = 4
  dim: int = 64
  depth: int = 2
  heads: int = 4
  mlp_dim: int = 128
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(
      self.dim, (self.patch,) * 2, (self.patch,) * 2, padding="VALID"
    )(x)
    x = x.reshape(x.shape[0], -1, self.dim)
    position = self.param("position", nn.initializers.normal(0.02), x.shape[1:])
    x = x + position
    for _ in range(self.depth):
      x = EncoderBlock(self.heads, self.mlp_dim)(x)
    x = nn.LayerNorm()(jnp.mean(x, axis=1))
    return nn.Dense(self.num_classes)(x)


class DecoderBlock(nn.Module):
  """A pre-LayerNorm causal self-attention and MLP block, in the ``nn.scan``
  calling convention ``(carry, input) -> (carry, output)``.

  Queries, keys and values come from one ``DenseGeneral`` (``(dim, 3 dim)``
  kernel) and the heads are merged before the output ``DenseGeneral``, so
  every kernel is a 2-D ``(in, out)`` matrix: sub-channel groups
  (``group_size``) then run as integer blocks in ``mcq_apply``. The
  attention's own products (queries by keys, weights by values) are
  activations by activations and stay in float.
  """

  heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x, _):
    batch, length, dim = x.shape
    head_dim = dim // self.heads
    qkv = nn.DenseGeneral(3 * dim, name="qkv")(
      nn.LayerNorm(name="attention_norm")(x)
    )
    qkv = qkv.reshape(batch, length, 3, self.heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim)
    causal = jnp.tril(jnp.ones((length, length), bool))
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    weights = nn.softmax(logits, axis=-1)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, dim)
    x = x + nn.DenseGeneral(dim, name="out")(y)
    y = nn.Dense(self.mlp_dim, name="up")(nn.LayerNorm(name="mlp_norm")(x))
    x = x + nn.Dense(dim, name="down")(nn.gelu(y))
    return x, None


class DecoderLM(nn.Module):
  """A byte-level decoder-only Transformer: token and learned position
  embeddings, ``depth`` :class:`DecoderBlock` layers stacked by ``nn.scan``
  (their parameters under ``layers`` carry a leading axis of ``depth``), a
  final LayerNorm and an untied output ``Dense``. Takes int token ids
  ``(batch, length)``, ``length <= context``; returns next-token logits."""

  vocab: int = 256
  dim: int = 128
  depth: int = 4
  heads: int = 4
  mlp_dim: int = 512
  context: int = 128

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    if self.dim % self.heads:
      raise ValueError(
        f"decoder_lm: dim {self.dim} is not a multiple of heads {self.heads}"
      )
    length = tokens.shape[-1]
    if length > self.context:
      raise ValueError(
        f"decoder_lm: {length} tokens exceed the context of {self.context}"
      )
    x = nn.Embed(self.vocab, self.dim, name="embed")(tokens)
    position = self.param(
      "position", nn.initializers.normal(0.02), (self.context, self.dim)
    )
    x = x + position[:length]
    stack = nn.scan(
      DecoderBlock,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      length=self.depth,
    )
    x, _ = stack(self.heads, self.mlp_dim, name="layers")(x, None)
    x = nn.LayerNorm(name="final_norm")(x)
    return nn.Dense(self.vocab, name="head")(x)


def build(config: Any, num_classes: int) -> nn.Module:
  """The model a run's ``config.model`` names, with ``num_classes`` outputs."""
  name = config.name
  options = {k: v for k, v in config.items() if k != "name"}
  if name == "mlp":
    return MLP(
      hidden=tuple(options.get("hidden", (128, 128))), num_classes=num_classes
    )
  if name == "lenet5":
    return LeNet5(num_classes=num_classes)
  if name == "vgg":
    return VGG(
      stages=tuple(options.get("stages", (64, 128, 256))),
      dense=options.get("dense", 256),
      num_classes=num_classes,
    )
  if name == "resnet20":
    return ResNet(
      (3, 3, 3), "basic", options.get("width", 16), "cifar", num_classes
    )
  if name == "resnet18":
    return ResNet(
      (2, 2, 2, 2), "basic", options.get("width", 64), "imagenet", num_classes
    )
  if name == "resnet50":
    return ResNet(
      (3, 4, 6, 3),
      "bottleneck",
      options.get("width", 64),
      "imagenet",
      num_classes,
    )
  if name == "transformer":
    return Transformer(num_classes=num_classes, **options)
  if name == "decoder_lm":
    return DecoderLM(vocab=num_classes, **options)
  raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
