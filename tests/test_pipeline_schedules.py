"""Pipeline schedules (parallel/pipeline/schedules.py), stage layouts (stage_layout.py) and the scheduled pipeline
run as one SPMD program (executor.py), every schedule (gpipe included) a tick table of it, on 8 fake CPU devices.

References: the closed-form bubbles and hand-drawn tick diagrams; a brute-force search over all contiguous splits;
hand-counted ghost slots; the unpipelined one-device step (jax.value_and_grad of `objective.model_losses`) for loss,
gradients and router loads."""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dsv3_jax import runtime, sharding
from dsv3_jax.analysis import load_config
from dsv3_jax.cli import ConfigError, UserError
from dsv3_jax.config import ModelConfig
from dsv3_jax.model import DeepSeekV3, abstract_model
from dsv3_jax.moe import RouterBias
from dsv3_jax.objective import model_losses
from dsv3_jax.parallel.pipeline import executor, schedules, stage_layout
from dsv3_jax.runtime import split_model_section

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=7,
                  num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                  v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                  first_k_dense_replace=1, dtype="float32", num_nextn_predict_layers=1)  # 1 dense + 6 MoE + MTP
LAM, ALPHA = 0.3, 0.01


# ---------------------------------------------------------------------------------------------- tick tables
@pytest.mark.parametrize("name,S,M,v", [("gpipe", 2, 4, 1), ("gpipe", 4, 8, 1), ("1f1b", 4, 8, 1), ("1f1b", 4, 16, 1),
                                        ("1f1b", 16, 32, 1), ("interleaved", 2, 4, 2), ("interleaved", 4, 8, 2),
                                        ("interleaved", 4, 8, 3), ("interleaved", 16, 32, 2)])
def test_counted_bubble_is_the_formula(name, S, M, v):
    for cost in ({"F": 1, "B": 2}, {"F": 1, "B": 3}):
        t = schedules.table(name, S, M, v, cost)
        assert t.bubble == pytest.approx(schedules.bubble_formula(name, S, M, v), abs=1e-12)
    f, b = schedules.op_ticks(name, S, M, v)
    assert (b >= f).all() and (f[:, 1:] > f[:, :-1]).all() and (b[:, :-1] > b[:, 1:]).all()  # data dependencies
    a = t.arrays
    assert a["f_valid"].sum() == a["b_valid"].sum() == M * S * v  # every op exactly once
    if name == "1f1b":  # a stage holds 2(S - s) - 1 micro-batches, GPipe all M
        assert t.peak_live == [min(2 * (S - s) - 1, M) for s in range(S)]
    if name == "gpipe":
        assert t.peak_live == [M] * S
    if name == "interleaved":
        assert t.bubble < schedules.bubble_formula("gpipe", S, M)


def test_tick_diagrams_by_hand():
    assert schedules.diagram(schedules.table("1f1b", 2, 3)) == "s0 0. 1. 2A .B .C\ns1 .. 0A 1B 2C .."
    assert schedules.diagram(schedules.table("gpipe", 2, 3)) == "s0 0. 1. 2. .. .. .C .B .A\ns1 .. 0. 1. 2. .C .B .A .."
    with pytest.raises(ValueError, match="multiple of the stages"):
        schedules.table("interleaved", 4, 6, 2)


# ---------------------------------------------------------------------------------------------- layouts
def _costs(kinds, flops, first=0.0, last=0.0):
    return stage_layout.LayerCosts(tuple(kinds), tuple(flops), {"dense": 10, "moe": 100}, first, last, 1000)


def test_balanced_split_is_optimal_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n, S = int(rng.integers(3, 9)), int(rng.integers(2, 5))
        c = _costs(["dense"] * 2 + ["moe"] * (n - 2), rng.uniform(1, 3, n), rng.uniform(0, 2), rng.uniform(0, 4))
        lay = stage_layout.balanced(c, S)
        assert lay.bounds[0] == 0 and lay.bounds[-1] == n and len(lay.bounds) == S + 1
        best = min(max(stage_layout.StageLayout((0,) + cut + (n,), c).stage_cost(s) for s in range(S))
                   for cut in itertools.combinations_with_replacement(range(1, n + 1), S - 1)
                   if all(cut[i] < cut[i + 1] for i in range(len(cut) - 1)))
        assert max(lay.stage_cost(s) for s in range(S)) <= best * 1.001 + 1e-12


