"""Decode throughput with the absorbed-MLA latent cache, with and without MTP speculative decoding, against
transformers' `generate` on the same weights, and the cache's size against a plain multi-head K/V cache.

    python benchmarks/decode.py [--workdir workdir/demo] [--new_tokens 128] [--repeats 3]
    python benchmarks/decode.py --random_init            # a randomly initialised tiny model: no training first
    python benchmarks/decode.py --skip_hf                 # dsv3_jax rows only (no torch needed)
    python benchmarks/decode.py --random_init --profile /tmp/decode_prof   # and where the time goes, both sides

Uses the demo model from `python train.py` (trains a short one into --workdir first if there is none), or
with --random_init (alias --quick) the model section of configs/tiny.py (or --config) initialised from
--seed, with random prompt token ids. Batch 1 decodes the first four prompts one after another; batch 16
decodes sixteen prompts together. Every run generates exactly --new_tokens per prompt (stop tokens off),
greedy, through the serving engine (`Engine.generate`, static batches: all of a batch's prompts submitted at
once and run to completion; one engine for plain and one for speculative decoding, each with a pool for 16
sequences of prompt + --new_tokens); compilation is excluded (a warm-up run per batch size first, and the time
the engine spends compiling is subtracted from its runs); the best of --repeats runs is reported. tokens/s are
generated tokens over prefill + decode wall time. The speedup is against plain decoding at the same batch size
in the same process, so it is meaningful on a shared machine even where absolute numbers are not.

transformers rows: the model is written with `dsv3_jax.interop.hf.save` to a temporary directory and read
back with `DeepseekV3ForCausalLM.from_pretrained` (transformers ignores the MTP layer), the same prompt
token ids are left-padded (with an attention mask) into the same batches, and `generate` runs greedy
(do_sample=False, eos_token_id=None so no row stops early, the default DynamicCache) for --new_tokens, best
of --repeats after one warm-up call per batch size, timed the same way. 'vs transformers' is a row's
tokens/s over transformers' at the same batch size. The greedy tokens of dsv3_jax's plain decoding are
compared with transformers' prompt by prompt: the number of leading tokens that agree is printed (in
float32 they should agree throughout, up to near-ties of the two logits; on a GPU both then use true
float32 matmuls, no TF32).

--dtype bfloat16 (the default on a GPU) runs both sides in bf16: the saved directory is read back with
`hf.load(dtype=bfloat16)` for dsv3_jax (bf16 weights, compute and latent cache) and with
`from_pretrained(dtype=torch.bfloat16)` for transformers; greedy outputs then diverge after a few tokens.
torch uses `cuda` when available; its CPU threads are the cores this process may use (--torch_threads). On
a CPU shared with other busy processes, torch's OpenMP threads can slow down many-fold when they outnumber
the idle cores; compare with --torch_threads 1 there (XLA's thread pool degrades far less).
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (puts the repository root on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dsv3_jax.config import ModelConfig  # noqa: E402
from dsv3_jax.infer.engine import Engine  # noqa: E402
from dsv3_jax.infer.memory_plan import cache_bytes_per_token, mha_cache_bytes_per_token  # noqa: E402

ROOT = C.ROOT
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

    config = C.load_config()
    config.train.steps = steps
    loop.train(config, workdir, quiet=True)


def random_model(config_path, seed: int):
    """(model, prompts): the config's model section initialised from `seed`, and 16 random prompts of 1-6
    tokens (ids >= 2, so none is BOS/EOS)."""
    from dsv3_jax.model import DeepSeekV3

    cfg = ModelConfig.from_dict(C.load_config(config_path).model)
    model = DeepSeekV3(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    ids = [rng.integers(2, cfg.vocab_size, int(n)).tolist() for n in rng.integers(1, 7, len(PROMPTS))]
    return model, ids


def timed(eng: Engine, ids, new_tokens: int, batch: int, repeats: int):
    """Best-of-`repeats` (tokens/s, acceptance rate, tokens of the last run per prompt) for `ids` decoded in
    batches of `batch`."""
    best, rate, outs = 0.0, None, []
    eng.generate(ids[:batch], new_tokens, stop_tokens=())  # compile the shapes of these batches
    for _ in range(repeats):
        tokens, seconds, acc, drafted, outs = 0, 0.0, 0, 0, []
        for i in range(0, len(ids), batch):
            out = eng.generate(ids[i:i + batch], new_tokens, stop_tokens=())
            tokens += sum(len(c.tokens) for c in out)
            seconds += out[0].seconds
            acc += sum(c.accepted for c in out)
            drafted += sum(c.drafted for c in out)
            outs += [c.tokens for c in out]
        best = max(best, tokens / seconds)
        rate = acc / drafted if drafted else None
    return best, rate, outs


def hf_generate(torch, device, model, chunk, n: int):
    """transformers' greedy `generate` of `n` tokens for the prompts `chunk`, left-padded into one batch."""
    L = max(map(len, chunk))
    inp = torch.zeros((len(chunk), L), dtype=torch.long)
    mask = torch.zeros((len(chunk), L), dtype=torch.long)
    for r, p in enumerate(chunk):
        inp[r, L - len(p):] = torch.as_tensor(p)
        mask[r, L - len(p):] = 1
    out = model.generate(input_ids=inp.to(device), attention_mask=mask.to(device), max_new_tokens=n, do_sample=False)
    return [row[L:].tolist() for row in out.cpu()]


