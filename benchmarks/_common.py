"""Helpers shared by the benchmarks that compare dsv3_jax with transformers' DeepseekV3ForCausalLM.

Import this before jax/torch: it puts the repository root on sys.path and keeps XLA from reserving
most of the GPU's memory up front (torch runs in the same process and needs some of it).
"""
from __future__ import annotations

import importlib.util
import os
import re
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dsv3_jax import runtime  # noqa: E402
from dsv3_jax.config import ModelConfig  # noqa: E402
from dsv3_jax.flops import matmul_params_per_token, train_flops_per_token  # noqa: E402,F401 (the benchmarks' formula)
from dsv3_jax.model import abstract_model, param_counts  # noqa: E402,F401 (abstract_model: used by the benchmarks)


def load_config(path: str | None = None):
    """The ConfigDict of a configs/*.py file (default: configs/tiny.py)."""
    path = path or os.path.join(ROOT, "configs", "tiny.py")
    spec = importlib.util.spec_from_file_location("bench_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def on_gpu() -> bool:
    return runtime.platform() == "gpu"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def torch_setup(threads: int | None = None):
    """Import torch, set its intra-op threads (default: the cores this process may use) and return
    (torch, device): cuda when available, else cpu."""
    import torch

    torch.set_num_threads(threads or cores())
    return torch, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def strict_float32(torch=None):
    """Full-precision float32 matmuls in both frameworks. On a GPU, XLA's default precision runs float32
    dots in TF32 while torch's default does not; this makes both true float32 (a no-op on CPU)."""
    if on_gpu():
        jax.config.update("jax_default_matmul_precision", "highest")
    if torch is not None and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def torch_dtype(torch, name: str):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def median(xs) -> float:
    return statistics.median(xs)


def timed(fn, *args, reps: int = 3, long_s: float | None = None) -> float:
    """Median seconds of `reps` calls of fn(*args) after one untimed call (compilation), each waited for with
    block_until_ready; with `long_s`, a first call longer than that is followed by one timed call only."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    if long_s is not None and time.perf_counter() - t0 > long_s:
        reps = 1
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hf_config(cfg: ModelConfig, **kwargs):
    """transformers.DeepseekV3Config from our ModelConfig, through the config.json converter of
    dsv3_jax.interop.hf (so the benchmark builds exactly the model `hf.save` would write).
    `kwargs` go to the config as well (attn_implementation, experts_implementation, ...)."""
    import transformers

    from dsv3_jax.interop.hf import config_to_hf

    d = config_to_hf(cfg)
    for k in ("architectures", "torch_dtype"):
        d.pop(k, None)
    return transformers.DeepseekV3Config(**d, **kwargs)


# ------------------------------------------------------------------ matmul roofline

def matmul_peak_jax(n: int, dtype, reps: int = 5) -> float:
    """FLOP/s of a jitted n x n x n matmul in jax (median of `reps`, after one warm-up)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / median(times)


def matmul_peak_torch(torch, device, n: int, dtype, reps: int = 5) -> float:
    """FLOP/s of an n x n x n torch.matmul on `device` (median of `reps`, after one warm-up)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / median(times)


def fmt_flops(x: float) -> str:
    for unit, scale in (("TFLOP/s", 1e12), ("GFLOP/s", 1e9)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x / 1e6:.1f} MFLOP/s"


class LoadWatch:
    """The machine's state around a measurement: the 1-minute load average when made and when `line()` is called,
    so a run on a busy machine shows in its own output (the run itself raises the 'after' figure towards the
    threads it uses; a 'before' well above 0 means something else was running)."""

    def __init__(self):
        self.before = os.getloadavg()[0]
        self.after = None

    def line(self) -> str:
        self.after = os.getloadavg()[0]
        busy = "  [the machine was busy before the run: ratios are less reliable]" if self.before > 0.5 else ""
        return f"load average (1 min): {self.before:.2f} before, {self.after:.2f} after, {cores()} cores{busy}"

    def record(self) -> dict:
        return {"load_before": self.before, "load_after": self.after, "cores": cores()}


def versions(torch=None) -> str:
    import flax
    import transformers

    parts = [f"jax {jax.__version__}", f"flax {flax.__version__}", f"transformers {transformers.__version__}"]
    if torch is not None:
        parts.append(f"torch {torch.__version__}")
    return ", ".join(parts)


# ------------------------------------------------------------------ profiles

CONTROL_FLOW = re.compile(r"(while|conditional|call|closed_call)(\.\d+)?$")


def traced_ops(trace_dir: str) -> dict[tuple[str, str], float]:
    """(HLO module, op) -> milliseconds, summed over a `jax.profiler.trace(trace_dir, create_perfetto_trace=True)`.
    On an accelerator: the kernels on the device's streams (processes named /device:...); on CPU: the XLA ops run
    on XLA's threads (each event names its module: 'jit_decode_step', ...)."""
    import collections
    import glob
    import gzip
    import json

    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(paths[-1]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    meta = [e for e in events if e.get("ph") == "M"]
    procs = {e["pid"]: e["args"].get("name", "") for e in meta if e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"].get("name", "") for e in meta if e.get("name") == "thread_name"}
    device = {p for p, name in procs.items() if name.startswith("/device:")}

    def counted(e):
        if device:
            return e["pid"] in device
        return (threads.get((e["pid"], e["tid"]), "").startswith("tf_XLA") and "::" not in e["name"]
                and not e["name"].startswith("end: ")  # (the thunk executor's end markers, ~2 us each)
                and not CONTROL_FLOW.match(e["name"]))  # (a loop or branch: its body's ops are counted)

    total = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and counted(e):
            total[(e.get("args", {}).get("hlo_module", ""), e["name"])] += float(e.get("dur", 0.0)) / 1e3
    return dict(total)


def top_ops(trace_dir: str, n: int | None = 15, by_module: bool = False) -> list[dict]:
    """The ops that took the most time in a trace (`traced_ops`): [{name, ms, share}], summed over the trace,
    largest first; with by_module, each name is 'module/op' (several programs in one trace)."""
    import collections

    total = collections.Counter()
    for (module, op), ms in traced_ops(trace_dir).items():
        total[f"{module}/{op}" if by_module and module else op] += ms
    whole = sum(total.values()) or 1.0
    return [{"name": k, "ms": v, "share": v / whole} for k, v in total.most_common(n)]


class CompiledTexts:
    """While active, records the abstract arguments of the named `jax.jit` functions of `module` (patched by
    attribute, so callers that look them up there, like the engine's `steps.decode_step`, are seen); then
    `texts()` gives their optimized HLO text by the module name a trace shows ('jit_<name>'), compiled again for
    every distinct set of shapes and static arguments they were called with (several programs of one function
    share its module name in a trace: their texts are joined, and an op name two of them use maps to the later
    one's scope)."""

    def __init__(self, module, *names: str):
        self.module, self.names, self.calls = module, names, {}

    def __enter__(self):
        self.saved = {n: getattr(self.module, n) for n in self.names}
        for n, fn in self.saved.items():
            def spy(*args, _fn=fn, _name=n, **kw):
                abstract = lambda x: (jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)  # noqa: E731
                                      if isinstance(x, jax.Array) else x)
                call = (jax.tree.map(abstract, args), jax.tree.map(abstract, kw))  # (before donation)
                self.calls.setdefault(_name, {}).setdefault(repr(call), call)
                return _fn(*args, **kw)
            setattr(self.module, n, spy)
        return self

    def __exit__(self, *exc):
        for n, fn in self.saved.items():
            setattr(self.module, n, fn)
        return False

    def texts(self) -> dict[str, str]:
        return {f"jit_{n}": "\n".join(self.saved[n].lower(*args, **kw).compile().as_text()
                                      for args, kw in calls.values())
                for n, calls in self.calls.items()}


def torch_profiled(torch, device, fn, path: str | None, n: int = 15) -> tuple:
    """Runs `fn()` under torch.profiler and writes the Chrome trace to `path` (None: not written; a long run's
    trace takes minutes to write): -> (what fn returned, the top `n` ops by self time [{name, ms, share}])."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        out = fn()
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        prof.export_chrome_trace(path)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    evs = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    whole = sum(getattr(e, key) for e in evs) or 1.0
    return out, [{"name": e.key, "ms": getattr(e, key) / 1e3, "share": getattr(e, key) / whole} for e in evs[:n]]


def print_ops(title: str, ops: list[dict], first: str = "op"):
    print(f"\n{title}")
    print(f"| {first} | ms | share |" + (" ops |" if ops and "ops" in ops[0] else ""))
    print("|---|---|---|" + ("---|" if ops and "ops" in ops[0] else ""))
    for o in ops:
        name = o.get("scope", o.get("name", ""))[:90]
        print(f"| {name} | {o['ms']:.2f} | {o['share']:.1%} |" + (f" {o['ops']} |" if "ops" in o else ""))


# the model's named scopes (jax.named_scope in dsv3_jax), most specific first: a profiled op counts under the first
# that its op_name (the HLO metadata: the scope path, "transpose(jvp(...))" in the backward) contains
SCOPES = (("expert_gemms", "routed experts: GEMMs"), ("dispatch", "routed experts: dispatch"),
          ("combine", "routed experts: combine"), ("routing", "router"), ("shared_experts", "shared expert"),
          ("dense_ffn", "dense FFN"), ("attention", "attention"), ("mtp_", "MTP block"),
          ("dense_layers", "dense layers (norms, residual)"), ("moe_layers", "MoE layers (norms, residual)"))


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> its op_name metadata, from an optimized HLO module's text (`compiled.as_text()`). A
    fusion or call that XLA made without metadata takes the first op_name of the computation it calls."""
    inst = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=')
    meta = re.compile(r'metadata=\{[^}]*?op_name="([^"]*)"')
    calls = re.compile(r'calls=%?([\w.\-]+)')
    names, called, first_in, comp = {}, {}, {}, None
    for line in hlo_text.splitlines():
        if not line.startswith(" ") and "{" in line:  # a computation's header: '%fused_computation.45 (...) {'
            comp = line.split()[0].lstrip("%") if not line.startswith("ENTRY") else line.split()[1].lstrip("%")
            continue
        m = inst.match(line)
        if not m:
            continue
        op = meta.search(line)
        if op:
            names[m.group(1)] = op.group(1)
            first_in.setdefault(comp, op.group(1))
        else:
            c = calls.search(line)
            if c:
                called[m.group(1)] = c.group(1)
    for name, comp in called.items():
        if comp in first_in:
            names.setdefault(name, first_in[comp])
    return names


def scope_of(op_name: str, training: bool = True) -> str:
    """'<scope> (fwd|bwd)' of an op_name; ops in no model scope are 'embedding, head, loss' or 'optimizer update'
    in a training step, 'embedding, head, sampling, cache' in inference (training=False: no fwd/bwd either)."""
    half = "bwd" if "transpose(" in op_name else "fwd"
    for key, label in SCOPES:
        if key in op_name:
            return f"{label} ({half})" if training else label
    if not training:
        return "embedding, head, sampling, cache"
    return "optimizer update" if op_name and "jvp(" not in op_name and "transpose(" not in op_name else \
        f"embedding, head, loss ({half})"


def scope_table(trace_dir: str, hlo: str | dict[str, str], training: bool = True) -> list[dict]:
    """The traced time of every XLA op (`traced_ops`) grouped by the model's named scopes: [{scope, ms, share,
    ops}], largest first. `hlo`: the optimized HLO text of the traced program, or {module name: text} of several
    (`CompiledTexts`); ops of no known module, or whose name the module does not know, count under 'unmapped'."""
    import collections

    names = ({m: hlo_op_names(t) for m, t in hlo.items()} if isinstance(hlo, dict) else None)
    single = hlo_op_names(hlo) if isinstance(hlo, str) else None
    total = collections.Counter()
    count = collections.Counter()
    for (module, op), ms in traced_ops(trace_dir).items():
        known = single if single is not None else names.get(module, {})
        scope = scope_of(known[op], training) if op in known else "unmapped"
        total[scope] += ms
        count[scope] += 1
    whole = sum(total.values()) or 1.0
    return [{"scope": k, "ms": v, "share": v / whole, "ops": count[k]} for k, v in total.most_common()]
