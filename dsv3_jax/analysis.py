"""Small helpers for the notebooks (no model logic): loading a `configs/*.py` file, and an emulated
limited-precision GEMM accumulator that shows why DeepSeek-V3 promotes FP8 partial sums to FP32
(REFERENCE.md section 6).

Hopper's FP8 tensor cores add the products of a GEMM into an accumulator that keeps only about 14
significant bits (technical report, section 3.3). Over a long K the running sum grows while each new
partial sum stays small, so the low bits of every addition are lost and the relative error grows with K.
DeepSeek-V3 (and DeepGEMM) restart the tensor-core accumulator every 128 elements of K (N_C = 128) and
add its value, scaled, to an FP32 accumulator on the CUDA cores: the truncated sum then never spans more
than 128 products. `limited_accumulator_matmul` emulates both schemes in numpy (float64 arithmetic with
explicit truncation); the library's own GEMM (`dsv3_jax.fp8.gemm`) accumulates in FP32 throughout.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np

from dsv3_jax.cli import UserError


def repo_root() -> str:
    """The source checkout that holds this package (the directory with `configs/` and `notebooks/`)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name_or_path: str):
    """The ConfigDict of a training config: a path to a `.py` file with `get_config()`, or the name of one
    in the checkout's `configs/` ("tiny", "deepseek_v3")."""
    path = name_or_path
    if not os.path.isfile(path):
        path = os.path.join(repo_root(), "configs", name_or_path.removesuffix(".py") + ".py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file {name_or_path!r} (looked for {path})")
    spec = importlib.util.spec_from_file_location(f"dsv3_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def truncate_mantissa(v, bits: int):
    """Round toward zero to `bits` significant bits (numpy, elementwise): the accumulator's register.

    truncate_mantissa(1.4375, 3) = 1.25 (binary 1.0111 -> 1.01); zero and signs are preserved.
    """
    m, e = np.frexp(np.asarray(v, np.float64))  # v = m * 2**e, 0.5 <= |m| < 1
    return np.ldexp(np.trunc(m * 2.0 ** bits) / 2.0 ** bits, e)


def limited_accumulator_matmul(a, b, *, bits: int = 14, chunk: int = 32, promote_every: int | None = None):
    """a [M, K] @ b [N, K].T with an emulated `bits`-bit accumulator. Returns float64 [M, N].

    The products are summed exactly `chunk` at a time (one tensor-core MMA instruction's K; 32 for FP8
    wgmma), and each chunk sum is added to a register that is truncated to `bits` significant bits after
    every addition. With `promote_every` (a multiple of `chunk`, e.g. 128) the register is restarted every
    `promote_every` elements of K and its value added to a float32 accumulator (FP32 promotion); without
    it one register spans the whole K. K must be a multiple of `chunk` (and of `promote_every`).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    (M, K), (N, K2) = a.shape, b.shape
    if K != K2:
        raise UserError(f"inner dimensions differ: a has K={K}, b has K={K2}")
    if K % chunk:
        raise UserError(f"K={K} must be a multiple of chunk={chunk}")
    if promote_every is not None and (promote_every % chunk or K % promote_every):
        raise UserError(f"promote_every={promote_every} must be a multiple of chunk={chunk} and divide K={K}")
    parts = np.einsum("mkc,nkc->kmn", a.reshape(M, K // chunk, chunk), b.reshape(N, K // chunk, chunk))
    if promote_every is None:
        acc = np.zeros((M, N))
        for p in parts:
            acc = truncate_mantissa(acc + p, bits)
        return acc
    total = np.zeros((M, N), np.float32)
    for block in parts.reshape(K // promote_every, promote_every // chunk, M, N):
        reg = np.zeros((M, N))
        for p in block:
            reg = truncate_mantissa(reg + p, bits)
        total += reg.astype(np.float32)
    return total.astype(np.float64)


def relative_error(x, ref, kind: str = "fro") -> float:
    """||x - ref|| / ||ref|| over all elements: 'fro' (root-sum-square) or 'max' (max-abs)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if kind == "fro":
        return float(np.linalg.norm((x - ref).ravel()) / np.linalg.norm(ref.ravel()))
    if kind == "max":
        return float(np.abs(x - ref).max() / np.abs(ref).max())
    raise UserError(f"kind={kind!r}: use 'fro' or 'max'")
