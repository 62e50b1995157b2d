"""Training loop: the loss falls, bias balancing works, resume is exact, bad steps are skipped,
config overrides reach the model and bad configs fail fast."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import runtime
from dsv3_jax.config import ModelConfig
from dsv3_jax.model import abstract_model, param_counts
from dsv3_jax.train import loop
from dsv3_jax.train.optim import make_optimizer
from dsv3_jax.train.step import make_train_step

pytestmark = pytest.mark.xdist_group("train")  # one worker builds the shared runs fixture once
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
    spec = importlib.util.spec_from_file_location("tiny", os.path.join(ROOT, "configs", "tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def micro_config(steps=24, **train):
    """The tiny config shrunk so that a run compiles and trains in seconds."""
    c = tiny_config()
    m = c.model
    m.vocab_size, m.hidden_size, m.intermediate_size, m.moe_intermediate_size = 512, 64, 128, 32
    m.num_hidden_layers, m.num_attention_heads, m.q_lora_rank, m.kv_lora_rank = 3, 2, 32, 32
    m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim = 16, 8, 16
    m.n_routed_experts, m.num_experts_per_tok, m.n_group, m.topk_group = 8, 2, 4, 2
    m.moe_block_size = 16
    c.train.steps, c.train.batch_size, c.train.seq_len = steps, 8, 32
    c.train.warmup_steps, c.train.peak_lr, c.train.log_every, c.train.eval_every = 4, 3e-3, 4, 8
    c.train.eval_batches, c.train.sample_tokens = 2, 0
    c.checkpoint.every_steps, c.checkpoint.async_save = 8, True
    c.mesh.data = 1  # one device (meshes are tested in test_parallel.py)
    for k, v in train.items():
        section, key = k.split("__")
        c[section][key] = v
    return c


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """One base run, one with gamma = 0, and the base run split in two halves with a resume."""
    base = tmp_path_factory.mktemp("base")
    r_full = loop.train(micro_config(moe__bias_update_rate=0.01), str(base), quiet=True)
    r_nobias = loop.train(micro_config(moe__bias_update_rate=0.0), str(tmp_path_factory.mktemp("nobias")), quiet=True)
    split = tmp_path_factory.mktemp("split")
    loop.train(micro_config(moe__bias_update_rate=0.01), str(split), quiet=True, interrupt_at=13)  # last ckpt: 8
    r_resumed = loop.train(micro_config(moe__bias_update_rate=0.01), str(split), quiet=True)
    return {"full": r_full, "nobias": r_nobias, "resumed": r_resumed, "split_dir": split, "base_dir": base}


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_loss_decreases(runs):
    hist = runs["full"].history
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.5, [h["loss"] for h in hist]
    assert np.isfinite(hist[-1]["val_loss"]) and hist[-1]["val_loss"] < hist[0]["loss"]
    required = {"step", "loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "max_vio", "skipped_steps",
                "tokens_per_sec"}
    for rec in _records(runs["base_dir"]):
        assert required <= set(rec)
    assert "val_loss" in _records(runs["base_dir"])[1]  # step 8 = eval_every


def test_tensorboard_events_hold_the_logged_losses_and_the_writer_leaves_torch_unloaded(runs):
    """The run's TensorBoard event file (TFRecord frames of tensorboardX's Event protos, read here frame by frame)
    holds every logged loss; and the writer is made without importing torch (tensorboardX would import it when
    installed; a fresh interpreter shows it stays unloaded and importable)."""
    import struct

    from tensorboardX.proto import event_pb2

    d = os.path.join(runs["base_dir"], "tensorboard")
    losses = {}
    for name in os.listdir(d):
        raw = open(os.path.join(d, name), "rb").read()
        at = 0
        while at < len(raw):
            (n,) = struct.unpack("<Q", raw[at:at + 8])
            event = event_pb2.Event.FromString(raw[at + 12:at + 12 + n])  # (length, its CRC, data, its CRC)
            at += 12 + n + 4
            for v in event.summary.value:
                if v.tag == "loss":
                    losses[event.step] = v.simple_value
    hist = runs["full"].history
    assert sorted(losses) == [h["step"] for h in hist]
    np.testing.assert_allclose([losses[h["step"]] for h in hist], [h["loss"] for h in hist], rtol=1e-6)
    code = ("import sys, tempfile; from dsv3_jax.train.metrics import MetricsWriter; "
            "w = MetricsWriter(tempfile.mkdtemp(), total_steps=1, quiet=True); assert w.tb is not None; "
            "print('torch' in sys.modules); import torch; print(torch.tensor([1.0]).sum().item())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.split() == ["False", "1.0"], r.stderr[-2000:]


def test_bias_balancing_lowers_max_vio(runs):
    with_bias = np.mean([h["max_vio"] for h in runs["full"].history[-3:]])
    without = np.mean([h["max_vio"] for h in runs["nobias"].history[-3:]])
    assert with_bias < without, (with_bias, without)
    # the biases moved only in the gamma > 0 run, and by multiples of gamma
    b_full = np.asarray(runs["full"].state["biases"]["moe_layers"]["ffn"]["bias"])
    b_none = np.asarray(runs["nobias"].state["biases"]["moe_layers"]["ffn"]["bias"])
    assert np.all(b_none == 0) and np.abs(b_full).max() > 0
    np.testing.assert_allclose(np.round(b_full / 0.01), b_full / 0.01, atol=1e-3)


def test_resume_is_exact(runs):
    full, resumed = _records(runs["base_dir"]), _records(runs["split_dir"])
    assert [r["step"] for r in full] == [r["step"] for r in resumed]
    keys = ["loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "max_vio", "val_loss"]
    for a, b in zip(full, resumed):
        for k in keys:
            assert a.get(k) == b.get(k), (a["step"], k, a.get(k), b.get(k))
    for a, b in zip(jax.tree.leaves(runs["full"].state), jax.tree.leaves(runs["resumed"].state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nonfinite_guard_skips_poisoned_batch():
    cfg = loop.validate_train_config(micro_config())
    tx, schedule = make_optimizer(peak_lr=1e-2, warmup_steps=0, constant_steps=10, decay_steps=10)
    graphdef, state = loop.init_state(cfg, tx, seed=0, rt=runtime.from_config(micro_config()))
    step = make_train_step(graphdef, tx, schedule)
    scalars = (jnp.float32(0.3), jnp.float32(1e-4), jnp.float32(0.01))
    good = jax.random.randint(jax.random.key(1), (4, 17), 0, cfg.vocab_size)
    poisoned = good.at[0, 3].set(cfg.vocab_size)  # out-of-range id: NaN embedding -> NaN loss
    before = jax.tree.map(np.asarray, state)
    state, m = step(state, poisoned, *scalars)
    assert not bool(m["finite"]) and int(m["skipped_steps"]) == 1
    for a, b in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(a, np.asarray(b))
    for a, b in zip(jax.tree.leaves(before["biases"]), jax.tree.leaves(state["biases"])):
        np.testing.assert_array_equal(a, np.asarray(b))
    state, m = step(state, good, *scalars)  # training goes on
    assert bool(m["finite"]) and int(m["skipped_steps"]) == 1 and int(state["step"]) == 2
    changed = [not np.array_equal(a, np.asarray(b)) for a, b in
               zip(jax.tree.leaves(before["params"]), jax.tree.leaves(state["params"]))]
    assert any(changed)


def test_nonfinite_guard_covers_the_update():
    """Finite loss and gradients, but an update that overflows: the state must not change."""
    import optax

    cfg = loop.validate_train_config(micro_config())
    overflow = optax.chain(optax.scale(3e38), optax.scale(3e38))  # any non-zero gradient -> inf update
    schedule = lambda step: jnp.float32(1.0)  # noqa: E731
    graphdef, state = loop.init_state(cfg, overflow, seed=0, rt=runtime.from_config(micro_config()))
    step = make_train_step(graphdef, overflow, schedule)
    batch = jax.random.randint(jax.random.key(1), (4, 17), 0, cfg.vocab_size)
    before = jax.tree.map(np.asarray, state)
    state, m = step(state, batch, jnp.float32(0.3), jnp.float32(1e-4), jnp.float32(0.01))
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
    assert not bool(m["finite"]) and int(m["skipped_steps"]) == 1
    for a, b in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_metrics_jsonl_is_strict_json(tmp_path):
    """A non-finite value is written as null; a line cut short by a kill is dropped on resume."""
    from dsv3_jax.train.metrics import MetricsWriter

    def reject(name):
        raise ValueError(f"non-strict JSON constant {name}")

    w = MetricsWriter(str(tmp_path), total_steps=3, quiet=True)
    w.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    w.write({"step": 2, "loss": 2.5, "grad_norm": 1.0, "lr": 1e-3})
    w.close()
    path = tmp_path / "metrics.jsonl"
    records = [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]
    assert records[0] == {"step": 1, "loss": None, "grad_norm": None, "lr": 1e-3}
    with open(path, "a") as f:
        f.write('{"step": 3, "loss": 2.')  # killed mid-write
    MetricsWriter(str(tmp_path), total_steps=3, start_step=2, quiet=True).close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


def _run_train(*args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_config_override_reaches_model():
    r = _run_train("--dry_run", "--config.model.num_hidden_layers=2", "--config.model.n_routed_experts=8",
                   "--config.model.q_lora_rank=48")
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout.strip().splitlines()[-1])
    cfg = ModelConfig.from_dict(tiny_config().model).replace(num_hidden_layers=2, n_routed_experts=8, q_lora_rank=48)
    counts = param_counts(abstract_model(cfg))
    assert {k: printed[k] for k in counts} == counts
    # every parameter trains (no LoRA, no DSA warm-up): all of them, the MTP modules' included
    assert printed["trainable_params"] == printed["total_params"] == counts["params_total"] + counts["params_mtp"]
    base = param_counts(abstract_model(ModelConfig.from_dict(tiny_config().model)))
    assert {k: printed[k] for k in counts} != base


@pytest.mark.parametrize("args,needle", [
    (["--config.data.path=/nonexistent/corpus"], "/nonexistent/corpus"),
    (["--config.model.num_experts_per_tok=32"], "num_experts_per_tok"),
    (["--config.train.batch_size=0"], "train.batch_size"),
    (["--config.train.grad_accum_steps=3"], "config.train.grad_accum_steps=3"),
    (["--config.mesh.stage=8"], "config.mesh.stage x config.mesh.pipeline_chunks = 8 pipeline stages"),  # 4 layers
])
def test_bad_config_fails_fast(tmp_path, args, needle):
    r = _run_train("--workdir", str(tmp_path / "wd"), *args, timeout=60)
    assert r.returncode != 0
    assert needle in r.stderr and "config error" in r.stderr
    assert not (tmp_path / "wd").exists()  # nothing was created before the error


def test_load_trained_and_greedy_decode(runs):
    """infer.py's loader restores exactly the trained parameters; the engine's greedy decoding of the loaded
    model (what infer.py does) equals the argmax of a fresh full forward over the growing sequence."""
    from flax import nnx

    from dsv3_jax.infer.engine import Engine
    from dsv3_jax.infer.load import load_trained

    from reference import decoding

    model, tokenizer, config, step = load_trained(str(runs["base_dir"]))
    assert step == config.train.steps == 24
    trained = nnx.merge(runs["full"].graphdef, runs["full"].state["params"], runs["full"].state["biases"])
    prompt = tokenizer.encode("The object").ids
    tokens = jnp.asarray([prompt])  # (jitted full forwards: eagerly, every op of the model compiles on its own)
    np.testing.assert_array_equal(np.asarray(decoding.logits(model, tokens)[0]),
                                  np.asarray(decoding.logits(trained, tokens)[0]))
    got = Engine.for_batch(model, 1, len(prompt) + 6).generate([prompt], 6, stop_tokens=())[0].tokens
    assert got == decoding.greedy(trained, [prompt], 6)[0]


def test_load_trained_missing_workdir(tmp_path):
    from dsv3_jax.infer.load import load_trained

    with pytest.raises(FileNotFoundError, match="train one first"):
        load_trained(str(tmp_path / "nothing"))


def test_train_starts_from_converted_weights(runs, tmp_path):
    """A weights-only checkpoint (the format of dsv3_jax.interop.convert) in the workdir initialises
    training at step 0 with a fresh optimizer. With warmup the first update has lr = 0, so after one
    step the parameters are exactly the converted ones."""
    from dsv3_jax.io.checkpoint import Checkpointer

    src = runs["full"]
    ck = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    cfg = micro_config(steps=1)
    ck.save(0, {"params": src.state["params"], "biases": src.state["biases"]},
            {"format": "dsv3_jax.params", "config": cfg.to_json()}, force=True)
    ck.close()
    result = loop.train(cfg, str(tmp_path), quiet=True)
    assert int(result.state["step"]) == 1
    for a, b in zip(jax.tree.leaves(src.state["params"]), jax.tree.leaves(result.state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bias_update_pairs_each_layer_with_its_own_counts():
    """update_biases pairs every RouterBias with the counts of the MoE module that owns it, by path: row l of
    the stacked main layers moves with layer l's counts, the MTP block's bias with the MTP block's counts,
    whatever order the stats arrive in; a bias without counts is an error naming it."""
    from flax import nnx, traverse_util

    from dsv3_jax.layer_stats import LayerStats
    from dsv3_jax.model import DeepSeekV3, split_model
    from dsv3_jax.train.step import update_biases

    E, L = 4, 3
    biases = {"moe_layers": {"ffn": {"bias": jnp.zeros((L, E))}},
              "mtp": {0: {"block": {"ffn": {"bias": jnp.zeros(E)}}}}}
    main = jnp.asarray([[10.0 if e == layer else 2.0 for e in range(E)] for layer in range(L)])  # layer l overloads l
    mtp = jnp.asarray([2.0, 2.0, 2.0, 10.0])  # the MTP block overloads expert 3
    stats = {"mtp/0/block/ffn": LayerStats(counts=mtp, balance=jnp.zeros(()), dropped=jnp.zeros(())),
             "moe_layers/ffn": LayerStats(counts=main, balance=jnp.zeros(L), dropped=jnp.zeros(L))}
    new = update_biases(biases, stats, 0.1)
    for layer in range(L):  # mean load 4: the overloaded expert goes down by gamma, the others up
        want = [-0.1 if e == layer else 0.1 for e in range(E)]
        np.testing.assert_allclose(np.asarray(new["moe_layers"]["ffn"]["bias"][layer]), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new["mtp"][0]["block"]["ffn"]["bias"]), [0.1, 0.1, 0.1, -0.1], rtol=1e-6)
    with pytest.raises(ValueError, match="mtp/0/block/ffn/bias has no expert counts"):
        update_biases(biases, {"moe_layers/ffn": stats["moe_layers/ffn"]}, 0.1)

    # the model reports its stats under exactly the paths of its router biases (main stack and MTP block)
    cfg = ModelConfig.from_dict(micro_config().model)
    model = DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    _, _, model_biases = split_model(model)
    out = model(jnp.zeros((1, 8), jnp.int32))
    owners = {"/".join(map(str, p[:-1])) for p in traverse_util.flatten_dict(model_biases)}
    assert set(out.moe_stats) == owners == {"moe_layers/ffn", "mtp/0/block/ffn"}
