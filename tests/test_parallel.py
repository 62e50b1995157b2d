"""Meshes on 8 fake CPU devices: every layout (pipelined ones included) gives the one-device loss, gradients and update;
expert parallelism (shard_map + all_to_all) against the dense reference, with and without drops;
mesh validation errors; parameter shard shapes."""
import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsv3_jax import runtime, sharding
from dsv3_jax.config import ModelConfig
from dsv3_jax.experts import experts_dense
from dsv3_jax.parallel.expert import capacity, experts_expert_parallel
from dsv3_jax.programs import program_for
from dsv3_jax.train.loop import init_state
from dsv3_jax.train.step import make_train_step

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                  num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                  v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                  first_k_dense_replace=1, dtype="float32",
                  num_nextn_predict_layers=0)  # MTP is covered elsewhere; it doubles compile time here
RUN = dict(moe_block_size=8)  # how CFG runs (the Runtime options; the mesh is added per test)


def _expert_inputs(N=64, K=2, E=8, D=16, F=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(ks[0], (N, D))
    idx = jnp.argsort(jax.random.uniform(ks[1], (N, E)), axis=1)[:, :K].astype(jnp.int32)
    w = jax.random.uniform(ks[2], (N, K))
    ws = [jax.random.normal(k, s) * 0.3 for k, s in zip(ks[3:], [(E, D, F), (E, D, F), (E, F, D)])]
    return x, idx, w, ws


@pytest.mark.parametrize("dispatch", ["padded", "ragged"])
@pytest.mark.parametrize("layout", [dict(expert=8), dict(expert=4, fsdp=2), dict(expert=2, data=2, tensor=2)])
def test_expert_parallel_matches_dense(layout, dispatch):
    """Dropless dispatch, padded all_to_all or ragged (on CPU the ragged exchange is emulated with the
    op's exact semantics), equals the dense single-device experts, values and gradients."""
    x, idx, w, ws = _expert_inputs()
    mesh = sharding.make_mesh(layout)
    ep = lambda x, *ws: experts_expert_parallel(x, idx, w, *ws, mesh=mesh, block=4, capacity_factor=0.0,  # noqa
                                                dispatch=dispatch)
    y, dropped = jax.jit(ep)(x, *ws)
    np.testing.assert_allclose(np.asarray(y), np.asarray(experts_dense(x, idx, w, *ws)), rtol=1e-5, atol=1e-5)
    assert float(dropped) == 0.0
    g_ep = jax.jit(jax.grad(lambda x, *ws: (ep(x, *ws)[0] ** 2).sum(), argnums=(0, 1, 2, 3)))(x, *ws)
    g_ref = jax.jit(jax.grad(lambda x, *ws: (experts_dense(x, idx, w, *ws) ** 2).sum(), argnums=(0, 1, 2, 3)))(x, *ws)
    for a, b in zip(g_ep, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", [dict(expert=8), dict(expert=2, tensor=2, data=2)],
                         ids=["expert8", "expert2xtensor2xdata2"])
def test_expert_parallel_capacity_drops_match_numpy(layout):
    """With a capacity factor, each token shard keeps the first C rows (in token order) per destination
    expert rank; dropped rows contribute nothing and are counted once (not once per tensor rank).
    Reference: numpy bookkeeping + the dense path on kept rows."""
    N, K, E, cf = 64, 2, 8, 1.0
    ep = layout["expert"]
    shards = layout["expert"] * layout.get("data", 1)  # the batch is split over data x fsdp x expert
    x, idx, w, ws = _expert_inputs(N=N, K=K, E=E)
    mesh = sharding.make_mesh(layout)
    y, dropped = jax.jit(lambda x, *ws: experts_expert_parallel(x, idx, w, *ws, mesh=mesh, block=4,
                                                                 capacity_factor=cf))(x, *ws)
    n_local, e_loc = N // shards, E // ep
    C = capacity(n_local * K, ep, cf)
    keep = np.zeros((N, K), bool)
    idx_np = np.asarray(idx)
    for r in range(shards):  # tokens [r*n_local, (r+1)*n_local) live on shard r
        seen = np.zeros(ep, int)
        for t in range(r * n_local, (r + 1) * n_local):
            for k in range(K):
                d = idx_np[t, k] // e_loc
                keep[t, k] = seen[d] < C
                seen[d] += 1
    assert float(dropped) == (~keep).sum() > 0
    ref = experts_dense(x, idx, w * jnp.asarray(keep, jnp.float32), *ws)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("layout", [dict(expert=8), dict(expert=2, tensor=2, data=2)],
                         ids=["expert8", "expert2xtensor2xdata2"])
def test_ragged_dispatch_with_a_capacity_factor_drops_what_does_not_fit_the_receive_buffer(layout):
    """Ragged dispatch with a capacity factor cf: each rank receives at most R = ceil(cf * M) rows (M: a shard's
    token-expert rows), laid out source by source and, from each source, by expert then row; the rows past R are
    not sent, contribute nothing and are counted once. Reference: numpy bookkeeping + the dense path on the kept
    rows; at cf = ep nothing can drop."""
    N, K, E = 64, 2, 8
    ep = layout["expert"]
    shards = layout["expert"] * layout.get("data", 1)  # shard r: data index r // ep, expert index r % ep
    x, idx, w, ws = _expert_inputs(N=N, K=K, E=E)
    mesh = sharding.make_mesh(layout)
    n_local, e_loc = N // shards, E // ep
    idx_np = np.asarray(idx)
    for cf in (0.6, float(ep)):
        y, dropped = jax.jit(partial(experts_expert_parallel, mesh=mesh, block=4, capacity_factor=cf,
                                     dispatch="ragged"))(x, idx, w, *ws)
        R = int(np.ceil(cf * n_local * K))
        keep = np.zeros((N, K), bool)
        for group in range(shards // ep):
            for dst in range(ep):
                got = 0
                for src in range(ep):
                    r = group * ep + src
                    rows = [(idx_np[t, k], t, k) for t in range(r * n_local, (r + 1) * n_local) for k in range(K)
                            if idx_np[t, k] // e_loc == dst]
                    for _, t, k in sorted(rows):  # by expert, then by row (t, k)
                        keep[t, k] = got < R
                        got += 1
        assert float(dropped) == (~keep).sum()
        assert (cf < ep) == (float(dropped) > 0)
        ref = experts_dense(x, idx, w * jnp.asarray(keep, jnp.float32), *ws)
        np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)

LAYOUTS = [dict(data=8), dict(fsdp=8), dict(expert=8), dict(data=2, fsdp=2, expert=2), dict(expert=2, tensor=2, data=2)]


@pytest.fixture(scope="module")
def one_device_step():
    return _one_step(None)


LR = 0.5


def _one_step(layout, cfg=CFG, microbatches=0, accum=1, **run):
    """One train step with plain SGD, so (new - old) / -LR is exactly the gradient (the program's state layout:
    the layers', or a pipeline's slots)."""
    tx = optax.sgd(LR)
    mesh = None if layout is None else sharding.make_mesh(layout)
    rt = runtime.resolve(mesh=mesh, microbatches=microbatches, **{**RUN, **run})
    program = program_for(rt, cfg, 16)
    graphdef, state = init_state(cfg, tx, 0, rt, program)
    init_params = jax.tree.map(np.asarray, state["params"])
    step = make_train_step(graphdef, tx, lambda s: LR, mesh, jax.tree.map(lambda x: x.sharding, state),
                           grad_accum_steps=accum, program=program)
    window = np.asarray(jax.random.randint(jax.random.key(1), (8, 17), 0, cfg.vocab_size))
    batch = jnp.asarray(window) if mesh is None else sharding.put_global_batch(window, sharding.batch_sharding(mesh))
    new_state, metrics = step(state, batch, jnp.float32(0.3), jnp.float32(1e-4), jnp.float32(0.01))
    grads = jax.tree.map(lambda new, old: (old - np.asarray(new)) / LR, new_state["params"], init_params)
    return new_state, metrics, grads


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "x".join(f"{k}{v}" for k, v in d.items()))
def test_layout_matches_one_device(layout, one_device_step):
    """Same loss, gradients (to 1e-4 relative / 1e-6 absolute in f32) and router biases as one device."""
    ref_state, ref_m, ref_g = one_device_step
    state, m, g = _one_step(layout)
    for k in ("loss", "balance_loss", "grad_norm", "max_vio"):
        np.testing.assert_allclose(float(m[k]), float(ref_m[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(ref_g), jax.tree.leaves(g)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(ref_state["biases"]), jax.tree.leaves(state["biases"])):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    # parameters stay sharded as the rules table says
    sizes = dict(sharding.make_mesh(layout).shape)
    wg = state["params"]["moe_layers"]["ffn"]["w_gate"]  # [L, E, D, F] ('layers','experts','embed','expert_mlp')
    L, E, D, F = wg.shape
    assert wg.addressable_shards[0].data.shape == (L // sizes["stage"], E // sizes["expert"], D // sizes["fsdp"],
                                                   F // sizes["tensor"])
    # the dry-run memory plan counts exactly the bytes each device holds
    from dsv3_jax.train.plan import memory_plan

    held = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state["params"]))
    assert memory_plan(CFG, sizes, 8, 16, remat=False)["params"] == held
    emb = state["params"]["embed"]["embedding"]  # [V, D] ('vocab', 'embed')
    assert emb.addressable_shards[0].data.shape == (CFG.vocab_size // sizes["tensor"], CFG.hidden_size // sizes["fsdp"])


@pytest.mark.parametrize("mesh_cfg,needle", [
    (dict(data=16), "needs 16 devices but 8"),
    (dict(data=-1, fsdp=-1), "only one axis may be -1"),
    (dict(data=-1, fsdp=3), "does not divide"),
    (dict(pipeline=2), "unknown axes"),
    (dict(fsdp=0, data=-1), "config.mesh.fsdp=0"),
])
def test_mesh_size_errors(mesh_cfg, needle):
    with pytest.raises(ValueError, match=needle):
        sharding.mesh_sizes(mesh_cfg, 8)


@pytest.mark.parametrize("sizes,batch,needle", [
    (dict(expert=3), None, "must divide model.n_routed_experts"),
    (dict(stage=2), None, "must divide the number of dense layers"),
    (dict(fsdp=5), None, "model.hidden_size"),
    (dict(data=2, fsdp=2), 6, "batch_size=6 must be divisible"),
])
def test_mesh_model_errors(sizes, batch, needle):
    full = {a: 1 for a in sharding.MESH_AXES} | sizes
    with pytest.raises(ValueError, match=needle):
        sharding.validate_mesh(full, CFG, batch)


# ----------------------------------------------------------------------------- pipeline parallelism

CFG4 = dataclasses.replace(CFG, num_hidden_layers=4, first_k_dense_replace=2)  # 2 dense + 2 MoE: 2 stages each


@pytest.fixture(scope="module")
def one_device_step4():
    return _one_step(None, CFG4)


# the meshes test_pipeline_schedules.py's program matrix does not run (there: stage 2 x expert 2 x data 2, stage 4 x
# data 2, stage 2 x fsdp 2 x tensor 2, each schedule); here the whole train step (init, SGD update, bias update)
PIPELINE_LAYOUTS = [(dict(stage=2, expert=2, fsdp=2), 2), (dict(stage=2, expert=4), 2)]


@pytest.mark.parametrize("layout,micro", PIPELINE_LAYOUTS,
                         ids=lambda v: "x".join(f"{k}{s}" for k, s in v.items()) if isinstance(v, dict) else f"m{v}")
def test_pipeline_matches_one_device(layout, micro, one_device_step4):
    """The gpipe schedule of the pipeline program over 'stage' (composed with data, FSDP, dropless expert and
    tensor parallelism), as train.py runs it: same loss and gradients as one device (1e-4 relative), identical
    router-bias updates (the per-layer loads are summed over exactly the micro-batches each stage processed)."""
    ref_state, ref_m, ref_g = one_device_step4
    state, m, g = _one_step(layout, CFG4, micro)
    for k in ("loss", "balance_loss", "grad_norm", "max_vio"):
        np.testing.assert_allclose(float(m[k]), float(ref_m[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    assert float(m["dropped_tokens"]) == 0.0
    program = program_for(runtime.resolve(mesh=sharding.make_mesh(layout), microbatches=micro, **RUN), CFG4, 16)
    g = program.to_layers({"params": g})["params"]
    for a, b in zip(jax.tree.leaves(ref_g), jax.tree.leaves(g), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(ref_state["biases"]), jax.tree.leaves(state["biases"])):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    for leaf in jax.tree.leaves(state["params"]["moe_layers"]):  # each stage holds its own layers (or 1/S of a
        stored = sum(int(np.prod(s.data.shape)) for s in leaf.addressable_shards) / leaf.sharding.mesh.size
        assert stored <= leaf.size / 2, (leaf.shape, leaf.sharding.spec)  # pooled one), never all of them


def test_bubble_fraction_and_microbatch_errors():
    from dsv3_jax.parallel.pipeline.schedules import bubble_formula, check_microbatches

    assert bubble_formula("gpipe", 4, 16) == pytest.approx(3 / 19)
    assert bubble_formula("gpipe", 16, 32) == pytest.approx(15 / 47)
    assert bubble_formula("gpipe", 1, 8) == 0.0
    check_microbatches(16, 4, 4)
    with pytest.raises(ValueError, match="config.mesh.microbatches=3"):
        check_microbatches(16, 3, 1)
    with pytest.raises(ValueError, match="divisible by data x fsdp x expert = 4"):
        check_microbatches(16, 8, 4)


# ----------------------------------------------------------------------------- expert capacity


@pytest.mark.parametrize("factor", [8.0, 0.5])
def test_capacity_path_in_the_model(factor, one_device_step):
    """expert=8 with a capacity factor: at factor = ep nothing can drop and the step equals the dropless
    one-device step; at 0.5 rows are dropped, counted in the `dropped_tokens` metric, and the loss moves."""
    _, m, g = _one_step(dict(expert=8), CFG, expert_capacity_factor=factor)
    _, ref_m, ref_g = one_device_step
    if factor == 8.0:
        assert float(m["dropped_tokens"]) == 0.0
        np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]), rtol=1e-5)
        for a, b in zip(jax.tree.leaves(ref_g), jax.tree.leaves(g)):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    else:
        rows = 8 * 16 * CFG.num_experts_per_tok  # token-expert rows of the one MoE layer
        assert 0 < float(m["dropped_tokens"]) < rows
        assert float(m["dropped_tokens"]) == int(float(m["dropped_tokens"]))
        assert abs(float(m["loss"]) - float(ref_m["loss"])) > 1e-6


def test_ragged_dispatch_lowers_to_ragged_all_to_all_for_gpu():
    """With the real op (emulate=False) the forward and backward lower for CUDA to ragged_all_to_all
    collectives: 2 exchanges forward (dispatch, combine) and their 2 transposes."""
    x, idx, w, ws = _expert_inputs()
    mesh = sharding.make_mesh(dict(expert=8))
    ep = lambda x, *ws: experts_expert_parallel(x, idx, w, *ws, mesh=mesh, block=4, capacity_factor=0.0,  # noqa
                                                dispatch="ragged", emulate=False)
    f = jax.value_and_grad(lambda x, *ws: (ep(x, *ws)[0] ** 2).sum(), argnums=(0, 1))
    text = jax.jit(f).trace(x, *ws).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("ragged_all_to_all") == 4


def test_ragged_dispatch_in_the_model_matches_one_device(one_device_step):
    _, m, g = _one_step(dict(expert=4, data=2), CFG, expert_dispatch="ragged")
    _, ref_m, ref_g = one_device_step
    np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]), rtol=1e-5)
    assert float(m["dropped_tokens"]) == 0.0
    for a, b in zip(jax.tree.leaves(ref_g), jax.tree.leaves(g)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layout,accum", [(None, 4), (dict(data=2, expert=2), 2)],
                         ids=["1dev-accum4", "data2xexpert2-accum2"])
