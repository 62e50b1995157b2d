"""Checkpoint interop: the released DeepSeek-V3 format (Hugging Face safetensors) <-> dsv3_jax.

    from dsv3_jax.interop import hf
    config, model = hf.load(DIR, dtype=jnp.float32)     # BF16/FP32 or FP8 (dequantised), with MTP
    config, model = hf.load(DIR, keep_fp8=True)          # projections and experts kept FP8 (served as shipped)
    hf.save(model, config, OUT)                          # loadable by transformers' from_pretrained

    python -m dsv3_jax.interop.convert --hf DIR --out WORKDIR [--mesh fsdp=8,expert=4] [--keep_fp8]
    from dsv3_jax.interop import convert
    config, model = convert.restore(WORKDIR)             # the converted orbax checkpoint

Modules: `safetensors_io` (streaming reads with pread, FP8 block scales, sharded writes), `layout`
(which HF tensor fills which slice of which parameter), `hf_config` (config.json <-> ModelConfig),
`hf_checkpoint` (open a directory, check every tensor from the headers, read pieces), `hf` (load, save,
tokenizer; the front door, re-exporting hf_config's public names), `convert` (streaming HF ->
orbax/tensorstore converter and its restore).
"""