def hf_timed(torch, device, model, ids, new_tokens: int, batch: int, repeats: int):
    """Best-of-`repeats` (tokens/s, tokens of the last run per prompt) of transformers' greedy `generate`
    over `ids` in left-padded batches of `batch`."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best, outs = 0.0, []
    with torch.inference_mode():
        hf_generate(torch, device, model, ids[:batch], 4)  # warm up
        sync()
        for _ in range(repeats):
            tokens, seconds, outs = 0, 0.0, []
            for i in range(0, len(ids), batch):
                t0 = time.perf_counter()
                res = hf_generate(torch, device, model, ids[i:i + batch], new_tokens)
                sync()
                seconds += time.perf_counter() - t0
                tokens += sum(len(r) for r in res)
                outs += res
            best = max(best, tokens / seconds)
    return best, outs


def profiled(eng: Engine, ids, new_tokens: int, out_dir: str, torch=None, device=None, ref=None):
    """--profile: one more run of plain decoding per batch size (1: one prompt, 16: sixteen) traced with
    jax.profiler (the engine's prefill and decode programs: top ops, then by the model's named scopes), and the
    same prompts through transformers' `generate` under torch.profiler."""
    from dsv3_jax.infer import steps

    for batch in (1, 16):
        d = os.path.join(out_dir, f"jax_batch{batch}")
        with C.CompiledTexts(steps, "prefill_step", "decode_step") as seen:
            with jax.profiler.trace(d, create_perfetto_trace=True):
                eng.generate(ids[:batch], new_tokens, stop_tokens=())
        C.print_ops(f"dsv3_jax, plain decoding, batch {batch}, {new_tokens} tokens: top ops by time ({d})",
                    C.top_ops(d, by_module=True))
        C.print_ops("the same trace by the model's named scopes (prefill and decode programs):",
                    C.scope_table(d, seen.texts(), training=False), "scope")
        if ref is not None:
            path = os.path.join(out_dir, f"torch_batch{batch}.json")
            with torch.inference_mode():
                _, ops = C.torch_profiled(torch, device, lambda b=batch: hf_generate(torch, device, ref, ids[:b],
                                                                                  new_tokens), path)
            C.print_ops(f"transformers generate, batch {batch}: top ops by self time (torch.profiler; {path}):", ops)


def agreement(a, b) -> list[int]:
    """Per prompt: the number of leading tokens on which two greedy outputs agree."""
    out = []
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        out.append(n)
    return out