def test_grad_accumulation_matches_whole_batch(layout, accum, one_device_step):
    """k sequential micro-batches: averaged loss terms and gradients, summed expert loads -> the same update
    and router-bias step as the whole batch at once."""
    ref_state, ref_m, ref_g = one_device_step
    state, m, g = _one_step(layout, CFG, accum=accum)
    for k in ("loss", "mtp_loss", "balance_loss", "grad_norm", "max_vio"):
        np.testing.assert_allclose(float(m[k]), float(ref_m[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(ref_g), jax.tree.leaves(g)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(ref_state["biases"]), jax.tree.leaves(state["biases"])):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


def test_adamw_moments_take_their_parameters_shardings():
    """The optimizer state built by init_state is sharded like the parameters (jit alone replicated the moments on
    every device)."""
    tx = optax.adamw(1e-3)
    mesh = sharding.make_mesh(dict(fsdp=4, expert=2))
    _, state = init_state(CFG, tx, 0, runtime.resolve(mesh=mesh, **RUN))
    params = jax.tree_util.tree_leaves_with_path(state["params"])
    by_path = {jax.tree_util.keystr(p): a.sharding for p, a in params}
    moments = [(jax.tree_util.keystr(p), a) for p, a in jax.tree_util.tree_leaves_with_path(state["opt_state"])
               if a.ndim > 0]
    assert len(moments) == 2 * len(params)  # mu and nu
    for key, a in moments:
        owner = next(k for k in by_path if key.endswith(k))
        assert a.sharding.is_equivalent_to(by_path[owner], a.ndim), key
    assert any(sh.spec != jax.sharding.PartitionSpec() for sh in by_path.values())
