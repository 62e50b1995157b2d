"""A pipeline schedule run as one jitted SPMD program: the train step's loss and gradients over 'stage'.

Shape legend: S stages, v chunks per stage, K = S * v virtual stages, M micro-batches of b rows, T tokens,
D model; k_dense / k_moe slots per chunk.

Layout (`stage_layout.py`): the blocks are split into K contiguous runs (any mix of dense and MoE blocks,
uneven where the counts do not divide); chunk c of stage s holds run c * S + s, in k slots per kind, [S, v, k]
over the stages. A stack's parameters are held in the slot layout (`slot_state.py`): the first r slots of each
chunk resident on their stage ([S, v, r, ...], dim 0 on 'stage'), the layers of the other slots pooled (held
split over 'stage', 1/S per device). At entry each stage borrows its pooled layers whole by one all-to-all over
'stage' (`_stage_slots`); their gradients go back to the holders by its transpose at exit. A slot with no layer
(stages hold different numbers of blocks of a kind) runs masked (its output and gradients discarded), so it
costs no tick time. The embedding runs on virtual stage 0;
the final norm, the head, the MTP modules and the loss on virtual stage K - 1 (their parameters
enter the program whole on every stage -- train.py stores them split over 'stage' too, so this is where they
are gathered, once per step; their gradients are summed over 'stage' once, at the end). The router loads come
out summed over stages in model order ([L, E]: a psum, so nothing of a stage's layers is gathered).

Program. `jax.shard_map` is manual over 'stage' only: inside, data, FSDP, expert and tensor parallelism are
XLA's and expert parallelism's own shard_map as everywhere else. A `lax.scan` runs the ticks of the
schedule's table (`schedules.table`); in tick t stage s reads its row and
  F  (if its row has one) takes micro-batch m's input from its activation slot (virtual stage 0: embeds the
     tokens into it), runs chunk c, and, on the last virtual stage, the head and the loss, whose gradient
     (1/M of d total) it puts in a gradient slot;
  B  (if its row has one) recomputes chunk c's forward from the saved input under `jax.vjp` and pulls the
     output gradient (plus alpha / (MoE layers x M) on each MoE layer's balance loss) back: weight gradients
     are added to the stage's slots, the input gradient is sent back (virtual stage 0: into the embedding);
  then the F output moves to stage s + 1 and the B input gradient to stage s - 1 (`lax.ppermute`; the
  last stage's output goes round to stage 0, the next chunk), into the slots the table names.
A tick where no stage runs an F (or a B) skips that part; a stage idle while others work runs it masked (see
below). A stage keeps only its chunks' inputs between F and B (the B recomputes the chunk's activations),
at most `table.x_slots` of them: 1f1b 2(S - s) - 1, GPipe M.

With dropless routing the loss, the gradients and the router loads equal the unpipelined step's
(tests/test_pipeline_schedules.py): every micro-batch passes every layer once, the loss is the mean over
equal micro-batches, and per-layer loads are summed over them.

Collectives inside a branch. Every stage runs the same ticks, and a `lax.cond` is taken only on a predicate
that is the same on every stage (does any stage run an F, a B, the first or last virtual stage, in this
tick); which stage really runs what is masked with `jnp.where`. A branch taken by some stages only would
leave the collectives XLA places in it (e.g. a collective-permute that reshards within a stage) waiting for
devices that never arrive. A masked op costs no tick time: every stage of a tick waits for the busiest.

In train.py (`step_grads`) the train state itself holds the stacks, and their AdamW moments, in the slot
layout (`slot_state.py`): the program takes them as they are, its gradients come back in that layout, and the
optimizer updates each resident layer where it lives and each pooled layer's pieces where they are held.
Checkpoints record the layout and are converted on restore when the reader's differs.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from dsv3_jax import sharding
from dsv3_jax.data import packing
from dsv3_jax.layer_stats import LayerStats
from dsv3_jax.model import model_tail, moe_only
from dsv3_jax.moe import RouterBias
from dsv3_jax.objective import counted_predictions, prediction_losses, total_loss
from dsv3_jax.parallel.pipeline.schedules import FIELDS, TickTable
from dsv3_jax.parallel.pipeline.slot_state import StackLayout, gather_slots, pool_split_dim, slot_spec, stack_specs
from dsv3_jax.parallel.pipeline.slot_state import stack_from_slots as from_slots  # noqa: F401  (tests read gradients back)
from dsv3_jax.parallel.pipeline.slot_state import stack_to_slots as to_slots
from dsv3_jax.rope import rope_tables

KINDS = ("dense", "moe")


class Ends(nnx.Module):
    """The parts of the model outside the blocks (same parameter paths as in the model): embedding, final
    norm, head and MTP modules."""

    def __init__(self, model):
        self.cfg = model.cfg
        self.embed, self.norm, self.lm_head, self.mtp = model.embed, model.norm, model.lm_head, model.mtp


@dataclasses.dataclass(frozen=True)
class Program:
    """The static part: schedule table, slot maps ([S, v, k] layer index per kind, -1 ghost), options."""

    table: TickTable
    slots: dict  # kind -> StackLayout: the slots [S, v, k] (layer index, -1 none), resident and pooled
    pool_dims: dict  # kind -> tree like one layer's parameters: the pool leaf dim 'stage' splits (-1: whole)
    moe_layers: int  # MoE layers whose balance losses are averaged: the main stack's and the MTP blocks'
    remat: bool = False

    @property
    def index(self) -> dict:
        return {k: lay.index for k, lay in self.slots.items()}

    def __hash__(self):
        return id(self)


def split_model(model):
    """(graphdefs, state): graphdefs {'ends', 'dense', 'moe'}; state {'ends': (params, biases), kind: (params,
    biases) stacked [L, ...]} -- kinds the model has."""
    gds, state = {}, {}
    gds["ends"], *state["ends"] = nnx.split(Ends(model), nnx.Param, RouterBias)
    for kind, stack in (("dense", model.dense_layers), ("moe", model.moe_layers)):
        if stack is not None:
            gds[kind], *state[kind] = nnx.split(stack, nnx.Param, RouterBias)
    state = {k: tuple(v) for k, v in state.items()}
    return gds, state


def plan(model, stages: int, microbatches: int, schedule: str, chunks: int = 1, seq_len: int = 4096,
         stage_layers: str = "", remat: bool = False) -> Program:
    """The Program of `model` over `stages`: layout (balanced over stages x chunks virtual stages, or the
    user's), slot maps and the schedule's tick table."""
    from dsv3_jax.parallel.pipeline import schedules, stage_layout

    layout = stage_layout.plan(model, stages * chunks, seq_len, stage_layers)
    slots = {k: StackLayout(stage_layout.slot_index(layout, stages, k), layout.resident_slots[k])
             for k in KINDS if k in layout.costs.kinds}
    mesh = model.runtime.mesh
    sizes = {a: 1 for a in sharding.MESH_AXES} | (dict(mesh.shape) if mesh is not None else {"stage": stages})
    _, state = split_model(model)
    pool_dims = {}
    for k in slots:
        params = state[k][0]
        specs = stack_specs(slots[k], sharding.pure_specs(params), nnx.to_pure_dict(params), sizes).get("pool")
        pool_dims[k] = None if specs is None else jax.tree.map(lambda sp: _or(pool_split_dim(sp), -1), specs,
                                                               is_leaf=lambda x: isinstance(x, P))
    cfg = model.cfg
    moe_layers = cfg.num_moe_layers + (cfg.num_nextn_predict_layers if cfg.has_moe else 0)
    return Program(schedules.table(schedule, stages, microbatches, chunks), slots, pool_dims, moe_layers, remat)


def place(program: Program, state: dict, mesh) -> tuple:
    """(ends, slots) on `mesh`: the ends as the rules table says (replicated over 'stage'); each stack's
    parameters in the slot layout ({'slots': [S, v, r, ...] on 'stage', 'pool': [P, ...] split over it}, the
    rest as for the stack), its router biases at every slot ([S, v, k, E])."""
    from jax.sharding import NamedSharding

    def put(specs, tree):
        return jax.tree.map(lambda sp, a: jax.device_put(a, NamedSharding(mesh, sp)), specs, tree,
                            is_leaf=lambda x: isinstance(x, P))

    ends = tuple(put(sharding.pure_specs(t), nnx.to_pure_dict(t)) for t in state["ends"])
    sizes = dict(mesh.shape)
    slots = {}
    for k, lay in program.slots.items():
        params, biases = (nnx.to_pure_dict(t) for t in state[k])
        specs = sharding.pure_specs(state[k][0])
        held = put(stack_specs(lay, specs, params, sizes), to_slots(params, lay))
        bspecs = jax.tree.map(slot_spec, sharding.pure_specs(state[k][1]), is_leaf=lambda x: isinstance(x, P))
        slots[k] = (held, put(bspecs, gather_slots(biases, lay.index)))
    return ends, slots


def value_and_grad(program: Program, gds, cfg, ends, slots, window, lam, alpha, *, mesh, indexer=None,
                   documents: bool = False, denominators=None):
    """The scheduled pipeline's step: ((total, terms, moe stats {path: LayerStats in model order}), grads) with
    grads = (d ends params, {kind: d slot params [S, v, k, ...]}).

    ends = (params, biases) of `Ends`; slots = {kind: (params, biases) in slot layout}; window [B, T+1]; indexer:
    sparse attention's (KL weight, dense warm-up?) (`objective.indexer_setting`), the objective's as in `total_loss`;
    documents: the windows carry packing flags (`data/packing.py`): every micro-batch's positions, attention and
    loss follow its documents, as the unpipelined objective's do (`denominators`: the terms' divisors for this whole
    window, as in `objective.prediction_losses`; default its own counts)."""
    tbl = program.table
    S, M, v = tbl.S, tbl.M, tbl.v
    K = S * v
    kinds = [k for k in KINDS if k in slots]
    E = cfg.n_routed_experts
    B, T1 = window.shape
    T, b = T1 - 1, B // M
    rows = {f: jnp.asarray(tbl.arrays[f]) for f in FIELDS}  # [ticks, S]
    a = tbl.arrays
    first = (a["f_chunk"] * S + np.arange(S)) == 0
    last = (a["f_chunk"] * S + np.arange(S)) == K - 1
    first_b = (a["b_chunk"] * S + np.arange(S)) == 0
    any_op = {"f": a["f_valid"].any(1), "b": a["b_valid"].any(1), "first_f": (first & (a["f_valid"] == 1)).any(1),
              "last_f": (last & (a["f_valid"] == 1)).any(1), "first_b": (first_b & (a["b_valid"] == 1)).any(1)}
    any_op = {k: jnp.asarray(v) for k, v in any_op.items()}  # per tick, the same on every stage
    real_all = {k: jnp.asarray(program.index[k] >= 0) for k in kinds}  # [S, v, k]
    warmup = indexer is not None and indexer[1]
    bal_cot = 0.0 if warmup else alpha / (program.moe_layers * M)
    n_blocks = cfg.num_hidden_layers + cfg.num_nextn_predict_layers  # the indexer's KL is a mean over every block
    kl_cot = 0.0 if indexer is None else indexer[0] / (n_blocks * M)

    def body(ends_params, ends_biases, slot_params, slot_biases, window, lam):
        s = jax.lax.axis_index("stage")
        # [v, k, ...]: this stage's chunks, its resident slots and the pooled layers it borrows for the step
        sp, give_back = jax.vjp(lambda held: {k: _stage_slots(program, k, held[k], s) for k in kinds}, slot_params)
        sb = jax.tree.map(lambda a: a[0], slot_biases)
        real = {k: real_all[k][s] for k in kinds}  # [v, k]
        micro = window.reshape(b, M, T1).swapaxes(0, 1)  # micro-batch m = rows m, m + M, ...
        micro = sharding.constrain(micro, (None, "batch", None))
        cos0, sin0 = rope_tables(cfg, jnp.broadcast_to(jnp.arange(T), (b, T)))

        # packed documents: each term of a micro-batch is its sum over the counted predictions divided by the whole
        # batch's count / M, so that the M micro-batches' mean is the batch's mean over its counted predictions
        depth = cfg.num_nextn_predict_layers
        dens = None
        if documents:
            dens = (jnp.stack([m.sum() for m in counted_predictions(window, T, depth)]).astype(jnp.float32)
                    if denominators is None else denominators) / M

        def read(win):  # a micro-batch window -> (tokens [b, T+1], (cos, sin, segment ids of the inputs or None))
            if not documents:
                return win, (cos0, sin0, None)
            tokens, _, seg = packing.split(win)
            return tokens, (*rope_tables(cfg, packing.positions(seg[:, :-1])), seg[:, :-1])

        def gatherable(ep):  # XLA's partitioner cannot split a gather inside a manual subgroup (it aborts): the
            # embedding table, which token lookups gather from, is gathered whole within the stage first
            emb = ep["embed"]["embedding"]
            if hasattr(emb, "get_value"):  # an nnx.State (else a pure dict, as in the train state)
                emb = emb.replace(sharding.constrain(emb.get_value(), (None, None)))
            else:
                emb = sharding.constrain(emb, (None, None))
            return ep | {"embed": ep["embed"] | {"embedding": emb}}

        def first_fn(ep, tokens):
            return nnx.merge(gds["ends"], gatherable(ep), ends_biases).embed(tokens)

        def last_fn(ep, x, win):
            m = nnx.merge(gds["ends"], gatherable(ep), ends_biases)
            tokens, pos = read(win)
            logits, mtp_logits, mtp_stats = model_tail(m, x, tokens[:, :-1], *pos)
            logits = sharding.constrain(logits, ("batch", None, None))  # the loss gathers the target logits
            mtp_logits = [sharding.constrain(lg, ("batch", None, None)) for lg in mtp_logits]
            ce, mtp = prediction_losses(logits, mtp_logits, win, documents, dens)
            zero = jnp.zeros((), jnp.float32)
            bal = sum((st.balance for st in moe_only(cfg, mtp_stats).values()), zero)
            kl = sum((st.indexer_kl for st in mtp_stats.values()), zero)
            terms = {"loss": ce, "mtp_loss": mtp, "balance_loss": bal / program.moe_layers,
                     "indexer_kl": kl / n_blocks}
            return total_loss(terms, lam, alpha, indexer), (ce, mtp, mtp_stats)

        def chunk_fn(p, x, c, pos):  # p: {kind: params [k, ...]} of chunk c -> (y, {kind: LayerStats [k]})
            h, out = x, {}
            for kind in kinds:
                gd, lb = gds[kind], jax.tree.map(lambda a: a[c], sb[kind])

                def layer(h, xs, gd=gd):
                    lp, lbias, r = xs

                    def run(h):
                        return nnx.merge(gd, lp, lbias)(h, *pos)

                    if program.remat:
                        run = jax.checkpoint(run, policy=jax.checkpoint_policies.nothing_saveable)
                    h_new, st = run(h)  # a ghost slot runs too, and is masked: see the module docstring
                    h = jnp.where(r, h_new, h)
                    return sharding.constrain(h, ("batch", None, None)), jax.tree.map(lambda a: jnp.where(r, a, 0), st)

                h, out[kind] = jax.lax.scan(layer, h, (p[kind], lb, real[kind][c]))
            return h, out

        def chunk_params(c):
            return {k: jax.tree.map(lambda a: a[c], sp[k]) for k in kinds}

        x_shape = jax.eval_shape(first_fn, ends_params, read(micro[0])[0][:, :-1])
        zeros_x = jnp.zeros(x_shape.shape, x_shape.dtype)
        mtp_stats0 = jax.eval_shape(lambda ep: last_fn(ep, zeros_x, micro[0])[1][2], ends_params)
        acc0 = {"ce": jnp.zeros((), jnp.float32), "mtp": jnp.zeros((), jnp.float32),
                "mtp_stats": jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), mtp_stats0),
                "stats": {k: LayerStats.zeros(E, real[k].shape) for k in kinds}}
        carry0 = (jnp.zeros((tbl.x_slots,) + x_shape.shape, x_shape.dtype),
                  jnp.zeros((tbl.dy_slots,) + x_shape.shape, x_shape.dtype),
                  jax.tree.map(jnp.zeros_like, sp), jax.tree.map(jnp.zeros_like, ends_params), acc0)

        def masked(ok, new, old):
            return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

        def tick(carry, xs):
            xbuf, dybuf, g_slots, g_ends, acc = carry
            row, anyop = xs
            row = {f: row[f][s] for f in FIELDS}

            def do_f(args):
                xbuf, dybuf, g_ends, acc = args
                ok = row["f_valid"] == 1
                m, c, slot = (jnp.maximum(row[f], 0) for f in ("f_micro", "f_chunk", "f_slot"))
                k = c * S + s
                win = micro[m]
                tokens, pos = read(win)
                x = jax.lax.cond(anyop["first_f"], lambda: first_fn(ends_params, tokens[:, :-1]), lambda: xbuf[slot])
                x = jnp.where(ok & (k == 0), x, xbuf[slot])
                xbuf = xbuf.at[slot].set(jnp.where(ok, x, xbuf[slot]))
                y, st = chunk_fn(chunk_params(c), x, c, pos)
                stats = {kk: jax.tree.map(lambda a, n: a.at[c].add(jnp.where(ok, n, 0)), acc["stats"][kk], st[kk])
                         for kk in kinds}
                acc = acc | {"stats": stats}

                def last(args):
                    dybuf, g_ends, acc = args
                    mine = ok & (k == K - 1)
                    (_, (ce, mtp, mst)), vjp = _vjp_aux(last_fn, ends_params, y, win)
                    dep, dy = vjp(jnp.float32(1.0 / M))
                    dslot = jnp.maximum(row["f_dyslot"], 0)
                    dybuf = dybuf.at[dslot].set(jnp.where(mine, dy.astype(dybuf.dtype), dybuf[dslot]))
                    new = acc | {"ce": acc["ce"] + ce / M, "mtp": acc["mtp"] + mtp / M,
                                 "mtp_stats": jax.tree.map(jnp.add, acc["mtp_stats"], mst)}
                    return dybuf, masked(mine, jax.tree.map(jnp.add, g_ends, dep), g_ends), masked(mine, new, acc)

                dybuf, g_ends, acc = jax.lax.cond(anyop["last_f"], last, lambda a: a, (dybuf, g_ends, acc))
                return xbuf, dybuf, g_ends, acc, jnp.where(ok, y, 0)

            xbuf, dybuf, g_ends, acc, send_f = jax.lax.cond(
                anyop["f"], do_f, lambda a: a + (zeros_x,), (xbuf, dybuf, g_ends, acc))

            def do_b(args):
                g_slots, g_ends = args
                ok = row["b_valid"] == 1
                m, c, xs_, ds_ = (jnp.maximum(row[f], 0) for f in ("b_micro", "b_chunk", "b_xslot", "b_dyslot"))
                k = c * S + s
                x, dy = xbuf[xs_], dybuf[ds_]
                tokens, pos = read(micro[m])
                (_, st), vjp = jax.vjp(lambda p, x: chunk_fn(p, x, c, pos), chunk_params(c), x)
                dst = {kk: LayerStats(counts=jnp.zeros_like(st[kk].counts),
                                      balance=jnp.full_like(st[kk].balance, bal_cot if kk == "moe" else 0.0),
                                      dropped=jnp.zeros_like(st[kk].dropped),
                                      indexer_kl=jnp.full_like(st[kk].indexer_kl, kl_cot),
                                      index_recall=jnp.zeros_like(st[kk].index_recall)) for kk in kinds}
                dp, dx = vjp((dy, dst))
                g_slots = {kk: jax.tree.map(lambda g, d: g.at[c].add(jnp.where(ok, d, 0)), g_slots[kk], dp[kk])
                           for kk in kinds}

                def embed_grad(g_ends):
                    _, vjp_e = jax.vjp(lambda ep: first_fn(ep, tokens[:, :-1]), ends_params)
                    return masked(ok & (k == 0), jax.tree.map(jnp.add, g_ends, vjp_e(dx)[0]), g_ends)

                g_ends = jax.lax.cond(anyop["first_b"], embed_grad, lambda g: g, g_ends)
                return g_slots, g_ends, jnp.where(ok & (k > 0), dx, 0)

            g_slots, g_ends, send_b = jax.lax.cond(anyop["b"], do_b, lambda a: a + (zeros_x,), (g_slots, g_ends))
            fwd = jax.lax.ppermute(send_f, "stage", [(i, (i + 1) % S) for i in range(S)])
            bwd = jax.lax.ppermute(send_b, "stage", [(i, (i - 1) % S) for i in range(S)])

            def store(buf, slot, val):
                i = jnp.maximum(slot, 0)
                return buf.at[i].set(jnp.where(slot >= 0, val.astype(buf.dtype), buf[i]))

            xbuf, dybuf = store(xbuf, row["recv_f"], fwd), store(dybuf, row["recv_b"], bwd)
            return (xbuf, dybuf, g_slots, g_ends, acc), None

        (_, _, g_slots, g_ends, acc), _ = jax.lax.scan(tick, carry0, (rows, any_op))
        g_ends = jax.lax.psum(g_ends, "stage")
        ce, mtp = jax.lax.psum(acc["ce"], "stage"), jax.lax.psum(acc["mtp"], "stage")
        mtp_stats = jax.tree.map(lambda a: jax.lax.psum(a, "stage"), acc["mtp_stats"])
        # the main blocks' indexer terms, summed over their slots (ghost slots hold zeros) and micro-batches
        idx_sums = jax.lax.psum(jnp.stack([sum(acc["stats"][k].indexer_kl.sum() for k in kinds),
                                           sum(acc["stats"][k].index_recall.sum() for k in kinds)]), "stage")
        moe_stats = None
        if "moe" in kinds:  # [v, k] slots -> the MoE layers in model order, summed over stages (a psum of [L, E]
            idx = jnp.asarray(program.index["moe"])[s].reshape(-1)  # loads, not a gather of other stages' slots)
            real_slot = idx >= 0

            def to_layers(a):
                a = a.reshape((-1,) + a.shape[2:])
                a = jnp.where(real_slot.reshape((-1,) + (1,) * (a.ndim - 1)), a, 0)
                return jnp.zeros((cfg.num_moe_layers,) + a.shape[1:], a.dtype).at[jnp.maximum(idx, 0)].add(a)

            moe_stats = jax.tree.map(lambda a: jax.lax.psum(to_layers(a), "stage"), acc["stats"]["moe"])
        g_held = give_back(g_slots)[0]  # resident slots as held; pooled pieces back to their holders
        for k in kinds:  # a pool leaf held whole on every stage: its gradient is what the borrowing stage made
            if "pool" in g_held[k]:
                g_held[k]["pool"] = jax.tree.map(lambda g, d: jax.lax.psum(g, "stage") if d < 0 else g,
                                                 g_held[k]["pool"], program.pool_dims[k])
        return ce, mtp, mtp_stats, moe_stats, idx_sums, g_ends, g_held

    ends_params, ends_biases = ends
    slot_params = {k: slots[k][0] for k in kinds}
    slot_biases = {k: slots[k][1] for k in kinds}
    on_stage = lambda t: jax.tree.map(lambda _: P("stage"), t)  # noqa: E731
    rep = lambda t: jax.tree.map(lambda _: P(), t)  # noqa: E731
    held_specs = {k: _held_specs(program, k, slot_params[k]) for k in kinds}
    fn = jax.shard_map(body, mesh=mesh, axis_names={"stage"}, check_vma=False,
                       in_specs=(rep(ends_params), rep(ends_biases), held_specs, on_stage(slot_biases), P(), P()),
                       out_specs=(P(), P(), P(), P(), P(), P(), held_specs))
    with jax.named_scope("pipeline"):
        ce, mtp, mtp_stats, main_stats, idx_sums, g_ends, g_slots = fn(ends_params, ends_biases, slot_params,
                                                                        slot_biases, window, lam)
    moe_stats = {}
    if "moe" in kinds:
        main = main_stats.per_microbatch(M)
        moe_stats["moe_layers/ffn"] = main
    mtp_stats = {k: st.per_microbatch(M) for k, st in mtp_stats.items()}
    moe_stats |= moe_only(cfg, mtp_stats)
    from dsv3_jax import layer_stats

    terms = {"loss": ce, "mtp_loss": mtp, "balance_loss": layer_stats.mean_balance(moe_stats),
             "dropped_tokens": layer_stats.total_dropped(moe_stats)}
    if cfg.dsa:  # means over every block: the main ones (summed over micro-batches here) and the MTP ones
        n_blocks = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        mtp_kl, mtp_recall = (sum((getattr(st, f) for st in mtp_stats.values()), jnp.zeros((), jnp.float32))
                              for f in ("indexer_kl", "index_recall"))
        terms |= {"indexer_kl": (idx_sums[0] / M + mtp_kl) / n_blocks,
                  "index_recall": (idx_sums[1] / M + mtp_recall) / n_blocks}
    total = total_loss(terms, lam, alpha, indexer)
    return (total, terms, moe_stats), (g_ends, g_slots)


def _or(x, default):
    return default if x is None else x


def _held_specs(program: Program, kind: str, held: dict) -> dict:
    """shard_map specs of a stack's parameters as held: resident slots on 'stage' by dim 0, a pool leaf by the dim
    'stage' splits (`Program.pool_dims`; whole on every stage if none)."""
    out = {}
    if "slots" in held:
        out["slots"] = jax.tree.map(lambda _: P("stage"), held["slots"])
    if "pool" in held:
        out["pool"] = jax.tree.map(lambda a, d: P() if d < 0 else P(*([None] * d), "stage"), held["pool"],
                                   program.pool_dims[kind])
    return out


def _stage_slots(program: Program, kind: str, held: dict, s):
    """Inside the program (manual over 'stage'): this stage's [v, k, ...] slots of a stack from what it holds,
    its resident slots ([1, v, r, ...]) followed by the pooled layers its other slots run, brought whole from
    the 1/S pieces every stage holds by one all-to-all over 'stage' (zeros in a slot with no layer: it runs
    masked). Its transpose (jax.vjp) returns each pooled layer's gradient pieces to their holders."""
    lay = program.slots[kind]
    parts = []
    if "slots" in held:
        parts.append(jax.tree.map(lambda a: a[0], held["slots"]))
    if "pool" in held:
        borrow = jnp.asarray(lay.borrow)  # [S, v, u]: pool position per (stage, chunk, slot), -1 none
        S = borrow.shape[0]

        def bring(a, d):  # a: the local pool leaf [P, ...], split over 'stage' on dim d (-1: whole)
            if d < 0:
                mine = borrow[s]
                got = a[jnp.maximum(mine, 0)]
                return jnp.where((mine >= 0).reshape(mine.shape + (1,) * (a.ndim - 1)), got, 0)
            send = a[jnp.maximum(borrow, 0)]  # [S (to), v, u, ...]: my piece of each stage's borrowed layers
            send = jnp.where((borrow >= 0).reshape(borrow.shape + (1,) * (a.ndim - 1)), send, 0)
            got = jax.lax.all_to_all(send, "stage", 0, 0, tiled=False)  # [S (from), v, u, ...]
            got = jnp.moveaxis(got, 0, 1 + d)  # the layer dim d (now at 2 + d) preceded by the pieces' source
            return got.reshape(got.shape[:1 + d] + (S * got.shape[2 + d],) + got.shape[3 + d:])

        parts.append(jax.tree.map(bring, held["pool"], program.pool_dims[kind]))
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *parts)


