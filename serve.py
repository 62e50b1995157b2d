"""OpenAI-compatible server for a trained workdir or a released-format checkpoint:

    python serve.py [--checkpoint workdir/demo | --hf DIR [--keep_fp8]] [--host 127.0.0.1] [--port 8000]
                    [--batch_size 16] [--page_size 16] [--max_batch_tokens 256] [--cache_mib 256]
                    [--speculative] [--mesh data=2,tensor=4] [--warmup] [--chat_template FILE]
                    [--api_key KEY] [--open_paths /health,/metrics] [--max_body_mib 32]

Endpoints (dsv3_jax/serve/app.py): POST /v1/completions, POST /v1/chat/completions (streaming with
"stream": true), GET /v1/models, POST /tokenize, POST /detokenize, GET /health, GET /metrics. One engine
thread owns the JAX loop (dsv3_jax/serve/worker.py); uvicorn serves the HTTP side. It prints the URL once
it is ready. SIGTERM (or Ctrl-C) stops accepting connections, lets running requests finish for up to
--shutdown_s seconds, then exits 0. If the engine thread dies (a failure it could not recover from; one
failing step only fails its own requests), every request gets 503, /health says why, and the process
exits 1 for its supervisor to restart it.
"""
import os
import signal
import sys
import threading
import time

from dsv3_jax import cli


