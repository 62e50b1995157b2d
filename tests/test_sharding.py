"""Logical axis names: a hand-written golden table of every variable of the tiny model (so a parameter
added without names, or with different names, fails here), the rules table, and placement on a
fake 8-device mesh."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsv3_jax import sharding
from dsv3_jax.model import DeepSeekV3

from reference import build, tiny_config

# Per-block variables (without the leading 'layers' axis that stacked blocks add).
ATTN_Q_LORA = {
    "attn/wq_a/kernel": ("embed", "q_lora"),
    "attn/q_norm/scale": ("q_lora",),
    "attn/wq_b/kernel": ("q_lora", "heads", "qk_head_dim"),
}
ATTN_NO_Q_LORA = {"attn/wq/kernel": ("embed", "heads", "qk_head_dim")}
ATTN_KV = {
    "attn/wkv_a/kernel": ("embed", "kv_lora"),
    "attn/kv_norm/scale": ("kv_lora",),
    "attn/wkv_b/kernel": ("kv_lora", "heads", "kv_head_dim"),
    "attn/wo/kernel": ("heads", "v_head_dim", "embed"),
    "attn_norm/scale": ("embed",),
    "ffn_norm/scale": ("embed",),
}
DENSE_FFN = {
    "ffn/gate/kernel": ("embed", "mlp"),
    "ffn/up/kernel": ("embed", "mlp"),
    "ffn/down/kernel": ("mlp", "embed"),
}
MOE_FFN = {
    "ffn/router": ("embed", "router_experts"),
    "ffn/bias": ("router_experts",),  # RouterBias: not a Param, but placed all the same
    "ffn/w_gate": ("experts", "embed", "expert_mlp"),
    "ffn/w_up": ("experts", "embed", "expert_mlp"),
    "ffn/w_down": ("experts", "expert_mlp", "embed"),
    "ffn/shared/gate/kernel": ("embed", "mlp"),
    "ffn/shared/up/kernel": ("embed", "mlp"),
    "ffn/shared/down/kernel": ("mlp", "embed"),
}
MTP_OWN = {
    "enorm/scale": ("embed",),
    "hnorm/scale": ("embed",),
    "norm/scale": ("embed",),
    "eh_proj/kernel": ("mtp_concat", "embed"),
}
TOP = {
    "embed/embedding": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "norm/scale": ("embed",),
}


def golden(q_lora: bool, depth: int) -> dict:
    attn = {**(ATTN_Q_LORA if q_lora else ATTN_NO_Q_LORA), **ATTN_KV}
    table = dict(TOP)
    for stack, ffn in (("dense_layers", DENSE_FFN), ("moe_layers", MOE_FFN)):
        for path, names in {**attn, **ffn}.items():
            table[f"{stack}/{path}"] = ("layers",) + names
    for k in range(depth):
        for path, names in {**MTP_OWN, **{f"block/{p}": n for p, n in {**attn, **MOE_FFN}.items()}}.items():
            table[f"mtp/{k}/{path}"] = names
    return table


def logical_names(model) -> dict:
    out = {}
    for path, v in nnx.to_flat_state(nnx.state(model)):
        out["/".join(map(str, path))] = v.get_metadata().get("out_sharding")
    return out


@pytest.mark.parametrize("q_lora", [True, False])
def test_golden_logical_axes(q_lora):
    cfg = tiny_config(q_lora_rank=12 if q_lora else None)
    model = nnx.eval_shape(lambda: DeepSeekV3(cfg, rngs=nnx.Rngs(0)))
    got = logical_names(model)
    want = golden(q_lora, cfg.num_nextn_predict_layers)
    assert sorted(set(got) - set(want)) == [], "variables missing from the golden table"
    assert sorted(set(want) - set(got)) == [], "golden entries with no variable"
    for path in want:
        assert tuple(got[path]) == want[path], path
    # Names and ranks agree (one name per dimension).
    for path, v in nnx.to_flat_state(nnx.state(model)):
        assert len(v.get_value().shape) == len(want["/".join(map(str, path))]), path


def test_logical_to_spec():
    assert sharding.logical_to_spec(("layers", "embed", "mlp")) == P("stage", "fsdp", "tensor")
    assert sharding.logical_to_spec(("layers", "experts", "embed", "expert_mlp")) == P("stage", "expert", "fsdp",
                                                                                      "tensor")
    assert sharding.logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert sharding.logical_to_spec(("batch", "length", "act_embed")) == P(("data", "fsdp", "expert"), None, None)
    assert sharding.logical_to_spec(("kv_lora", "heads", "kv_head_dim")) == P(None, "tensor", None)
    assert sharding.logical_to_spec(()) == P()
    with pytest.raises(KeyError, match="no_such_axis"):
        sharding.logical_to_spec(("embed", "no_such_axis"))


def test_rules_target_known_mesh_axes_and_cover_golden_names():
    for name, axes in sharding.RULES:
        for a in (axes if isinstance(axes, tuple) else (axes,)):
            assert a is None or a in sharding.MESH_AXES, (name, a)
    names = {n for t in (golden(True, 1), golden(False, 1)) for ns in t.values() for n in ns}
    missing = names - {n for n, _ in sharding.RULES}
    assert not missing, missing


def test_state_specs_and_placement_on_mesh():
    cfg = tiny_config()
    model = build(lambda r: DeepSeekV3(cfg, rngs=r), seed=0)
    state = nnx.state(model)
    specs = {"/".join(map(str, p)): s for p, s in nnx.to_flat_state(sharding.state_specs(state))}
    assert specs["moe_layers/ffn/w_gate"] == P("stage", "expert", "fsdp", "tensor")
    assert specs["moe_layers/ffn/bias"] == P("stage", None)
    assert specs["embed/embedding"] == P("tensor", "fsdp")
    assert specs["mtp/1/eh_proj/kernel"] == P(None, "fsdp")
    assert specs["dense_layers/attn/wo/kernel"] == P("stage", "tensor", None, "fsdp")

    devices = np.array(jax.devices()[:8]).reshape(1, 1, 2, 2, 2)
    mesh = Mesh(devices, sharding.MESH_AXES)  # data 1, stage 1, fsdp 2, expert 2, tensor 2
    shardings = {"/".join(map(str, p)): s for p, s in nnx.to_flat_state(sharding.state_shardings(state, mesh))}
    values = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}
    assert shardings["moe_layers/ffn/w_gate"] == NamedSharding(mesh, P("stage", "expert", "fsdp", "tensor"))
    w = jax.device_put(values["moe_layers/ffn/w_gate"], shardings["moe_layers/ffn/w_gate"])  # [L=2, E=8, D=16, F=8]
    assert w.addressable_shards[0].data.shape == (2, 4, 8, 4)
    emb = jax.device_put(values["embed/embedding"], shardings["embed/embedding"])  # [V=48, D=16] -> tensor, fsdp
    assert emb.addressable_shards[0].data.shape == (24, 8)
    bias = jax.device_put(values["moe_layers/ffn/bias"], shardings["moe_layers/ffn/bias"])  # replicated
    assert bias.addressable_shards[0].data.shape == (2, 8)
    # Placement does not change values.
    np.testing.assert_array_equal(np.asarray(w), np.asarray(model.moe_layers.ffn.w_gate[...]))
