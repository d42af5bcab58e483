"""Causal attention with a choice of implementation (`model.attention.implementation`)."""

from __future__ import annotations

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'pallas')
