"""The routed experts' grouped GEMM on Hopper through Mosaic GPU, with its backward: the 'mgpu' expert layout.

    y = grouped_gemm(x, w, sizes)     x [M, K] rows sorted by group, w [G, K, N], sizes [G] (sum M) -> [M, N]
    y[rows of g] = x[rows of g] @ w[g]                  the same product as jax.lax.ragged_dot(x, w, sizes)

The kernels are jax's own Pallas Mosaic GPU ones (`jax.experimental.pallas.ops.gpu`: warp-group wgmma, TMA loads,
a pipelined K loop); this module only chooses their tile sizes and gives them a backward (`jax.custom_vjp`):

    dx = dy @ w[g]^T per group          ragged_dot(dy, w, transpose_rhs=True)       [M, N] . [G, K, N] -> [M, K]
    dw[g] = x[rows of g]^T @ dy[rows]   transposed_ragged_dot(x, dy)                [M, K] , [M, N] -> [G, K, N]

(the forward is `ragged_dot(x, w)`). `jax.lax.ragged_dot` is the reference path ('ragged'): on the GPU it is
XLA's, and `benchmarks/grouped_gemm.py` times the two against a dense GEMM of the same FLOPs. The kernels need a
CUDA device with wgmma (sm_90); elsewhere the call fails when compiled, so `runtime.resolve` refuses 'mgpu' off
a GPU before anything is built. On CPU the tests lower it for CUDA and check the VJP's wiring with reference
kernels of the same signatures (`reference_kernels`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _tiles(k: int, n: int) -> dict:
    """Tile sizes for a [*, k] x [k, n] product: 128-wide output tiles where n allows, 64-deep K steps."""
    block_n = 128 if n % 128 == 0 else 64
    return {"block_m": 128, "block_n": block_n, "block_k": 64, "max_concurrent_steps": 4, "grid_block_n": 1}


def mgpu_kernels():
    """(ragged_dot, transposed_ragged_dot) of jax's Pallas Mosaic GPU ops, with this module's tile choice."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

    def forward(lhs, rhs, sizes, transpose_rhs=False):
        n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
        return ragged_dot_mgpu.ragged_dot(lhs, rhs, group_sizes=sizes, transpose_rhs=transpose_rhs,
                                          **_tiles(lhs.shape[1], n))

    def weight_grad(lhs, rhs, sizes):
        return transposed_ragged_dot_mgpu.transposed_ragged_dot(lhs, rhs, group_sizes=sizes,
                                                                **_tiles(lhs.shape[1], rhs.shape[1]))

    return forward, weight_grad


def reference_kernels():
    """The same two operations in plain jax (`jax.lax.ragged_dot`): what the Mosaic GPU kernels compute."""
    def forward(lhs, rhs, sizes, transpose_rhs=False):
        rhs = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
        return jax.lax.ragged_dot(lhs, rhs, sizes)

    def weight_grad(lhs, rhs, sizes):  # lhs [M, K], rhs [M, N] (rows ragged by group) -> [G, K, N]
        dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((0,), (0,)), ((), ())),
                                                 lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
        return jax.lax.ragged_dot_general(lhs, rhs, sizes, dims)

    return forward, weight_grad


def make_grouped_gemm(kernels):
    """grouped_gemm(x, w, sizes) with the custom VJP above, over `kernels` = (forward, weight_grad)."""
    forward, weight_grad = kernels

    @jax.custom_vjp
    def grouped_gemm(x, w, sizes):
        return forward(x, w, sizes)

    def fwd(x, w, sizes):
        return forward(x, w, sizes), (x, w, sizes)

    def bwd(res, dy):
        x, w, sizes = res
        dy = dy.astype(x.dtype)
        dx = forward(dy, w, sizes, transpose_rhs=True)
        dw = weight_grad(x, dy, sizes)
        return dx.astype(x.dtype), dw.astype(w.dtype), None

    grouped_gemm.defvjp(fwd, bwd)
    return grouped_gemm


@functools.cache
def grouped_gemm_mgpu():
    """The Mosaic GPU grouped GEMM (built on first use: importing the kernels needs no device, compiling does)."""
    return make_grouped_gemm(mgpu_kernels())