def test_resident_and_pooled_slots_by_hand_and_bad_splits():
    c = dataclasses.replace(_costs(["dense"] + ["moe"] * 3, [1, 1, 1, 1]), total_params=310)  # dense 10, MoE 100
    lay = stage_layout.given(c, "1,3")  # stage 0: the dense block, stage 1: three MoE blocks
    assert (lay.slots("dense"), lay.slots("moe")) == (1, 3)
    assert lay.empty_slots("dense") == 1 and lay.empty_slots("moe") == 3
    # a resident slot would pad stage 1 with a dense block (10 of 310) or stage 0 with a MoE one: all pooled
    assert lay.resident_slots == {"dense": 0, "moe": 0} and lay.ghost_params == 0
    assert lay.pooled_blocks("dense") == 1 and lay.pooled_blocks("moe") == 3 and lay.pooled_params == 310
    np.testing.assert_array_equal(stage_layout.slot_index(lay, 2, "moe")[:, 0], [[-1, -1, -1], [0, 1, 2]])
    # dense counts [2, 2, 2, 0] over 4 stages, 1000 parameters in all. Train state per stage by hand (x 10):
    # r = 0: 4 x 6 pooled / 4 + 2 x 2 borrowed = 10; r = 1: 4 + 4 x 3 / 4 + 2 = 9; r = 2: 8, padding stage 3
    # with 2 dense blocks (20 = 2%: within the budget). MoE [0, 0, 0, 2]: one resident slot pads 3 x 100.
    c8 = _costs(["dense"] * 6 + ["moe"] * 2, [1] * 8)
    lay = stage_layout.given(c8, "2,2,2,2")
    assert lay.resident_slots == {"dense": 2, "moe": 0} and lay.ghost_params == 20
    assert lay.state_params == 80 + 100 * (4 * 2 / 4 + 2 * 2)
    lay = stage_layout.given(dataclasses.replace(c8, total_params=999), "2,2,2,2")  # 20 > 2%: one slot fewer
    assert lay.resident_slots == {"dense": 1, "moe": 0} and lay.ghost_params == 10
    for bad in ("1,2", "a,b", "5,-1"):
        with pytest.raises(ConfigError, match="pipeline_stage_layers"):
            stage_layout.given(c, bad)
    with pytest.raises(ConfigError, match="more than 5 stages leave one empty"):
        stage_layout.balanced(c, 6)


def _model_cfg(name):
    return ModelConfig.from_dict(split_model_section(load_config(name).model)[0])


def test_deepseek_v3_layout_over_16_stages():
    model = abstract_model(_model_cfg("deepseek_v3"))
    lay = stage_layout.plan(model, 16, 4096)
    assert lay.stages == 16 and lay.bounds[-1] == 61
    assert [len(lay.blocks(s)) for s in range(16)] == [4] * 15 + [1]  # the head and MTP weigh ~3 layers
    assert lay.imbalance() < 1.25
    # by hand: stage 0 holds the 3 dense layers and 1 MoE, the last stage 1 MoE: one resident MoE slot (two would
    # pad 2 x 11.5B, 3.4%), no ghosts; the dense layers and the 3 MoE layers of 14 stages beyond it are pooled
    assert [lay.count(s, "moe") for s in range(16)] == [1] + [4] * 14 + [1]
    assert lay.resident_slots == {"dense": 0, "moe": 1}
    assert lay.ghost_params == 0 and lay.pooled_blocks("dense") == 3 and lay.pooled_blocks("moe") == 42
    assert lay.ghost_blocks("moe", 2) * lay.costs.params["moe"] > stage_layout.GHOST_BUDGET * lay.costs.total_params
    tiny = abstract_model(_model_cfg("tiny"))
    for S in (2, 4):
        assert stage_layout.plan(tiny, S, 256).bounds[-1] == 4


# ---------------------------------------------------------------------------------------------- the program
WINDOW = np.asarray(jax.random.randint(jax.random.key(1), (16, 17), 0, CFG.vocab_size))


@pytest.fixture(scope="module")
def one_device():
    model = DeepSeekV3(CFG, rngs=nnx.Rngs(0), runtime=runtime.resolve(moe_block_size=8))
    gd, params, biases = nnx.split(model, nnx.Param, RouterBias)

    def objective(p):
        terms, stats = model_losses(gd, p, biases, jnp.asarray(WINDOW))
        return terms["loss"] + LAM * terms["mtp_loss"] + ALPHA * terms["balance_loss"], (terms, stats)

    (total, (terms, stats)), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
    return total, terms, stats, nnx.to_pure_dict(grads)


