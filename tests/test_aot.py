"""Ahead-of-time compilation for TPU topologies (dsv3_jax/aot.py, train.py --aot).

On every machine: the matmul FLOPs counted from a traced program (`jaxpr_flops`, which scales XLA's loop-once cost
analysis) against hand counts, the model FLOPs formula against a hand count, and bad topologies refused in one
line. Where libtpu is installed (`pip install -e ".[tpu-aot]"`, Python >= 3.12), the micro config's real train
step compiles for a v5e:2x2 slice with the scheduled pipeline and expert parallelism, and its report holds the
per-device bytes of the train state counted by hand from the shapes and shardings."""
import importlib.util
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testenv import one_device_env

from dsv3_jax import aot
from dsv3_jax.cli import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def test_jaxpr_flops_count_every_loop_trip_and_the_backward_by_hand():
    L, M, K = 5, 8, 16

    def f(w, x, head):
        def body(h, wi):
            return jnp.tanh(h @ wi), None

        h = jax.lax.scan(body, x, w)[0]
        return (h @ head).sum()

    args = (jnp.ones((L, K, K)), jnp.ones((M, K)), jnp.ones((K, 3)))
    jaxpr = jax.make_jaxpr(f)(*args)
    layer, head = 2 * M * K * K, 2 * M * K * 3
    assert aot.jaxpr_flops(jaxpr) == L * layer + head
    assert aot.jaxpr_flops(jaxpr, loops=False) == layer + head  # as XLA's cost analysis counts a loop
    # value_and_grad with respect to all three arguments: each matmul once forward and twice backward (the
    # gradients of both its operands)
    grad = jax.make_jaxpr(jax.value_and_grad(f, argnums=(0, 1, 2)))(*args)
    assert aot.jaxpr_flops(grad) == 3 * (L * layer + head)
    # remat and jit nest a jaxpr: counted through; cond: the costlier branch
    nested = jax.make_jaxpr(jax.jit(jax.checkpoint(lambda x: jax.lax.cond(x.sum() > 0, lambda y: y @ y,
                                                                          lambda y: y, x))))(jnp.ones((K, K)))
    assert aot.jaxpr_flops(nested) == 2 * K ** 3


def test_model_flops_formula_by_hand():
    """The benchmarks' train FLOPs per token for a model with no MTP, embedding V x D: 6 x (active matmul
    parameters: the head, attention, dense FFN, shared + K/E routed experts, router) + the attention term."""
    from dsv3_jax.config import ModelConfig
    from dsv3_jax.flops import decode_flops_per_token, train_flops_per_token
    from dsv3_jax.model import abstract_model

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                      num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=8,
                      qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
                      num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1,
                      num_nextn_predict_layers=0, dtype="float32")
    D, H, V = 32, 2, 64
    attn = (D * 16 + 16 * H * 12 + D * (8 + 4) + 8 * H * (8 + 8) + H * 8 * D)  # q_a, q_b, kv_a, kv_b, o
    dense = 3 * D * 48
    moe = 3 * D * 16 * (1 + 2) + D * 4  # shared + K of the routed experts, and the router
    matmul = 2 * attn + dense + moe + D * V  # + the head (the embedding is a gather)
    T = 10
    want = 6 * matmul + 6 * 2 * H * (12 + 8) * T / 2
    assert train_flops_per_token(abstract_model(cfg), T) == pytest.approx(want)
    assert decode_flops_per_token(abstract_model(cfg), T) == pytest.approx(2 * matmul + 2 * 2 * H * T * (2 * 8 + 4))


@pytest.mark.parametrize("bad", ["v5p", "v9:2x2", "v5p:8x", "tpu7x 8x8x8"])
def test_bad_topologies_are_refused_in_one_line(bad):
    with pytest.raises(UserError, match="give a TPU topology as GENERATION"):
        aot.parse_topology(bad)


