"""Ahead-of-time compilation of the real steps for a TPU topology, on this machine (`dsv3_jax.aot`): the train
step (as `train.py --aot`), or the serving engine's prefill or decode step at a given batch, context and page
size, each from shapes alone, with per-device memory against the chip's HBM and XLA's cost figures.

    # Python >= 3.12:  pip install -e ".[tpu-aot]"   (jax[tpu]: libtpu from PyPI)
    python benchmarks/aot.py --topology v5p:4x4x4 --step decode --batch 256 --context 8192 \\
        --config configs/deepseek_v3.py --config.mesh.expert=64 --config.mesh.data=1
    python benchmarks/aot.py --topology tpu7x:4x4x4 --step prefill --batch 16 --prefill_len 2048 ...
    python benchmarks/aot.py --topology v5p:8x8x16 --step train --config configs/deepseek_v3.py --config.mesh.*

The serving steps are the Engine's (`dsv3_jax.infer.steps`), placed as the Engine places them on a mesh:
parameters by the logical-axis rules (config.mesh), the page pools split over 'stage' by layer and otherwise
replicated, each step's rows split over the batch axes. --fp8_weights auto keeps the FP8 release in FP8 where
the chip has FP8 matrix units (tpu7x) and uses BF16 elsewhere. The last line printed is JSON (`aot.REPORT_KEYS`
and more); --json FILE also appends it to FILE.
"""
import json
import os
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from dsv3_jax import cli  # noqa: E402

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "deepseek_v3.py")
FLAGS = flags.FLAGS


def define_flags():
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Model / mesh config file.", lock_config=True)
    flags.DEFINE_string("topology", "v5e:2x2", "TPU topology, GENERATION:AxB[xC] (v5p:8x8x16, tpu7x:8x8x8, ...).")
    flags.DEFINE_enum("step", "decode", ["train", "prefill", "decode"], "Which step to compile.")
    flags.DEFINE_integer("batch", 256, "Rows of the serving step.")
    flags.DEFINE_integer("context", 8192, "Cached positions per row (the page table's reach).")
    flags.DEFINE_integer("prefill_len", 2048, "Tokens per row of the prefill step.")
    flags.DEFINE_integer("page_size", 64, "Tokens per cache page.")
    flags.DEFINE_integer("decode_steps", 1, "Decode tokens per dispatch.")
    flags.DEFINE_enum("fp8_weights", "auto", ["auto", "none", "w8a8", "weight_only"],
                      "FP8-resident weights: auto = where the chip has FP8 matrix units.")
    flags.DEFINE_string("paged_attention", "auto", "How decode reads the pages: auto, jnp or pallas.")
    flags.DEFINE_string("json", None, "Append the JSON line to this file too.")
    flags.DEFINE_bool("verbose", False, "Print the traceback of a user error too.")


def main(argv):
    del argv
    from dsv3_jax import aot

    if FLAGS.step == "train":
        report = aot.train_step_report(FLAGS.config, FLAGS.topology)
    else:
        report = aot.serve_step_report(FLAGS.config, FLAGS.topology, step=FLAGS.step, batch=FLAGS.batch,
                                       context=FLAGS.context, prefill_len=FLAGS.prefill_len,
                                       page_size=FLAGS.page_size, decode_steps=FLAGS.decode_steps,
                                       fp8_weights=FLAGS.fp8_weights, paged_attention=FLAGS.paged_attention)
    aot.print_report(report)
    if FLAGS.json:
        with open(FLAGS.json, "a") as f:
            f.write(json.dumps(report, default=str) + "\n")


def run():
    cli.check_config_args(sys.argv, DEFAULT_CONFIG)  # a missing file or unknown key: one line, not a traceback
    define_flags()
    app.run(main, flags_parser=cli.parse_absl_flags)


if __name__ == "__main__":
    cli.run(run, "benchmarks/aot.py")
