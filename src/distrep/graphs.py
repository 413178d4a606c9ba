"""A training step replayed as a CUDA graph, and how it spreads its variants over CUDA streams.

The engine's hand-written and fused steps touch only tensors that keep their addresses from step
to step (buffers allocated once, parameters and frozen flags updated in place), so on CUDA a step
can be recorded once as a graph and replayed: the launch overhead of its ~20 kernels per variant
is paid once. :func:`step_function` decides whether a step is replayed, :func:`stream_schedule`
on which streams a replayed step's variants run.
"""

from __future__ import annotations

import os

import torch

from distrep.engine import StackedRuns, Trainer
from distrep.errors import DistrepError
from distrep.fused import FusedRuns

# On CUDA the hand-written and fused steps are replayed as one CUDA graph unless
# DISTREP_CUDA_GRAPHS=0 (measured on an H100: the same bits as the eager step, Table 1's fused
# bf16 step 4 % faster; docs/engine-h100-fused/).
CUDA_GRAPHS_VARIABLE = "DISTREP_CUDA_GRAPHS"
# How a graphed step spreads its groups (variants) over CUDA streams. "per-variant": each group on
# a stream of its own, so that one variant's latency-bound head kernel runs beside another's
# products; measured to pay for the fused step in TF32 and bf16 (H200: Table 1 6-13 % and Table 3
# 9-16 % faster, the same bits; docs/engine-h200-fused/; 3xTF32 1-3 %, docs/engine-h200-3xtf32/),
# not in fp32, where two products side by side slow each other (Table 1 7 % slower); the
# hand-written step was not timed with it. "pipeline" (fused groups only, opt-in): the products
# in order on one stream, variant i + 1's forward product before variant i's weight gradient,
# and the head kernels on a second, so that one product at a time runs beside one kernel; on the
# H200 it made fp32's Table 1 slower still (76 % of the GEMM peak against 88 % on one stream:
# the kernel's FMAs and the SIMT product share the same pipes) and 3xTF32 no faster.
# DISTREP_CUDA_STREAMS=0 (one stream), 1 (per-variant), pipeline, or auto (unset: as measured).
CUDA_STREAMS_VARIABLE = "DISTREP_CUDA_STREAMS"
STREAM_SCHEDULES = {"0": "one", "1": "per-variant", "pipeline": "pipeline"}
# The schedule ``auto`` takes for a step whose variants are all fused, per precision (any other
# step takes one stream), as measured above.
FUSED_STREAMS = {"fp32": "one", "3xtf32": "per-variant", "tf32": "per-variant", "bf16": "per-variant"}


def stream_schedule(trainer: Trainer) -> str:
    """How a graphed step of ``trainer`` uses CUDA streams: ``"one"``, ``"per-variant"`` or
    ``"pipeline"`` (:data:`CUDA_STREAMS_VARIABLE`; ``auto``, the default, takes
    :data:`FUSED_STREAMS` for the fused step, a stream per variant on tensor cores, TF32, 3xTF32
    and bf16, and one stream otherwise: IEEE fp32's SIMT products fill the GPU and slow each
    other side by side; measured on an H200, docs/engine-h200-fused/ and
    docs/engine-h200-3xtf32/). A single group always takes one stream."""
    setting = os.environ.get(CUDA_STREAMS_VARIABLE, "auto")
    if setting != "auto" and setting not in STREAM_SCHEDULES:
        raise DistrepError(f"{CUDA_STREAMS_VARIABLE}={setting!r}: use 1 (a stream per variant), "
                           "0 (one stream), pipeline (products and kernels on two streams) or auto")
    fused = all(isinstance(g, FusedRuns) for g in trainer.groups)
    if len(trainer.groups) < 2:
        return "one"
    if setting == "auto":
        return FUSED_STREAMS[trainer.precision] if fused else "one"
    if setting == "pipeline" and not fused:
        raise DistrepError(f"{CUDA_STREAMS_VARIABLE}=pipeline needs the fused step for every "
                           "variant (--engine fused)")
    return STREAM_SCHEDULES[setting]


