"""The training sections' numbers checked against their ranges (a ConfigError naming the key and the fix).

Imports nothing heavy, so that train.py says what is wrong with a hyperparameter before it loads JAX (about
3 s of a CPU process's start); `loop.validate_train_config` checks them again with everything else.
"""
from __future__ import annotations

import math

from dsv3_jax.cli import ConfigError


def check_hyperparameters(config) -> None:
    """Every number of the training sections finite, every hyperparameter in its range (ConfigError)."""
    for section in ("train", "moe", "mtp", "checkpoint", "data", "mesh"):
        for key, value in config[section].items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"config.{section}.{key}={value} is not a finite number; set a finite value.")
    t = config.train

    def need(ok: bool, key: str, value, rule: str):
        if not ok:
            raise ConfigError(f"config.{key}={value} {rule}.")

    for key in ("steps", "batch_size", "seq_len", "log_every", "eval_every"):
        need(t[key] > 0, f"train.{key}", t[key], "must be > 0")
    for key in ("warmup_steps", "eval_batches", "sample_tokens", "batch_size_start", "batch_ramp_steps"):
        need(t[key] >= 0, f"train.{key}", t[key], "must be >= 0")
    need(0.0 < t.peak_lr <= 1.0, "train.peak_lr", t.peak_lr,
         "must be in (0, 1] (AdamW learning rates are ~1e-4..1e-2; DeepSeek-V3: 2.2e-4)")
    need(0.0 <= t.final_lr_ratio <= 1.0, "train.final_lr_ratio", t.final_lr_ratio, "must be in [0, 1]")
    need(0.0 <= t.constant_fraction <= 1.0, "train.constant_fraction", t.constant_fraction, "must be in [0, 1]")
    for key in ("b1", "b2"):
        need(0.0 <= t[key] < 1.0, f"train.{key}", t[key], "must be in [0, 1) (DeepSeek-V3: b1 0.9, b2 0.95)")
    eps = t.get("eps", 1e-8)
    need(0.0 < eps < 1.0, "train.eps", eps, "must be in (0, 1) (AdamW epsilon; default 1e-8)")
    need(0.0 <= t.weight_decay < 1.0 / t.peak_lr, "train.weight_decay", t.weight_decay,
         f"must be >= 0 and below 1/peak_lr = {1.0 / t.peak_lr:g} (decoupled decay multiplies weights by 1 - lr*wd)")
    need(t.clip_norm >= 0.0, "train.clip_norm", t.clip_norm, "must be >= 0 (0 disables clipping)")
    m, mtp = config.moe, config.mtp
    need(0.0 <= m.bias_update_rate < 1.0, "moe.bias_update_rate", m.bias_update_rate,
         "must be in [0, 1) (gamma; DeepSeek-V3: 0.001)")
    need(m.seq_balance_alpha >= 0.0, "moe.seq_balance_alpha", m.seq_balance_alpha, "must be >= 0")
    need(mtp.loss_weight >= 0.0, "mtp.loss_weight", mtp.loss_weight, "must be >= 0")
    need(mtp.loss_weight_after >= 0.0, "mtp.loss_weight_after", mtp.loss_weight_after, "must be >= 0")
    need(config.checkpoint.every_steps > 0, "checkpoint.every_steps", config.checkpoint.every_steps, "must be > 0")
    need(config.checkpoint.keep > 0, "checkpoint.keep", config.checkpoint.keep, "must be > 0")
    need(0.0 <= config.data.val_fraction < 1.0, "data.val_fraction", config.data.val_fraction, "must be in [0, 1)")
