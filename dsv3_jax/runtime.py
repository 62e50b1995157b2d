"""Runtime: how the network runs, as opposed to what it is (`ModelConfig`).

A `Runtime` is frozen and fully concrete: every "auto" of the config is decided here, once, by the
resolver (`resolve` / `from_config`), which is also the only code in the package that asks JAX which
backend it runs on (`platform`). Entry points (train.py, infer.py, the converter, benchmarks,
notebooks) resolve one, print `describe()` and pass it to the model explicitly:

    rt = runtime.from_config(config, mesh)           # or runtime.resolve(moe_impl="dense", ...)
    model = DeepSeekV3(cfg, rngs=nnx.Rngs(0), runtime=rt)

`DeepSeekV3(cfg, rngs=...)` without one uses `default()`: this backend, no mesh (one device). A resolved
Runtime is never edited; its variants come from named constructors: `for_decode()`, `local()`,
`for_engine(paged_attention)`, `with_fp8_weights(mode)`, `without_fp8_gemms()`.

What it holds, and who reads it:
    remat                                                    the layer-stack strategy (`strategies.stack`): a
                                                             `lax.scan` over the stacked layers, remat or not
    mesh, stages, microbatches, pipeline_schedule,           the train program (`programs.program_for`): the
    pipeline_chunks, pipeline_stage_layers                   scheduled pipeline over the mesh axis 'stage' when
                                                             it has more than one stage
    expert_impl, block_size, expert_blocks_loop,            the routed-expert strategy (`strategies.experts`):
    expert_dispatch, capacity_factor,                        dense / blocks / ragged on the local device, or
    emulate_ragged_all_to_all                                expert parallelism over the mesh axis 'expert'
    decode_expert_impl                                       the local layout for cached decode steps
                                                             (`for_decode()`)
    fp8, fp8_options                                         FP8 block-scaled GEMMs and how they run
    fp8_weights                                              inference on FP8-resident weights (the release's
                                                             128x128 blocks kept as shipped): 'w8a8' or
                                                             'weight_only' GEMMs (`dsv3_jax.fp8.resident`)
    attention_f32_core                                       the absorbed-MLA core in float32 (XLA:CPU
                                                             cannot run some bf16 x bf16 -> f32 dots)
    paged_attention                                          how decode reads a paged latent cache: 'jnp'
                                                             (gather, the reference) or 'pallas' (the kernel
                                                             of `infer.paged_attention`)
    attention, attention_fallback                            the causal attention core of training and prefill:
                                                             'einsum' (scores materialised, the reference),
                                                             'blockwise' (flash attention in plain JAX),
                                                             'xla' or 'cudnn' (jax.nn.dot_product_attention;
                                                             cudnn: flash attention, MLA's 192/128 head dims on
                                                             Hopper); fallback: einsum where cuDNN refuses
    dsa_stage, dsa_loss_weight                               DeepSeek Sparse Attention training (V3.2): 'sparse'
                                                             (attend to the indexer's top-k; the indexer learns
                                                             the sparse attention's distribution) or
                                                             'dense_warmup' (attend densely; only the indexer
                                                             learns, toward the dense distribution), and the
                                                             weight of the indexer's KL in the loss (`dsa.py`)
    backend                                                  what the above was resolved for

The config keys users type keep their sections: `model.moe_impl`, `model.moe_block_size`, `model.fp8`,
`model.expert_capacity_factor`, `model.expert_dispatch`, `model.attention`, `model.dsa.stage`, `model.dsa.loss_weight`
(HF-style configs have always carried them there), `train.remat`, `mesh.*` (axes, `mesh.microbatches`,
`mesh.pipeline_schedule`) and the `fp8` section (the fields of `Fp8Options`). `ModelConfig.from_dict` skips the run
keys: `split_model_section` takes them out first.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax

from dsv3_jax.cli import ConfigError, UserError

EXPERT_IMPLS = ("dense", "blocks", "ragged", "mgpu")
GROUPED_IMPLS = ("ragged", "mgpu")  # rows sorted by expert, grouped GEMMs (experts.experts_ragged)
DISPATCHES = ("padded", "ragged")
SCHEDULES = ("gpipe", "1f1b", "interleaved")  # parallel/pipeline/schedules.py
PAGED_ATTENTION = ("jnp", "pallas")
ATTENTION = ("einsum", "blockwise", "xla", "cudnn")  # the training / prefill attention core (mla.MLA.expanded)
DSA_STAGES = ("sparse", "dense_warmup")  # DeepSeek Sparse Attention's two training stages (dsa.py)
FP8_WEIGHT_MODES = ("w8a8", "weight_only")  # activations quantised 1x128 | left in the compute dtype
# keys of a config's `model` section that describe the run, with their defaults
MODEL_RUN_KEYS: dict[str, Any] = {"moe_impl": "auto", "moe_block_size": 64, "fp8": False,
                                  "expert_capacity_factor": 0.0, "expert_dispatch": "auto", "attention": "auto",
                                  "dsa": {}}  # {stage, loss_weight}: DeepSeek Sparse Attention's training stage


# ----------------------------------------------------------------------------- the one backend query


_TARGET: contextvars.ContextVar = contextvars.ContextVar("dsv3_jax_compile_target", default=None)


def platform() -> str:
    """'cpu', 'gpu' or 'tpu': the backend this process computes on (the only `jax.default_backend()` call), or
    inside `compiling_for(devices)`, the backend of those devices."""
    target = _TARGET.get()
    b = jax.default_backend() if target is None else target.platform
    return "gpu" if b in ("gpu", "cuda", "rocm") else b


def device_kind() -> str:
    target = _TARGET.get()
    return (jax.devices()[0] if target is None else target).device_kind


@contextlib.contextmanager
def compiling_for(devices):
    """Resolve runtimes for `devices` (e.g. a TPU topology's, compiled ahead of time on this CPU: `dsv3_jax.aot`)
    instead of this process's backend: every 'auto' is decided as it would be on those chips."""
    token = _TARGET.set(list(devices)[0])
    try:
        yield
    finally:
        _TARGET.reset(token)


# ----------------------------------------------------------------------------- FP8 options


@dataclasses.dataclass(frozen=True)
class Fp8Options:
    """How the FP8 GEMMs run. Hashable: it is a static (non-differentiable) argument of the VJPs.
    Set from a config as `--config.fp8.KEY=VALUE` (the switch itself is `--config.model.fp8`)."""

    impl: str = "auto"  # 'auto' (CPU: 'blocked', accelerators: 'pallas') | 'blocked' | 'dequant' | 'pallas'
    pow2_scales: bool = False  # round every scale up to a power of two
    cache_fp8_inputs: bool = True  # keep x as fp8 tiles for Wgrad (DeepSeek) instead of x itself
    backend: str = "auto"  # Pallas: 'triton' | 'mosaic_tpu' | 'auto'
    interpret: bool | None = None  # Pallas interpret mode (default: on CPU)
    block_m: int = 128  # Pallas output tile rows (dense GEMMs; grouped GEMMs use the MoE block size)
    block_n: int = 128  # Pallas output tile columns
    num_warps: int = 8  # Triton
    num_stages: int = 3  # Triton
    tpu_fp8: bool | None = None  # feed fp8 to the TPU MXU (default: TPU v7 only)

    def gemm_kw(self) -> dict:
        return dict(impl=self.impl, backend=self.backend, interpret=self.interpret, block_n=self.block_n,
                    num_warps=self.num_warps, num_stages=self.num_stages, tpu_fp8=self.tpu_fp8)


FP8_IMPLS = ("auto", "dequant", "blocked", "pallas")
FP8_BACKENDS = ("auto", "triton", "mosaic_tpu")


def _choose(what: str, value: str, choices: tuple[str, ...], auto: str, key: str) -> str:
    if value not in choices:
        raise UserError(f"{what}={value!r}: choose from {choices}.", key=key)
    return auto if value == "auto" else value


def fp8_impl(impl: str) -> str:
    """'auto' -> 'blocked' on CPU (XLA:CPU has no FP8 units; interpret-mode Pallas is slow), else 'pallas'."""
    return _choose("fp8 gemm impl", impl, FP8_IMPLS, "blocked" if platform() == "cpu" else "pallas",
                   "fp8.impl")


def fp8_backend(backend: str, what: str = "fp8 pallas backend") -> str:
    """'auto' -> 'mosaic_tpu' on TPU, else 'triton' (every Pallas kernel of the package)."""
    return _choose(what, backend, FP8_BACKENDS, "mosaic_tpu" if platform() == "tpu" else "triton",
                   "fp8.backend")


def fp8_interpret(interpret: bool | None) -> bool:
    """Pallas kernels run in interpret mode on CPU unless told."""
    return platform() == "cpu" if interpret is None else bool(interpret)


def paged_attention_impl(impl: str) -> str:
    """'auto' -> 'jnp' on every backend for now: the Pallas kernel matches the reference on CPU (interpret mode)
    and lowers for CUDA and TPU, but no accelerator run has measured where it pays; ask for 'pallas'."""
    return _choose("paged_attention", impl, ("auto",) + PAGED_ATTENTION, "jnp", "paged_attention")


def fp8_tpu_mxu(tpu_fp8: bool | None) -> bool:
    """Only TPU v7 multiplies fp8 natively (REFERENCE.md section 9); older chips get bf16 blocks."""
    if tpu_fp8 is not None:
        return bool(tpu_fp8)
    return platform() == "tpu" and "7" in device_kind()


def resolve_fp8(options: Fp8Options | None = None, **kw) -> Fp8Options:
    """Every 'auto' / None of an Fp8Options made concrete for this backend."""
    o = dataclasses.replace(options or Fp8Options(), **kw)
    for name in ("block_m", "block_n", "num_warps", "num_stages"):
        if getattr(o, name) <= 0:
            raise UserError(f"fp8.{name}={getattr(o, name)} must be > 0.", key=f"fp8.{name}")
    return dataclasses.replace(o, impl=fp8_impl(o.impl), backend=fp8_backend(o.backend),
                               interpret=fp8_interpret(o.interpret), tpu_fp8=fp8_tpu_mxu(o.tpu_fp8))


@dataclasses.dataclass(frozen=True)
class Fp8Weights:
    """What a layer holding FP8-resident weights needs: the GEMM mode and how the GEMMs run."""

    mode: str  # 'w8a8' | 'weight_only'
    options: Fp8Options = Fp8Options()


# ----------------------------------------------------------------------------- Runtime


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How the model runs; every field concrete (build one with `resolve` or `from_config`)."""

    backend: str
    mesh: jax.sharding.Mesh | None = None
    expert_impl: str = "blocks"
    decode_expert_impl: str = "dense"
    block_size: int = 64
    expert_blocks_loop: bool = False  # 'blocks' GEMMs as a loop over the used blocks (CPU; `resolve`)
    expert_dispatch: str = "padded"
    capacity_factor: float = 0.0
    emulate_ragged_all_to_all: bool = False
    remat: bool = False
    unroll_layers: bool = False  # the layer stacks' lax.scan unrolled (CPU; accelerators keep the loop, `resolve`)
    microbatches: int = 1
    pipeline_schedule: str = "gpipe"
    pipeline_chunks: int = 1
    pipeline_stage_layers: str = ""
    fp8: bool = False
    fp8_options: Fp8Options = Fp8Options()
    fp8_weights: str | None = None  # None | 'w8a8' | 'weight_only': projections and experts held in FP8
    attention_f32_core: bool = False
    paged_attention: str = "jnp"
    attention: str = "einsum"
    attention_fallback: bool = False  # 'auto' chose cudnn: einsum where cuDNN refuses the shapes or dtype
    attention_block: int = 512  # 'blockwise': query and key rows per tile
    dsa_stage: str = "sparse"  # DeepSeek Sparse Attention training: 'sparse' | 'dense_warmup' (models with an indexer)
    dsa_loss_weight: float = 1.0  # weight of the indexer's KL in the training loss
    lora: Any = None  # lora.LoraOptions: low-rank adapters on the targeted projections (config.lora), or None

    def __post_init__(self):
        for name, value, choices in (("expert_impl", self.expert_impl, EXPERT_IMPLS),
                                     ("decode_expert_impl", self.decode_expert_impl, EXPERT_IMPLS),
                                     ("expert_dispatch", self.expert_dispatch, DISPATCHES),
                                     ("pipeline_schedule", self.pipeline_schedule, SCHEDULES),
                                     ("paged_attention", self.paged_attention, PAGED_ATTENTION),
                                     ("attention", self.attention, ATTENTION),
                                     ("dsa_stage", self.dsa_stage, DSA_STAGES)):
            if value not in choices:
                raise UserError(f"Runtime.{name}={value!r}: choose from {choices} (build a Runtime with "
                                f"dsv3_jax.runtime.resolve, which also accepts 'auto').", key=f"Runtime.{name}")
        if self.block_size <= 0:
            raise UserError(f"moe_block_size={self.block_size} must be > 0 (rows per expert block).",
                            key="moe_block_size")
        if self.attention_block <= 0:
            raise UserError(f"Runtime.attention_block={self.attention_block} must be > 0 (rows per attention tile).",
                            key="Runtime.attention_block")
        if not self.dsa_loss_weight >= 0:
            raise UserError(f"dsa.loss_weight={self.dsa_loss_weight} must be >= 0 (the weight of the indexer's KL).",
                            key="dsa.loss_weight")
        if self.capacity_factor < 0:
            raise UserError(f"expert_capacity_factor={self.capacity_factor} must be >= 0 (0: dropless).",
                            key="expert_capacity_factor")
        if self.microbatches < 1:
            raise UserError(f"Runtime.microbatches={self.microbatches} must be >= 1.", key="Runtime.microbatches")
        if self.pipeline_chunks < 1 or (self.pipeline_chunks > 1 and self.pipeline_schedule != "interleaved"):
            raise UserError(f"pipeline_chunks={self.pipeline_chunks}: chunks per stage are >= 1, and > 1 only with "
                            f"pipeline_schedule='interleaved'.", key="pipeline_chunks")
        if self.pipeline_schedule == "interleaved" and self.stages > 1 and self.microbatches % self.stages:
            raise UserError(f"microbatches={self.microbatches}: the interleaved schedule feeds micro-batches in "
                            f"groups of the {self.stages} stages; choose a multiple of {self.stages}.",
                            key="microbatches")
        if self.fp8 and self.expert_impl in GROUPED_IMPLS:
            raise UserError("fp8 runs the routed experts in the 'blocks' layout; resolve the Runtime with "
                            "moe_impl='auto' or 'blocks'.", key="fp8")
        if self.fp8_weights not in (None,) + FP8_WEIGHT_MODES:
            raise UserError(f"fp8_weights={self.fp8_weights!r}: choose from {FP8_WEIGHT_MODES} (or None).",
                            key="fp8_weights")
        if self.fp8_weights and self.fp8:
            raise UserError("fp8_weights (inference on FP8-resident weights) and fp8 (the FP8 training GEMMs on "
                            "float32 master weights) exclude each other; FP8-resident weights cannot be trained.",
                            key="fp8_weights")
        if self.fp8_weights and {self.expert_impl, self.decode_expert_impl} & set(GROUPED_IMPLS):
            raise UserError("FP8-resident experts run in the 'blocks' or 'dense' layout; resolve the Runtime with "
                            "moe_impl='auto', 'blocks' or 'dense'.", key="fp8_weights")

    # -- what the mesh implies
    def axis(self, name: str) -> int:
        return 1 if self.mesh is None or name not in self.mesh.axis_names else int(self.mesh.shape[name])

    @property
    def stages(self) -> int:
        return self.axis("stage")

    @property
    def expert_parallel(self) -> bool:
        return self.axis("expert") > 1

    @property
    def fp8_gemms(self) -> Fp8Options | None:
        """The FP8 options when the FP8 GEMMs are on, else None (what layers and expert GEMMs take)."""
        return self.fp8_options if self.fp8 else None

    @property
    def fp8_resident(self) -> Fp8Weights | None:
        """How FP8-resident weights multiply (mode and GEMM options), or None for float weights."""
        return Fp8Weights(self.fp8_weights, self.fp8_options) if self.fp8_weights else None

    @property
    def data_shards(self) -> int:
        """Ways the batch is split: data x fsdp x expert."""
        return self.axis("data") * self.axis("fsdp") * self.axis("expert")

    # -- derived runtimes (a resolved Runtime is never edited: each variant has a name)
    def with_fp8_weights(self, mode: str | None) -> Runtime:
        """This runtime on FP8-resident weights in `mode` ('w8a8' | 'weight_only'; None: float weights). The
        FP8 grouped GEMM uses the block layout, so a 'ragged' expert layout becomes 'blocks'."""
        if mode is None:
            return dataclasses.replace(self, fp8_weights=None)

        def grouped(impl):
            return "blocks" if impl in GROUPED_IMPLS else impl
        return dataclasses.replace(self, fp8_weights=mode, expert_impl=grouped(self.expert_impl),
                                   decode_expert_impl=grouped(self.decode_expert_impl))

    def without_fp8_gemms(self) -> Runtime:
        """This runtime with the FP8 training GEMMs off (`fp8=False`), e.g. before `with_fp8_weights`."""
        return dataclasses.replace(self, fp8=False)

    def for_decode(self, expert_impl: str | None = None) -> Runtime:
        """The runtime of cached decode steps: the decode expert layout (cheapest at a few rows), or `expert_impl`."""
        return dataclasses.replace(self, expert_impl=expert_impl or self.decode_expert_impl)

    def local(self) -> Runtime:
        """This runtime on one device: no mesh (no pipeline, local experts); callers place arrays themselves."""
        return dataclasses.replace(self, mesh=None)

    def for_engine(self, paged_attention: str = "auto") -> Runtime:
        """The serving engine's runtime: `local()`, decode reading the paged cache with `paged_attention`."""
        return dataclasses.replace(self, mesh=None, paged_attention=paged_attention_impl(paged_attention))

    def describe(self) -> str:
        """One line for start-up logs."""
        if self.mesh is None:
            mesh = "1 device, no mesh"
        else:
            axes = " x ".join(f"{a} {s}" for a, s in self.mesh.shape.items() if s > 1)
            mesh = f"mesh {axes} ({self.mesh.size} devices)" if axes else "a one-device mesh"
        loop = (", a loop over the used blocks" if self.expert_blocks_loop and not (self.fp8 or self.fp8_weights)
                else "")
        if self.expert_parallel:
            cf = "dropless" if self.capacity_factor <= 0 else f"capacity factor {self.capacity_factor:g}"
            experts = (f"expert-parallel ({self.expert_dispatch} dispatch, {cf}, local blocks of {self.block_size}"
                       f"{loop if self.expert_impl == 'blocks' else ''})")
        else:
            experts = self.expert_impl + (f" (blocks of {self.block_size}{loop})" if self.expert_impl == "blocks"
                                          else "")
        chunks = f" x {self.pipeline_chunks} chunks" if self.pipeline_chunks > 1 else ""
        stack = (f"pipeline {self.pipeline_schedule} {self.stages} stages{chunks} x {self.microbatches} micro-batches"
                 if self.stages > 1 else ("scan unrolled" if self.unroll_layers else "scan"))
        fp8 = "off"
        if self.fp8:
            o = self.fp8_options
            fp8 = f"on ({o.impl}" + (f", {o.backend}" if o.impl == "pallas" else "") + ")"
        if self.fp8_weights:
            o = self.fp8_options
            fp8 = (f"weights resident ({self.fp8_weights}, {o.impl}" + (f", {o.backend}" if o.impl == "pallas" else "")
                   + ")")
        paged = "; paged attention pallas" if self.paged_attention == "pallas" else ""
        attn = "" if self.attention == "einsum" else (
            f"; attention {self.attention}" + (" (einsum where cuDNN refuses)" if self.attention_fallback else ""))
        dsa = "; dsa dense warm-up (indexer only)" if self.dsa_stage == "dense_warmup" else ""
        if self.lora is not None:
            dsa += f"; LoRA rank {self.lora.rank} on {','.join(self.lora.targets)} (base frozen)"
        return (f"runtime: {self.backend}, {mesh}; experts {experts}, decode {self.decode_expert_impl}; "
                f"layers {stack}, remat {'on' if self.remat else 'off'}; fp8 {fp8}{paged}{attn}{dsa}")


def resolve(*, mesh: jax.sharding.Mesh | None = None, moe_impl: str = "auto", moe_block_size: int = 64,
            expert_capacity_factor: float = 0.0, expert_dispatch: str = "auto", decode_moe_impl: str = "auto",
            remat: bool = False, microbatches: int = 0, pipeline_schedule: str = "gpipe", pipeline_chunks: int = 1,
            pipeline_stage_layers: str = "", fp8: bool = False,
            fp8_options: Fp8Options | None = None, emulate_ragged_all_to_all: bool | None = None,
            fp8_weights: str | None = None, attention: str = "auto", dsa_stage: str = "sparse",
            dsa_loss_weight: float = 1.0, lora=None) -> Runtime:
    """A concrete Runtime for this backend. 'auto' means:
      moe_impl         'blocks' on CPU (XLA:CPU lowers ragged_dot densely, ~25x slower), 'ragged' elsewhere
                       ('mgpu': the Mosaic GPU grouped GEMM on Hopper, grouped_gemm_mgpu.py, asked for by name);
                       'blocks' with fp8 or fp8_weights (the FP8 grouped GEMM uses the block layout); on CPU the
                       float 'blocks' GEMMs loop over the blocks that hold rows (expert_blocks_loop: XLA:CPU runs
                       the batched small dots at about half a flat dot's speed and computes every block of the
                       static bound), elsewhere one batched einsum
      decode_moe_impl  'dense' on CPU (cheapest at decode sizes there), else the training layout
      expert_dispatch  'ragged' (ragged_all_to_all; with a capacity factor, a receive buffer of cf x a balanced
                       rank's rows) on GPU/TPU, else 'padded' (all_to_all; XLA:CPU has no ragged_all_to_all)
      microbatches 0   twice the pipeline stages (1 without a pipeline)
      attention        'cudnn' on GPU (flash attention; einsum where cuDNN refuses the shapes or dtype), 'blockwise'
                       on TPU (flash attention in plain JAX, blockwise_attention.py), else 'einsum'
    """
    p = platform()
    choices = ("auto",) + EXPERT_IMPLS
    for name, value in (("moe_impl", moe_impl), ("decode_moe_impl", decode_moe_impl)):
        if value not in choices:
            raise UserError(f"{name}={value!r}: choose from {choices}.", key=name)
    if expert_dispatch not in ("auto",) + DISPATCHES:
        raise UserError(f"expert_dispatch={expert_dispatch!r}: choose from {('auto',) + DISPATCHES}.",
                        key="expert_dispatch")
    if pipeline_schedule not in SCHEDULES:
        raise UserError(f"pipeline_schedule={pipeline_schedule!r}: choose from {SCHEDULES}.", key="pipeline_schedule")
    if microbatches < 0:
        raise UserError(f"microbatches={microbatches} must be >= 0 (0: twice the number of stages).",
                        key="microbatches")
    if attention not in ("auto",) + ATTENTION:
        raise UserError(f"attention={attention!r}: choose from {('auto',) + ATTENTION}.", key="attention")
    fallback = attention == "auto" and p == "gpu"
    if attention == "auto":
        attention = {"gpu": "cudnn", "tpu": "blockwise"}.get(p, "einsum")
    impl = ("blocks" if p == "cpu" else "ragged") if moe_impl == "auto" else moe_impl
    grouped_fp8 = fp8 or fp8_weights  # the FP8 grouped GEMM uses the block layout
    if grouped_fp8 and impl in GROUPED_IMPLS:
        impl = "blocks"
    decode = ("dense" if p == "cpu" else impl) if decode_moe_impl == "auto" else decode_moe_impl
    if grouped_fp8 and decode in GROUPED_IMPLS:
        decode = "blocks"
    if "mgpu" in (impl, decode) and p != "gpu":
        raise UserError(f"moe_impl='mgpu' runs jax's Mosaic GPU grouped GEMM kernels, which need a CUDA GPU with "
                        f"wgmma (Hopper, sm_90); this backend is {p}: use 'auto', 'ragged' or 'blocks'.",
                        key="moe_impl" if impl == "mgpu" else "decode_moe_impl")
    if expert_dispatch == "auto":
        expert_dispatch = "ragged" if p in ("gpu", "tpu") else "padded"
    stages = 1 if mesh is None or "stage" not in mesh.axis_names else int(mesh.shape["stage"])
    return Runtime(backend=p, mesh=mesh, expert_impl=impl, decode_expert_impl=decode, block_size=int(moe_block_size),
                   expert_blocks_loop=p == "cpu",
                   expert_dispatch=expert_dispatch, capacity_factor=float(expert_capacity_factor),
                   emulate_ragged_all_to_all=(p == "cpu") if emulate_ragged_all_to_all is None
                   else emulate_ragged_all_to_all,
                   remat=bool(remat), unroll_layers=p == "cpu",
                   microbatches=int(microbatches) or default_microbatches(stages),
                   pipeline_schedule=pipeline_schedule, pipeline_chunks=int(pipeline_chunks),
                   pipeline_stage_layers=str(pipeline_stage_layers or ""), fp8=bool(fp8),
                   fp8_options=resolve_fp8(fp8_options),
                   fp8_weights=fp8_weights or None, attention_f32_core=p == "cpu", attention=attention,
                   attention_fallback=fallback, dsa_stage=dsa_stage, dsa_loss_weight=float(dsa_loss_weight),
                   lora=lora)


def default_microbatches(stages: int) -> int:
    return 2 * stages if stages > 1 else 1


@functools.cache
def _default(backend: str) -> Runtime:
    return resolve()


def default() -> Runtime:
    """The runtime of a model built without one: this backend, no mesh, every choice 'auto'."""
    return _default(platform())


# ----------------------------------------------------------------------------- from a config


def split_model_section(model_section: Mapping[str, Any]) -> tuple[dict, dict]:
    """A config's `model` mapping -> (architecture fields for ModelConfig, run keys with defaults filled)."""
    d = dict(model_section.to_dict() if hasattr(model_section, "to_dict") else model_section)
    run = {k: d.pop(k, default) for k, default in MODEL_RUN_KEYS.items()}
    return d, run


def fp8_options_from(section: Mapping[str, Any] | None) -> Fp8Options:
    """The `fp8` section of a config (absent in configs saved before it existed) -> Fp8Options."""
    d = dict(section.to_dict() if hasattr(section, "to_dict") else (section or {}))
    known = {f.name for f in dataclasses.fields(Fp8Options)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"config.fp8 has unknown key(s) {unknown}; valid keys are {sorted(known)}.", key="fp8")
    return Fp8Options(**d)


def from_config(config, mesh: jax.sharding.Mesh | None = None) -> Runtime:
    """The Runtime a training config asks for on `mesh` (config errors name the key)."""
    from dsv3_jax import lora as lora_lib

    lora_opts = lora_lib.from_config(config.get("lora"))
    fp8_base = bool((config.get("lora") or {}).get("fp8_base", False))
    if fp8_base and lora_opts is None:
        raise ConfigError("config.lora.fp8_base holds the base FP8 for LoRA; set config.lora.rank > 0 (only adapters "
                          "can train beside FP8 weights).", key="lora.fp8_base")

    _, run = split_model_section(config.model)
    mesh_section = config.get("mesh") or {}
    if lora_opts is not None and lora_opts.dropout and int(mesh_section.get("stage", 1)) > 1:
        raise ConfigError("config.lora.dropout does not run over pipeline stages (config.mesh.stage > 1) yet; set "
                          "config.lora.dropout=0 or config.mesh.stage=1.", key="lora.dropout")
    train = config.get("train") or {}
    dsa = dict(run["dsa"].to_dict() if hasattr(run["dsa"], "to_dict") else run["dsa"] or {})
    unknown = sorted(set(dsa) - {"stage", "loss_weight"})
    if unknown:
        raise ConfigError(f"config.model.dsa has unknown key(s) {unknown}; valid keys are ['loss_weight', 'stage'].",
                          key="model.dsa")
    if dsa.get("stage", "sparse") not in DSA_STAGES:
        raise ConfigError(f"config.model.dsa.stage={dsa['stage']!r}: choose from {DSA_STAGES} (V3.2's two training "
                          f"stages: the indexer's dense warm-up, then sparse training).", key="model.dsa.stage")
    try:
        return resolve(mesh=mesh, moe_impl=run["moe_impl"], moe_block_size=run["moe_block_size"], fp8=run["fp8"],
                       expert_capacity_factor=run["expert_capacity_factor"], expert_dispatch=run["expert_dispatch"],
                       remat=bool(train.get("remat", False)), microbatches=int(mesh_section.get("microbatches", 0)),
                       pipeline_schedule=mesh_section.get("pipeline_schedule", "gpipe"),
                       pipeline_chunks=int(mesh_section.get("pipeline_chunks", 1)),
                       pipeline_stage_layers=mesh_section.get("pipeline_stage_layers", ""),
                       fp8_options=fp8_options_from(config.get("fp8")), attention=run["attention"],
                       dsa_stage=dsa.get("stage", "sparse"), dsa_loss_weight=dsa.get("loss_weight", 1.0),
                       lora=lora_opts, fp8_weights="w8a8" if fp8_base else None)
    except ConfigError:
        raise
    except UserError as e:
        raise _config_error(e) from None


# the config section of each resolver argument a config sets (the `key` of the resolver's errors)
_CONFIG_SECTION = {"moe_impl": "model", "moe_block_size": "model", "expert_capacity_factor": "model",
                   "expert_dispatch": "model", "dsa.loss_weight": "model", "attention": "model", "microbatches": "mesh",
                   "pipeline_schedule": "mesh", "pipeline_chunks": "mesh"}


def _config_error(e: UserError) -> ConfigError:
    """A resolver error as the config key it concerns (its `key`): `moe_impl=...` -> `config.model.moe_impl=...`;
    the fp8 section's keys ('fp8.impl') are named as they are."""
    section = _CONFIG_SECTION.get(e.key)
    if section is not None:
        return ConfigError(f"config.{section}.{e}", key=f"{section}.{e.key}")
    if e.key is not None and e.key.startswith("fp8."):
        return ConfigError(f"config.{e}", key=e.key)
    return ConfigError(str(e), key=e.key)
