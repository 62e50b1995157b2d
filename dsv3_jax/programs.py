"""The training program a Runtime asks for: where a train step's loss and gradients come from, and the layout
of the train state they work on.

    program_for(rt, cfg, seq_len)   Plain       `jax.value_and_grad` of the whole model; the state in the layer
                                                layout (every stack [L, ...], as the model holds it)
                                    Pipelined   the scheduled pipeline over the mesh axis 'stage' (`parallel/pipeline/`,
                                                any schedule: gpipe, 1f1b, interleaved); the state in its slot layout

A program owns everything about the state that depends on it, so the train loop, the step, the dry-run planner,
infer.py's loader and the checkpointer never ask which one runs:

    layout                      None (the layer layout) or {kind: StackLayout} (`slot_state.py`)
    state_specs(specs, shapes, sizes)   PartitionSpecs of the state's params/biases in the program's layout
    to_layout(state)            the layer layout -> the program's (what `train.init_state` builds from)
    to_layers(state)            the program's layout -> the layer layout (the post-training sample, exports)
    value_and_grad(...)         ((total, (terms, moe stats)), grads) of one window, grads in the program's layout
    save_meta() / restore_target(abstract, meta)   the checkpoint meta entry of the layout, and a restore target
                                that reads whichever layout a checkpoint was written in and converts to this one

The plain program's loss is `objective.model_losses` of the merged model; the pipelined program runs the
schedule's tick table (`executor.py`), which computes the same loss and gradients (tests/test_pipeline_schedules.py).
"""
from __future__ import annotations

import dataclasses

import jax

from dsv3_jax.cli import UserError
from dsv3_jax.objective import counted_predictions, indexer_setting, model_losses, total_loss
from dsv3_jax.parallel.pipeline import slot_state
from dsv3_jax.param_kinds import cast_for_compute, freeze_fp8


@dataclasses.dataclass(frozen=True, eq=False)
class Plain:
    """`jax.value_and_grad` of the model, the state in the layer layout. `compute_dtype`: the weights used in it
    are cast to it before the model runs (`param_kinds.cast_for_compute`; None: not, as under FP8 training, whose
    GEMMs quantise the float32 masters)."""

    layout = None
    compute_dtype: object = None
    indexer: tuple | None = None  # sparse attention: (KL weight, dense warm-up?), `objective.indexer_setting`
    documents: bool = False  # the windows carry packing flags (`data/packing.py`: loss masks, document boundaries)
    mtp_depth: int = 0  # (with documents: the prediction terms counted per window, `prediction_counts`)

    def _params(self, params):
        params = freeze_fp8(params)  # (a frozen FP8 base: no gradient asked of it)
        return params if self.compute_dtype is None else cast_for_compute(params, self.compute_dtype)

    def state_specs(self, specs: dict, shapes: dict, sizes: dict) -> dict:
        return specs

    def to_layout(self, state: dict) -> dict:
        return state

    def to_layers(self, state: dict) -> dict:
        return state

    def prediction_counts(self, window):
        """[depth + 1] float32: a flagged window's counted predictions per term (`objective.counted_predictions`)."""
        T = window.shape[1] - 1
        return jax.numpy.stack([m.sum() for m in counted_predictions(window, T, self.mtp_depth)]).astype("float32")

    def value_and_grad(self, graphdef, params, biases, window, lam, alpha, *, mesh=None, denominators=None,
                       dropout_key=None):
        """`denominators` (packed documents under gradient accumulation): each term's divisor instead of this
        window's own count, so that the mean over the step's windows is the step's mean (`make_train_step`);
        `dropout_key`: LoRA adapter dropout's key for this window (`lora.set_dropout_keys`)."""
        def objective(params):
            terms, stats = model_losses(graphdef, self._params(params), biases, window, self.documents, denominators,
                                        dropout_key)
            return total_loss(terms, lam, alpha, self.indexer), (terms, stats)

        return jax.value_and_grad(objective, has_aux=True)(params)

    def loss(self, graphdef, params, biases, window, *, mesh=None):
        return model_losses(graphdef, self._params(params), biases, window, self.documents)[0]["loss"]

    def save_meta(self) -> dict:
        return slot_state.save_meta(self.layout)

    def restore_target(self, abstract: dict, meta: dict):
        """Read a checkpoint in any layout (a pipelined run's slots included) as this program's."""
        return slot_state.restore_target(abstract, self.layout, meta)

    def describe(self, rt) -> str | None:
        return None


@dataclasses.dataclass(frozen=True, eq=False)
class Pipelined(Plain):
    """The scheduled pipeline (`parallel/pipeline/executor.py`): its `Program` (tick table, slot layout) and the
    graphdefs of the model's parts, built from the abstract model."""

    program: object = None  # executor.Program
    graphdefs: dict = None
    cfg: object = None  # ModelConfig

    @property
    def layout(self) -> dict:
        return self.program.slots

    def state_specs(self, specs: dict, shapes: dict, sizes: dict) -> dict:
        return slot_state.slot_specs(specs, shapes, sizes, self.layout)

    def to_layout(self, state: dict) -> dict:
        return slot_state.to_slots(state, self.layout)

    def to_layers(self, state: dict) -> dict:
        return slot_state.to_layers(state, self.layout)

    def value_and_grad(self, graphdef, params, biases, window, lam, alpha, *, mesh=None, denominators=None,
                       dropout_key=None):
        from dsv3_jax.parallel.pipeline import executor

        if dropout_key is not None:  # (refused with the config: `runtime.from_config`)
            raise UserError("LoRA adapter dropout does not run in the pipelined program; set config.lora.dropout=0")
        return executor.step_grads(self.program, self.graphdefs, self.cfg, params, biases, window, lam, alpha,
                                   mesh=mesh, indexer=self.indexer, documents=self.documents,
                                   denominators=denominators)

    def loss(self, graphdef, params, biases, window, *, mesh=None):
        """The main loss, from the program (its gradients are dropped: evaluation is rare)."""
        zero = jax.numpy.float32(0.0)
        (_, (terms, _)), _ = self.value_and_grad(graphdef, params, biases, window, zero, zero, mesh=mesh)
        return terms["loss"]

    def describe(self, rt) -> str:
        t = self.program.table
        return (f"pipeline: {rt.pipeline_schedule}, {rt.stages} stages x {rt.microbatches} micro-batches, bubble "
                f"fraction {t.bubble:.1%} (counted from its {t.ticks}-tick schedule)")


def program_for(rt, model_cfg, seq_len: int, documents: bool = False) -> Plain:
    """The program of a train step under `rt`: the scheduled pipeline when its mesh has more than one stage.
    `documents`: the windows carry packing flags (chat data, `config.data.document_mask`)."""
    indexer = indexer_setting(rt, model_cfg)
    if rt.stages <= 1:
        return Plain(compute_dtype=None if rt.fp8 else model_cfg.compute_dtype, indexer=indexer, documents=documents,
                     mtp_depth=model_cfg.num_nextn_predict_layers)
    from dsv3_jax.parallel.pipeline import executor

    prog, gds = executor.for_training(model_cfg, rt, seq_len)
    return Pipelined(program=prog, graphdefs=gds, cfg=model_cfg, indexer=indexer, documents=documents,
                     mtp_depth=model_cfg.num_nextn_predict_layers)
