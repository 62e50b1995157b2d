"""The Runtime: every 'auto' made concrete by the resolver (the one reader of the backend), config keys with
their old spellings, clear errors naming the key, the strategies a model takes from it, and a model
that follows its Runtime rather than the ambient mesh."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import runtime, sharding, strategies
from dsv3_jax.cli import ConfigError, UserError
from dsv3_jax.config import ModelConfig
from dsv3_jax.config_base import base_config
from dsv3_jax.experts import LocalExperts
from dsv3_jax.model import DeepSeekV3, with_runtime
from dsv3_jax.parallel.expert import ExpertParallel
from dsv3_jax.programs import Pipelined, Plain, program_for
from dsv3_jax.stack import ScanStack

MODEL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
             num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
             v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
             first_k_dense_replace=1, dtype="float32")


def _config(**model_run):
    c = base_config()
    c.model = ml_collections.ConfigDict({**MODEL, **runtime.MODEL_RUN_KEYS, **model_run})
    return c


def test_auto_resolves_for_this_backend():
    assert runtime.platform() == "cpu"  # the suite runs on CPU
    rt = runtime.resolve()
    got = (rt.backend, rt.expert_impl, rt.decode_expert_impl, rt.expert_dispatch)
    assert got == ("cpu", "blocks", "dense", "padded")
    assert rt.attention_f32_core and rt.emulate_ragged_all_to_all
    assert rt.fp8_options.impl == "blocked" and rt.fp8_options.interpret is True and rt.fp8_options.tpu_fp8 is False
    assert rt.microbatches == 1 and rt.stages == 1 and not rt.expert_parallel
    # fp8 keeps the block layout (the FP8 grouped GEMM runs on it) even when ragged was asked for
    assert runtime.resolve(moe_impl="ragged", fp8=True).expert_impl == "blocks"
    mesh = sharding.make_mesh(dict(stage=2, data=4))
    assert runtime.resolve(mesh=mesh).microbatches == 4  # 0: twice the stages


def test_config_keys_keep_their_spellings():
    """--config.model.moe_impl / fp8 / moe_block_size / expert_*, --config.train.remat, --config.mesh.microbatches
    and the fp8 section all reach the Runtime; ModelConfig.from_dict takes only the architecture."""
    c = _config(moe_impl="dense", moe_block_size=16, fp8=True, expert_capacity_factor=1.5)
    c.train.remat = True
    c.mesh.microbatches = 6
    c.fp8.pow2_scales = True
    rt = runtime.from_config(c)
    assert (rt.expert_impl, rt.block_size, rt.fp8, rt.capacity_factor, rt.remat, rt.microbatches) == \
        ("dense", 16, True, 1.5, True, 6)
    assert rt.fp8_options.pow2_scales and rt.fp8_gemms is rt.fp8_options
    cfg = ModelConfig.from_dict(c.model)
    assert not hasattr(cfg, "moe_impl") and cfg.hidden_size == 32
    line = rt.describe()
    assert line.startswith("runtime: cpu") and "dense" in line and "remat on" in line and "fp8 on (blocked)" in line


@pytest.mark.parametrize("key, value, needle", [
    ("moe_impl", "megablox", "config.model.moe_impl='megablox'"),
    ("moe_block_size", 0, "config.model.moe_block_size=0"),
    ("expert_dispatch", "fast", "config.model.expert_dispatch='fast'"),
    ("expert_capacity_factor", -1.0, "expert_capacity_factor=-1.0"),
    ("attention", "flash", "config.model.attention='flash'"),
])
def test_bad_run_keys_name_the_key(key, value, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        runtime.from_config(_config(**{key: value}))


def test_bad_fp8_and_schedule_keys():
    c = _config()
    c.fp8.impl = "cuda"
    with pytest.raises(ConfigError, match="fp8 gemm impl='cuda'"):
        runtime.from_config(c)
    c = _config()
    c.mesh.pipeline_schedule = "dualpipe"
    with pytest.raises(ConfigError, match="config.mesh.pipeline_schedule='dualpipe'"):
        runtime.from_config(c)
    c = _config()
    c.mesh.pipeline_schedule, c.mesh.pipeline_chunks = "1f1b", 2
    with pytest.raises(ConfigError, match="config.mesh.pipeline_chunks=2.*only with pipeline_schedule='interleaved'"):
        runtime.from_config(c)
    with pytest.raises(ValueError, match="choose from"):
        runtime.Runtime(backend="cpu", expert_impl="auto")  # a Runtime is concrete: 'auto' is the resolver's


@pytest.mark.parametrize("section, key, value", [("model", "moe_impl", "megablox"), ("model", "moe_block_size", 0),
                                                 ("mesh", "pipeline_schedule", "dualpipe"), ("fp8", "block_n", 0),
                                                 ("fp8", "impl", "cuda")])
def test_config_errors_carry_their_key(section, key, value):
    """The config key travels as data (`ConfigError.key`): nothing reads it back from the message."""
    c = _config()
    c[section][key] = value
    with pytest.raises(ConfigError) as e:
        runtime.from_config(c)
    assert e.value.key == f"{section}.{key}"


def test_derived_runtimes_have_names():
    """A resolved Runtime is never edited: no general `replace`, each variant from a named constructor."""
    mesh = sharding.make_mesh(dict(expert=4, data=2))
    rt = runtime.resolve(mesh=mesh, moe_impl="blocks", fp8=True)
    assert not hasattr(rt, "replace")
    assert rt.local().mesh is None and rt.local().fp8 and rt.mesh is mesh
    engine = rt.for_engine("pallas")
    assert engine.mesh is None and engine.paged_attention == "pallas" and rt.for_engine().paged_attention == "jnp"
    assert rt.for_decode().expert_impl == "dense" and rt.for_decode("blocks").expert_impl == "blocks"
    with pytest.raises(UserError, match="exclude each other") as e:
        rt.with_fp8_weights("w8a8")
    assert e.value.key == "fp8_weights"
    resident = rt.without_fp8_gemms().with_fp8_weights("w8a8")
    assert (resident.fp8, resident.fp8_weights, resident.with_fp8_weights(None).fp8_weights) == (False, "w8a8", None)


def test_strategies_follow_the_runtime():
    mesh = sharding.make_mesh(dict(expert=4, stage=2))
    rt = runtime.resolve(mesh=mesh, moe_block_size=8)
    assert isinstance(strategies.experts(rt), ExpertParallel) and strategies.experts(rt).block == 8
    # a pipeline is a train program, not a stack strategy; on CPU the scan is unrolled, on accelerators a loop
    assert strategies.stack(rt) == ScanStack(remat=False, unroll=True)
    piped = program_for(rt, ModelConfig(**MODEL), 16)
    assert isinstance(piped, Pipelined) and (piped.program.table.name, piped.program.table.M) == ("gpipe", 4)
    local = runtime.resolve(moe_impl="dense")
    assert strategies.experts(local) == LocalExperts("dense", 64, None, None, loop=True)
    # the float 'blocks' GEMMs loop over the used blocks on CPU only (experts.swiglu_block_loop)
    assert strategies.experts(runtime.resolve()) == LocalExperts("blocks", 64, None, None, loop=True)
    assert strategies.experts(rt).loop
    assert strategies.stack(local) == ScanStack(remat=False, unroll=True)
    chip = type("Chip", (), {"platform": "tpu", "device_kind": "TPU v5p"})()
    with runtime.compiling_for([chip]):  # (as dsv3_jax.aot resolves for a pod: the layer loop kept)
        assert strategies.stack(runtime.resolve()) == ScanStack(remat=False, unroll=False)
        assert strategies.experts(runtime.resolve(moe_impl="blocks")) == LocalExperts("blocks", 64, None, None)
    assert type(program_for(local, ModelConfig(**MODEL), 16)) is Plain


def test_model_follows_its_runtime_not_the_ambient_mesh():
    """Under an ambient expert x stage mesh a model built with the default Runtime still runs locally (the
    mesh no longer chooses algorithms), giving the same logits as outside the mesh; a Runtime with the
    mesh makes the model expert-parallel (its jaxpr has the all_to_all) with equal logits."""
    cfg = ModelConfig(**MODEL)
    model = DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (8, 8)), jnp.int32)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).logits)
    ref = fwd(state, tokens)
    mesh = sharding.make_mesh(dict(expert=4, data=2))
    with jax.set_mesh(mesh):
        text = str(jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t).logits)(state, tokens))
        np.testing.assert_allclose(np.asarray(fwd(state, tokens)), np.asarray(ref), rtol=1e-5, atol=1e-6)
    assert "all_to_all" not in text
    ep = with_runtime(model, runtime.resolve(mesh=mesh))
    ep_graphdef, ep_state = nnx.split(ep)
    with jax.set_mesh(mesh):
        text = str(jax.make_jaxpr(lambda s, t: nnx.merge(ep_graphdef, s)(t).logits)(ep_state, tokens))
        got = jax.jit(lambda s, t: nnx.merge(ep_graphdef, s)(t).logits)(ep_state, tokens)
    assert "all_to_all" in text
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_with_runtime_refuses_to_switch_fp8():
    model = DeepSeekV3(ModelConfig(**MODEL), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="cannot switch the FP8 GEMMs"):
        with_runtime(model, runtime.resolve(fp8=True))
