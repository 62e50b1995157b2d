"""Training throughput: one full step (forward, backward, AdamW update) of dsv3_jax against transformers'
DeepseekV3ForCausalLM (PyTorch, eager) on the same config, batch, dtype and machine, in one process.

    python benchmarks/train_throughput.py [--config configs/tiny.py] [--batch 16 --seq 128]
                                          [--warmup 2 --steps 5] [--dtype float32|bfloat16]

dsv3_jax: the real training step (`dsv3_jax.train.step.make_train_step`) with the optimizer and
schedules `train.py` uses (`dsv3_jax.train.loop.make_schedules`: global-norm clipping + masked AdamW,
MTP weight lambda, balance-loss alpha, router-bias update gamma), state built by `loop.init_state`.
Two rows: MTP as configured, and MTP depth 0 (the same network as transformers', which has no MTP).
transformers: `DeepseekV3Config` from our ModelConfig through `dsv3_jax.interop.hf.config_to_hf`,
loss through `labels`, `clip_grad_norm_(1.0)` + `torch.optim.AdamW` (0.9, 0.95, wd 0.1); no MTP, no
balance loss, no router-bias update (transformers trains without them). Both see the same batch
of random token ids [B, T] (dsv3_jax reads a window [B, T+1] and predicts T tokens; transformers shifts
`labels` = the T inputs and predicts T-1; both run the forward over B*T tokens, which is what is counted).

Timing: compilation (jax) and the first steps (both) are excluded (--warmup), then each of --steps steps
is timed on its own (block_until_ready / cuda.synchronize) and the median is reported.

Dtypes: float32 on CPU (with --dtype float32 on a GPU: true float32 matmuls in both; XLA would otherwise
use TF32 where torch does not). On a GPU the default is bfloat16: dsv3_jax computes in bf16 with float32
master weights and optimizer state (model.dtype=bfloat16, model.param_dtype=float32); transformers runs
once under torch.autocast(bfloat16) with float32 weights (the same recipe) and once with the weights
themselves (and so AdamW's state) in bfloat16 (--torch_bf16 picks).

Model FLOPs per token (forward + backward = 3 x forward; one multiply-add = 2 FLOPs):

    F = 6 * (N_main + sum_k N_mtp_k)  +  6 * (L + D_mtp) * H * (dqk + dv) * T / 2

N_main: parameters a token multiplies against in the main model: `dsv3_jax.model.param_counts`
'params_active' (routed experts counted K/E, head included) less the embedding table (a gather) and the
RMSNorm gains (elementwise). N_mtp_k: MTP module k's own parameters counted the same way plus the shared
head applied once more (D x V). The second term is attention's scores (q.k: 2 * H * dqk per query-key
pair) and weighted values (2 * H * dv per pair), forward + backward x3, over T/2 keys per query on
average (causal halving), in the L main layers and D_mtp MTP blocks; dqk = qk_nope + qk_rope head dims,
dv = v_head_dim. The transformers row and the depth-0 row use D_mtp = 0.
Achieved model FLOP/s = F * tokens/s. The roofline is the machine's measured matmul peak in this run: a
square n x n x n matmul (f32 on CPU, bf16 on GPU) in jax and in torch; the larger of the two is used.

Threads: torch's intra-op threads are set to the cores this process may use (--torch_threads; a list
such as 1,2 gives one transformers row each); XLA:CPU uses all of them on its own (XLA_FLAGS=
"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" pins it to one). On a CPU shared
with other busy processes, torch's OpenMP threads can slow down many-fold when they outnumber the idle
cores (every parallel region waits for its slowest thread); compare with --torch_threads 1 there.
"""
from __future__ import annotations

import _common as C

import argparse
import os
import time

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dsv3_jax import runtime  # noqa: E402
from dsv3_jax.config import ModelConfig  # noqa: E402
from dsv3_jax.train.loop import init_state, make_schedules  # noqa: E402
from dsv3_jax.train.step import make_train_step  # noqa: E402


