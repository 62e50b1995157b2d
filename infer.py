"""Generate text from a model trained by train.py (or a released-format checkpoint directory):

    python infer.py --checkpoint WORKDIR --prompt "..." [--max_new_tokens N]
        [--temperature T --top_p P --top_k K --seed S] [--speculative] [--output_json FILE]
        [--mesh data=2,tensor=4] [--hf DIR [--keep_fp8 [--fp8_mode w8a8|weight_only]]]
        python infer.py --hf DIR --keep_fp8 --dry_run --mesh expert=8 [--hbm_gib 141]   # serving memory plan

Reads prompts from stdin (one per line) when no --prompt is given. --temperature 0 (the default) is
greedy. Decoding runs on the serving engine (dsv3_jax/infer/engine.py): a paged absorbed-MLA latent cache
(--page_size), continuous batching of up to --batch_size requests with chunked prefill (--max_batch_tokens
per step); --speculative drafts each token after next with the MTP module and verifies both in one step.
Output text streams to stdout (when one prompt is decoded at a time); tokens/s and the acceptance rate go
to stderr. --mesh places parameters and cache on a device mesh by the logical-axis rules (on CPU, fake devices with
XLA_FLAGS=--xla_force_host_platform_device_count=8).
"""
import json
import math
import sys

from absl import app, flags, logging

from dsv3_jax import cli

flags.DEFINE_string("checkpoint", "workdir/demo", "A train.py workdir (holds checkpoints/ and tokenizer.json).")
flags.DEFINE_string("hf", None, "A released-format directory (config.json, *.safetensors, tokenizer.json); "
                                "overrides --checkpoint.")
flags.DEFINE_string("prompt", None, "Prompt text; read from stdin, one prompt per line, when omitted.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt (fewer if a stop token comes first).")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
flags.DEFINE_integer("top_k", 0, "Keep only the k most likely tokens (0: off).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: keep the smallest set of tokens with this much mass (1: off).")
flags.DEFINE_integer("seed", 0, "Random seed for sampling.")
flags.DEFINE_boolean("speculative", False, "MTP speculative decoding (the MTP module drafts, the model verifies).")
flags.DEFINE_boolean("index_fp8", False, "Sparse attention (V3.2): cache the indexer's keys as FP8 with a per-token "
                     "scale (Dh + 4 bytes per token and layer instead of 2 Dh in BF16).")
flags.DEFINE_string("output_json", None, "Write a JSON list, one {text, tokens, tokens_per_sec, acceptance_rate} "
                                         "per prompt.")
flags.DEFINE_string("mesh", None, "Device mesh, e.g. 'data=2,tensor=4' (axes: data, stage, fsdp, expert, tensor; "
                                  "unnamed axes are 1, one axis may be -1 = the remaining devices).")
flags.DEFINE_integer("batch_size", 1, "Requests in the running batch at once (continuous batching: one joins as "
                     "another ends); output streams only when this is 1.")
flags.DEFINE_integer("cache_len", 0, "Cache tokens per request that the page pool is sized for (pool = batch_size x "
                     "cache_len); 0: longest prompt + max_new_tokens, rounded up to a page.")
flags.DEFINE_integer("page_size", 16, "Tokens per page of the paged latent cache.")
flags.DEFINE_integer("max_batch_tokens", 256, "Tokens per engine step: decoding requests take one each, prompts are "
                     "prefilled in chunks of what is left.")
flags.DEFINE_integer("decode_steps", 4, "Decode steps per dispatch (the host reads tokens once per this many).")
flags.DEFINE_enum("paged_attention", "auto", ["auto", "jnp", "pallas"], "How attention reads the paged cache: "
                  "'jnp' gathers the pages (the reference), 'pallas' is the flash-decoding kernel; auto: jnp.")
flags.DEFINE_string("cache_dtype", None, "Dtype of the latent cache (float32, bfloat16); default: compute dtype.")
flags.DEFINE_bool("dry_run", False, "With --hf: print the per-device serving memory plan (weights, latent cache) for "
                  "--mesh and --hbm_gib from config.json alone, and exit.")
flags.DEFINE_string("lora", None, "LoRA adapters exported from a fine-tuning run (python -m dsv3_jax.lora export), "
                    "applied to the base given by --hf or --checkpoint.")
flags.DEFINE_bool("keep_fp8", False, "With --hf: keep projection and expert weights FP8 as shipped (float8_e4m3fn + "
                  "128x128 block scales; a BF16 checkpoint is quantised on load) and run FP8 GEMMs on them; with "
                  "--dry_run: plan the weights kept FP8.")
flags.DEFINE_enum("fp8_mode", "w8a8", ["w8a8", "weight_only"], "GEMMs on FP8-resident weights: w8a8 (activations "
                  "quantised 1x128, DeepSeek's serving recipe) or weight_only (activations unquantised; equal to the "
                  "dequantised model up to float32 rounding).")
