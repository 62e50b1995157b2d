"""Train DeepSeek-V3-style models: `python train.py --config configs/tiny.py --workdir DIR`.

Every config field is overridable, e.g. `--config.train.steps=200 --config.model.n_group=2`.
`--dry_run` builds the model abstractly and prints parameter counts without allocating anything.
`--aot=TOPOLOGY` (e.g. v5p:8x8x16) compiles the real train step for that TPU topology from shapes alone and
prints per-device memory and the compiler's cost figures (`dsv3_jax.aot`; needs the `tpu-aot` extra).
A bad flag, config value, corpus or checkpoint ends as one line on stderr (exit status 2);
`--verbose` (or DSV3_VERBOSE=1) adds the traceback.
"""
import os
import sys

from absl import app, flags, logging

from dsv3_jax import cli

_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(_HERE, "configs", "tiny.py")
FLAGS = flags.FLAGS


def define_flags():
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Training config file.", lock_config=True)
    flags.DEFINE_string("workdir", os.path.join(_HERE, "workdir", "demo"), "Checkpoints, metrics, tokenizer.")
    flags.DEFINE_bool("dry_run", False, "Print parameter counts from abstract shapes and exit.")
    flags.DEFINE_float("hbm_gib", 0.0, "With --dry_run and config.lora.rank > 0: device memory (GiB) the fine-tuning "
                       "plan is checked against (0: not checked).")
    flags.DEFINE_string("aot", None, "Compile the train step ahead of time for this TPU topology (e.g. v5p:8x8x16, "
                        "tpu7x:8x8x8) and print its per-device memory and cost; nothing runs.")
    flags.DEFINE_bool("verbose", False, "Print the traceback of a user error too (or set DSV3_VERBOSE=1).")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    from dsv3_jax.train.hyperparams import check_hyperparameters

    check_hyperparameters(FLAGS.config)  # (before JAX is loaded: a bad number is reported at once)
    from dsv3_jax import sharding
    from dsv3_jax.config import ModelConfig
    from dsv3_jax.train import plan
    from dsv3_jax.train.loop import train, validate_train_config

    t = FLAGS.config.train
    if FLAGS.aot:
        from dsv3_jax import aot

        if FLAGS.dry_run:
            raise cli.UserError("--aot and --dry_run: choose one (--aot compiles, --dry_run only counts).")
        aot.print_report(aot.train_step_report(FLAGS.config, FLAGS.aot))
        return
    try:  # say what is wrong before anything is built
        if FLAGS.dry_run:  # abstract shapes only: the mesh may be larger than this machine
            model_cfg = ModelConfig.from_dict(FLAGS.config.model)
            sizes = plan.dry_run_mesh(FLAGS.config)
            sharding.validate_mesh(sizes, model_cfg, t.batch_size, allow_uneven_stages=True)
        else:
            from dsv3_jax import distributed

            distributed.initialize(FLAGS.config.get("distributed"))  # before anything touches a backend
            model_cfg = validate_train_config(FLAGS.config)
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, cli.UserError):
            raise
        raise cli.ConfigError(str(e)) from e
    if FLAGS.dry_run:
        from dsv3_jax import lora
        from dsv3_jax.train.loop import microbatches, trainable_filter

        m = FLAGS.config.mesh
        plan.dry_run(model_cfg, sizes, t.batch_size, t.seq_len, t.remat,
                     microbatches=microbatches(FLAGS.config, sizes["stage"]),
                     grad_accum=t.get("grad_accum_steps", 1), schedule=m.get("pipeline_schedule", "gpipe"),
                     chunks=m.get("pipeline_chunks", 1), stage_layers=m.get("pipeline_stage_layers", ""),
                     trainable=trainable_filter(FLAGS.config), lora_opts=lora.from_config(FLAGS.config.get("lora")),
                     hbm_bytes=int(FLAGS.hbm_gib * 2**30) or None)
        return
    train(FLAGS.config, FLAGS.workdir)


def run():
    cli.check_config_args(sys.argv, DEFAULT_CONFIG)  # a missing file or unknown key: one line, not a traceback
    define_flags()
    app.run(main, flags_parser=cli.parse_absl_flags)


if __name__ == "__main__":
    cli.run(run, "train.py")
