"""The pruning stage's names in one place: everything of :mod:`compressor.prune` (plan, scoring,
applying, screening and the floor, the search), where callers and tests have always found them."""

from __future__ import annotations

from . import flops  # noqa: F401 (callers reach it as pruning.flops)
from .prune import *  # noqa: F401,F403
from .prune import __all__  # noqa: F401
from .prune.apply import _pruned_graph_by_tracing  # noqa: F401
from .prune.plan import _chunks, _plan  # noqa: F401
