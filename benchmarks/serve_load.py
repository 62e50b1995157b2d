"""Serving under load: the engine (continuous batching over the paged latent cache) against static batching
(the same engine fed one batch at a time) and transformers' `generate`, on one fixed, seeded workload, in one
run on one machine.

    python benchmarks/serve_load.py [--requests 128] [--concurrency 16] [--rate R] [--output_json FILE]
                                    [--systems engine,engine_c1,static,transformers_batched,transformers_single]
    python benchmarks/serve_load.py --http [--clients 32] [--duration 300] [--concurrency 16]   # the soak
    python benchmarks/serve_load.py --systems engine,transformers_batched --profile /tmp/prof   # where time goes

--http starts `python serve.py` (with --warmup) on a free localhost port and runs --clients streaming clients
(plain HTTP, one request after another each, cycling through the same workload, greedy) for --duration
seconds; it reports requests completed, errors (expected 0), output tokens/s, TTFT, TPOT and ITL p50/p99 as
seen by the clients (a streamed chunk may carry several tokens: they arrive with gap 0), cache pages in use at
the end (expected 0), the server's RSS at start and end, and its exit code after SIGTERM. The soak with every
kind of request (cancels, errors, logprobs, n, stop strings) is benchmarks/serve_soak.py.

Workload (seeded by --seed): --requests requests, prompt lengths uniform in [16, 512] tokens cut from the
demo corpus (`data.corpus.default_corpus`, tokenised by the demo tokenizer), max_tokens uniform in [16, 256],
greedy, no stop tokens (every request produces exactly max_tokens). Arrivals: a closed loop at
--concurrency (a new request arrives when one finishes; the default) or Poisson at --rate requests/s.
Systems:
  engine                the engine at --concurrency (max_batch = concurrency, --page_size, --max_batch_tokens)
  engine_c1             the engine at concurrency 1 (one request at a time)
  static                static batches of --concurrency requests through the engine (`Engine.generate`, same
                        page size and decode steps): a batch runs until its longest request is done (every row
                        generates that many tokens; the others' extra tokens are not counted), then the next
                        batch starts: what continuous batching is measured against
  transformers_batched  `DeepseekV3ForCausalLM.generate` on the same weights, left-padded batches of --concurrency
  transformers_single   the same, one request at a time
  engine_json           the engine with every request held to a JSON object (structured outputs: llguidance's
                        mask per token, one token per dispatch); an object may close before max_tokens
Static-batch systems take requests in arrival order (with --rate a batch starts when its last request has
arrived). The engine compiles every shape it can schedule first (`Engine.warmup`, as a server does at
start-up) and reports the compilations the measured run still triggered (0 expected); the static system's
engine warms up the same way; compile time that still falls inside a run is subtracted.

Metrics per system: output tokens/s and requests/s over the run's wall time; time to first token (arrival ->
first token seen by the client) p50/p99; time per output token (TPOT) p50/p99 over requests, each request's
mean gap between tokens ((last - first) / (tokens - 1)); inter-token latency (ITL) p50/p99 over every gap
between consecutive tokens of a request, as vLLM and SGLang report it: the engine hands tokens to the client
in bursts of --decode_steps, so most gaps are 0 and p99 is the burst interval; transformers' batched rows
get the times of the batch's steps (a logits processor stamps each step). The engine also reports
compilations, pages in use at peak, prefix-cache hits (prompts here share no prefixes, so hits are ~0) and
preemptions.
"""
import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (puts the repository root on sys.path)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from decode import ensure_demo  # noqa: E402

from dsv3_jax.infer.engine import Engine  # noqa: E402
from dsv3_jax.infer.sampling import SamplingParams  # noqa: E402

SYSTEMS = ("engine", "engine_c1", "static", "transformers_batched", "transformers_single", "engine_json")
GREEDY = SamplingParams()


