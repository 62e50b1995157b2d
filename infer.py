"""Generate text from a model trained by train.py:

    python infer.py --checkpoint WORKDIR --prompt "..." [--max_new_tokens N]

Reads prompts from stdin (one per line) when no --prompt is given.
"""
import sys
import time

from absl import app, flags, logging

flags.DEFINE_string("checkpoint", "workdir/demo", "A train.py workdir (holds checkpoints/ and tokenizer.json).")
flags.DEFINE_string("prompt", None, "Prompt text; read from stdin, one prompt per line, when omitted.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from dsv3_jax.infer.load import load_trained
    from dsv3_jax.infer.simple import greedy_tokens

    prompts = [FLAGS.prompt] if FLAGS.prompt is not None else [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise SystemExit("no prompt: pass --prompt or pipe prompts on stdin")
    try:
        model, tokenizer, _, step = load_trained(FLAGS.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    for prompt in prompts:
        ids = tokenizer.encode(prompt).ids
        t0 = time.perf_counter()
        try:
            out = greedy_tokens(model, ids, FLAGS.max_new_tokens)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        dt = time.perf_counter() - t0
        print(prompt + tokenizer.decode(out))
        print(f"[{len(out)} tokens in {dt:.2f}s: {len(out) / dt:.1f} tokens/s, checkpoint step {step}]", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
