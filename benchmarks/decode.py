"""Decode throughput with the absorbed-MLA latent cache, with and without MTP speculative decoding, and
the cache's size against a plain multi-head K/V cache.

    python benchmarks/decode.py [--workdir workdir/demo] [--new_tokens 128] [--repeats 3]

Uses the demo model from `python train.py` (trains a short one into --workdir first if there is none).
Batch 1 decodes the first four prompts one after another; batch 16 decodes sixteen prompts together.
Every run generates exactly --new_tokens per prompt (stop tokens off), greedy; compilation is excluded
(`Generator` compiles ahead of time); the best of --repeats runs is reported. tokens/s are generated
tokens over prefill + decode wall time. The speedup is against plain decoding at the same batch size in
the same process, so it is meaningful on a shared machine even where absolute numbers are not.
"""
import argparse
import importlib.util
import os
import sys
import time

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dsv3_jax.config import ModelConfig  # noqa: E402
from dsv3_jax.infer.generate import Generator, cache_bytes_per_token, mha_cache_bytes_per_token  # noqa: E402
from dsv3_jax.infer.load import load_trained  # noqa: E402

PROMPTS = [
    "The", "The object", "import os", "A function that returns", "The following", "Return the value of",
    "If the", "class", "This module provides", "The default", "An exception", "def", "Note that the",
    "In the", "The standard library", "Example:",
]


def ensure_demo(workdir: str, steps: int):
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        return
    print(f"no checkpoint in {workdir}: training the demo config for {steps} steps first")
    from dsv3_jax.train import loop

    spec = importlib.util.spec_from_file_location("tiny", os.path.join(ROOT, "configs", "tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    config.train.steps = steps
    loop.train(config, workdir, quiet=True)


def timed(gen: Generator, ids, new_tokens: int, speculative: bool, batch: int, repeats: int):
    """Best-of-`repeats` (tokens/s, acceptance rate) for `ids` decoded in batches of `batch`."""
    best, rate = 0.0, None
    gen.generate(ids[:batch], 4, speculative=speculative, stop_tokens=())  # compile these shapes
    for _ in range(repeats):
        tokens, seconds, acc, drafted = 0, 0.0, 0, 0
        for i in range(0, len(ids), batch):
            out = gen.generate(ids[i:i + batch], new_tokens, speculative=speculative, stop_tokens=())
            tokens += sum(len(c.tokens) for c in out)
            seconds += out[0].seconds
            acc += sum(c.accepted for c in out)
            drafted += sum(c.drafted for c in out)
        best = max(best, tokens / seconds)
        rate = acc / drafted if drafted else None
    return best, rate


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default=os.path.join(ROOT, "workdir", "demo"))
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train_steps", type=int, default=300, help="steps of the demo run trained if none exists")
    a = p.parse_args()
    ensure_demo(a.workdir, a.train_steps)
    model, tokenizer, _, step = load_trained(a.workdir)
    cfg = model.cfg
    ids = [tokenizer.encode(t).ids for t in PROMPTS]
    capacity = -(-(max(map(len, ids)) + a.new_tokens) // 64) * 64
    gen = Generator(model, capacity=capacity)
    print(f"backend={jax.default_backend()} devices={jax.device_count()} model={a.workdir} (step {step}), "
          f"new_tokens={a.new_tokens}, cache {capacity} slots {gen.cache_dtype.name}, decode MoE "
          f"'{gen.decode_moe_impl}', best of {a.repeats}")

    rows = []
    for batch, prompts in ((1, ids[:4]), (16, ids[:16])):
        base = None
        for speculative in (False, True):
            tps, rate = timed(gen, prompts, a.new_tokens, speculative, batch, a.repeats)
            base = base or tps
            rows.append((batch, "MTP speculative" if speculative else "plain", tps, rate, tps / base))
    print()
    print("| batch | decoding | tokens/s | acceptance | speedup |")
    print("|---|---|---|---|---|")
    for batch, mode, tps, rate, speedup in rows:
        print(f"| {batch} | {mode} | {tps:.1f} | {'-' if rate is None else f'{rate:.2f}'} | {speedup:.2f}x |")
    print(f"(compilation, excluded above: {gen.compile_seconds:.1f}s)")

    print()
    print("| model | cache | bytes/token (main layers) | vs multi-head K/V |")
    print("|---|---|---|---|")
    v3 = ModelConfig()  # the released model: sizes only, nothing is built
    for dtype in (jnp.float32, jnp.bfloat16):
        size = jnp.dtype(dtype).itemsize
        demo = cache_bytes_per_token(jax.eval_shape(lambda: model.init_cache(1, 1, dtype)))["main"]
        v3_latent = (v3.kv_lora_rank + v3.qk_rope_head_dim) * v3.num_hidden_layers * size
        for name, c, lat in (("demo (tiny)", cfg, demo), ("DeepSeek-V3 671B", v3, v3_latent)):
            mha = mha_cache_bytes_per_token(c, size)
            print(f"| {name} | latent, {jnp.dtype(dtype).name} | {lat:,} | {mha:,} = {mha / lat:.1f}x larger |")
    mtp = cache_bytes_per_token(jax.eval_shape(lambda: model.init_cache(1, 1, jnp.bfloat16, mtp=True)))["mtp"]
    print(f"(speculative decoding adds the MTP layer's own latent cache: {mtp} bytes/token in bfloat16 for the "
          f"demo, {(v3.kv_lora_rank + v3.qk_rope_head_dim) * 2:,} for DeepSeek-V3)")
    return rows


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"(total {time.time() - t0:.0f}s)")
