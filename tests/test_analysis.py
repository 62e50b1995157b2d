"""dsv3_jax.analysis: the emulated limited-precision accumulator against hand-computed values and an
independent loop, the error measures, and config loading."""
import os

import ml_dtypes
import numpy as np
import pytest

from dsv3_jax.analysis import limited_accumulator_matmul, load_config, relative_error, repo_root, truncate_mantissa


def test_truncate_mantissa_hand_values():
    # 1.4375 = 0b1.0111: 3 significant bits keep 0b1.01 = 1.25; toward zero for negatives; powers of two exact
    np.testing.assert_array_equal(truncate_mantissa([1.4375, -1.4375, 0.0, 8.0, 7.0, 6.5], 3),
                                  [1.25, -1.25, 0.0, 8.0, 7.0, 6.0])
    assert truncate_mantissa(2.0 ** 20 + 1.0, 14) == 2.0 ** 20  # the +1 is below the 14th bit


def test_accumulator_stagnates_and_promotion_restores_the_sum():
    # bits=2: 1, 2, 3, 4 are exact, but 4 + 1 = 5 = 0b101 truncates to 4: the sum of eight ones stalls at 4.
    a = np.ones((1, 8))
    assert limited_accumulator_matmul(a, a, bits=2, chunk=1)[0, 0] == 4.0
    # restarting every 4 products: each register holds 4 exactly, the float32 total is 8
    assert limited_accumulator_matmul(a, a, bits=2, chunk=1, promote_every=4)[0, 0] == 8.0
    # chunk=8: one exact chunk sum, 8 fits in 2 bits
    assert limited_accumulator_matmul(a, a, bits=2, chunk=8)[0, 0] == 8.0


def test_accumulator_matches_an_explicit_loop():
    rng = np.random.default_rng(0)
    M, N, K, bits, chunk = 3, 4, 256, 10, 32
    a = rng.uniform(0, 2, (M, K)).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    b = rng.uniform(0, 2, (N, K)).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)

    def trunc(v):  # round toward zero to `bits` significant bits, written out
        if v == 0:
            return 0.0
        e = np.floor(np.log2(abs(v))) + 1  # v = m * 2^e with 0.5 <= |m| < 1
        step = 2.0 ** (e - bits)
        return np.sign(v) * np.floor(abs(v) / step) * step

    want_plain, want_promoted = np.zeros((M, N)), np.zeros((M, N), np.float32)
    for i in range(M):
        for j in range(N):
            acc, total, reg = 0.0, np.float32(0), 0.0
            for k0 in range(0, K, chunk):
                s = float(np.dot(a[i, k0:k0 + chunk], b[j, k0:k0 + chunk]))
                acc = trunc(acc + s)
                reg = trunc(reg + s)
                if (k0 + chunk) % 128 == 0:
                    total = np.float32(total + np.float32(reg))
                    reg = 0.0
            want_plain[i, j], want_promoted[i, j] = acc, total
    np.testing.assert_array_equal(limited_accumulator_matmul(a, b, bits=bits, chunk=chunk), want_plain)
    np.testing.assert_array_equal(limited_accumulator_matmul(a, b, bits=bits, chunk=chunk, promote_every=128),
                                  want_promoted)
    exact = a @ b.T
    assert relative_error(want_plain, exact, "max") > relative_error(want_promoted, exact, "max")
    with pytest.raises(ValueError, match="multiple"):
        limited_accumulator_matmul(a[:, :100], b[:, :100], chunk=32)


def test_relative_error_hand_values():
    ref = np.array([3.0, 4.0])  # norm 5, max 4
    assert relative_error([3.0, 4.5], ref) == pytest.approx(0.1)
    assert relative_error([3.0, 5.0], ref, "max") == pytest.approx(0.25)
    with pytest.raises(ValueError):
        relative_error(ref, ref, "l1")


def test_load_config_by_name_and_path():
    tiny = load_config("tiny")
    assert tiny.model.vocab_size == 4096 and tiny.model.n_routed_experts == 16
    v3 = load_config(os.path.join(repo_root(), "configs", "deepseek_v3.py"))
    assert v3.model.hidden_size == 7168
    with pytest.raises(FileNotFoundError, match="no config"):
        load_config("no_such_config")