def _scheduled(layout, name, M, v, remat=False):
    mesh = sharding.make_mesh(layout)
    with jax.set_mesh(mesh):
        model = DeepSeekV3(CFG, rngs=nnx.Rngs(0), runtime=runtime.resolve(mesh=mesh, moe_block_size=8))
        program = executor.plan(model, layout["stage"], M, name, v, seq_len=16, remat=remat)
        gds, state = executor.split_model(model)
        ends, slots = executor.place(program, state, mesh)
        window = sharding.put_global_batch(WINDOW, sharding.batch_sharding(mesh))
        step = jax.jit(lambda e, s, w: executor.value_and_grad(program, gds, CFG, e, s, w, jnp.float32(LAM),
                                                                      jnp.float32(ALPHA), mesh=mesh))
        (total, terms, stats), (g_ends, g_slots) = step(ends, slots, window)
        grads = g_ends | {f"{k}_layers": executor.from_slots(g_slots[k], program.slots[k],
                                                                   getattr(CFG, f"num_{k}_layers")) for k in g_slots}
    return total, terms, stats, grads, step, (ends, slots, window), mesh, program


EXPERT, DEEP, TENSOR = dict(stage=2, expert=2, data=2), dict(stage=4, data=2), dict(stage=2, fsdp=2, tensor=2)
# each schedule on two of the three layouts (gpipe over EXPERT is the tiny-config training test's first leg,
# test_pipeline_training.py; FSDP x tensor runs with the interleaved schedule here and 1f1b in the HLO test there)
CASES = [("gpipe", DEEP), ("1f1b", EXPERT), ("1f1b", DEEP), ("interleaved", EXPERT), ("interleaved", DEEP),
         ("interleaved", TENSOR)]


@pytest.mark.parametrize("name,layout", CASES, ids=lambda v: "x".join(f"{k}{s}" for k, s in v.items())
                         if isinstance(v, dict) else v)
def test_scheduled_pipeline_matches_one_device(name, layout, one_device, monkeypatch):
    """Loss terms 1e-5, every gradient 1e-4 relative, router loads (so the bias updates) identical, for an uneven
    split of 1 dense + 6 MoE layers + MTP (interleaved: 2 chunks per stage; 1f1b over stage 2 x expert 2 x data 2
    with remat). gpipe over stage 4 x data 2 runs with any padding allowed: MoE blocks [1, 2, 2, 1] per stage
    take 2 resident slots (stages 0 and 3 pad one: a tie in train state, and more resident wins), the dense
    block stays pooled (a resident slot would cost more than it saves): padded and pooled slots in one step.
    1f1b over stage 4 x data 2 holds its pooled layers whole on every stage (as a leaf with no dim to split is)."""
    remat = name == "1f1b" and "expert" in layout  # one case also recomputes each layer inside the B's recompute
    padded = name == "gpipe" and layout == dict(stage=4, data=2)
    if padded:
        monkeypatch.setattr(stage_layout, "GHOST_BUDGET", 1.0)
    if name == "1f1b" and layout == dict(stage=4, data=2):  # pooled layers held whole (as a leaf with no dim to
        # split is), borrowed by stages 1 and 2: their gradients are summed
        from dsv3_jax.parallel.pipeline import slot_state

        monkeypatch.setattr(slot_state, "pool_spec", lambda shape, spec, sizes: P(None, *(
            slot_state._unstaged(a) for a in tuple(spec)[1:])))
    got = _scheduled(layout, name, 4, 2 if name == "interleaved" else 1, remat)
    slots = got[-1].slots
    if padded:
        assert {k: lay.resident for k, lay in slots.items()} == {"dense": 0, "moe": 2}
        assert (slots["moe"].index[:, 0, :2] < 0).sum() == 2 and len(slots["moe"].pooled) == 0
        assert slots["dense"].pooled.tolist() == [0]
    else:  # within the 2% budget nothing is padded at this size: every slot some stage leaves empty is pooled
        assert all((lay.index[:, :, :lay.resident] >= 0).all() for lay in slots.values())
        assert any(len(lay.pooled) for lay in slots.values())
    _check_matches_one_device(one_device, *got)


