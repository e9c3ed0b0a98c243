"""CUDA graphs of a per-segment step function: one graph per segment index, captured on first use, then replayed.

Why: eager forwards of a small model are bound by Python and kernel launches, not by the GPU, and so are the
reductions that follow them; replaying one captured graph per step removes that overhead (docs/results.md has the
measured step times). What a graph reads and writes must stay at one address from replay to replay: the step
function must read only tensors that :meth:`SegmentGraphs.pin` fixed and buffers that never move (the episodes'
``drrl_gym.kv_cache.PreallocatedCache``, written in place), and tensors it owns itself. :class:`SegmentGraphs` knows
nothing of episodes: it takes the step as a callable.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import torch

_T = TypeVar("_T")


def capture_cuda_graph(run: Callable[[], _T], pool: Any = None,
                       rewind: Callable[[], object] | None = None) -> tuple[torch.cuda.CUDAGraph, _T]:
    """A CUDA graph of ``run()`` and the outputs it writes on every replay (recorded, not run: replay it).

    Capture needs one eager run first, on a side stream (library handles, workspaces, cached index tensors), so
    ``run`` is called twice and must start from the same state each time: ``rewind()``, if given, runs between the
    two, outside the graph (e.g. to put a cache's length back after the eager decode step advanced it).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    if rewind is not None:
        rewind()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = run()
    return graph, outputs


class SegmentGraphs(Generic[_T]):
    """Graphs of ``step(segment)``, which returns tensors (and may write fixed buffers, such as a KV cache).

    Capture runs the step twice (once eagerly, once recorded), so a step must write the same values at the same
    places whenever it runs from the same state. Outputs stay valid until the same segment runs again. A capture
    that fails (e.g. an op that synchronises with the host) warns once and makes :meth:`run` return None from then
    on: the caller runs eagerly, with the same results.
    """

    def __init__(self, step: Callable[[int], _T]) -> None:
        self.step = step
        self.pool = torch.cuda.graph_pool_handle()  # graphs replay one after another, so they can share memory
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, _T]] = {}
        self.failed = False
        self._pinned: dict[str, list[torch.Tensor]] = {}

    def pin(self, name: str, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The fixed tensors for ``name``: the first call keeps ``tensors``; later calls copy theirs into the kept
        ones. Returns the kept tensors, which the step must read."""
        kept = self._pinned.setdefault(name, list(tensors))
        if kept is not tensors:
            for fixed, new in zip(kept, tensors, strict=True):
                if fixed is not new:
                    fixed.copy_(new)
        return kept

    def run(self, segment: int) -> _T | None:
        """Replay segment's graph (capturing it first if new); None if graphs cannot be used."""
        if self.failed:
            return None
        if segment not in self.graphs:
            try:
                self.graphs[segment] = capture_cuda_graph(lambda: self.step(segment), self.pool)
            except RuntimeError as error:
                warnings.warn(f"CUDA graph capture failed, running eagerly (slower, same results): {error}",
                              RuntimeWarning, stacklevel=3)
                self.failed = True
                return None
        graph, outputs = self.graphs[segment]
        graph.replay()
        return outputs