def load_hf_pair(model, dtype: str, need_torch: bool, threads):
    """Save `model` with hf.save; -> (dsv3_jax model in `dtype` (the same object in float32), torch
    module or None, torch, device)."""
    from dsv3_jax.interop import hf

    tmp = tempfile.TemporaryDirectory(prefix="dsv3_decode_")
    with tmp as d:
        hf.save(model, None, d)
        if dtype != "float32":
            _, model = hf.load(d, dtype=jnp.dtype(dtype))
        if not need_torch:
            return model, None, None, None
        torch, device = C.torch_setup(threads)
        if dtype == "float32":
            C.strict_float32(torch)
        import transformers

        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # its load report lists the MTP layer it does not read
        transformers.logging.disable_progress_bar()
        try:
            ref = transformers.DeepseekV3ForCausalLM.from_pretrained(d, dtype=C.torch_dtype(torch, dtype))
        finally:
            transformers.logging.set_verbosity(verbosity)
        ref = ref.to(device).eval()
    ref.generation_config.eos_token_id = None  # never stop early: exactly --new_tokens, as dsv3_jax's rows
    ref.generation_config.pad_token_id = 0
    return model, ref, torch, device


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default=os.path.join(ROOT, "workdir", "demo"))
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train_steps", type=int, default=300, help="steps of the demo run trained if none exists")
    p.add_argument("--random_init", "--quick", action="store_true",
                   help="a randomly initialised model (the --config's model section) instead of the demo model")
    p.add_argument("--config", default=None, help="with --random_init: a configs/*.py file (default configs/tiny.py)")
    p.add_argument("--seed", type=int, default=0, help="with --random_init: parameters and prompt ids")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weights, compute and cache of both (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--skip_hf", action="store_true", help="no transformers rows (torch not needed)")
    p.add_argument("--torch_threads", type=int, default=None, help="torch intra-op threads (default: usable cores)")
    p.add_argument("--profile", default="", help="after the timed runs, trace one more plain run per batch size "
                                                 "(jax.profiler) and transformers' (torch.profiler) into this "
                                                 "directory and print their top ops and the model's scopes")
    a = p.parse_args()
    dtype = a.dtype or ("bfloat16" if C.on_gpu() else "float32")
    if dtype == "float32":
        C.strict_float32()  # on a GPU: no TF32 in XLA's float32 dots (torch's default has none either)

    if a.random_init:
        model, ids = random_model(a.config, a.seed)
        source, step = f"random init ({os.path.basename(a.config or 'configs/tiny.py')}, seed {a.seed})", None
    else:
        from dsv3_jax.infer.load import load_trained

        ensure_demo(a.workdir, a.train_steps)
        model, tokenizer, _, step = load_trained(a.workdir)
        ids = [tokenizer.encode(t).ids for t in PROMPTS]
        source = a.workdir
    ref = torch = device = None
    if dtype != "float32" or not a.skip_hf:
        model, ref, torch, device = load_hf_pair(model, dtype, not a.skip_hf, a.torch_threads)
    cfg = model.cfg
    capacity = max(map(len, ids)) + a.new_tokens
    engines = {s: Engine.for_batch(model, 16, capacity, speculative=s) for s in (False, True)}
    eng = engines[False]
    print(eng.runtime.describe())
    print(f"backend={eng.runtime.backend} devices={jax.device_count()} model={source}"
          f"{'' if step is None else f' (step {step})'}, dtype {dtype}, new_tokens={a.new_tokens}, paged cache "
          f"{eng.pool.pages} pages of {eng.page_size} ({eng.cache_dtype.name}), {eng.decode_steps} decode steps per "
          f"dispatch, decode MoE '{eng.decode_runtime.expert_impl}', best of {a.repeats}")
    if ref is not None:
        print(f"transformers: {C.versions(torch)}, device {device}, torch threads {torch.get_num_threads()}, "
              f"attn={ref.config._attn_implementation}, experts={getattr(ref.config, '_experts_implementation', None)}")

    rows, agree = [], {}
    load = C.LoadWatch()
    for batch, prompts in ((1, ids[:4]), (16, ids[:16])):
        base, plain_out = None, None
        group = []
        for speculative in (False, True):
            tps, rate, outs = timed(engines[speculative], prompts, a.new_tokens, batch, a.repeats)
            base = base or tps
            plain_out = plain_out or outs
            group.append([batch, "MTP speculative" if speculative else "plain", tps, rate, tps / base, None])
        if ref is not None:
            tps, outs = hf_timed(torch, device, ref, prompts, a.new_tokens, batch, a.repeats)
            for r in group:
                r[5] = r[2] / tps
            group.append([batch, "transformers generate", tps, None, tps / base, 1.0])
            agree[batch] = agreement(plain_out, outs)
        rows += group
    print()
    print("| batch | decoding | tokens/s | acceptance | speedup | vs transformers |")
    print("|---|---|---|---|---|---|")
    for batch, mode, tps, rate, speedup, vs in rows:
        print(f"| {batch} | {mode} | {tps:.1f} | {'-' if rate is None else f'{rate:.2f}'} | {speedup:.2f}x | "
              f"{'-' if vs is None else f'{vs:.2f}x'} |")
    print(f"(compilation, excluded above: {sum(e.compile_seconds for e in engines.values()):.1f}s); {load.line()}")
    for batch, n in agree.items():
        full = sum(x == a.new_tokens for x in n)
        print(f"greedy agreement with transformers, batch {batch} ({dtype}): {full}/{len(n)} prompts agree on all "
              f"{a.new_tokens} tokens; leading tokens that agree per prompt: {n}")
    if a.profile:
        profiled(eng, ids, a.new_tokens, a.profile, torch, device, ref)

    print()
    print("| model | cache | bytes/token (main layers) | vs multi-head K/V |")
    print("|---|---|---|---|")
    v3 = ModelConfig()  # the released model: sizes only, nothing is built
    # measured from the engine's page pools (a pool of 2 one-token pages per dtype)
    pools = {dt: Engine(model, page_size=1, pages=2, cache_dtype=dt, speculative=bool(len(model.mtp))).pools
             for dt in (jnp.float32, jnp.bfloat16)}
    for dt in pools:
        size = jnp.dtype(dt).itemsize
        demo = cache_bytes_per_token(pools[dt])["main"]
        v3_latent = (v3.kv_lora_rank + v3.qk_rope_head_dim) * v3.num_hidden_layers * size
        for name, c, lat in (("demo (tiny)", cfg, demo), ("DeepSeek-V3 671B", v3, v3_latent)):
            mha = mha_cache_bytes_per_token(c, size)
            print(f"| {name} | latent, {jnp.dtype(dt).name} | {lat:,} | {mha:,} = {mha / lat:.1f}x larger |")
    if len(model.mtp):
        mtp = cache_bytes_per_token(pools[jnp.bfloat16])["mtp"]
        print(f"(speculative decoding adds the MTP layer's own latent cache: {mtp} bytes/token in bfloat16 for the "
              f"demo, {(v3.kv_lora_rank + v3.qk_rope_head_dim) * 2:,} for DeepSeek-V3)")
    return rows


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"(total {time.time() - t0:.0f}s)")
