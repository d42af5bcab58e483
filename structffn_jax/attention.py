"""Causal self-attention with a choice of implementation (`model.attention.implementation`).

`attend(q, k, v, implementation=...)` maps queries (B, T, H, E) and keys/values (B, T, K, E)
(grouped-query: K divides H; letters of docs/design.md §1) to the causal softmax attention
output (B, T, H, E):

  'xla'     jax.nn.dot_product_attention's XLA path: scores materialised, every device.
  'cudnn'   jax.nn.dot_product_attention(implementation='cudnn'): cuDNN's fused flash
            attention, GPUs only, bfloat16/float16 only (grouped-query handled by cuDNN).
  'pallas'  a Pallas flash attention that jax ships, picked by the target platform:
            GPU  jax.experimental.pallas.ops.gpu.attention.mha (Triton lowering);
            TPU  jax.experimental.pallas.ops.tpu.flash_attention (Mosaic TPU);
            CPU  the GPU kernel in the Pallas interpreter (slow: for tests).
            Both kernels want as many key/value heads as query heads: K is repeated to H
            (its gradient sums back over the group). Shapes a kernel cannot tile take 'xla'.
            (jax's Mosaic GPU attention for Hopper needs the CUDA plugin even to trace, so it
            can be neither lowered nor interpreted without a GPU; it is not wired in.)
  'auto'    'cudnn' on GPUs where it applies (bfloat16/float16, head width a multiple of 8 up
            to 128), 'xla' everywhere else. On TPU it stays 'xla' until a TPU measurement says
            the Pallas kernel is faster.

The KV-cache decode path (`model.Attention.decode`: a few queries over a padded cache with a
per-row length mask) always uses 'xla': fused kernels pay off on long query blocks, and the
masked cache shape is not one the kernels take.

Under a multi-device jit a pallas_call is not split by XLA's automatic sharding (it sees whole,
gathered operands), and jax partitions its cuDNN call through a Python callback that an exported
program cannot carry. On a mesh (`jax.set_mesh`) both fused paths therefore run inside a
`shard_map` over the batch and head axes (the rules `sharding.constrain` reads): attention is
independent per sequence and per kv-head group, so each device attends its own share.

The target platform is the default backend, or the one set by `kernels.api.target_platform`
(for `jax.export` to another platform).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from structffn_jax.kernels import api as kernels_api
from structffn_jax.kernels.layout import pow2_tile
from structffn_jax.schema import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS


# Largest Pallas tiles along the sequence: Triton (GPU) forward and backward, Mosaic (TPU).
GPU_BLOCK, GPU_BLOCK_BWD, TPU_BLOCK = 128, 64, 128


def _pallas_supports(platform: str, t: int, e: int) -> bool:
  if platform == 'tpu':  # the kernel's tiles are multiples of 128 (its MIN_BLOCK_SIZE)
    return t % TPU_BLOCK == 0
  if platform == 'gpu':  # Triton dots: tiles of at least 16, head width padded to a power of 2
    return pow2_tile(t, GPU_BLOCK_BWD) >= 16 and e <= 256
  return t > 0  # the interpreter takes any shape


def _cudnn_supports(dtype, e: int) -> bool:
  return jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and e % 8 == 0 and e <= 128


def resolve(implementation: str, q_BTHE, platform: str | None = None) -> str:
  """The implementation that will run: 'xla', 'cudnn' or 'pallas'."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'attention implementation={implementation!r} is unknown; use one of '
                     f'{IMPLEMENTATIONS}.')
  platform = platform or kernels_api.platform()
  _, t, _, e = q_BTHE.shape
  if implementation == 'auto':
    return 'cudnn' if platform == 'gpu' and _cudnn_supports(q_BTHE.dtype, e) else 'xla'
  if implementation == 'cudnn' and platform != 'gpu':
    raise ValueError(f'attention implementation=\'cudnn\' needs a GPU; the target is {platform}. '
                     "Use 'auto', 'xla' or 'pallas'.")
  if implementation == 'pallas' and not _pallas_supports(platform, t, e):
    return 'xla'
  return implementation


def _repeat_kv(x_BTKE, h: int):
  return jnp.repeat(x_BTKE, h // x_BTKE.shape[2], axis=2)


def _pallas_gpu(q, k, v, scale, interpret):
  """Triton flash attention, (B, T, H, E) layout; the interpreter on CPU."""
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention  # pylint: disable=g-import-not-at-top
  t = q.shape[1]
  fwd, bwd = pow2_tile(t, GPU_BLOCK), pow2_tile(t, GPU_BLOCK_BWD)
  blocks = gpu_attention.BlockSizes(block_q=fwd, block_k=fwd, block_q_dkv=bwd, block_kv_dkv=bwd,
                                    block_q_dq=bwd, block_kv_dq=bwd)
  return gpu_attention.mha(q, k, v, None, sm_scale=scale, causal=True, block_sizes=blocks,
                           interpret=interpret)


def _pallas_tpu(q, k, v, scale):
  """Mosaic TPU flash attention, which wants (B, H, T, E)."""
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_attention  # pylint: disable=g-import-not-at-top
  b = TPU_BLOCK
  blocks = tpu_attention.BlockSizes(
      block_q=b, block_k_major=b, block_k=b, block_b=1, block_q_major_dkv=b,
      block_k_major_dkv=b, block_k_dkv=b, block_q_dkv=b, block_k_major_dq=b, block_k_dq=b,
      block_q_dq=b)
  to_bhte = lambda x: x.transpose(0, 2, 1, 3)
  o = tpu_attention.flash_attention(to_bhte(q), to_bhte(k), to_bhte(v), causal=True,
                                    sm_scale=scale, block_sizes=blocks)
  return to_bhte(o)


def _on_mesh(fn, q, k, v):
  """fn on each device's batch rows and heads when a mesh is set, else on the whole arrays."""
  axes = ('batch', None, 'heads', None)
  return kernels_api.on_mesh(fn, (q, k, v), [axes] * 3, axes)


def attend(q_BTHE, k_BTKE, v_BTKE, *, scale: float, implementation: str = 'auto'):
  """Causal attention output (B, T, H, E) with `implementation` (see the module docstring)."""
  platform = kernels_api.platform()
  impl = resolve(implementation, q_BTHE, platform)
  if impl == 'xla':
    return jax.nn.dot_product_attention(q_BTHE, k_BTKE, v_BTKE, is_causal=True, scale=scale,
                                        implementation='xla')
  if impl == 'cudnn':
    cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                         implementation='cudnn')
    return _on_mesh(cudnn, q_BTHE, k_BTKE, v_BTKE)
  h = q_BTHE.shape[2]
  k_BTHE, v_BTHE = _repeat_kv(k_BTKE, h), _repeat_kv(v_BTKE, h)
  if platform == 'tpu':
    kernel = lambda q, k, v: _pallas_tpu(q, k, v, scale)
  else:
    kernel = lambda q, k, v: _pallas_gpu(q, k, v, scale, interpret=platform != 'gpu')
  return _on_mesh(kernel, q_BTHE, k_BTHE, v_BTHE)