def parser():
    p = cli.ArgumentParser(prog="python serve.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="workdir/demo", help="a train.py or converter workdir")
    p.add_argument("--hf", default=None, help="a released-format directory (overrides --checkpoint)")
    p.add_argument("--keep_fp8", action="store_true", help="with --hf: keep the FP8 weights FP8 (W8A8 GEMMs)")
    p.add_argument("--lora", default=None, help="LoRA adapters exported from a fine-tuning run (python -m "
                   "dsv3_jax.lora export), served on the base given by --hf or --checkpoint")
    p.add_argument("--fp8_mode", default="w8a8", choices=("w8a8", "weight_only"))
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=2,tensor=4")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model_name", default=None, help="the model id clients name (default: the directory name)")
    p.add_argument("--batch_size", type=int, default=16, help="requests in the running batch")
    p.add_argument("--page_size", type=int, default=16)
    p.add_argument("--max_batch_tokens", type=int, default=256)
    p.add_argument("--decode_steps", type=int, default=4)
    p.add_argument("--paged_attention", choices=("auto", "jnp", "pallas"), default="auto",
                   help="how attention reads the paged cache: jnp gather (the reference) or the Pallas kernel")
    p.add_argument("--cache_mib", type=float, default=256.0, help="device memory of the latent-cache page pool")
    p.add_argument("--max_seq_len", type=int, default=0, help="longest prompt + max_tokens (0: the model's context)")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding for every request")
    p.add_argument("--index_fp8", action="store_true",
                   help="sparse attention (V3.2): cache the indexer's keys as FP8 with a per-token scale")
    p.add_argument("--max_waiting", type=int, default=256, help="queued requests beyond this get HTTP 429")
    p.add_argument("--max_tokens", type=int, default=16, help="max_tokens of a completion request that gives none")
    p.add_argument("--chat_template", default=None,
                   help="a Jinja chat template file, or deepseek_v32 for V3.2's encoder (default: the "
                        "checkpoint's chat_template.jinja or tokenizer_config.json's; V3.2's encoder for V3.2)")
    p.add_argument("--warmup", action="store_true", help="compile every step shape before accepting requests")
    p.add_argument("--shutdown_s", type=float, default=30.0, help="grace period for running requests on SIGTERM")
    p.add_argument("--tool_parser", default="auto",
                   help="the model's tool-call format: auto (from the chat template), none, deepseek_v3 (V3, R1), "
                        "deepseek_v31, deepseek_v32, kimi_k2")
    p.add_argument("--reasoning_parser", default="auto", choices=("auto", "none", "deepseek_r1"),
                   help="split <think> text into reasoning_content: auto (when the chat template knows </think>)")
    p.add_argument("--api_key", default=os.environ.get("DSV3_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $DSV3_API_KEY; none: no key needed)")
    p.add_argument("--open_paths", default="/health,/metrics",
                   help="paths served without the API key, comma-separated ('' protects every path)")
    p.add_argument("--max_body_mib", type=float, default=32.0, help="larger request bodies get HTTP 413")
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)

    def run():
        from dsv3_jax.mesh_axes import parse_mesh
        from dsv3_jax.serve.chat import eos_ids, load_chat_template

        for name in ("batch_size", "page_size", "max_batch_tokens", "decode_steps", "max_waiting", "max_tokens"):
            if getattr(args, name) < 1:
                raise cli.UserError(f"--{name}={getattr(args, name)} must be >= 1")
        for name in ("cache_mib", "max_body_mib"):
            if not getattr(args, name) > 0:
                raise cli.UserError(f"--{name}={getattr(args, name)} must be > 0")
        mesh = None
        if args.mesh:
            parse_mesh(args.mesh)
        if args.keep_fp8 and not args.hf:
            raise cli.UserError("--keep_fp8 applies to --hf DIR")
        template = load_chat_template(args.hf or args.checkpoint, args.chat_template)  # (refused before loading)
        from dsv3_jax.serve.tools import PARSERS, detect_parser

        text = (template or {}).get("template")
        tool_parser = {"auto": detect_parser(text), "none": None}.get(args.tool_parser, args.tool_parser)
        if tool_parser is not None and tool_parser not in PARSERS:
            raise cli.UserError(f"--tool_parser={args.tool_parser}: one of auto, none, {', '.join(sorted(PARSERS))}")
        reasoning = args.reasoning_parser == "deepseek_r1" or (args.reasoning_parser == "auto" and text is not None
                                                               and ("</think>" in text or text == "deepseek_v32"))
        # (every check above reads only the flags and the chat template, before JAX is imported)
        import uvicorn

        from dsv3_jax import sharding
        from dsv3_jax.infer.engine import Engine
        from dsv3_jax.serve.app import build_app
        from dsv3_jax.serve.worker import EngineWorker

        if args.hf:
            from dsv3_jax.infer.load import load_hf
            from dsv3_jax.interop import hf

            if args.mesh:
                import jax

                sizes = sharding.mesh_sizes(sharding.parse_mesh(args.mesh), jax.device_count())
                sharding.validate_mesh(sizes, hf.parse_config(hf.read_config(args.hf)).model)
                mesh = sharding.make_mesh(sizes)
            model, tokenizer = load_hf(args.hf, keep_fp8=args.keep_fp8, fp8_mode=args.fp8_mode, mesh=mesh)
            source = args.hf
        else:
            from dsv3_jax.infer.load import load_trained

            model, tokenizer, _, _ = load_trained(args.checkpoint, fp8_mode=args.fp8_mode)
            source = args.checkpoint
            if args.mesh:
                import jax

                sizes = sharding.mesh_sizes(sharding.parse_mesh(args.mesh), jax.device_count())
                sharding.validate_mesh(sizes, model.cfg)
                mesh = sharding.make_mesh(sizes)
        if args.lora:  # the base plus a fine-tune's adapters (dsv3_jax/lora.py)
            from dsv3_jax import lora_io

            model = lora_io.attach(model, args.lora)  # (the base's directory still gives the template and eos ids)
        engine = Engine(model, page_size=args.page_size, max_batch=args.batch_size,
                        max_batch_tokens=max(args.max_batch_tokens, args.batch_size),
                        cache_bytes=int(args.cache_mib * 2**20), decode_steps=args.decode_steps,
                        speculative=args.speculative, mesh=mesh, tokenizer=tokenizer,
                        max_seq_len=args.max_seq_len or None, paged_attention=args.paged_attention,
                        index_fp8=args.index_fp8)
        print(f"[{engine.runtime.describe()}; {engine.pool.pages} cache pages of {args.page_size} tokens]",
              file=sys.stderr, flush=True)
        if args.warmup:
            n = engine.warmup()
            print(f"[compiled {n} step shapes in {engine.compile_seconds:.0f}s]", file=sys.stderr, flush=True)
        worker = EngineWorker(engine, max_waiting=args.max_waiting)
        worker.start()
        name = args.model_name or os.path.basename(os.path.normpath(source))
        app = build_app(worker, tokenizer, name, chat_template=template, default_max_tokens=args.max_tokens,
                        eos_ids=eos_ids(source, tokenizer), api_key=args.api_key or None,
                        open_paths=[p for p in args.open_paths.split(",") if p],
                        max_body=int(args.max_body_mib * 2**20), tool_parser=tool_parser, reasoning=reasoning)

        config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                timeout_graceful_shutdown=int(args.shutdown_s))
        server = uvicorn.Server(config)

        def announce():  # once the socket listens (uvicorn's `started`), not at app start-up, which comes first
            while not server.started and not server.should_exit:
                time.sleep(0.05)
            if server.started:
                print(f"serving {name} at http://{args.host}:{args.port}/v1 (OpenAI API)", flush=True)

        def fatal(exc):  # the engine thread died: answer 503 for a moment, then exit non-zero
            print(f"[the engine stopped: {exc!r}; exiting]", file=sys.stderr, flush=True)
            threading.Timer(2.0, lambda: setattr(server, "should_exit", True)).start()

        worker.on_fatal = fatal
        threading.Thread(target=announce, daemon=True).start()
        signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
        server.run()
        worker.stop(args.shutdown_s)
        if worker.error is not None:
            return 1
        print("stopped", flush=True)

    return cli.call(run, "serve.py", argv)


if __name__ == "__main__":
    sys.exit(main())
