"""Structured-projection kernels: `api` (the public entry), `reference` (plain einsums), `xla`
(layout-tuned batched matmuls), `pallas_gpu` (Pallas kernels with hand-written backward)."""

from structffn_jax.kernels.api import (IMPLEMENTATIONS, blockdense, blockshuffle,
                                       blockshuffle_ffn, lowrank, resolve)

__all__ = ['IMPLEMENTATIONS', 'blockdense', 'blockshuffle', 'blockshuffle_ffn', 'lowrank',
           'resolve']