def workload(tokenizer, n: int, seed: int, rate: float | None):
    """[(arrival offset s or None, prompt ids, max_tokens)] from the demo corpus."""
    from dsv3_jax.data import corpus

    rng = np.random.default_rng(seed)
    ids = np.concatenate([np.asarray(tokenizer.encode(t).ids, np.int32) for t in corpus.default_corpus()[:400]])
    out, t = [], 0.0
    for _ in range(n):
        L, m = int(rng.integers(16, 513)), int(rng.integers(16, 257))
        start = int(rng.integers(0, len(ids) - L))
        if rate:
            t += float(rng.exponential(1.0 / rate))
        out.append((t if rate else None, ids[start:start + L].tolist(), m))
    return out


def summarise(name, records, wall, extra=None):
    """records: [(arrival, [token times], n_tokens)] -> the system's row."""
    ttft = [times[0] - arr for arr, times, _ in records if times]
    tpot = [(times[-1] - times[0]) / (len(times) - 1) for _, times, _ in records if len(times) > 1]
    gaps = [b - a for _, times, _ in records for a, b in zip(times, times[1:])]
    tokens = sum(n for _, _, n in records)
    q = lambda xs, p: float(np.percentile(xs, p)) if xs else None  # noqa: E731
    row = {"system": name, "requests": len(records), "output_tokens": tokens, "seconds": wall,
           "output_tokens_per_sec": tokens / wall, "requests_per_sec": len(records) / wall,
           "ttft_p50_s": q(ttft, 50), "ttft_p99_s": q(ttft, 99), "tpot_p50_s": q(tpot, 50), "tpot_p99_s": q(tpot, 99),
           "itl_p50_s": q(gaps, 50), "itl_p99_s": q(gaps, 99)}
    row.update(extra or {})
    return row


# ---------------------------------------------------------------------------------------------- our systems
def make_engine(model, concurrency, args, name):
    """An engine for --concurrency rows of up to 512 + 256 tokens, every shape it can schedule compiled (as a
    server does at start-up)."""
    eng = Engine.for_batch(model, concurrency, 512 + 256, page_size=args.page_size, decode_steps=args.decode_steps,
                           max_batch_tokens=max(args.max_batch_tokens, concurrency))
    t = time.perf_counter()
    warmed = eng.warmup()
    print(f"  {name} warm-up: {warmed} shapes in {time.perf_counter() - t:.0f}s", flush=True)
    return eng


def run_engine(model, work, concurrency, args, grammars=None, profile=""):
    """The engine at `concurrency` over `work` (after its warm-up); `profile`: a directory where the run (not the
    warm-up) is traced with jax.profiler."""
    name = ("engine" if concurrency > 1 else "engine_c1") + ("_json" if grammars is not None else "")
    eng = make_engine(model, concurrency, args, name)
    c0, n0 = eng.compile_seconds, eng.compilations
    times: dict[int, list[float]] = {}
    arrival: dict[int, float] = {}
    pending = list(enumerate(work))
    t0 = time.perf_counter()

    def submit(i, p, m):
        constraint = None if grammars is None else grammars.make({"type": "json_object"})
        rid = eng.submit(p, m, GREEDY, stop_ids=(), constraint=constraint,
                         on_tokens=lambda req, new: times[req.rid].extend([time.perf_counter()] * len(new)))
        times[rid] = []
        arrival[rid] = time.perf_counter() if work[i][0] is None else t0 + work[i][0]

    live = 0
    with jax.profiler.trace(profile, create_perfetto_trace=True) if profile else contextlib.nullcontext():
        while pending or not eng.idle:
            now = time.perf_counter()
            while pending and (live < concurrency if pending[0][1][0] is None else now >= t0 + pending[0][1][0]):
                i, (_, p, m) = pending.pop(0)
                submit(i, p, m)
                live += 1
            if eng.idle:
                time.sleep(0.001)
                continue
            live -= len(eng.step())
    wall = time.perf_counter() - t0 - (eng.compile_seconds - c0)  # shapes the warm-up missed: not service time
    records = [(arrival[r], times[r], len(eng.result(r).output)) for r in times]
    return summarise(name, records, wall,
                     {"warmup_compilations": n0, "compilations": eng.compilations - n0,
                      "compile_seconds": eng.compile_seconds - c0,
                      "pages": eng.pool.pages, "pages_peak": eng.pool.peak_used, "prefix_hits": eng.pool.hits,
                      "preemptions": eng.scheduler.preemptions})


