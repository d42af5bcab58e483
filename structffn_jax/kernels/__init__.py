"""Structured-projection kernels: `api` (the public entry), `reference` (plain einsums), `xla`
(layout-tuned batched matmuls), `pallas_triton` and `pallas_tpu` (Pallas kernels for GPUs and
TPUs with hand-written backward), `layout` (the layout helpers they share)."""

from structffn_jax.kernels.api import (IMPLEMENTATIONS, blockdense, blockshuffle,
                                       blockshuffle_ffn, lowrank, resolve)

__all__ = ['IMPLEMENTATIONS', 'blockdense', 'blockshuffle', 'blockshuffle_ffn', 'lowrank',
           'resolve']