def _vjp_aux(last_fn, ends_params, y, win):
    """jax.vjp of last_fn(ends_params, y, win) with its aux: ((loss, aux), vjp)."""
    loss, vjp, aux = jax.vjp(lambda ep, y: last_fn(ep, y, win), ends_params, y, has_aux=True)
    return (loss, aux), vjp


# ---------------------------------------------------------------------------------------------- train step
ENDS = ("embed", "norm", "lm_head", "mtp")  # the parameter paths of `Ends`


def step_grads(program: Program, gds, cfg, params: dict, biases: dict, window, lam, alpha, *, mesh, indexer=None,
               documents: bool = False, denominators=None):
    """`value_and_grad` on the train state's pure dicts: ((total, (terms, moe stats)), grads shaped like params),
    the form `step.make_train_step` takes from `jax.value_and_grad`. `params` hold the stacks in the slot
    layout (`slot_state.py`), so they go to the program as they are and their gradients come back in it;
    the router biases ([L, E], replicated) are put into slots here."""
    ends = ({k: params[k] for k in ENDS if k in params}, {k: biases[k] for k in ENDS if k in biases})
    slots = {kind: (params[f"{kind}_layers"], gather_slots(biases.get(f"{kind}_layers", {}), program.index[kind]))
             for kind in program.slots}
    (total, terms, stats), (g_ends, g_slots) = value_and_grad(program, gds, cfg, ends, slots, window, lam, alpha,
                                                               mesh=mesh, indexer=indexer, documents=documents,
                                                               denominators=denominators)
    grads = dict(g_ends) | {f"{kind}_layers": g for kind, g in g_slots.items()}
    return (total, (terms, stats)), grads


def check_config(model_cfg, stages: int, microbatches: int, schedule: str, chunks: int, stage_layers: str,
                 seq_len: int) -> None:
    """The layout and the schedule's table from the abstract model, so a bad split or schedule fails (with
    ConfigError) before anything is built or written."""
    from dsv3_jax.model import DeepSeekV3

    model = nnx.eval_shape(lambda: DeepSeekV3(model_cfg, rngs=nnx.Rngs(0)))
    plan(model, stages, microbatches, schedule, chunks, seq_len, stage_layers)


def for_training(model_cfg, rt, seq_len: int):
    """(program, graphdefs) of a train step under `rt`'s scheduled pipeline, from the abstract model."""
    from dsv3_jax.model import DeepSeekV3

    model = nnx.eval_shape(lambda: DeepSeekV3(model_cfg, rngs=nnx.Rngs(0), runtime=rt))
    program = plan(model, rt.stages, rt.microbatches, rt.pipeline_schedule, rt.pipeline_chunks, seq_len,
                   rt.pipeline_stage_layers, rt.remat)
    gds, _ = split_model(model)
    return program, gds
