"""The training loop: config -> data -> model -> jitted steps -> metrics and checkpoints -> sample.

    python train.py --config configs/tiny.py --workdir DIR [--config.train.steps=N ...]

What happens, in order (all config errors are raised before anything is compiled):
  1. validate the config (ModelConfig + training sections), build corpus, tokenizer and loader;
  2. build the model and optimizer, or restore both (with router biases, loader position, step and
     skip counter) from the latest checkpoint in WORKDIR/checkpoints;
  3. per step: a window batch from the loader, lambda/gamma from their schedules, one jitted step
     (donated state); every `log_every` steps a metrics record (console, TensorBoard, metrics.jsonl),
     every `eval_every` steps the validation loss, every `checkpoint.every_steps` an async checkpoint;
  4. at the end: final checkpoint and a greedy sample of generated text.
Resuming re-runs the same command; metrics.jsonl records after the restored step are dropped first,
so the file always describes one uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsv3_jax import distributed, param_kinds, runtime, sharding
from dsv3_jax.cli import ConfigError, UserError
from dsv3_jax.config import ModelConfig
from dsv3_jax.data import build as data_lib
from dsv3_jax.data import packing
from dsv3_jax.data.bpe import EOS_ID
from dsv3_jax.data.loader import val_batches
from dsv3_jax.io import tokenizer as tokenizer_io
from dsv3_jax.io.checkpoint import Checkpointer
from dsv3_jax.model import DeepSeekV3, split_model, with_runtime
from dsv3_jax.moe import RouterBias
from dsv3_jax.parallel.pipeline.schedules import check_microbatches
from dsv3_jax.programs import Plain, program_for
from dsv3_jax.runtime import Runtime
from dsv3_jax.train import evaluation, init_from
from dsv3_jax.train.hyperparams import check_hyperparameters
from dsv3_jax.train.metrics import MetricsWriter
from dsv3_jax.train.optim import batch_size_at, make_optimizer
from dsv3_jax.train.step import make_eval_step, make_train_step


@dataclasses.dataclass
class TrainResult:
    state: dict
    graphdef: object
    tokenizer: object
    history: list  # metrics records written during this call
    sample: str
    program: Plain = Plain()  # the train program, owner of the state's layout (`program.to_layers` undoes it)


def validate_train_config(config, num_devices: int | None = None) -> ModelConfig:
    """Check every section before any work; raise ConfigError naming the key and the fix. The mesh is checked
    against `num_devices` (default: this process's `jax.device_count()`; a TPU topology's when compiling ahead
    of time)."""
    try:
        model_cfg = ModelConfig.from_dict(config.model)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model: {e}") from None
    runtime.from_config(config)  # the run keys (model.moe_impl, mesh.microbatches, fp8.*, ...), before any work
    if config.model.get("dsa") and not model_cfg.dsa:
        raise ConfigError("config.model.dsa sets a sparse-attention training stage, but the model has no indexer "
                          "(model.index_topk=0); set model.index_topk > 0 (a V3.2 config) or remove model.dsa.",
                          key="model.dsa")
    check_hyperparameters(config)
    t = config.train
    if t.seq_len > model_cfg.max_position_embeddings:
        raise ConfigError(f"config.train.seq_len={t.seq_len} exceeds model.max_position_embeddings="
                          f"{model_cfg.max_position_embeddings}; shorten the sequences or raise the limit.")
    try:
        sizes = sharding.mesh_sizes(config.mesh.to_dict(), num_devices or jax.device_count())
        # the pipeline's stage layout splits any layer mix (checked below)
        sharding.validate_mesh(sizes, model_cfg, t.batch_size, allow_uneven_stages=True)
        if t.batch_size_start > 0:
            sharding.validate_mesh(sizes, model_cfg, t.batch_size_start, allow_uneven_stages=True)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    accum = t.get("grad_accum_steps", 1)
    shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    for b in (t.batch_size, t.batch_size_start):
        if b <= 0:
            continue
        if accum < 1 or b % (accum * shards):
            raise ConfigError(f"config.train.grad_accum_steps={accum}: the batch of {b} sequences must split into "
                              f"that many micro-batches, each divisible by data x fsdp x expert = {shards}.")
        if sizes["stage"] > 1:
            try:
                check_microbatches(b // accum, microbatches(config, sizes["stage"]), shards)
            except ValueError as e:
                raise ConfigError(str(e)) from None
    if sizes["stage"] > 1:
        from dsv3_jax.parallel.pipeline import executor

        m = config.mesh
        executor.check_config(model_cfg, sizes["stage"], microbatches(config, sizes["stage"]),
                              m.get("pipeline_schedule", "gpipe"), m.get("pipeline_chunks", 1),
                              m.get("pipeline_stage_layers", ""), t.seq_len)
    init_from.check(config.get("init_from", ""))
    if config.data.path and not os.path.exists(config.data.path):
        raise ConfigError(f"config.data.path={config.data.path!r} does not exist; point it at a text/JSONL "
                          f"file or directory, or set it to '' for the embedded corpus.")
    if config.data.tokenizer_path and not os.path.isfile(config.data.tokenizer_path):
        raise ConfigError(f"config.data.tokenizer_path={config.data.tokenizer_path!r} is not a file; point it at a "
                          f"tokenizer.json, or set it to '' to train one on the corpus.")
    return model_cfg


def microbatches(config, stages: int | None = None) -> int:
    """Pipeline micro-batches per step (config.mesh.microbatches; 0: twice the number of stages, as resolved
    from the mesh when `stages` is given, since config.mesh.stage may be -1)."""
    return config.mesh.get("microbatches", 0) or runtime.default_microbatches(
        config.mesh.stage if stages is None else stages)


def make_schedules(config, mesh_sizes=None):
    t = config.train
    warmup = min(t.warmup_steps, t.steps)  # a short run keeps the schedule's shape
    after_warmup = t.steps - warmup
    constant = int(after_warmup * t.constant_fraction)
    tx, schedule = make_optimizer(peak_lr=t.peak_lr, warmup_steps=warmup, constant_steps=constant,
                                  decay_steps=max(after_warmup - constant, 1), final_ratio=t.final_lr_ratio,
                                  b1=t.b1, b2=t.b2, eps=t.get("eps", 1e-8), weight_decay=t.weight_decay,
                                  clip_norm=t.clip_norm, trainable=trainable_filter(config))

    def lam(step):
        m = config.mtp
        return m.loss_weight_after if 0 <= m.switch_step <= step else m.loss_weight

    def gamma(step):  # (DSA's dense warm-up and LoRA train only some weights: the router biases stay as they are)
        stop = config.moe.bias_update_stop_step
        frozen = trainable_filter(config) is not None
        return 0.0 if 0 <= stop <= step or frozen else config.moe.bias_update_rate

    def batch(step):
        start = t.batch_size_start if t.batch_size_start > 0 else t.batch_size
        shards = 1 if mesh_sizes is None else mesh_sizes["data"] * mesh_sizes["fsdp"] * mesh_sizes["expert"]
        if mesh_sizes is not None and mesh_sizes["stage"] > 1:  # whole micro-batches per data shard
            shards *= microbatches(config, mesh_sizes["stage"])
        shards *= t.get("grad_accum_steps", 1)
        return batch_size_at(step, start, t.batch_size, t.batch_ramp_steps, multiple_of=shards)

    return tx, schedule, lam, gamma, batch


def trainable_filter(config):
    """Which parameters train (`path -> bool` for `make_optimizer`; None: all): a LoRA run its adapters only
    (`config.lora`), DSA's dense warm-up the indexers only."""
    from dsv3_jax import lora

    if lora.from_config(config.get("lora")) is not None:
        if dsa_warmup(config):
            raise ConfigError("config.lora and config.model.dsa.stage=dense_warmup each choose what trains; use one "
                              "of them.", key="lora")
        return lora.is_adapter
    return param_kinds.in_indexer if dsa_warmup(config) else None