flags.DEFINE_float("hbm_gib", 141.0, "Device memory for --dry_run, GiB (default: an H200's 141).")
flags.DEFINE_bool("verbose", False, "Print the traceback of a user error too (or set DSV3_VERBOSE=1).")
FLAGS = flags.FLAGS


def make_mesh(text: str, model_cfg):
    import jax

    from dsv3_jax import runtime, sharding

    sizes = sharding.parse_mesh(text)
    try:
        resolved = sharding.mesh_sizes(sizes, jax.device_count())
    except ValueError as e:
        hint = ("; on CPU, fake devices with XLA_FLAGS=--xla_force_host_platform_device_count=N"
                if runtime.platform() == "cpu" else "")
        raise ValueError(f"--mesh {text!r}: {e}{hint}") from None
    sharding.validate_mesh(resolved, model_cfg)
    return sharding.make_mesh(resolved)


def dry_run() -> None:
    """--dry_run: the serving memory plan of --hf DIR's config.json on --mesh (dsv3_jax/infer/memory_plan.py)."""
    from dsv3_jax import sharding
    from dsv3_jax.infer.memory_plan import GIB, print_plan, serving_plan
    from dsv3_jax.interop import hf

    if not FLAGS.hf:
        raise cli.UserError("--dry_run plans a released-format checkpoint: pass --hf DIR (config.json is enough)")
    if not FLAGS.hbm_gib > 0:
        raise cli.UserError(f"--hbm_gib={FLAGS.hbm_gib} must be > 0")
    cfg_hf = hf.parse_config(hf.read_config(FLAGS.hf))
    sizes = {a: 1 for a in sharding.MESH_AXES} | sharding.parse_mesh(FLAGS.mesh or "")
    if -1 in sizes.values():
        raise cli.UserError(f"--mesh {FLAGS.mesh!r}: a dry run plans for devices it does not have; give every axis "
                            f"its size")
    sharding.validate_mesh(sizes, cfg_hf.model)
    itemsize = 2 if FLAGS.cache_dtype is None else jnp_itemsize(cli.parse_dtype(FLAGS.cache_dtype, "--cache_dtype"))
    plan = serving_plan(cfg_hf.model, sizes, fp8_block=cfg_hf.fp8_block or (128, 128), keep_fp8=FLAGS.keep_fp8,
                        hbm_bytes=int(FLAGS.hbm_gib * GIB), cache_itemsize=itemsize, index_fp8=FLAGS.index_fp8)
    print_plan(plan, sizes)


def jnp_itemsize(name: str) -> int:
    import jax.numpy as jnp

    return jnp.dtype(name).itemsize


