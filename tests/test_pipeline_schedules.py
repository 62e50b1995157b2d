"""Pipeline schedules (parallel/pipeline/schedules.py), stage layouts (stage_layout.py) and the scheduled pipeline
run as one SPMD program (executor.py), every schedule (gpipe included) a tick table of it, on 8 fake CPU devices.

References: the closed-form bubbles and hand-drawn tick diagrams; a brute-force search over all contiguous splits;
hand-counted ghost slots; the unpipelined one-device step (jax.value_and_grad of `objective.model_losses`) for loss,
gradients and router loads."""
import dataclasses
import itertools
import re

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


CASES = [(dict(stage=2, expert=2, data=2), 4), (dict(stage=4, data=2), 4), (dict(stage=2, fsdp=2, tensor=2), 4)]


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "interleaved"])
@pytest.mark.parametrize("layout,M", CASES, ids=lambda v: "x".join(f"{k}{s}" for k, s in v.items())
                         if isinstance(v, dict) else f"m{v}")
def test_scheduled_pipeline_matches_one_device(layout, M, name, one_device, monkeypatch):
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
    got = _scheduled(layout, name, M, 2 if name == "interleaved" else 1, remat)
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


def _all_gathers(text):
    """(result elements, device groups) of every all-gather in compiled HLO text (groups explicit {{..}}, iota
    [G,N]<=[dims]T(perm) or mesh['a'=2,'b'=4] {'a'}); an all-gather whose groups are in none of these fails."""
    out = []
    for line in text.splitlines():
        if " all-gather(" not in line and " all-gather-start(" not in line:
            continue
        shape = re.search(r"= \(?[a-z0-9]+\[([\d,]*)\]", line)
        size = int(np.prod([int(x) for x in shape.group(1).split(",") if x])) if shape else 0
        m = re.search(r"replica_groups=\{(\{[^=]*?\})\}", line)
        if m:
            out.append((size, [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([0-9,]*)\}", m.group(1))]))
            continue
        m = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line)  # mesh['a'=2,'b'=4] {'a'}
        if m:
            names = re.findall(r"'(\w+)'=(\d+)", m.group(1))
            grouped = re.findall(r"'(\w+)'", m.group(2))
            ids = np.arange(int(np.prod([int(n) for _, n in names]))).reshape([int(n) for _, n in names])
            order = [i for i, (a, _) in enumerate(names) if a not in grouped] + [
                i for i, (a, _) in enumerate(names) if a in grouped]
            size_g = int(np.prod([int(n) for a, n in names if a in grouped]))
            out.append((size, ids.transpose(order).reshape(-1, size_g).tolist()))
            continue
        m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
        if m:
            dims = [int(x) for x in m.group(3).split(",")]
            ids = np.arange(int(np.prod(dims))).reshape(dims)
            if m.group(4):
                ids = ids.transpose([int(x) for x in m.group(4).split(",")])
            out.append((size, ids.reshape(int(m.group(1)), int(m.group(2))).tolist()))
            continue
        raise AssertionError(f"unparsed all-gather: {line[:300]}")
    return out


def test_lowered_step_permutes_between_stages_and_gathers_no_other_stages_layers():
    """train.py's compiled 1f1b step (state in the slot layout, AdamW update included) on stage 2 x fsdp 2 x
    tensor 2 moves activations with collective-permutes and brings its pooled layer (the dense one) to stage 0
    with an all-to-all. With the embedding, head and MTP held replicated, every
    all-gather (FSDP's weight gathers) stays inside one stage's devices: no stage ever receives another stage's
    layers, in the program or the optimizer update. As train.py holds them (split over 'stage' too), the
    gathers that cross stages bring in no more than those parameters, once."""
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from dsv3_jax.programs import program_for
    from dsv3_jax.train.loop import init_state
    from dsv3_jax.train.step import make_train_step

    mesh = sharding.make_mesh(dict(stage=2, fsdp=2, tensor=2))
    rt = runtime.resolve(mesh=mesh, moe_block_size=8, microbatches=4, pipeline_schedule="1f1b")
    program = program_for(rt, CFG, WINDOW.shape[1] - 1)
    tx = optax.adamw(1e-3)
    graphdef, state = init_state(CFG, tx, 0, rt, program)
    window = sharding.put_global_batch(WINDOW, sharding.batch_sharding(mesh))
    stage_of = {int(d.id): s for s in range(2) for d in np.asarray(mesh.devices).take(s, axis=1).reshape(-1)}
    stacks = ("dense_layers", "moe_layers")

    def unsplit(path, x):  # the parameters outside the stacks (and their moments) back to replicated over 'stage'
        if any(getattr(k, "key", None) in stacks for k in path) or not isinstance(x.sharding, NamedSharding):
            return x
        spec = [(tuple(a for a in ax if a != "stage") or None) if isinstance(ax, tuple) else
                (None if ax == "stage" else ax) for ax in x.sharding.spec]
        return jax.device_put(x, NamedSharding(mesh, P(*spec)))

    ends_local = 0  # elements of the ends a device holds once gathered over 'stage'
    for path, x in jax.tree_util.tree_leaves_with_path(state["params"]):
        if not any(getattr(k, "key", None) in stacks for k in path):
            ends_local += int(np.prod(unsplit(path, x).sharding.shard_shape(x.shape)))
    for split in (False, True):
        st = state if split else jax.tree_util.tree_map_with_path(unsplit, state)
        step = make_train_step(graphdef, tx, lambda s: 1e-3, mesh, jax.tree.map(lambda x: x.sharding, st),
                               program=program)
        text = step.lower(st, window, jnp.float32(LAM), jnp.float32(ALPHA), jnp.float32(1e-3)).compile().as_text()
        assert "collective-permute" in text
        assert " all-to-all(" in text or " all-to-all-start(" in text  # the pooled dense layer, borrowed by stage 0
        gathers = _all_gathers(text)
        assert gathers, "FSDP should all-gather weights within a stage"
        across = sum(size for size, groups in gathers for g in groups[:1] if len({stage_of[d] for d in g}) > 1)
        if split:
            assert 0 < across <= ends_local, (across, ends_local)
        else:
            assert across == 0


def test_tiny_config_trains_with_gpipe_over_2_and_4_stages_and_logs_the_one_device_losses(tmp_path):
    """train() on configs/tiny.py (1 dense + 3 MoE layers + MTP, shorter windows) for 5 steps: over stage 2 x
    expert 2 x data 2 with the gpipe schedule (uneven stages: the 4 layers, then the head and MTP; the tick table
    of the one scheduled program, like 1f1b and interleaved above) and gradient accumulation over 2 halves of each
    batch, the logged losses, MaxVio and the final evaluation are the one-device run's. The state is held in the
    slot layout (each stage's layers only) and its checkpoints record it: the run, killed after step 3 (checkpoint
    of step 2), resumes over stage 4 x data 2 (gpipe again: another uneven split and slot layout, converted on
    restore) and still logs the one-device losses; infer.py's reader gets the one-device weights back in the layer
    layout."""
    from test_train import tiny_config

    from dsv3_jax.infer.load import load_trained
    from dsv3_jax.train import loop

    def run(name, interrupt_at=None, accum=1, **mesh):
        c = tiny_config()
        c.train.steps, c.train.seq_len, c.train.log_every, c.train.sample_tokens = 5, 32, 1, 0
        c.train.grad_accum_steps = accum
        c.checkpoint.every_steps, c.checkpoint.async_save = 2, False
        c.mesh.data = 1
        for k, v in mesh.items():
            c.mesh[k] = v
        return loop.train(c, str(tmp_path / name), quiet=True, interrupt_at=interrupt_at)

    ref = run("one")  # (the pipelined run also accumulates: 2 sequential halves of each batch, 2 micro-batches each)
    first = run("piped", interrupt_at=3, accum=2, stage=2, expert=2, data=2, pipeline_schedule="gpipe", microbatches=2)
    lay = first.program.layout["moe"]  # at 32 tokens the head and MTP cost what the 4 layers do: stage 1 holds
    assert lay.index.tolist() == [[[0, 1, 2]], [[-1, -1, -1]]], lay.index.tolist()  # only them, so all 3 are pooled
    assert lay.resident == 0 and lay.pooled.tolist() == [0, 1, 2]
    held = [a for path, a in jax.tree_util.tree_leaves_with_path((first.state["params"], first.state["opt_state"]))
            if "moe_layers" in jax.tree_util.keystr(path)]  # the parameters and their AdamW moments
    assert len(held) > 20
    for leaf in held:  # each device stores half of every pooled layer (stage s: one contiguous half of a dim)
        spec = tuple(leaf.sharding.spec)
        assert leaf.shape[0] == 3 and any(ax == "stage" or (isinstance(ax, tuple) and ax[0] == "stage")
                                          for ax in spec[1:]), (leaf.shape, spec)
        stored = sum(int(np.prod(s.data.shape)) for s in leaf.addressable_shards) / 8
        assert stored == leaf.size / (2 * np.prod([2 for ax in spec if ax == "expert" or (
            isinstance(ax, tuple) and "expert" in ax)])), (leaf.shape, spec)
    second = run("piped", stage=4, data=2, pipeline_schedule="gpipe", microbatches=4)  # (4: fewer ticks to trace)
    assert [r["step"] for r in first.history] == [1, 2, 3] and [r["step"] for r in second.history] == [3, 4, 5]
    got = first.history[:2] + second.history
    for a, b in zip(ref.history, got, strict=True):
        for k in ("loss", "mtp_loss", "max_vio", "val_loss"):
            if k in a:
                np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=f"step {a['step']} {k}")
    assert second.program.layout["moe"].index.tolist() != lay.index.tolist()  # another slot layout
    final = second.program.to_layers(second.state)
    model, *_ = load_trained(str(tmp_path / "piped"))
    for name, tree in (("trained state", final["params"]), ("infer.py's reader", nnx.to_pure_dict(
            nnx.state(model, nnx.Param)))):
        pairs = zip(jax.tree_util.tree_leaves_with_path(ref.state["params"]), jax.tree.leaves(tree), strict=True)
        for (path, a), b in pairs:
            # (Adam divides by sqrt(v): where a gradient is ~0 (embedding rows of unseen tokens), rounding moves
            # an element by up to the learning rate; a layer in the wrong place is off by the weights' scale)
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=5e-4,
                                       err_msg=f"{name} {jax.tree_util.keystr(path)}")


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


