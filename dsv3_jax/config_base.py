"""Defaults for every non-model section of a training config (ml-collections).

`configs/*.py` call `base_config()` and fill in `config.model` (the fields of `ModelConfig`, plus the run
keys `moe_impl`, `moe_block_size`, `fp8`, `expert_capacity_factor`, `expert_dispatch`, `attention` that the Runtime
resolver reads, see `dsv3_jax/runtime.py`) and any section they change. Every key here is an interface:
users override it as `--config.SECTION.KEY=V`. Shared by train.py, infer.py (a checkpoint's saved config)
and the converter (the config it records).
"""
from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()  # ModelConfig fields, filled in by each configs/*.py
    c.init_from = ""  # a new run starts from the weights of another run's workdir, the converter's or an HF directory

    c.lora = ml_collections.ConfigDict()  # low-rank adapters, the base frozen (dsv3_jax/lora.py); rank 0: off
    c.lora.rank = 0
    c.lora.alpha = 16.0  # the update is (alpha / rank) A B
    c.lora.dropout = 0.0  # dropout on the adapters' input while training (projections and MLPs; not with stage > 1)
    c.lora.targets = "wq_a,wq_b,wkv_a,wkv_b,wo"  # MLA projections; also wq, dense_ffn, shared_experts, routed_experts
    c.lora.fp8_base = False  # hold the base as FP8 blocks (the release as shipped; W8A8 GEMMs), adapters float

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000  # optimizer steps
    c.train.seed = 0  # parameter init, data order and sampling
    c.train.batch_size = 16  # global batch (sequences); the end value of the ramp below
    c.train.batch_size_start = 0  # batch-size ramp start; 0 disables the ramp
    c.train.batch_ramp_steps = 0  # steps over which the batch grows from batch_size_start to batch_size
    c.train.seq_len = 128  # tokens per sequence
    c.train.peak_lr = 2.2e-4  # DeepSeek-V3 peak learning rate
    c.train.warmup_steps = 100  # linear warmup 0 -> peak_lr
    c.train.constant_fraction = 0.6  # fraction of the steps after warmup spent at peak_lr
    c.train.final_lr_ratio = 0.1  # cosine decay ends at peak_lr * this
    c.train.weight_decay = 0.1  # AdamW decoupled weight decay (not on norms and biases)
    c.train.b1 = 0.9  # AdamW beta1
    c.train.b2 = 0.95  # AdamW beta2
    c.train.eps = 1e-8  # AdamW epsilon (added to sqrt of the second moment)
    c.train.clip_norm = 1.0  # global gradient-norm clipping
    c.train.log_every = 10  # steps between metrics lines
    c.train.eval_every = 100  # steps between validation losses
    c.train.eval_batches = 4  # validation batches per evaluation
    c.train.eval_generate = 0  # chat data: held-out conversations answered greedily at each evaluation (0: none)
    c.train.sample_tokens = 48  # tokens of greedy text printed at the end of training (0: none)
    c.train.remat = False  # rematerialise each block in the backward pass (saves activation memory)
    c.train.grad_accum_steps = 1  # split each step's batch into this many sequential micro-batches

    c.moe = ml_collections.ConfigDict()
    c.moe.bias_update_rate = 0.001  # gamma: b_i += gamma * sign(mean load - load_i) after each step
    c.moe.bias_update_stop_step = -1  # from this step on gamma = 0 (DeepSeek: last 500B tokens); -1 never
    c.moe.seq_balance_alpha = 0.0001  # alpha of the sequence-wise balance loss

    c.mtp = ml_collections.ConfigDict()
    c.mtp.loss_weight = 0.3  # lambda: weight of the mean MTP cross-entropy
    c.mtp.loss_weight_after = 0.1  # lambda after mtp.switch_step (DeepSeek: 0.3 -> 0.1)
    c.mtp.switch_step = -1  # step at which lambda drops to loss_weight_after; -1 never

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 100  # steps between orbax checkpoints (the last step is always saved)
    c.checkpoint.keep = 3  # checkpoints kept
    c.checkpoint.async_save = True  # write checkpoints in the background

    c.mesh = ml_collections.ConfigDict()  # device mesh; the product of the sizes = number of devices
    c.mesh.data = -1  # data parallel (-1: all devices not used by the other axes)
    c.mesh.stage = 1  # pipeline stages (the scheduled pipeline program, parallel/pipeline/)
    c.mesh.microbatches = 0  # pipeline micro-batches per step when stage > 1 (0: 2 x stage)
    c.mesh.pipeline_schedule = "gpipe"  # pipeline schedule when stage > 1: gpipe | 1f1b | interleaved
    c.mesh.pipeline_chunks = 1  # interleaved: layer chunks per stage (parallel/pipeline/schedules.py)
    c.mesh.pipeline_stage_layers = ""  # "3,4,4,...": layers per (virtual) stage; "" = balanced by FLOPs
    c.mesh.fsdp = 1  # parameters and optimizer state sharded, batch split
    c.mesh.expert = 1  # routed experts split, tokens moved with all_to_all, batch split
    c.mesh.tensor = 1  # heads / ffn width split

    c.fp8 = ml_collections.ConfigDict()  # how the FP8 GEMMs run when model.fp8=True (dsv3_jax.runtime.Fp8Options)
    c.fp8.impl = "auto"  # auto (CPU: blocked, GPU/TPU: pallas) | blocked | dequant | pallas
    c.fp8.pow2_scales = False  # round every scale up to a power of two
    c.fp8.cache_fp8_inputs = True  # keep the forward input as fp8 tiles for Wgrad (DeepSeek's recipe)
    c.fp8.backend = "auto"  # Pallas backend: auto | triton | mosaic_tpu
    c.fp8.block_m = 128  # Pallas output tile rows (dense GEMMs)
    c.fp8.block_n = 128  # Pallas output tile columns
    c.fp8.num_warps = 8  # Triton
    c.fp8.num_stages = 3  # Triton

    c.distributed = ml_collections.ConfigDict()  # multi-host: one process per host, see dsv3_jax/distributed.py
    c.distributed.coordinator_address = ""  # HOST:PORT of process 0 ("": JAX_COORDINATOR_ADDRESS)
    c.distributed.num_processes = 0  # 0: JAX_NUM_PROCESSES, else one process
    c.distributed.process_id = -1  # -1: JAX_PROCESS_ID
    c.distributed.auto = False  # let JAX detect the cluster (SLURM, Open MPI, Cloud TPU, ...)

    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # text/markdown/JSONL file or directory; "" uses the embedded corpus
    c.data.tokenizer_path = ""  # an existing tokenizer.json; "" trains a byte-level BPE into the workdir
    c.data.val_fraction = 0.05  # tail of the token stream held out for validation
    c.data.document_mask = False  # every eos ends a document: attention does not cross it, positions restart
    return c