def batches(work, concurrency):
    for i in range(0, len(work), concurrency):
        yield work[i:i + concurrency]


def run_static(model, work, concurrency, args):
    eng = make_engine(model, concurrency, args, "static")
    c0 = eng.compile_seconds
    records = []
    t0 = time.perf_counter()
    for b in batches(work, concurrency):
        start = time.perf_counter()
        if b[-1][0] is not None:
            time.sleep(max(0.0, t0 + b[-1][0] - start))
        start = time.perf_counter()
        times = [[] for _ in b]
        limit = [m for _, _, m in b]
        c_before = eng.compile_seconds

        def on_tokens(row, new, times=times):
            times[row].extend([time.perf_counter()] * len(new))

        eng.generate([p for _, p, _ in b], max(limit), GREEDY, stop_tokens=(), on_tokens=on_tokens)
        shift = eng.compile_seconds - c_before  # a new shape compiled inside: not service time
        for (arr, _, m), ts in zip(b, times):
            arr = start if arr is None else t0 + arr
            ts = [t - shift for t in ts[:m]]
            records.append((arr, ts, len(ts)))
    wall = time.perf_counter() - t0 - (eng.compile_seconds - c0)
    return summarise("static", records, wall, {"compile_seconds": eng.compile_seconds - c0})


# ---------------------------------------------------------------------------------------------- transformers
def load_transformers(model, threads):
    from dsv3_jax.interop import hf

    torch, device = C.torch_setup(threads)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="dsv3_serve_") as d:
        hf.save(model, None, d)
        ref = transformers.DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32).to(device).eval()
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    return torch, device, ref