def test_checkpoints_convert_between_slot_layouts(tmp_path):
    """A state saved in one slot layout restores, converted, into another (resident + pooled -> all pooled, ->
    padded resident), into the layer layout (resume without a pipeline, infer.py), and a layer-layout checkpoint
    (the converter's) into a slot layout: every leaf exactly where `relayout` puts it. The first slot layout's
    checkpoints fail in one line."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from dsv3_jax.io.checkpoint import Checkpointer
    from dsv3_jax.parallel.pipeline import slot_state
    from dsv3_jax.parallel.pipeline.slot_state import StackLayout

    mesh = sharding.make_mesh(dict(stage=2, expert=2, data=2))
    sizes = dict(mesh.shape)
    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    params = {"moe_layers": {"ffn": {"w_gate": normal(5, 4, 8, 6)}, "norm": {"scale": normal(5, 8)}},
              "embed": {"embedding": normal(16, 8)}}
    pspecs = {"moe_layers": {"ffn": {"w_gate": P(None, "expert")}, "norm": {"scale": P()}},
              "embed": {"embedding": P()}}
    state = {"params": params, "opt_state": ({"mu": jax.tree.map(lambda a: 2 * a, params)},),
             "biases": {"moe_layers": {"bias": normal(5, 4)}}, "step": np.int32(7)}
    layouts = {"A": {"moe": StackLayout(np.array([[[0, 1, 2]], [[3, 4, -1]]]), 2)},  # 2 resident, layer 2 pooled
               "B": {"moe": StackLayout(np.array([[[0, 1, 2, 3, 4]], [[-1] * 5]]), 0)},  # all pooled
               "C": {"moe": StackLayout(np.array([[[0, 1, 2]], [[3, 4, -1]]]), 3)},  # all resident, one padded
               None: None}

    def held(name):  # the state in layout `name`, placed as train.py would
        lay = layouts[name]
        st = slot_state.relayout(state, None, lay)
        specs = pspecs if lay is None else slot_state.slot_specs(
            {"params": pspecs, "biases": {"moe_layers": {"bias": P()}}},
            {"params": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params), "biases": None}, sizes,
            lay)["params"]
        put = lambda sp, a: jax.device_put(a, NamedSharding(mesh, sp))  # noqa: E731
        is_spec = lambda x: isinstance(x, P)  # noqa: E731
        return st | {"params": jax.tree.map(put, specs, st["params"], is_leaf=is_spec),
                     "opt_state": ({"mu": jax.tree.map(put, specs, st["opt_state"][0]["mu"], is_leaf=is_spec)},),
                     "biases": jax.tree.map(lambda a: put(P(), a), st["biases"]), "step": put(P(), st["step"])}

    abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),  # noqa
                                         tree)
    assert held("A")["params"]["moe_layers"]["pool"]["ffn"]["w_gate"].sharding.spec[2] == "stage"

    def check(got, want):
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=jax.tree_util.keystr(path))

    with Checkpointer(tmp_path / "a", async_save=False) as ck:
        ck.save(1, held("A"), slot_state.save_meta(layouts["A"]), force=True)
        for name in ("B", "C", None, "A"):
            target = slot_state.restore_target(abstract(held(name)), layouts[name], ck.restore_meta()[1])
            check(ck.restore(target)[1], slot_state.relayout(state, None, layouts[name]))
    with Checkpointer(tmp_path / "conv", async_save=False) as ck:  # the converter's weights, layer layout
        ck.save(0, {k: held(None)[k] for k in ("params", "biases")}, {"format": "dsv3_jax.params"}, force=True)
        want = {k: held("A")[k] for k in ("params", "biases")}
        got = ck.restore(slot_state.restore_target(abstract(want), layouts["A"], ck.restore_meta()[1]))[1]
        check(got, want)
    with pytest.raises(UserError, match="first pipeline slot layout"):
        slot_state.restore_target(abstract(held("A")), layouts["A"], {"pipeline_slots": {"moe": [[[0]]]}})
