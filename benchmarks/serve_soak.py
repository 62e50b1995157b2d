"""The serving soak: many clients with every kind of request against `python serve.py`, for a bounded time; does
anything fail that should not, does anything stay behind?

    python benchmarks/serve_soak.py [--clients 32] [--duration 120] [--cache_mib 1.5] [--json FILE]

Starts `python serve.py` on the demo checkpoint (trained first if absent: benchmarks/decode.py's ensure_demo) on
a free localhost port with --warmup and a small page pool (--cache_mib: requests get preempted), then runs
--clients threads for --duration seconds, each sending one request after another, the kind drawn by a seeded
generator from this mix:

    stream      streamed completion (greedy or sampled, some with a stop string, some n=2)
    whole       non-streamed completion (some with logprobs, some with echo)
    chat        chat completion, streamed or not
    cancel_sse  a streamed request whose client goes away after its first chunk
    cancel_http a non-streamed request whose client goes away after 0.2 s
    invalid     a request the server must refuse with 4xx (a bad field, an unknown model, a prompt past the
                context, a body that is not JSON)

Every answer is checked: 200 with a finish_reason and no stop string in the text, 4xx for the invalid ones,
429 counted as back-pressure. Anything else (a 5xx, a refused valid request, a stop string in the text, a
client exception) is `unexpected` (target 0). At the end, once the server is idle: cache pages in use and
request records held (target 0), the server's RSS after the first 20% of the run (warm-up) and at the end
(target: growth under 5%), and serve.py's exit code after SIGTERM (target 0). Prints a table; --json writes the
same figures as one object.
"""
import argparse
import collections
import http.client
import json
import os
import random
import re
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (puts the repository root on sys.path)

from _serve import rss_mib, start_server  # noqa: E402
from decode import ensure_demo  # noqa: E402

KINDS = (("stream", 0.35), ("whole", 0.2), ("chat", 0.1), ("cancel_sse", 0.1), ("cancel_http", 0.1),
         ("invalid", 0.15))
STOPS = ["\n", ".", " the"]
INVALID = [{"temperature": -1}, {"top_p": 0}, {"seed": 2 ** 64}, {"n": 100}, {"logprobs": 50}, {"model": "nope"},
           {"prompt": "word " * 4000}, {"max_tokens": 0}, "{not json"]


def metrics(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(dsv3:\w+)(?:\{[^}]*\})? ([0-9.e+-]+)$", text,
                                                                  re.M)}