def jax_step_times(config, cfg: ModelConfig, window: np.ndarray, warmup: int, steps: int, profile: str = ""):
    """Per-step seconds of the real dsv3_jax train step; also the compile + first-step time. `profile`: a
    directory where 3 more steps are traced (jax.profiler, perfetto) after the timed ones."""
    tx, schedule, lam, gamma, _ = make_schedules(config)
    graphdef, state = init_state(cfg, tx, config.train.seed, runtime.from_config(config))
    train_step = make_train_step(graphdef, tx, schedule)
    w = jnp.asarray(window)
    alpha = jnp.float32(config.moe.seq_balance_alpha)
    t0 = time.perf_counter()
    times, first = [], None
    for i in range(warmup + steps):
        t = time.perf_counter()
        state, metrics = train_step(state, w, jnp.float32(lam(i)), alpha, jnp.float32(gamma(i)))
        jax.block_until_ready((state, metrics))
        if i == 0:
            first = time.perf_counter() - t0
        if i >= warmup:
            times.append(time.perf_counter() - t)
    if profile:
        args = (state, w, jnp.float32(lam(0)), alpha, jnp.float32(gamma(0)))
        HLO[:] = [train_step.lower(*args).compile().as_text()]  # (op names -> named scopes, `C.scope_table`)
        with jax.profiler.trace(profile, create_perfetto_trace=True):
            for i in range(3):
                state, metrics = train_step(state, w, jnp.float32(lam(i)), alpha, jnp.float32(gamma(i)))
            jax.block_until_ready((state, metrics))
    loss = float(metrics["loss"])
    del state
    return times, first, loss


def torch_step_times(torch, device, cfg: ModelConfig, window: np.ndarray, warmup: int, steps: int, mode: str,
                     experts: str | None, seed: int, profile: str = ""):
    """Per-step seconds of transformers' DeepseekV3ForCausalLM: forward with labels, backward, clip, AdamW.
    mode: 'float32', 'autocast' (bf16 autocast, f32 weights) or 'weights' (bf16 weights). `profile`: a directory
    where 3 more steps are traced with torch.profiler (a Chrome trace; `torch_top_ops` reads the ops)."""
    import transformers

    kw = {} if not experts else {"experts_implementation": experts}
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(C.hf_config(cfg, **kw)).to(device)
    if mode == "weights":
        model = model.to(torch.bfloat16)
    model.train()
    impl = (getattr(model.config, "_attn_implementation", None), getattr(model.config, "_experts_implementation", None))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.as_tensor(window[:, :-1], dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if mode == "autocast"
                else _null())
    times, first = [], None

    def one_step(model, opt):
        with autocast:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return loss

    t0 = time.perf_counter()
    for i in range(warmup + steps):
        t = time.perf_counter()
        loss = one_step(model, opt)
        if i == 0:
            first = time.perf_counter() - t0
        if i >= warmup:
            times.append(time.perf_counter() - t)
    if profile:
        def three(model=model, opt=opt):
            for _ in range(3):
                one_step(model, opt)

        _, TORCH_OPS[:] = C.torch_profiled(torch, device, three, os.path.join(profile, "torch_trace.json"))
    out = float(loss.detach().float().cpu())
    del model, opt
    return times, first, out, impl