def run_transformers(tf, work, concurrency, name):
    torch, device, ref = tf
    import transformers

    class Stamp(transformers.LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    def run(b, n):
        L = max(len(p) for _, p, _ in b)
        inp = torch.zeros((len(b), L), dtype=torch.long)
        mask = torch.zeros((len(b), L), dtype=torch.long)
        for r, (_, p, _) in enumerate(b):
            inp[r, L - len(p):] = torch.as_tensor(p)
            mask[r, L - len(p):] = 1
        stamp = Stamp()
        ref.generate(input_ids=inp.to(device), attention_mask=mask.to(device), max_new_tokens=n, do_sample=False,
                     logits_processor=transformers.LogitsProcessorList([stamp]))
        return stamp.times

    records = []
    with torch.inference_mode():
        run(work[:concurrency], 4)
        t0 = time.perf_counter()
        for b in batches(work, concurrency):
            if b[-1][0] is not None:
                time.sleep(max(0.0, t0 + b[-1][0] - time.perf_counter()))
            start = time.perf_counter()
            times = run(b, max(m for _, _, m in b))
            for arr, _, m in b:
                records.append((start if arr is None else t0 + arr, times[:m], m))
        wall = time.perf_counter() - t0
    return summarise(name, records, wall)


# ---------------------------------------------------------------------------------------------- HTTP soak
def soak(args, tokenizer, work):
    """N streaming clients against `python serve.py` for a set duration (the --http mode)."""
    import http.client
    import re
    import threading

    from _serve import rss_mib, start_server

    proc, port = start_server([f"--checkpoint={args.workdir}", f"--batch_size={args.concurrency}",
                               f"--page_size={args.page_size}", f"--max_batch_tokens={args.max_batch_tokens}",
                               f"--decode_steps={args.decode_steps}", f"--max_waiting={4 * args.clients}",
                               "--max_seq_len=768", "--warmup"])
    rss_start = rss_mib(proc.pid)
    model = os.path.basename(os.path.normpath(args.workdir))
    records, errors, lock = [], [], threading.Lock()
    stop_at = time.perf_counter() + args.duration

    def client(c):
        i = c
        while time.perf_counter() < stop_at:
            _, prompt, m = work[i % len(work)]
            i += args.clients
            body = json.dumps({"model": model, "prompt": prompt, "max_tokens": m, "temperature": 0, "stream": True})
            t0, times, n = time.perf_counter(), [], 0
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                conn.request("POST", "/v1/completions", body=body, headers={"content-type": "application/json"})
                resp = conn.getresponse()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
                for raw in resp.fp:
                    if not raw.startswith(b"data:") or raw.startswith(b"data: [DONE]"):
                        if raw.startswith(b"data: [DONE]"):
                            break
                        continue
                    chunk = json.loads(raw[5:])
                    if chunk["choices"][0]["text"]:
                        times.append(time.perf_counter())
                    if chunk.get("usage"):
                        n = chunk["usage"]["completion_tokens"]
                conn.close()
                if times and n > len(times):  # n tokens came in len(times) chunks: the tokens that shared a
                    times = [times[0]] * (n - len(times)) + times  # chunk arrived with gap 0 (which chunk: no matter)
                with lock:
                    records.append((t0, times, n))
            except Exception as e:  # noqa: BLE001 - counted and reported, the soak goes on
                with lock:
                    errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    pages_end = float(re.search(r"^dsv3:cache_pages_used{[^}]*} ([0-9.e+]+)$", text, re.M).group(1))
    rss_end = rss_mib(proc.pid)
    proc.terminate()
    code = proc.wait(timeout=120)
    row = summarise("serve.py (HTTP, streaming)", records, wall,
                    {"clients": args.clients, "duration_s": args.duration, "errors": len(errors),
                     "error_examples": errors[:3], "pages_in_use_at_end": pages_end, "server_rss_mib_start": rss_start,
                     "server_rss_mib_end": rss_end, "server_exit_code": code})
    print(f"soak: {args.clients} streaming clients for {args.duration:.0f}s: {row['requests']} requests completed, "
          f"{row['errors']} errors, {row['output_tokens_per_sec']:.1f} output tokens/s, TTFT p50/p99 "
          f"{1000 * row['ttft_p50_s']:.0f}/{1000 * row['ttft_p99_s']:.0f} ms, TPOT p50/p99 "
          f"{1000 * row['tpot_p50_s']:.0f}/{1000 * row['tpot_p99_s']:.0f} ms, ITL (each gap) p50/p99 "
          f"{1000 * row['itl_p50_s']:.0f}/{1000 * row['itl_p99_s']:.0f} ms, pages in use at the end {pages_end:.0f}, "
          f"server RSS {rss_start:.0f} -> {rss_end:.0f} MiB, exit code {code}")
    return row


# ---------------------------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=os.path.join(C.ROOT, "workdir", "demo"))
    p.add_argument("--train_steps", type=int, default=300)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second (default: closed loop)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--page_size", type=int, default=16)
    p.add_argument("--max_batch_tokens", type=int, default=256)
    p.add_argument("--decode_steps", type=int, default=4)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--torch_threads", type=int, default=None)
    p.add_argument("--output_json", default=None)
    p.add_argument("--profile", default="", help="after the measured runs, trace the engine over the first "
                                                 "--profile_requests requests into this directory (jax.profiler) "
                                                 "and, when it ran, transformers_batched's first batch of them "
                                                 "(torch.profiler); print their top ops and the model's scopes")
    p.add_argument("--profile_requests", type=int, default=32)
    p.add_argument("--http", action="store_true", help="soak: streaming clients against `python serve.py`")
    p.add_argument("--clients", type=int, default=32, help="--http: concurrent streaming clients")
    p.add_argument("--duration", type=float, default=300.0, help="--http: seconds of load")
    args = p.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    bad = sorted(set(systems) - set(SYSTEMS))
    if bad:
        raise SystemExit(f"--systems: unknown {bad}; choose from {','.join(SYSTEMS)}")

    ensure_demo(args.workdir, args.train_steps)
    from dsv3_jax.infer.load import load_trained

    model, tokenizer, _, step = load_trained(args.workdir)
    work = workload(tokenizer, args.requests, args.seed, args.rate)
    if args.http:
        row = soak(args, tokenizer, work)
        if args.output_json:
            with open(args.output_json, "w") as f:
                json.dump([row], f, indent=1)
        print(json.dumps(row))
        return
    arrivals = f"Poisson {args.rate}/s" if args.rate else f"closed loop at concurrency {args.concurrency}"
    print(f"demo model step {step}; {args.requests} requests, prompts {min(len(w[1]) for w in work)}-"
          f"{max(len(w[1]) for w in work)} tokens, max_tokens {min(w[2] for w in work)}-{max(w[2] for w in work)}, "
          f"{sum(w[2] for w in work)} output tokens; {arrivals}; {C.cores()} cores", flush=True)
    rows = []
    tf = None
    load = C.LoadWatch()
    for s in systems:
        t = time.perf_counter()
        if s == "engine":
            rows.append(run_engine(model, work, args.concurrency, args))
        elif s == "engine_c1":
            rows.append(run_engine(model, work, 1, args))
        elif s == "engine_json":
            from dsv3_jax.serve.structured import Grammars

            rows.append(run_engine(model, work, args.concurrency, args, Grammars(tokenizer, model.cfg.vocab_size,
                                                                                 eos_ids=(1,))))
        elif s == "static":
            rows.append(run_static(model, work, args.concurrency, args))
        else:
            tf = tf or load_transformers(model, args.torch_threads)
            rows.append(run_transformers(tf, work, args.concurrency if s == "transformers_batched" else 1, s))
        print(f"  {s}: {rows[-1]['output_tokens_per_sec']:.1f} output tokens/s ({time.perf_counter() - t:.0f}s)",
              flush=True)
    print(load.line())
    for r in rows:
        r.update(load.record())
    fmt = "{:<22}{:>12}{:>10}{:>11}{:>11}{:>11}{:>11}{:>11}{:>11}{:>9}"
    print(fmt.format("system", "out tok/s", "req/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "ITL p50",
                     "ITL p99", "vs eng"))
    eng = next((r for r in rows if r["system"] == "engine"), None)
    ms = lambda x: "-" if x is None else f"{1000 * x:.0f} ms"  # noqa: E731
    for r in rows:
        ratio = "" if eng is None else f"{eng['output_tokens_per_sec'] / r['output_tokens_per_sec']:.2f}x"
        print(fmt.format(r["system"], f"{r['output_tokens_per_sec']:.1f}", f"{r['requests_per_sec']:.2f}",
                         ms(r["ttft_p50_s"]), ms(r["ttft_p99_s"]), ms(r["tpot_p50_s"]), ms(r["tpot_p99_s"]),
                         ms(r["itl_p50_s"]), ms(r["itl_p99_s"]), ratio))
    for r in rows:
        if "compilations" in r:
            print(f"{r['system']}: {r['warmup_compilations']} shapes compiled at warm-up, {r['compilations']} in the "
                  f"measured run ({r['compile_seconds']:.1f}s), "
                  f"pages peak {r['pages_peak']} of {r['pages']}, prefix-cache hits {r['prefix_hits']} pages, "
                  f"preemptions {r['preemptions']}")
    if args.profile:
        profiled(model, work[:args.profile_requests], args, tf if "transformers_batched" in systems else None)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(rows, f, indent=1)
    print(json.dumps(rows))


def profiled(model, work, args, tf):
    """--profile: the engine's run over `work` traced (its prefill and decode programs: top ops, then by the
    model's named scopes), and transformers' first padded batch of it under torch.profiler."""
    from dsv3_jax.infer import steps

    d = os.path.join(args.profile, "engine")
    with C.CompiledTexts(steps, "prefill_step", "decode_step") as seen:
        run_engine(model, work, args.concurrency, args, profile=d)
    C.print_ops(f"engine over {len(work)} requests at concurrency {args.concurrency}: top ops by time ({d})",
                C.top_ops(d, by_module=True))
    C.print_ops("the same trace by the model's named scopes:", C.scope_table(d, seen.texts(), training=False),
                "scope")
    if tf is not None:  # one padded batch (torch.profiler's bookkeeping of a longer run takes minutes)
        first = work[:args.concurrency]
        _, ops = C.torch_profiled(tf[0], tf[1], lambda: run_transformers(tf, first, args.concurrency, "profile"), None)
        C.print_ops(f"transformers_batched, the first {len(first)} of those requests as one batch: top ops by self "
                    "time (torch.profiler):", ops)


if __name__ == "__main__":
    main()