class Soak:
    def __init__(self, args, port: int, model: str, prompts: list[str]):
        self.args, self.port, self.model, self.prompts = args, port, model, prompts
        self.outcomes = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)
        self.lock = threading.Lock()

    def note(self, outcome: str, example: str | None = None):
        with self.lock:
            self.outcomes[outcome] += 1
            if example is not None and len(self.examples[outcome]) < 3:
                self.examples[outcome].append(example[:300])

    def post(self, path: str, body, read=True, close_after: float | None = None, sse_chunks: int | None = None):
        """(status, text) of one request; with close_after / sse_chunks the client goes away early (None)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        conn.request("POST", path, body=data, headers={"content-type": "application/json"})
        if close_after is not None:
            time.sleep(close_after)
            conn.sock.close()
            return None
        resp = conn.getresponse()
        if sse_chunks is not None and resp.status == 200:
            for _ in range(sse_chunks):
                resp.fp.readline()
            conn.sock.close()
            return None
        text = resp.read().decode()
        conn.close()
        return resp.status, text

    def one(self, rng: random.Random):
        kind = rng.choices([k for k, _ in KINDS], [w for _, w in KINDS])[0]
        prompt = rng.choice(self.prompts)
        body = {"model": self.model, "prompt": prompt, "max_tokens": rng.randint(4, 64),
                "temperature": rng.choice([0, 0.8]), "seed": rng.randint(0, 2 ** 40)}
        stop = rng.choice([None, None] + STOPS)
        if stop:
            body["stop"] = [stop]
        if kind == "invalid":
            bad = rng.choice(INVALID)
            got = self.post("/v1/completions", bad if isinstance(bad, str) else body | bad)
            self.note("refused_4xx" if 400 <= got[0] < 500 and got[0] != 429 else "unexpected",
                      None if 400 <= got[0] < 500 else f"invalid {bad!r} -> {got[0]} {got[1][:200]}")
            return
        if kind == "cancel_sse":
            self.post("/v1/completions", body | {"stream": True, "max_tokens": 64}, sse_chunks=2)
            self.note("cancelled_by_client")
            return
        if kind == "cancel_http":
            self.post("/v1/completions", body | {"max_tokens": 64}, close_after=0.2)
            self.note("cancelled_by_client")
            return
        chat = kind == "chat"
        stream = kind == "stream" or (chat and rng.random() < 0.5)
        if kind == "stream" and rng.random() < 0.3:
            body["n"] = 2
        if kind == "whole" and rng.random() < 0.5:
            body |= {"logprobs": rng.randint(0, 5), "echo": rng.random() < 0.5}
        if chat:
            body.pop("prompt")
            body["messages"] = [{"role": "user", "content": prompt}]
        status, text = self.post("/v1/chat/completions" if chat else "/v1/completions", body | {"stream": stream})
        if status == 429:
            self.note("rate_limited_429")
            return
        if status != 200:
            self.note("unexpected", f"{kind} -> {status} {text[:200]}")
            return
        texts, finish = self.parse(text, stream, chat, body.get("n", 1))
        if body.get("echo"):  # the prompt comes first (and may hold the stop string itself)
            texts = [t[len(prompt):] if t.startswith(prompt) else t for t in texts]
        if any(f is None for f in finish):
            self.note("unexpected", f"{kind}: a choice without finish_reason: {text[-300:]}")
        elif stop and any(stop in t for t in texts):
            self.note("unexpected", f"{kind}: stop string {stop!r} in the text {texts!r}")
        else:
            self.note("ok")

    @staticmethod
    def parse(text: str, stream: bool, chat: bool, n: int):
        """(texts, finish_reasons) per choice of a whole body or an SSE stream; an error event raises."""
        texts, finish = [""] * n, [None] * n
        bodies = [json.loads(line[5:]) for line in text.splitlines()
                  if line.startswith("data:") and "[DONE]" not in line] if stream else [json.loads(text)]
        for b in bodies:
            if "error" in b:
                raise RuntimeError(f"error event: {b['error']}")
            for ch in b["choices"]:
                i = ch["index"]
                if chat:
                    part = (ch.get("delta") or ch.get("message") or {}).get("content") or ""
                else:
                    part = ch.get("text") or ""
                texts[i] += part
                finish[i] = ch.get("finish_reason") or finish[i]
        return texts, finish

    def client(self, c: int, stop_at: float):
        rng = random.Random(self.args.seed * 1000 + c)
        while time.perf_counter() < stop_at:
            try:
                self.one(rng)
            except Exception as e:  # noqa: BLE001 (counted: the soak goes on)
                self.note("unexpected", f"client exception: {e!r}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=os.path.join(C.ROOT, "workdir", "demo"))
    p.add_argument("--train_steps", type=int, default=300)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=120.0)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--cache_mib", type=float, default=1.5, help="small on purpose: requests get preempted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    ensure_demo(args.workdir, args.train_steps)
    from dsv3_jax.data import corpus

    prompts = [t[:rng_len] for t, rng_len in zip(corpus.default_corpus()[:64], [40, 120, 300, 600] * 16)]
    proc, port = start_server([f"--checkpoint={args.workdir}", f"--batch_size={args.batch_size}",
                               f"--cache_mib={args.cache_mib}", f"--max_waiting={4 * args.clients}",
                               "--max_seq_len=512", "--warmup", "--shutdown_s=30"])
    model = os.path.basename(os.path.normpath(args.workdir))
    soak = Soak(args, port, model, prompts)
    start = time.perf_counter()
    stop_at = start + args.duration
    threads = [threading.Thread(target=soak.client, args=(c, stop_at)) for c in range(args.clients)]
    for t in threads:
        t.start()
    time.sleep(0.2 * args.duration)
    rss_warm = rss_mib(proc.pid)
    rss_trace = [(round(time.perf_counter() - start), round(rss_warm, 1))]
    while any(t.is_alive() for t in threads):
        time.sleep(5)
        m = metrics(port)
        print(f"  {time.perf_counter() - start:5.0f}s  {dict(soak.outcomes)}  running "
              f"{m.get('dsv3:num_requests_running', 0):.0f} waiting {m.get('dsv3:num_requests_waiting', 0):.0f} "
              f"pages {m.get('dsv3:cache_pages_used', 0):.0f} RSS {rss_mib(proc.pid):.0f} MiB", flush=True)
        rss_trace.append((round(time.perf_counter() - start), round(rss_mib(proc.pid), 1)))
    for t in threads:
        t.join()
    deadline = time.perf_counter() + 60  # cancelled requests drain
    while time.perf_counter() < deadline:
        m = metrics(port)
        if not (m["dsv3:num_requests_running"] or m["dsv3:num_requests_waiting"] or m["dsv3:cache_pages_used"]):
            break
        time.sleep(0.5)
    m = metrics(port)
    rss_end = rss_mib(proc.pid)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    row = {"clients": args.clients, "duration_s": args.duration, "outcomes": dict(soak.outcomes),
           "requests": sum(soak.outcomes.values()), "unexpected": soak.outcomes.get("unexpected", 0),
           "unexpected_examples": soak.examples.get("unexpected", []),
           "preemptions": m.get("dsv3:num_preemptions_total", 0),
           "pages_in_use_at_end": m["dsv3:cache_pages_used"], "requests_held_at_end": m["dsv3:requests_held"],
           "server_rss_mib_after_warmup": round(rss_warm, 1), "server_rss_mib_end": round(rss_end, 1),
           "rss_growth_pct": round(100 * (rss_end - rss_warm) / rss_warm, 2), "rss_trace_s_mib": rss_trace,
           "server_exit_code": code}
    print(f"\n{'clients x seconds':<28}{args.clients} x {args.duration:.0f}")
    for k, v in sorted(soak.outcomes.items()):
        print(f"  {k:<26}{v}")
    for k in ("requests", "unexpected", "preemptions", "pages_in_use_at_end", "requests_held_at_end",
              "server_rss_mib_after_warmup", "server_rss_mib_end", "rss_growth_pct", "server_exit_code"):
        print(f"{k:<28}{row[k]}")
    for e in row["unexpected_examples"]:
        print(f"  unexpected: {e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