def dsa_warmup(config) -> bool:
    """The run is DeepSeek Sparse Attention's dense warm-up (`config.model.dsa.stage`): only the indexer trains."""
    return (config.model.get("dsa") or {}).get("stage", "sparse") == "dense_warmup"


def check_writable(workdir: str) -> None:
    """Create `workdir` and check a file can be written there (UserError naming it if not)."""
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"--workdir {workdir}: cannot write there ({e.strerror or e}); choose a writable "
                        f"directory") from None


def schedule_change(saved_config_json: str | None, config, step: int) -> str | None:
    """A line saying how the learning rate at `step` changed when the resumed run's schedule keys differ
    from the saved run's (e.g. train.steps raised on a finished run stretches the cosine), else None."""
    if not saved_config_json:
        return None
    import ml_collections

    saved = ml_collections.ConfigDict(json.loads(saved_config_json))
    keys = ("steps", "peak_lr", "warmup_steps", "constant_fraction", "final_lr_ratio")
    changed = [f"train.{k} {saved.train[k]} -> {config.train[k]}" for k in keys
               if k in saved.train and saved.train[k] != config.train[k]]
    if not changed:
        return None
    before = float(make_schedules(saved)[1](step))
    after = float(make_schedules(config)[1](step))
    return (f"note: the schedule changed on resume ({', '.join(changed)}): learning rate at step {step} "
            f"was {before:.4g}, is now {after:.4g}")