HLO: list[str] = []  # the profiled dsv3_jax step's optimized HLO text
TORCH_OPS: list[dict] = []  # the profiled transformers row's top ops (self time), filled by torch_step_times


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="a configs/*.py file (default configs/tiny.py); its model section")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: config train.batch_size)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the config's train.seq_len)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles, for jax)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype of both (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--torch_bf16", default="autocast,weights",
                   help="with bfloat16: transformers rows to run, 'autocast' (f32 weights) and/or 'weights' (bf16)")
    p.add_argument("--hf_experts", default="",
                   help="transformers experts_implementation(s), comma-separated (e.g. grouped_mm,eager); "
                        "default: transformers' own default")
    p.add_argument("--torch_threads", default="",
                   help="torch intra-op threads, comma-separated for one transformers row each (default: usable cores)")
    p.add_argument("--matmul_n", type=int, default=None, help="roofline matmul size (default 2048 CPU, 8192 GPU)")
    p.add_argument("--skip", default="", help="comma-separated rows to skip: mtp, nomtp, torch")
    p.add_argument("--fp8", action="store_true", help="also the step with model.fp8=True (the FP8 recipe), MTP as "
                                                       "configured: the BF16 / FP8 ratio")
    p.add_argument("--profile", default="", help="trace 3 steps of the first dsv3_jax row (jax.profiler) and of the "
                                                 "first transformers row (torch.profiler) into this directory and "
                                                 "print the top ops by time")
    p.add_argument("--json", default="", help="also write the rows (and the profile's top ops) to this file")
    a = p.parse_args()

    config = C.load_config(a.config)
    B = a.batch or config.train.batch_size
    T = a.seq or config.train.seq_len
    gpu = C.on_gpu()
    dtype = a.dtype or ("bfloat16" if gpu else "float32")
    cfg = ModelConfig.from_dict(config.model).replace(dtype=dtype)
    rt = runtime.from_config(config)
    print(rt.describe())
    threads = [int(t) for t in a.torch_threads.split(",") if t] or [C.cores()]
    torch, device = C.torch_setup(threads[0])
    if dtype == "float32":
        C.strict_float32(torch)
    skip = set(filter(None, a.skip.split(",")))
    window = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    n = a.matmul_n or (8192 if gpu else 2048)

    print(f"backend={runtime.platform()} ({runtime.device_kind()}), torch device={device}, "
          f"{C.versions(torch)}")
    print(f"cores={C.cores()} torch threads={torch.get_num_threads()}; batch {B} x {T} tokens, dtype {dtype}, "
          f"warmup {a.warmup}, median of {a.steps} steps")

    mm_dtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    peak_jax = C.matmul_peak_jax(n, mm_dtype)
    peak_torch = C.matmul_peak_torch(torch, device, n, C.torch_dtype(torch, dtype))
    peak = max(peak_jax, peak_torch)
    print(f"matmul roofline ({n}^3, {dtype}): jax {C.fmt_flops(peak_jax)}, torch {C.fmt_flops(peak_torch)}")

    cfg0 = cfg.replace(num_nextn_predict_layers=0)
    flops_mtp = C.train_flops_per_token(C.abstract_model(cfg), T)
    flops0 = C.train_flops_per_token(C.abstract_model(cfg0), T)
    counts = C.matmul_params_per_token(C.abstract_model(cfg))
    print(f"model FLOPs/token: {flops0 / 1e6:.2f}M without MTP (matmul params/token {counts['main']:,}), "
          f"{flops_mtp / 1e6:.2f}M with MTP depth {cfg.num_nextn_predict_layers} "
          f"(+{sum(counts['mtp']):,} params/token)")

    rows = []  # (name, seconds/step, flops/token, first-step seconds, final loss, note)
    load = C.LoadWatch()
    profile = a.profile
    if cfg.num_nextn_predict_layers and "mtp" not in skip:
        t, first, loss = jax_step_times(config, cfg, window, a.warmup, a.steps, profile)
        profile = ""
        rows.append((f"dsv3_jax (MTP depth {cfg.num_nextn_predict_layers})", C.median(t), flops_mtp, first, loss,
                     f"moe_impl={rt.expert_impl}"))
    if a.fp8:
        fp8_config = config.copy_and_resolve_references()
        fp8_config.model.fp8 = True
        t, first, loss = jax_step_times(fp8_config, cfg, window, a.warmup, a.steps)
        rows.append((f"dsv3_jax FP8 (MTP depth {cfg.num_nextn_predict_layers})", C.median(t), flops_mtp, first,
                     loss, "model.fp8=True: block-scaled FP8 GEMMs"))
    if "nomtp" not in skip:
        t, first, loss = jax_step_times(config, cfg0, window, a.warmup, a.steps, profile)
        profile = ""
        rows.append(("dsv3_jax (MTP off)", C.median(t), flops0, first, loss, f"moe_impl={rt.expert_impl}"))
    if "torch" not in skip:
        modes = ["float32"] if dtype == "float32" else [m for m in a.torch_bf16.split(",") if m]
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            for experts in (a.hf_experts.split(",") if a.hf_experts else [None]):
                for mode in modes:
                    t, first, loss, (attn, exp) = torch_step_times(torch, device, cfg0, window, a.warmup, a.steps,
                                                                   mode, experts, config.train.seed,
                                                                   a.profile if not TORCH_OPS else "")
                    label = "transformers" + ("" if mode == "float32" else f" (bf16 {mode})")
                    if a.hf_experts:
                        label += f" [{exp}]"
                    if len(threads) > 1:
                        label += f" ({n_threads} thread{'s' if n_threads > 1 else ''})"
                    rows.append((label, C.median(t), flops0, first, loss,
                                 f"attn={attn}, experts={exp}, torch threads={n_threads}"))

    ref = min((r[1] for r in rows if r[0].startswith("transformers")), default=None)  # the fastest transformers row
    tokens = B * T
    print()
    print("| implementation | tokens/s | ms/step | vs transformers | model FLOP/s | of matmul peak |")
    print("|---|---|---|---|---|---|")
    for name, s, f, _, _, _ in rows:
        ratio = f"{ref / s:.2f}x" if ref else "-"
        print(f"| {name} | {tokens / s:,.0f} | {s * 1e3:.1f} | {ratio} | {C.fmt_flops(f * tokens / s)} | "
              f"{f * tokens / s / peak:.1%} |")
    print()
    print(load.line())
    print("vs transformers: the fastest transformers row's ms/step over this row's (tokens/s ratio). The MTP row "
          "does more work per token (its FLOPs/token include the MTP module); compare the 'MTP off' row for the "
          "same network.")
    for name, _, _, first, loss, note in rows:
        print(f"  {name}: first step {first:.1f}s (jax: includes compilation), loss after the run {loss:.3f}, {note}")
    ops, scopes = [], []
    if a.profile:
        ops = C.top_ops(a.profile)
        C.print_ops(f"top ops by time over 3 traced steps of the first dsv3_jax row ({a.profile}):", ops)
        scopes = C.scope_table(a.profile, HLO[0])
        C.print_ops("the same trace by the model's named scopes (each op under its op_name's scope; bwd: the "
                    "backward):", scopes, "scope")
        if TORCH_OPS:
            C.print_ops(f"top ops by self time over 3 profiled steps of the first transformers row (torch.profiler; "
                        f"{a.profile}/torch_trace.json):", TORCH_OPS)
    if a.json:
        import json

        out = {"backend": runtime.platform(), "device": runtime.device_kind(), "versions": C.versions(torch),
               "config": a.config, "batch": B, "seq": T, "dtype": dtype, "matmul_peak_flops": peak,
               "rows": [{"name": name, "ms_per_step": s * 1e3, "tokens_per_sec": tokens / s, "flops_per_token": f,
                         "model_flops_per_sec": f * tokens / s, "mfu": f * tokens / s / peak,
                         "vs_transformers": (ref / s) if ref else None, "first_step_s": first, "loss": loss,
                         "note": note} for name, s, f, first, loss, note in rows],
               "top_ops": ops, "scopes": scopes, "torch_top_ops": TORCH_OPS} | load.record()
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"(total {time.time() - t0:.0f}s)")
