"""The two strategies a model takes from its Runtime: how routed experts run and how a layer stack runs.

    experts(rt)  LocalExperts(impl)   every expert on this device: 'dense' | 'blocks' | 'ragged'
                                      (`experts.py`); the FP8 grouped GEMM when rt.fp8
                 ExpertParallel       experts split over the mesh axis 'expert' (`parallel/expert.py`)
    stack(rt)    ScanStack            `lax.scan` over the stacked layers (`stack.py`), remat or not

Both are frozen dataclasses (static, hashable): `MoE` and `DeepSeekV3` call them, and nothing in the
model looks at the mesh or the backend to choose an algorithm. Pipeline parallelism is not a stack strategy:
it owns the whole train step (its loss, gradients and state layout), so training asks for it as a program
(`programs.program_for`); a forward of the model on a mesh with stages scans its layers where they are held.
"""
from __future__ import annotations

from dsv3_jax.experts import LocalExperts
from dsv3_jax.parallel.expert import ExpertParallel
from dsv3_jax.runtime import Runtime
from dsv3_jax.stack import ScanStack


def experts(rt: Runtime):
    fp8 = rt.fp8_gemms
    if rt.expert_parallel:
        return ExpertParallel(mesh=rt.mesh, block=rt.block_size, capacity_factor=rt.capacity_factor,
                              dispatch=rt.expert_dispatch, emulate=rt.emulate_ragged_all_to_all, fp8=fp8,
                              fp8_weights=rt.fp8_resident, impl=rt.expert_impl, loop=rt.expert_blocks_loop)
    return LocalExperts(rt.expert_impl, rt.block_size, fp8, rt.fp8_resident, rt.expert_blocks_loop)


def stack(rt: Runtime):
    return ScanStack(remat=rt.remat, unroll=rt.unroll_layers)
