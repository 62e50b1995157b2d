"""The serving memory plan (`infer.py --dry_run`) against what really holds the bytes: on one device, the FP8
checkpoint `hf.save(fp8=True)` writes (FP8 tensors, their scales, the rest in BF16); on an expert x tensor
mesh, the shards each device really holds of the model in BF16; and the CLI's table and JSON line."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax import sharding
from dsv3_jax.config import ModelConfig
from dsv3_jax.infer.memory_plan import serving_plan
from dsv3_jax.interop import hf
from dsv3_jax.interop import safetensors_io as st
from dsv3_jax.model import DeepSeekV3

CFG = ModelConfig(vocab_size=160, hidden_size=192, intermediate_size=256, moe_intermediate_size=160,
                  num_hidden_layers=3, num_attention_heads=2, q_lora_rank=144, kv_lora_rank=136, qk_nope_head_dim=16,
                  qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
                  topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=1, dtype="float32")
ONE = {a: 1 for a in sharding.MESH_AXES}


def test_plan_counts_the_bytes_of_a_real_fp8_checkpoint(tmp_path):
    model = DeepSeekV3(CFG, rngs=nnx.Rngs(0))
    hf.save(model, None, str(tmp_path), dtype=jnp.bfloat16, fp8=True)
    aliases = {f"model.layers.{CFG.num_hidden_layers}.{n}" for n in ("embed_tokens.weight", "shared_head.head.weight")}
    stored = 0
    for f in sorted(tmp_path.glob("*.safetensors")):
        for name, info in st.read_header(str(f)).items():
            if name not in aliases:  # the MTP layer's copies of embedding and head are shared, not held twice
                stored += int(np.prod(info.shape)) * st.DTYPES[info.dtype].itemsize
    plan = serving_plan(CFG, ONE, fp8_block=(128, 128), keep_fp8=True, hbm_bytes=1 << 30)
    assert plan["weights_bytes_per_device"] == stored
    assert plan["weights_bytes_per_device"] < 0.6 * plan["weights_bytes_per_device_bf16"]
    per_token = (CFG.kv_lora_rank + CFG.qk_rope_head_dim) * CFG.num_hidden_layers * 2
    assert plan["reserve_bytes"] == (1 << 30) - int((1 << 30) * 0.95)
    assert plan["cache_tokens_per_device"] == ((1 << 30) - plan["reserve_bytes"] - stored) // per_token


def test_plan_counts_the_shards_each_device_holds():
    sizes = ONE | {"expert": 2, "tensor": 2, "data": 2}
    mesh = sharding.make_mesh(sizes)
    model = DeepSeekV3(CFG, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    placed = jax.device_put(jax.tree.map(lambda x: x.astype(jnp.bfloat16), state),
                            sharding.state_shardings(state, mesh))
    held = sum(x.addressable_shards[0].data.size * (4 if "bias" in "/".join(map(str, p)) else 2)
               for p, x in jax.tree_util.tree_leaves_with_path(placed))
    plan = serving_plan(CFG, sizes, fp8_block=None, keep_fp8=False, hbm_bytes=1 << 30)
    assert plan["weights_bytes_per_device_bf16"] == held


def test_dry_run_cli_prints_the_table_and_json(tmp_path):
    cfg_hf = hf.config_to_hf(CFG, torch_dtype="bfloat16", fp8_block=(128, 128))
    (tmp_path / "config.json").write_text(json.dumps(cfg_hf))  # nothing else: config.json is enough
    r = subprocess.run([sys.executable, "infer.py", f"--hf={tmp_path}", "--keep_fp8", "--dry_run", "--mesh=expert=2",
                        "--hbm_gib=1"], capture_output=True, text=True, timeout=300,
                       cwd=str(__import__("pathlib").Path(__file__).parent.parent))
    assert r.returncode == 0, r.stderr[-2000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    want = serving_plan(CFG, ONE | {"expert": 2}, fp8_block=(128, 128), keep_fp8=True, hbm_bytes=1 << 30)
    assert last == {k: want[k] for k in ("weights_bytes_per_device", "weights_bytes_per_device_bf16",
                                         "cache_tokens_per_device")}
    assert "FP8 as shipped" in r.stdout and "cached tokens per device" in r.stdout
    r = subprocess.run([sys.executable, "infer.py", f"--checkpoint={tmp_path}", "--keep_fp8", "--prompt=x"],
                       capture_output=True, text=True, timeout=300,
                       cwd=str(__import__("pathlib").Path(__file__).parent.parent))
    assert r.returncode == 2 and "--keep_fp8 applies to --hf DIR" in r.stderr
    np.testing.assert_equal(last["weights_bytes_per_device"] < last["weights_bytes_per_device_bf16"], True)