def _check_matches_one_device(one_device, total, terms, stats, grads, *_):
    ref_total, ref_terms, ref_stats, ref_grads = one_device
    np.testing.assert_allclose(float(total), float(ref_total), rtol=1e-5)
    for k in ("loss", "mtp_loss", "balance_loss", "dropped_tokens"):
        np.testing.assert_allclose(float(terms[k]), float(ref_terms[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ref_grads)[0], jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4 * float(np.abs(a).max()) + 1e-9,
                                   err_msg=jax.tree_util.keystr(path))
    assert sorted(stats) == sorted(ref_stats)
    for key in stats:
        np.testing.assert_array_equal(np.asarray(stats[key].counts), np.asarray(ref_stats[key].counts))


def test_bad_pipeline_configs_fail_before_anything_is_built():
    tiny = _model_cfg("tiny")  # 4 layers
    with pytest.raises(ConfigError, match="= 8 pipeline stages, but the model has 4 layers"):
        executor.check_config(tiny, 4, 8, "interleaved", 2, "", 32)
    with pytest.raises(ConfigError, match="pipeline_stage_layers='1,2'"):
        executor.check_config(tiny, 2, 4, "1f1b", 1, "1,2", 32)
    with pytest.raises(ConfigError, match="names 3 stages but config.mesh.stage=2"):
        executor.check_config(tiny, 2, 4, "1f1b", 1, "1,1,2", 32)
    mesh = sharding.make_mesh(dict(stage=4, data=2))
    with pytest.raises(UserError, match="microbatches=6: the interleaved schedule"):
        runtime.resolve(mesh=mesh, microbatches=6, pipeline_schedule="interleaved", pipeline_chunks=2)


# ---------------------------------------------------------------------------------------------- sparse attention
DSA_CFG = dataclasses.replace(CFG, num_hidden_layers=3, index_topk=5, index_n_heads=2, index_head_dim=8,
                              initializer_range=0.2)  # 1 dense + 2 MoE + MTP; peaked attention: a KL worth comparing


@pytest.mark.parametrize("stage", ["sparse", "dense_warmup"])
def test_dsa_pipeline_with_experts_matches_one_device(stage):
    """DeepSeek Sparse Attention (top 5 of 16 keys) in both training stages, 1f1b over stage 2 x expert 2 x data 2
    against `jax.value_and_grad` of the one-device objective (`objective.total_loss`): the indexer's KL and recall
    (main blocks in slots on both stages, the MTP block on the last) 1e-5, every gradient 1e-4 relative; in the
    warm-up only the indexers' gradients are non-zero. The sparse stage's windows are packed documents with loss
    masks (`data/packing.py`: each micro-batch's positions, attention and loss follow its own rows' documents)."""
    from dsv3_jax.data import packing
    from dsv3_jax.objective import total_loss

    setting = (0.5, stage == "dense_warmup")
    documents = stage == "sparse"
    window = WINDOW
    if documents:  # 2-3 documents per row at row-dependent places, a few prompt (non-target) tokens
        rng = np.random.default_rng(3)
        starts = np.zeros(WINDOW.shape, bool)
        starts[np.arange(16), rng.integers(3, 8, 16)] = True
        starts[np.arange(16), rng.integers(9, 14, 16)] = True
        window = packing.encode(WINDOW, targets=rng.random(WINDOW.shape) > 0.2, starts=starts).astype(np.int32)
    model = DeepSeekV3(DSA_CFG, rngs=nnx.Rngs(0), runtime=runtime.resolve(moe_block_size=8, dsa_stage=stage))
    gd, params, biases = nnx.split(model, nnx.Param, RouterBias)

    def objective(p):
        terms, _ = model_losses(gd, p, biases, jnp.asarray(window), documents)
        return total_loss(terms, LAM, ALPHA, setting), terms

    (ref_total, ref_terms), ref_grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
    layout = dict(stage=2, expert=2, data=2)
    mesh = sharding.make_mesh(layout)
    with jax.set_mesh(mesh):
        model = DeepSeekV3(DSA_CFG, rngs=nnx.Rngs(0),
                           runtime=runtime.resolve(mesh=mesh, moe_block_size=8, dsa_stage=stage))
        program = executor.plan(model, 2, 4, "1f1b", 1, seq_len=16)
        gds, state = executor.split_model(model)
        ends, slots = executor.place(program, state, mesh)
        placed = sharding.put_global_batch(window, sharding.batch_sharding(mesh))
        (total, terms, _), (g_ends, g_slots) = jax.jit(lambda e, s, w: executor.value_and_grad(
            program, gds, DSA_CFG, e, s, w, jnp.float32(LAM), jnp.float32(ALPHA), mesh=mesh, indexer=setting,
            documents=documents))(ends, slots, placed)
        grads = g_ends | {f"{k}_layers": executor.from_slots(g_slots[k], program.slots[k],
                                                             getattr(DSA_CFG, f"num_{k}_layers")) for k in g_slots}
    np.testing.assert_allclose(float(total), float(ref_total), rtol=1e-5)
    for k in ("loss", "indexer_kl", "index_recall"):
        np.testing.assert_allclose(float(terms[k]), float(ref_terms[k]), rtol=1e-5, err_msg=k)
    assert 0 < float(ref_terms["index_recall"]) < 0.99 and float(ref_terms["indexer_kl"]) > 1e-4
    ref = nnx.to_pure_dict(ref_grads)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ref)[0], jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4 * float(np.abs(a).max()) + 1e-9,
                                   err_msg=jax.tree_util.keystr(path))
        if setting[1] and "indexer" not in jax.tree_util.keystr(path):
            assert not np.any(np.asarray(b)), jax.tree_util.keystr(path)