def step_function(trainer: Trainer, x_t: torch.Tensor, y: torch.Tensor, lr: float,
                  frozen: list[torch.Tensor], x_bf16: torch.Tensor | None = None):
    """A callable that runs one SGD step of ``trainer`` on these inputs and returns its per-group
    ``(loss, correct)``: on CUDA, when every group is hand-written or fused, the step replayed
    as a CUDA graph (:class:`GraphedStep`; ``DISTREP_CUDA_GRAPHS=0`` turns it off), else
    :meth:`Trainer.step` itself."""
    graphs = (x_t.device.type == "cuda" and os.environ.get(CUDA_GRAPHS_VARIABLE, "1") != "0"
              and all(isinstance(g, (StackedRuns, FusedRuns)) for g in trainer.groups))
    if graphs:
        return GraphedStep(trainer, (x_t, y, lr, frozen, x_bf16))
    return lambda: trainer.step(x_t, y, lr, frozen, x_bf16)


class GraphedStep:
    """:meth:`Trainer.step` on fixed inputs, captured once as a CUDA graph and replayed, so the
    launch overhead of the step's ~20 kernels per group is paid once, not every step. The
    first ``WARMUP`` calls run eagerly (they allocate the step's buffers and compile its Triton
    kernels); the next captures the step and replays it; later calls replay. Every tensor the
    step reads or writes keeps its address from step to step (buffers allocated once, parameters
    and ``frozen`` updated in place), which is what a replay needs; the returned statistics are
    the graph's own tensors, overwritten by the next replay."""

    WARMUP = 2

    def __init__(self, trainer: Trainer, args: tuple):
        self.trainer, self.args, self.calls = trainer, args, 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.schedule = stream_schedule(trainer)

    def __call__(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.graph is None and self.calls < self.WARMUP:
            self.calls += 1
            return self.trainer.step(*self.args)
        if self.graph is None:
            torch.cuda.synchronize()
            count = {"one": 0, "pipeline": 1, "per-variant": len(self.trainer.groups)}[self.schedule]
            streams = [torch.cuda.Stream() for _ in range(count)]
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):          # records; nothing runs until the replay
                self.stats = (self._record_pipeline(streams[0]) if self.schedule == "pipeline"
                              else self._record(streams))
            self.graph = graph
        self.graph.replay()
        return self.stats

    def _record(self, streams: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The step as the graph records it: one stream, or each group forked onto its own
        stream from the capture's and joined back (the graph's branches then run side by side)."""
        if not streams:
            return self.trainer.step(*self.args)
        capture, stats = torch.cuda.current_stream(), []
        for gi, stream in enumerate(streams):
            stream.wait_stream(capture)
            with torch.cuda.stream(stream):
                stats.append(self.trainer.step_group(gi, *self.args))
        for stream in streams:
            capture.wait_stream(stream)
        return stats

    def _record_pipeline(self, kernels) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The fused step as the graph records it with the products in order on the capture's
        stream (variant i + 1's forward product before variant i's weight gradient and update)
        and each head kernel on ``kernels``, after its product and before the rest of its step,
        so that one variant's kernel may run beside the next one's product."""
        capture, G = torch.cuda.current_stream(), len(self.trainer.groups)
        phases = [self.trainer.fused_phases(gi, *self.args) for gi in range(G)]
        done, stats = [], []
        for i in range(G + 1):
            if i < G:
                phases[i][0]()                            # the product, on the capture's stream
                kernels.wait_stream(capture)
                with torch.cuda.stream(kernels):
                    phases[i][1]()                        # the kernel, beside what follows
                done.append(torch.cuda.Event())
                done[i].record(kernels)
            if i > 0:
                capture.wait_event(done[i - 1])
                stats.append(phases[i - 1][2]())          # the rest of variant i - 1's step
        capture.wait_stream(kernels)
        return stats