def _state_builders(model_cfg: ModelConfig, tx, seed: int, rt: Runtime | None, program: Plain | None):
    """(mesh, graphdef, make_params, make_opt_state): the jitted constructors of the train state, their outputs
    sharded by the rules table in `program`'s layout (shared by `init_state` and `abstract_state`)."""
    rt = rt or runtime.default()
    program = program or Plain()
    mesh = rt.mesh if rt.mesh is not None else sharding.make_mesh({"data": 1}, jax.devices()[:1])
    build = lambda: DeepSeekV3(model_cfg, rngs=nnx.Rngs(seed), runtime=rt)  # noqa: E731
    abstract = nnx.eval_shape(build)
    graphdef, abstract_params, abstract_biases = split_model(abstract)
    specs = {"params": sharding.pure_specs(nnx.state(abstract, nnx.Param)),
             "biases": sharding.pure_specs(nnx.state(abstract, RouterBias))}
    specs = program.state_specs(specs, {"params": abstract_params, "biases": abstract_biases}, dict(mesh.shape))
    out = jax.tree.map(lambda p: NamedSharding(mesh, p), specs)
    make_params = jax.jit(lambda: program.to_layout(dict(zip(("params", "biases"), split_model(build())[1:]))),
                          out_shardings=out)
    replicated = NamedSharding(mesh, P())
    params_shardings = out["params"]

    def make_opt_state(params):  # the moments take their parameter's sharding (jit alone would replicate them)
        frozen = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731  (a frozen parameter: no moment)
        moments = optax.tree_map_params(tx, lambda m, sh: m if frozen(m) else sh, jax.eval_shape(tx.init, params),
                                        params_shardings, transform_non_params=lambda _: replicated, is_leaf=frozen)
        return jax.jit(tx.init, out_shardings=moments)

    return mesh, graphdef, make_params, make_opt_state


def init_state(model_cfg: ModelConfig, tx, seed: int, rt: Runtime | None = None, program: Plain | None = None):
    """(graphdef, train state), created by one jitted constructor whose outputs are already sharded by
    the rules table (no device ever holds the whole model); the optimizer state inherits the
    parameters' shardings. The model runs with `rt` (default: `runtime.default()`); without a mesh in
    it, the state is placed on a one-device mesh. The state is held in `program`'s layout (default `Plain()`: the
    layer layout; a scheduled pipeline: its slot layout, for the parameters and the optimizer state)."""
    mesh, graphdef, make_params, make_opt_state = _state_builders(model_cfg, tx, seed, rt, program)
    params_biases = make_params()
    params, biases = params_biases["params"], params_biases["biases"]
    replicated = NamedSharding(mesh, P())

    def on_mesh(x):  # scalars created from constants (e.g. Adam's count) land on one device: replicate
        ok = isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
        return x if ok else jax.device_put(x, replicated)

    opt_state = jax.tree.map(on_mesh, make_opt_state(params)(params))
    state = {"params": params, "biases": biases, "opt_state": opt_state,
             "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
             "skipped": jax.device_put(jnp.zeros((), jnp.int32), replicated)}
    return graphdef, state


def abstract_state(model_cfg: ModelConfig, tx, rt: Runtime | None = None, program: Plain | None = None):
    """(graphdef, train state as `jax.ShapeDtypeStruct`s with their shardings): what `init_state` would place,
    without allocating or computing anything (for compiling the step ahead of time, `dsv3_jax.aot`)."""
    mesh, graphdef, make_params, make_opt_state = _state_builders(model_cfg, tx, 0, rt, program)
    params_biases = jax.eval_shape(make_params)
    replicated = NamedSharding(mesh, P())
    sds = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)  # noqa: E731
    opt = make_opt_state(params_biases["params"])
    opt_state = jax.eval_shape(opt, params_biases["params"])
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    state = {"params": params_biases["params"], "biases": params_biases["biases"], "opt_state": opt_state,
             "step": scalar, "skipped": scalar}
    # eval_shape keeps the jitted constructors' output shardings; anything without one is replicated
    state = jax.tree.map(lambda x: x if getattr(x, "sharding", None) is not None else sds(x, replicated), state)
    return graphdef, state


