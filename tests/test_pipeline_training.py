"""Training through the scheduled pipeline (parallel/pipeline/), on 8 fake CPU devices: the compiled step's
collectives (HLO), train() on configs/tiny.py with the gpipe tick table over 2 and 4 uneven stages (killed and
resumed in another slot layout) against the one-device run, and checkpoints converted between slot layouts.
(Split from test_pipeline_schedules.py, which checks the schedules and the program's gradients, so that the two
files run on separate test workers.)

References: the one-device run's logged losses and weights; collective groups counted from the compiled HLO text;
`relayout` of a hand-written state."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_pipeline_schedules import ALPHA, CFG, LAM, WINDOW

from dsv3_jax import runtime, sharding
from dsv3_jax.cli import UserError


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
    """train() on configs/tiny.py (1 dense + 3 MoE layers + MTP, shorter windows) for 4 steps: over stage 2 x
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

    def run(name, interrupt_at=None, accum=1, every=2, **mesh):
        c = tiny_config()
        c.train.steps, c.train.seq_len, c.train.log_every, c.train.sample_tokens = 4, 32, 1, 0
        c.train.grad_accum_steps = accum
        c.checkpoint.every_steps, c.checkpoint.async_save = every, False  # (and the last step's, always)
        c.mesh.data = 1
        for k, v in mesh.items():
            c.mesh[k] = v
        return loop.train(c, str(tmp_path / name), quiet=True, interrupt_at=interrupt_at)

    ref = run("one", every=4)  # (the pipelined run also accumulates: 2 sequential halves of each batch,
    #                            2 micro-batches each)
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
    second = run("piped", every=4, stage=4, data=2, pipeline_schedule="gpipe", microbatches=4)  # (4: fewer ticks)
    assert [r["step"] for r in first.history] == [1, 2, 3] and [r["step"] for r in second.history] == [3, 4]
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
