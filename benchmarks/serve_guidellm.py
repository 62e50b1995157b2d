"""guidellm (vLLM's load generator, a client no one here wrote) against `python serve.py`: a bounded synthetic
benchmark of the chat endpoint with streaming.

    pip install -e ".[bench]"
    python benchmarks/serve_guidellm.py [--streams 8] [--requests 64] [--prompt_tokens 64] [--output_tokens 32]
                                        [--json FILE]

Starts `python serve.py` on the demo checkpoint (trained first if absent) with --warmup on a free localhost port,
writes a tokenizer directory guidellm can load (the demo's tokenizer.json and a tokenizer_config.json naming
transformers' fast tokenizer), runs `guidellm run` with a concurrent profile of --streams streams for --requests
requests of synthetic text, then stops the server with SIGTERM. Prints guidellm's figures that matter here:
requests completed / errored / incomplete (target: errored 0), TTFT, inter-token latency and time per output
token p50/p95, output tokens/s, and serve.py's exit code. --json writes them as one object.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (puts the repository root on sys.path)

from _serve import start_server  # noqa: E402
from decode import ensure_demo  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=os.path.join(C.ROOT, "workdir", "demo"))
    p.add_argument("--train_steps", type=int, default=300)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt_tokens", type=int, default=64)
    p.add_argument("--output_tokens", type=int, default=32)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if shutil.which("guidellm") is None:
        raise SystemExit('guidellm is not installed: pip install -e ".[bench]"')
    ensure_demo(args.workdir, args.train_steps)
    model = os.path.basename(os.path.normpath(args.workdir))
    with tempfile.TemporaryDirectory(prefix="dsv3_guidellm_") as d:
        tok = os.path.join(d, "tokenizer")
        os.makedirs(tok)
        shutil.copy(os.path.join(args.workdir, "tokenizer.json"), tok)
        with open(os.path.join(tok, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                       "eos_token": "<|end_of_text|>"}, f)
        server, port = start_server([f"--checkpoint={args.workdir}", f"--batch_size={args.streams}",
                                     "--max_seq_len=512", "--warmup"])
        out = os.path.join(d, "guidellm.json")
        cmd = ["guidellm", "run", "--backend", f"kind=openai_http,target=http://127.0.0.1:{port},model={model}",
               "--profile", f"kind=concurrent,streams={args.streams}",
               "--constraint", f"kind=max_requests,count={args.requests}",
               "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}",
               "--tokenizer", f"kind=huggingface_auto,model={tok}", "--output", f"kind=json,path={out}",
               "--disable-console-interactive"]
        print(" ".join(cmd), flush=True)
        rc = subprocess.run(cmd, env=os.environ | {"HF_HUB_OFFLINE": "1"}).returncode
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=120)
        if rc != 0:
            raise SystemExit(f"guidellm exited {rc}")
        with open(out) as f:
            m = json.load(f)["benchmarks"][0]["metrics"]

    def pct(key, q):
        return round(m[key]["successful"]["percentiles"][q], 1)

    row = {"streams": args.streams, "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
           **{f"requests_{k}": v for k, v in m["request_totals"].items()},
           "ttft_ms_p50": pct("time_to_first_token_ms", "p50"), "ttft_ms_p95": pct("time_to_first_token_ms", "p95"),
           "itl_ms_p50": pct("inter_token_latency_ms", "p50"), "itl_ms_p95": pct("inter_token_latency_ms", "p95"),
           "tpot_ms_p50": pct("time_per_output_token_ms", "p50"),
           "tpot_ms_p95": pct("time_per_output_token_ms", "p95"),
           "output_tokens_per_s": round(m["output_tokens_per_second"]["successful"]["mean"], 1),
           "server_exit_code": code}
    for k, v in row.items():
        print(f"{k:<24}{v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