def test_train_cli_refuses_a_bad_topology_before_anything_is_built():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--aot=v9:1x1"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT, env=one_device_env())
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("train.py: ")]
    assert r.returncode == 2 and len(lines) == 1 and "--aot='v9:1x1'" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def _tpu_tiled(shape, itemsize: int) -> int:
    """Bytes of an array in TPU memory at most: the minor two dims padded to full (8, 128) tiles (sub-32-bit
    types pack 32 / bits rows per sublane), a vector or scalar to 128-element tiles."""
    shape = list(shape) or [1]
    rows = 8 * (4 // itemsize) if itemsize < 4 else 8
    shape[-1] = -(-shape[-1] // 128) * 128
    if len(shape) >= 2:
        shape[-2] = -(-shape[-2] // rows) * rows
    return math.prod(shape) * itemsize


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu-aot]' under Python "
                                           ">= 3.12); benchmarks/aot.py and README's AOT table run it")
def test_micro_train_step_compiles_for_v5e_2x2_with_pipeline_and_experts():
    import optax
    from test_train import micro_config

    from dsv3_jax import runtime, sharding
    from dsv3_jax.config import ModelConfig
    from dsv3_jax.programs import program_for
    from dsv3_jax.runtime import split_model_section
    from dsv3_jax.train.loop import abstract_state

    c = micro_config()
    c.mesh.data, c.mesh.stage, c.mesh.expert = 1, 2, 2
    c.mesh.pipeline_schedule, c.mesh.microbatches = "1f1b", 4
    r = aot.train_step_report(c, "v5e:2x2")
    assert set(aot.REPORT_KEYS) <= set(r) and r["devices"] == 4 and r["hbm_fits"]
    assert r["mesh"] == {"stage": 2, "expert": 2} and r["schedule"] == "1f1b"
    # the state's bytes per device by hand: every leaf's shard (its sharding's shard shape) on device 0
    chip, devices = aot.topology_devices("v5e:2x2")
    with runtime.compiling_for(devices):
        mesh = sharding.make_mesh(c.mesh.to_dict(), devices)
        rt = runtime.from_config(c, mesh)
        cfg = ModelConfig.from_dict(split_model_section(c.model)[0])
        _, state = abstract_state(cfg, optax.adamw(1e-3), rt, program_for(rt, cfg, c.train.seq_len))
    shards = [(x.sharding.shard_shape(x.shape), np.dtype(x.dtype).itemsize) for x in jax.tree.leaves(state)]
    held = sum(math.prod(shape) * size for shape, size in shards)
    tiled = sum(_tpu_tiled(shape, size) for shape, size in shards)
    window = _tpu_tiled((c.train.batch_size // 2, c.train.seq_len + 1), 4)  # (the batch is split over 'expert')
    kinds = r["bytes_by_kind"]
    # the arguments are the state (donated: aliased to the outputs) and the window of token ids, as TPU memory
    # holds them: at least their elements' bytes, at most every array padded to full (8, 128) tiles (XLA picks
    # smaller tiles where a dim is short)
    assert held < kinds["argument"] <= tiled + window, (held, tiled, window, kinds)
    assert held <= kinds["alias"] <= kinds["argument"] and kinds["temp"] > 0
    assert r["hbm_bytes_per_chip"] < chip.hbm_bytes
    # XLA counted the loop bodies once; scaled by the traced program's trips, the compiled work per device is at
    # least the model's share (a bound, not a figure: at this size elementwise work, the head on every stage and
    # the pipeline's masked ticks weigh as much as the matmuls; the README's table has the real model's ratios)
    assert r["loop_factor"] > 1 and 1.0 <= r["flops_ratio"] <= 10.0, r



@pytest.mark.parametrize("kw,needle", [(dict(step="verify"), "choose 'prefill' or 'decode'"),
                                       (dict(fp8_weights="fp4"), "choose auto, none"),
                                       (dict(batch=0), "batch=0 must be >= 1")])
def test_serve_step_report_refuses_bad_settings_in_one_line(kw, needle):
    from test_train import micro_config

    with pytest.raises(UserError, match=needle):
        aot.serve_step_report(micro_config(), "v5e:2x2", **kw)


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu-aot]' under Python "
                                           ">= 3.12); benchmarks/aot.py and README's AOT table run it")
def test_engine_decode_step_compiles_for_v5e_2x2_and_holds_the_pools_and_weights():
    """The serving engine's decode step (the Engine's own jitted `steps.decode_step`) for the micro config at 8
    rows x 256 positions, rows split over data 2 x expert 2: its arguments hold at least every parameter's shard
    and the whole page pool on each device (the pools are replicated), counted by hand from the shapes."""
    from test_train import micro_config

    from dsv3_jax.config import ModelConfig
    from dsv3_jax.model import abstract_model, param_counts

    c = micro_config()
    c.mesh.data, c.mesh.expert = 2, 2
    r = aot.serve_step_report(c, "v5e:2x2", step="decode", batch=8, context=256, page_size=16)
    assert set(aot.REPORT_KEYS) <= set(r) and r["hbm_fits"] and r["mesh"] == {"data": 2, "expert": 2}
    cfg = ModelConfig.from_dict(c.model)
    pages = 8 * (256 // 16) + 1
    pool = cfg.num_hidden_layers * pages * 16 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4  # float32 cache
    counts = param_counts(abstract_model(cfg))
    params = 4 * (counts["params_total"] + counts["params_mtp"])  # float32; no parameter is split over 'data',
    # the routed experts are split over 'expert' (2): a device holds between half of them and all of them
    low, high = pool + params / 2, pool + params
    assert low < r["bytes_by_kind"]["argument"] <= 1.5 * high, (low, high, r["bytes_by_kind"])
    # one token per row: the compiled work is at least the model's (matmuls of 8 tokens, attention over 256
    # positions), and the sampling and page gathers add to it
    assert r["flops_ratio"] >= 1.0 and r["est_step_s"] > 0, r


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu-aot]' under Python "
                                           ">= 3.12); benchmarks/aot.py and README's AOT table run it")