class Stream:
    """Prints a prompt, then its continuation as tokens arrive (re-decoding the whole continuation each time,
    so multi-token characters come out whole)."""

    def __init__(self, tokenizer, prompt: str):
        self.tokenizer, self.tokens, self.shown = tokenizer, [], ""
        sys.stdout.write(prompt)
        sys.stdout.flush()

    def __call__(self, row: int, new: list):
        self.tokens.extend(new)
        self._show(self.tokenizer.decode(self.tokens))

    def _show(self, text: str):
        if text.startswith(self.shown):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text

    def finish(self, text: str):
        self._show(text)
        sys.stdout.write("\n")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from dsv3_jax.infer.sampling_params import SamplingParams
    from dsv3_jax.mesh_axes import parse_mesh

    if FLAGS.dry_run:
        return dry_run()
    prompts = [FLAGS.prompt] if FLAGS.prompt is not None else [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise cli.UserError("no prompt: pass --prompt or pipe prompts on stdin")
    for name in ("temperature", "top_p"):
        if not math.isfinite(getattr(FLAGS, name)):
            raise cli.UserError(f"--{name}={getattr(FLAGS, name)} is not a finite number")
    try:
        sampling = SamplingParams(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p, FLAGS.seed)
    except ValueError as e:
        raise cli.UserError(f"--{e}") from None
    if FLAGS.batch_size < 1:
        raise cli.UserError(f"--batch_size={FLAGS.batch_size} must be >= 1")
    if FLAGS.max_new_tokens < 1:
        raise cli.UserError(f"--max_new_tokens={FLAGS.max_new_tokens} must be >= 1")
    for name in ("page_size", "max_batch_tokens", "decode_steps"):
        if getattr(FLAGS, name) < 1:
            raise cli.UserError(f"--{name}={getattr(FLAGS, name)} must be >= 1")
    cache_dtype = cli.parse_dtype(FLAGS.cache_dtype, "--cache_dtype") if FLAGS.cache_dtype else None
    if FLAGS.mesh:
        parse_mesh(FLAGS.mesh)  # syntax, before any weight is read
    if FLAGS.keep_fp8 and not FLAGS.hf:
        raise cli.UserError("--keep_fp8 applies to --hf DIR (a train.py or converter workdir keeps the weights "
                            "as written; convert with --keep_fp8 for an FP8-resident workdir)")
    # (every check above reads only the flags, before JAX is imported: a bad flag is answered at once)
    import jax.numpy as jnp

    from dsv3_jax.data.bpe import EOS_ID
    from dsv3_jax.infer.engine import Engine

    mesh = None
    if FLAGS.hf:
        from dsv3_jax.infer.load import load_hf
        from dsv3_jax.interop import hf

        if FLAGS.mesh:  # placed while loading: the host never holds the whole model
            mesh = make_mesh(FLAGS.mesh, hf.parse_config(hf.read_config(FLAGS.hf)).model)
        model, tokenizer = load_hf(FLAGS.hf, keep_fp8=FLAGS.keep_fp8, fp8_mode=FLAGS.fp8_mode, mesh=mesh)
        source = FLAGS.hf
    else:
        from dsv3_jax.infer.load import load_trained

        model, tokenizer, _, step = load_trained(FLAGS.checkpoint, fp8_mode=FLAGS.fp8_mode)
        source = f"{FLAGS.checkpoint} step {step}"
    if FLAGS.lora:  # the base plus a fine-tune's adapters (dsv3_jax/lora.py)
        from dsv3_jax import lora_io

        model = lora_io.attach(model, FLAGS.lora)
        source = f"{source} + {FLAGS.lora}"
    cfg = model.cfg
    if FLAGS.mesh and mesh is None:
        mesh = make_mesh(FLAGS.mesh, cfg)
    ids = [tokenizer.encode(p).ids for p in prompts]
    need = max(map(len, ids)) + FLAGS.max_new_tokens
    capacity = FLAGS.cache_len or min(cfg.max_position_embeddings, -(-need // FLAGS.page_size) * FLAGS.page_size)
    if FLAGS.speculative and not len(model.mtp):
        raise cli.UserError("--speculative needs a model with an MTP module (num_nextn_predict_layers >= 1)")
    lookahead = FLAGS.decode_steps * (2 if FLAGS.speculative else 1)
    # The pool holds --batch_size sequences of `capacity` tokens (plus the decode lookahead), and the trash page.
    pages = FLAGS.batch_size * -(-(capacity + lookahead) // FLAGS.page_size) + 1
    engine = Engine(model, page_size=FLAGS.page_size, max_batch=FLAGS.batch_size,
                    max_batch_tokens=max(FLAGS.max_batch_tokens, FLAGS.batch_size), pages=pages,
                    decode_steps=FLAGS.decode_steps, cache_dtype=jnp.dtype(cache_dtype) if cache_dtype else None,
                    speculative=FLAGS.speculative, mesh=mesh, max_seq_len=capacity,
                    paged_attention=FLAGS.paged_attention, index_fp8=FLAGS.index_fp8)
    streaming = FLAGS.batch_size == 1  # requests then run one after another, in order
    streams = {}

    def on_tokens(i):
        def cb(req, new):
            if streaming:
                if i not in streams:
                    streams[i] = Stream(tokenizer, prompts[i])
                streams[i](i, new)
        return cb

    rids = []
    for i, p in enumerate(ids):  # every prompt is checked before anything compiles
        try:
            rids.append(engine.submit(p, FLAGS.max_new_tokens, sampling, stop_ids=(EOS_ID,), on_tokens=on_tokens(i)))
        except cli.UserError as e:
            raise cli.UserError(f"prompt {i}: {e}") from None
    placed = "" if mesh is None else f"; parameters and cache placed on {dict(mesh.shape)} (XLA partitions each step)"
    print(f"[{engine.runtime.describe()}{placed}]", file=sys.stderr)

    def report(i, req):
        text = tokenizer.decode(req.output)
        if streaming:
            if i not in streams:
                streams[i] = Stream(tokenizer, prompts[i])
            streams[i].finish(text)
        tps = len(req.output) / max(req.seconds, 1e-9)
        stats = f"{len(req.output)} tokens in {req.seconds:.2f}s: {tps:.1f} tokens/s"
        rate = req.accepted / req.drafted if req.drafted else None
        if FLAGS.speculative:
            stats += f", acceptance rate {rate or 0.0:.2f} ({req.accepted}/{req.drafted} drafts)"
        print(f"[{stats}; {req.finish_reason}]", file=sys.stderr)
        return {"text": prompts[i] + text, "tokens": list(req.output), "tokens_per_sec": tps,
                "acceptance_rate": rate if FLAGS.speculative else None}

    index = {rid: i for i, rid in enumerate(rids)}
    results = {}
    while not engine.idle:
        for req in engine.step():
            results[index[req.rid]] = report(index[req.rid], req)
    results = [results[i] for i in range(len(prompts))]
    if not streaming:
        for r in results:
            print(r["text"])
    print(f"[{source}; paged cache {engine.pool.pages} pages of {FLAGS.page_size} tokens "
          f"({engine.cache_dtype.name}), peak {engine.pool.peak_used} used; {engine.compilations} compilations in "
          f"{engine.compile_seconds:.1f}s (not counted in tokens/s)]", file=sys.stderr)
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    cli.run(lambda: app.run(main, flags_parser=cli.parse_absl_flags), "infer.py")