def train(config, workdir: str, *, quiet: bool = False, interrupt_at: int | None = None) -> TrainResult:
    """Train (or resume) to `config.train.steps`. `interrupt_at` stops after that step as a crash would:
    no final checkpoint and no sample, so tests can check that resuming reproduces the run exactly."""
    model_cfg = validate_train_config(config)
    t = config.train
    main = distributed.is_main()
    quiet = quiet or not main
    if main:
        check_writable(workdir)

    def build():
        return data_lib.build_data(config.data.path or None, init_from.tokenizer_path(config), workdir,
                                   model_cfg.vocab_size, t.seq_len, config.data.val_fraction, t.seed,
                                   max_val_tokens=max(t.eval_batches, 1) * t.batch_size * (t.seq_len + 1),
                                   document_mask=config.data.get("document_mask", False))

    # multi-host: process 0 trains and saves the tokenizer; the others then load it from the workdir
    data = build() if main else None
    if main and not os.path.isfile(os.path.join(workdir, tokenizer_io.TOKENIZER_FILENAME)):  # for infer.py
        tokenizer_io.save_tokenizer(data.tokenizer, os.path.join(workdir, tokenizer_io.TOKENIZER_FILENAME))
    distributed.barrier("dsv3_jax.data")
    data = data or build()
    val = val_batches(data.val, t.seq_len, t.batch_size, t.eval_batches) if data.n_val_tokens else []
    if config.data.get("document_mask", False):
        val = [packing.mark_documents(v, EOS_ID) for v in val]
    tokenizer_hash = tokenizer_io.tokenizer_hash(data.tokenizer)

    mesh = sharding.make_mesh(config.mesh.to_dict())
    rt = runtime.from_config(config, mesh)
    tx, schedule, lam, gamma, batch_size = make_schedules(config, dict(mesh.shape))
    # plain value_and_grad, or the pipeline (its state layout); documents: loss masks and document boundaries
    program = program_for(rt, model_cfg, t.seq_len, documents=data.documents)
    graphdef, state = init_state(model_cfg, tx, t.seed, rt, program)
    if not quiet:
        print(rt.describe())
        if program.describe(rt):
            print(program.describe(rt))
    ckpt = Checkpointer(os.path.join(os.path.abspath(workdir), "checkpoints"), keep=config.checkpoint.keep,
                        save_interval_steps=config.checkpoint.every_steps, async_save=config.checkpoint.async_save)
    start, tokens_total = 0, 0  # tokens_total: input tokens of every step so far (metrics: tokens_seen)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    weights_only = lambda meta: meta.get("format") == "dsv3_jax.params"  # noqa: E731 (the converter's output)

    def target(meta):  # the state as this run holds it, read from the layout the checkpoint was written in
        if weights_only(meta):
            return program.restore_target({"params": abstract["params"], "biases": abstract["biases"]}, meta)
        saved = meta.get("tokenizer_sha256")
        if saved is not None and saved != tokenizer_hash:
            raise UserError(f"the tokenizer of this run differs from the one {workdir} was trained with (token "
                            f"ids would change under the checkpoint); resume with the run's own tokenizer.json "
                            f"(leave --config.data.tokenizer_path empty) or use another --workdir")
        return program.restore_target(abstract, meta)

    try:  # multi-host: every process restores, only the first moves a damaged step aside
        restored = ckpt.load(target, log=lambda msg: print(msg, file=sys.stderr), move_aside=main)
    except UserError:
        ckpt.close()
        raise
    distributed.barrier("dsv3_jax.restore")
    ckpt.reload()
    if restored is None and config.get("init_from", ""):  # a new run from another run's weights (e.g. the next
        # stage of DSA training); once this run has checkpoints of its own, it resumes from those instead
        weights = lambda meta: program.restore_target({"params": abstract["params"],  # noqa: E731
                                                       "biases": abstract["biases"]}, meta)
        state = dict(state, **init_from.initial_weights(config.init_from, weights, state, quiet, model_cfg,
                                                        program, rt))
    if restored is not None:
        step0, got, meta = restored
        if weights_only(meta):
            # weights only (python -m dsv3_jax.interop.convert): start training from them at step 0 with a
            # fresh optimizer; the first checkpoint of this run supersedes the converted one
            state = dict(state, **got)
            if not quiet:
                print(f"initialised from the converted weights in {workdir}")
        else:
            start, state = step0, got
            tokens_total = int(meta.get("tokens_seen", 0))
            try:
                data.train.restore(meta["loader"])
            except ValueError as e:
                raise UserError(f"{workdir} step {start}: the data loader position does not fit this corpus ({e}); "
                                f"resume with the corpus and seq_len the run was trained on") from None
            if not quiet:
                print(f"resumed from step {start} in {workdir}")
                note = schedule_change(meta.get("config"), config, start)
                if note:
                    print(note)
    writer = MetricsWriter(workdir, total_steps=t.steps, start_step=start, quiet=quiet, enabled=main)
    sizes = param_kinds.trainable_counts(state["params"], trainable_filter(config))  # (in every metrics record)

    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    train_step = make_train_step(graphdef, tx, schedule, mesh, state_shardings,
                                 grad_accum_steps=t.get("grad_accum_steps", 1), program=program,
                                 dropout_seed=t.seed if rt.lora is not None and rt.lora.dropout else None)
    eval_step = make_eval_step(graphdef, mesh, program)
    batch_sharding = sharding.batch_sharding(mesh)
    alpha = jnp.float32(config.moe.seq_balance_alpha)
    gen_pairs = []  # the generation check on held-out conversations (chat data, config.train.eval_generate)
    if t.get("eval_generate", 0) > 0 and data.documents and jax.process_count() == 1:
        gen_pairs = evaluation.held_out_prompts(data.val, t.eval_generate)
    history, tokens_seen, t0 = [], 0, time.perf_counter()  # tokens_seen: since the last log line
    for step in range(start, t.steps):
        window = sharding.put_global_batch(data.train.next_batch(batch_size(step)), batch_sharding)
        state, metrics = train_step(state, window, jnp.float32(lam(step)), alpha, jnp.float32(gamma(step)))
        tokens_seen += window.shape[0] * (window.shape[1] - 1)
        tokens_total += window.shape[0] * (window.shape[1] - 1)
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            dt = time.perf_counter() - t0
            record = {"step": done, "loss": m["loss"], "mtp_loss": m["mtp_loss"], "balance_loss": m["balance_loss"],
                      "grad_norm": m["grad_norm"], "lr": m["lr"], "max_vio": m["max_vio"],
                      "skipped_steps": int(m["skipped_steps"]), "dropped_tokens": int(m["dropped_tokens"]),
                      "tokens_per_sec": tokens_seen / max(dt, 1e-9), "tokens_seen": tokens_total,
                      "batch_size": int(window.shape[0]), "lambda": lam(step), "gamma": gamma(step)} | sizes
            record |= {k: m[k] for k in ("indexer_kl", "index_recall") if k in m}  # sparse attention (V3.2)
            if not m["finite"]:
                record["skipped_this_step"] = True
            if val and (done % t.eval_every == 0 or done == t.steps):
                record["val_loss"] = float(np.mean([float(eval_step(state["params"], state["biases"],
                                                                         sharding.put_global_batch(v, batch_sharding)))
                                                    for v in val]))
            if gen_pairs and (done % t.eval_every == 0 or done == t.steps):
                params = program.to_layers({"params": state["params"]})["params"]
                now = with_runtime(nnx.merge(graphdef, params, state["biases"]), rt.local())
                record |= evaluation.generation_check(now, data.tokenizer, gen_pairs, EOS_ID)
            writer.write(record)
            history.append(record)
            tokens_seen, t0 = 0, time.perf_counter()
        else:
            writer.advance()
        if interrupt_at is not None and done >= interrupt_at:
            break
        if done % config.checkpoint.every_steps == 0 or done == t.steps:
            ckpt.save(done, state, {"loader": data.train.state(), "config": config.to_json(),
                                    "tokenizer_sha256": tokenizer_hash, "tokens_seen": tokens_total}
                      | program.save_meta(), force=True)
    ckpt.wait()
    ckpt.close()
    writer.close()

    sample = ""
    if t.sample_tokens > 0 and interrupt_at is None and jax.process_count() > 1 and not quiet:
        print("no sample in a multi-process run: generate from the checkpoint with infer.py")
    if t.sample_tokens > 0 and interrupt_at is None and jax.process_count() == 1:
        from dsv3_jax.infer.engine import Engine

        # one prompt on this process's devices: the training runtime without its mesh (no pipeline, local experts)
        params = program.to_layers({"params": state["params"]})["params"]
        model = with_runtime(nnx.merge(graphdef, params, state["biases"]), rt.local())
        ids = data.tokenizer.encode("The").ids
        out = Engine.for_batch(model, 1, len(ids) + t.sample_tokens).generate([ids], t.sample_tokens, stop_tokens=())
        sample = "The" + data.tokenizer.decode(out[0].tokens)
        if not quiet:
            print(f"\nsample (greedy, {t.sample_tokens} tokens):\n{sample}\n")
    return TrainResult(state=state, graphdef=graphdef, tokenizer=data.tokenizer, history=history, sample=sample,
                       program=program)