def test_fp8_resident_decode_compiles_for_tpu7x_with_the_pallas_gemm_partitioned():
    """On Ironwood (FP8 matrix units) the FP8 release is served FP8-resident: the decode step with its
    projections and experts as Pallas FP8 GEMMs, split over 8 devices (expert 4 x tensor 2: the kernels see
    arrays split over a mesh outside shard_map, which compiles only through their custom partitioning)."""
    from test_train import micro_config

    c = micro_config()
    m = c.model  # the FP8 GEMMs work on 128 x 128 blocks: widths of whole blocks
    m.hidden_size, m.moe_intermediate_size, m.intermediate_size, m.q_lora_rank = 256, 128, 256, 128
    c.mesh.data, c.mesh.expert, c.mesh.tensor = 1, 4, 2
    r = aot.serve_step_report(c, "tpu7x:2x2x1", step="decode", batch=8, context=128, page_size=16)
    assert r["fp8_weights"] == "w8a8" and r["devices"] == 8 and r["hbm_fits"], r
    assert r["mesh"] == {"expert": 4, "tensor": 2}, r  # (before the partitioning: "Mosaic kernels cannot be
    # automatically partitioned")

@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu-aot]' under Python "
                                           ">= 3.12); benchmarks/aot.py and README's AOT table run it")
def test_decode_with_the_paged_attention_kernel_compiles_for_v5e_2x2():
    """The Pallas paged-attention kernel (Mosaic) in the engine's decode step, rows split over data 2 x expert 2:
    it compiles only in its own shard_map (before it: "Mosaic kernels cannot be automatically partitioned")."""
    from test_train import micro_config

    c = micro_config()
    c.mesh.data, c.mesh.expert = 2, 2
    r = aot.serve_step_report(c, "v5e:2x2", step="decode", batch=8, context=256, page_size=16,
                              paged_attention="pallas")
    assert r["paged_attention"] == "pallas" and r["hbm_fits"] and r["mesh"] == {"data": 2, "expert": 2}, r


def test_out_of_memory_messages_of_xla_are_read_by_hand():
    G, T = 1024 ** 3, 1024 ** 4
    assert aot._oom_bytes("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 108.30G of 94.75G hbm.") \
        == (108.30 * G, 94.75 * G)
    assert aot._oom_bytes("E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory required for HLO "
                          "temporaries (3.70T) exceeds available HBM (95.73G). HLO module: jit_step.") \
        == (3.70 * T, 95.73 * G)
    assert aot._oom_bytes("INTERNAL: something else") is None
