"""The accelerator suite (benchmarks/gpu_suite.sh, issue #19) checked on CPU: the benchmark config has the
issue's shape, the suite's cheap parts run end to end and their numbers are checked against references, and
the report and profile readers give hand-computed figures."""
import gzip
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from testenv import one_device_env

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import abstract_model, param_counts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(path, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_bench_config_is_a_realistic_deepseek_shape():
    """1-3B parameters, MLA with d_model >= 1536, >= 32 routed experts with top-k >= 4 and a shared expert, seq
    4096, bf16 compute on f32 master weights."""
    c = _module("configs/gpu_bench.py", "gpu_bench").get_config()
    cfg = ModelConfig.from_dict(c.model)
    counts = param_counts(abstract_model(cfg))
    assert 1e9 <= counts["params_total"] <= 3e9, counts
    assert cfg.hidden_size >= 1536 and cfg.kv_lora_rank and cfg.q_lora_rank
    assert cfg.n_routed_experts >= 32 and cfg.num_experts_per_tok >= 4 and cfg.n_shared_experts >= 1
    assert cfg.num_moe_layers > 0 and cfg.num_nextn_predict_layers >= 1
    assert c.train.seq_len == 4096 and c.model.dtype == "bfloat16" and c.model.param_dtype == "float32"


def test_suite_runs_its_gemm_parts_and_reports(tmp_path):
    """gpu_suite.sh --smoke with the two GEMM parts: the grouped GEMM agrees with a per-expert float64 product,
    the FP8 kernel (interpret mode, no accelerator here) with its fp64 reference, and the report lists the
    other parts as missing with 'n/a' figures."""
    out = tmp_path / "suite"
    env = one_device_env(PYTHON=sys.executable, GPU_SUITE_PARTS="grouped_gemm fp8_gemm")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh"), "--smoke", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    suite = json.loads((out / "suite.json").read_text())
    assert suite["missing"] == ["train", "fp8_loss_gap"]
    grouped = suite["parts"]["grouped_gemm"]
    assert len(grouped["rows"]) == 8  # 2 projections x 2 loads x (fwd, fwd+bwd)
    assert all(r["max_rel_err"] < 1e-5 for r in grouped["rows"])
    assert {r["load"] for r in grouped["rows"]} == {"balanced", "skewed"}
    assert suite["summary"]["grouped_fwd"] == min(r["ratio"] for r in grouped["rows"] if r["pass"] == "fwd")
    errors = suite["parts"]["fp8_gemm"]["interpret_errors"]
    assert errors["triton/float32"] < 1e-5 and errors["mosaic_tpu/float32"] < 1e-5
    md = (out / "suite.md").read_text()
    assert "| train step MFU (BF16, of the measured matmul peak) | n/a | >= 30% | - |" in md


def test_report_figures_by_hand():
    report = _module("benchmarks/gpu_suite_report.py", "gpu_suite_report")
    parts = {
        "train": {"rows": [
            {"name": "dsv3_jax (MTP depth 1)", "mfu": 0.31, "tokens_per_sec": 1000.0, "vs_transformers": 1.5,
             "ms_per_step": 120.0},
            {"name": "dsv3_jax FP8 (MTP depth 1)", "mfu": 0.4, "tokens_per_sec": 1200.0, "vs_transformers": 1.8,
             "ms_per_step": 100.0},
            {"name": "transformers (bf16 autocast)", "mfu": 0.2, "tokens_per_sec": 666.0, "vs_transformers": 1.0,
             "ms_per_step": 180.0}]},
        "grouped_gemm": {"min_ratio": {"fwd": 0.7, "fwd+bwd": 0.55}},
        "fp8_gemm": {"rows": [{"speedup_vs_bf16": 1.0}, {"speedup_vs_bf16": 4.0}]},
        "fp8_loss_gap": {"steps": 100, "runs": [{"final_loss": {"rel_gap": 0.002}}]},
    }
    s = report.summarize(parts)
    assert s["mfu"] == 0.31 and s["fp8_step_speedup"] == pytest.approx(1.2)
    assert s["fp8_gemm_min"] == 1.0 and s["fp8_gemm_geomean"] == pytest.approx(2.0)
    assert s["grouped_fwd_bwd"] == 0.55 and s["fp8_loss_gap"] == 0.002
    md = report.table(s)
    assert "| train step MFU (BF16, of the measured matmul peak) | 31.0% | >= 30% | yes |" in md
    assert "| grouped GEMM / dense, fwd+bwd (lowest) | 55.0% | >= 60% | no |" in md
    assert "| FP8 GEMM / BF16 dot, geometric mean | 2.00x | >= 1.3x | yes |" in md
    assert "after 100 steps | +0.200% |" in md


def test_top_ops_sums_device_kernels(tmp_path):
    """A perfetto trace with a device process: only its kernels count, summed by name, largest first."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import _common

    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
              {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
              {"ph": "X", "pid": 1, "tid": 1, "name": "host_work", "dur": 9000.0},
              {"ph": "X", "pid": 2, "tid": 5, "name": "gemm_fusion", "dur": 300.0},
              {"ph": "X", "pid": 2, "tid": 5, "name": "loop_fusion", "dur": 100.0},
              {"ph": "X", "pid": 2, "tid": 6, "name": "gemm_fusion", "dur": 600.0}]
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    ops = _common.top_ops(str(tmp_path))
    assert [o["name"] for o in ops] == ["gemm_fusion", "loop_fusion"]
    assert ops[0]["ms"] == pytest.approx(0.9) and ops[0]["share"] == pytest.approx(0.9)


def test_scope_table_maps_a_cpu_trace_to_the_named_scopes(tmp_path):
    """A real jax.profiler trace on CPU of a jitted function called through a module attribute (as the engine calls
    `steps.decode_step`): `CompiledTexts` records its arguments, and `scope_table` puts its two matmuls under the
    scopes they were written in (hand-known: the 'attention' one is 4x the FLOPs of the 'shared_experts' one)."""
    import types

    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import _common

    def step(a, b, c):
        with jax.named_scope("attention"):
            x = jnp.tanh(a @ b)
        with jax.named_scope("shared_experts"):
            return x @ c

    mod = types.SimpleNamespace(step=jax.jit(step))
    a, b, c = (jnp.ones(s, jnp.float32) for s in ((256, 512), (512, 256), (256, 128)))
    mod.step(a, b, c).block_until_ready()
    with _common.CompiledTexts(mod, "step") as seen:
        with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
            for _ in range(5):
                mod.step(a, b, c).block_until_ready()
    assert mod.step is seen.saved["step"]  # restored
    texts = seen.texts()
    assert list(texts) == ["jit_step"]
    scopes = {r["scope"]: r for r in _common.scope_table(str(tmp_path), texts, training=False)}
    assert {"attention", "shared expert"} <= set(scopes), scopes
    assert scopes["attention"]["ms"] > scopes["shared expert"]["ms"] > 0
    assert scopes["attention"]["share"] + scopes["shared expert"]["share"] > 0.5, scopes
    assert {o["name"].split("/")[0] for o in _common.top_ops(str(tmp_path), n=None, by_module=True)} == {"jit_step"}
