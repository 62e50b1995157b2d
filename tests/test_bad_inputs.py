"""Bad input, as a demanding user gives it, to the real CLIs (train.py, infer.py, the converter) run as
subprocesses. Every case must: exit with status 2, print no traceback, print exactly one error line
that names the problem, and leave a trained workdir next to it byte-for-byte unchanged (most cases
point the CLI at that very workdir). Also: a corrupt latest checkpoint falls back to the previous
one and the run goes on; if none restores, one line says so and nothing is moved.
"""
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from testenv import one_device_env

pytestmark = pytest.mark.xdist_group("bad_inputs")  # one worker trains the shared workdir (session fixture) once

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny config (tiny.py shrunk) that trains 2 steps in seconds; every train.py case starts from it.
MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
             v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, moe_block_size=16)
TRAIN = dict(steps=2, batch_size=2, seq_len=32, warmup_steps=1, log_every=1, eval_every=2, eval_batches=1,
             sample_tokens=0)
BASE = ([f"--config.model.{k}={v}" for k, v in MODEL.items()] + [f"--config.train.{k}={v}" for k, v in TRAIN.items()]
        + ["--config.checkpoint.every_steps=1", "--config.checkpoint.async_save=False", "--config.mesh.data=1"])


def run(script, *args, stdin=None, timeout=240):
    env = one_device_env()
    env.pop("DSV3_VERBOSE", None)
    cmd = [sys.executable, *(["-m", script] if script.startswith("dsv3_jax") else [os.path.join(ROOT, script)])]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout, cwd=ROOT, input=stdin,
                          env=env)


def digest(path) -> dict:
    """relative path -> sha256 of every file (and each directory) under `path`."""
    out = {}
    for root, _, files in os.walk(path):
        rel = os.path.relpath(root, path)
        out[rel + "/"] = "dir"
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.join(rel, name)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("trained") / "run")
    r = run("train.py", "--workdir", wd, *BASE)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["1", "2"]
    return wd


@pytest.fixture(scope="session")
def hf_dir(trained, tmp_path_factory):
    """A released-format directory of a tiny model (BF16 and an FP8 twin), with the run's tokenizer."""
    import jax.numpy as jnp
    from flax import nnx

    from dsv3_jax.config import ModelConfig
    from dsv3_jax.interop import hf
    from dsv3_jax.model import DeepSeekV3

    cfg = ModelConfig(**{k: v for k, v in MODEL.items() if k != "moe_block_size"}, first_k_dense_replace=1,
                      num_nextn_predict_layers=0, max_position_embeddings=256, rope_scaling=None, dtype="float32",
                      param_dtype="float32")
    model = DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    base = tmp_path_factory.mktemp("hf")
    dirs = {}
    for name, fp8 in (("bf16", False), ("fp8", True)):
        d = str(base / name)
        hf.save(model, None, d, dtype=jnp.float32, fp8=fp8)
        shutil.copy(os.path.join(trained, "tokenizer.json"), d)
        dirs[name] = d
    return dirs


def clone(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def read_st(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        return header, f.read()


def write_st(path, header, data):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def edit_header(d, fn):
    path = os.path.join(d, "model.safetensors")
    header, data = read_st(path)
    fn(header)
    write_st(path, header, data)


def first(header, pred):
    return next(k for k, v in header.items() if k != "__metadata__" and pred(k, v))


# ---------------------------------------------------------------------------- the mutations


def m_lfs(d):
    with open(os.path.join(d, "model.safetensors"), "w") as f:
        f.write("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123456\n")


def m_header_len(d):
    path = os.path.join(d, "model.safetensors")
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 2**40))


def m_truncated(d):
    path = os.path.join(d, "model.safetensors")
    os.truncate(path, os.path.getsize(path) - 1000)


def m_span(d):
    def fn(h):
        k = first(h, lambda k, v: len(v["shape"]) == 2)
        h[k]["shape"][1] -= 1
    edit_header(d, fn)


def m_overlap(d):
    def fn(h):
        names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        a, b = names[0], names[1]
        size = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
        h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + size]
    edit_header(d, fn)


def m_int_dtype(d):
    def fn(h):
        k = first(h, lambda k, v: k.endswith("o_proj.weight") and v["dtype"] == "F32")
        h[k]["dtype"] = "I32"
    edit_header(d, fn)


def m_no_scale(d):
    def fn(h):
        k = first(h, lambda k, v: k.endswith("_scale_inv"))
        del h[k]
    edit_header(d, fn)


def m_missing_field(d):
    path = os.path.join(d, "config.json")
    with open(path) as f:
        c = json.load(f)
    del c["hidden_size"]
    with open(path, "w") as f:
        json.dump(c, f)


def m_config_not_json(d):
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write("{not json")


def m_no_config(d):
    os.remove(os.path.join(d, "config.json"))


def m_pickle_only(d):
    os.remove(os.path.join(d, "model.safetensors"))
    with open(os.path.join(d, "pytorch_model.bin"), "wb") as f:
        f.write(b"\x80\x04\x95 never unpickled")


def m_bad_tokenizer(d):
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump({"version": "1.0", "model": {"type": "NoSuchModel"}}, f)


HF_CASES = [  # (id, source dir, mutation, what the error line must name)
    ("hf_lfs_pointer", "bf16", m_lfs, "git-lfs pointer"),
    ("hf_header_length", "bf16", m_header_len, "header length"),
    ("hf_truncated", "bf16", m_truncated, "truncated"),
    ("hf_span_vs_shape", "bf16", m_span, "needs"),
    ("hf_overlap", "bf16", m_overlap, "overlap"),
    ("hf_int_dtype", "bf16", m_int_dtype, "needs floating point"),
    ("hf_fp8_without_scale", "fp8", m_no_scale, "_scale_inv"),
    ("hf_config_missing_field", "bf16", m_missing_field, "missing hidden_size"),
    ("hf_config_not_json", "bf16", m_config_not_json, "not valid JSON"),
    ("hf_no_config", "bf16", m_no_config, "config.json"),
    ("hf_pickle_only", "bf16", m_pickle_only, "pickle"),
    ("hf_bad_tokenizer", "bf16", m_bad_tokenizer, "tokenizer.json"),
]


def check(r, needle, prog):
    err = r.stderr
    assert r.returncode == 2, (r.returncode, err[-2000:])
    assert "Traceback" not in err and "Traceback" not in r.stdout, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith(f"{prog}: ")]
    assert len(lines) == 1, err[-2000:]
    assert needle in lines[0], lines[0]


def corpus_files(tmp_path):
    """Corpora with one defect each (a valid line first, so the line number is not trivially 1)."""
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "notes.csv").write_text("a,b\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": oops}\n')
    (tmp_path / "latin.txt").write_bytes(b"first line\nna\xefve caf\xe9\n")
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "nonstr.jsonl").write_text('{"text": 42}\n')
    (tmp_path / "garbage_tok.json").write_text('{"hello": "world"}')
    (tmp_path / "pickle_tok.json").write_bytes(b"\x80\x04\x95\x00 not a tokenizer")
    (tmp_path / "afile").write_text("x")
    return tmp_path


TRAIN_CASES = [  # (id, extra args ({t} = the corpus dir), needle)
    ("unknown_key", ["--config.train.nosuch=1"], "no key 'nosuch'"),
    ("unknown_section", ["--config.trian.steps=3"], "did you mean --config.train"),
    ("missing_config_file", ["--config=configs/nope.py"], "configs/nope.py: no such file"),
    ("wrong_type", ["--config.train.steps=abc"], "--config.train.steps=abc"),
    ("bad_dtype", ["--config.model.dtype=flaot32"], "flaot32"),
    ("lr_nan", ["--config.train.peak_lr=nan"], "config.train.peak_lr=nan"),
    ("lr_too_large", ["--config.train.peak_lr=30"], "config.train.peak_lr=30"),
    ("b2_out_of_range", ["--config.train.b2=1.5"], "config.train.b2=1.5"),
    ("weight_decay_inf", ["--config.train.weight_decay=inf"], "config.train.weight_decay=inf"),
    ("clip_negative", ["--config.train.clip_norm=-1"], "config.train.clip_norm=-1"),
    ("eps_zero", ["--config.train.eps=0"], "config.train.eps=0"),
    ("mtp_weight_nan", ["--config.mtp.loss_weight=nan"], "config.mtp.loss_weight=nan"),
    ("gamma_negative", ["--config.moe.bias_update_rate=-0.1"], "config.moe.bias_update_rate=-0.1"),
    ("mesh_too_big", ["--config.mesh.data=3"], "config.mesh"),
    ("missing_corpus", ["--config.data.path={t}/nothing_here"], "nothing_here"),
    ("no_usable_files", ["--config.data.path={t}/empty_dir"], "contains no .txt/.md/.jsonl files"),
    ("malformed_jsonl", ["--config.data.path={t}/bad.jsonl"], "bad.jsonl:3: invalid JSON"),
    ("non_utf8_text", ["--config.data.path={t}/latin.txt"], "latin.txt:2: not valid UTF-8"),
    ("non_utf8_jsonl", ["--config.data.path={t}/latin.jsonl"], "latin.jsonl:2: not valid UTF-8"),
    ("jsonl_text_not_string", ["--config.data.path={t}/nonstr.jsonl"], 'nonstr.jsonl:1: the "text" field'),
    ("tokenizer_not_tokenizer", ["--config.data.tokenizer_path={t}/garbage_tok.json"], "garbage_tok.json: not a "
                                                                                        "valid tokenizer"),
    ("tokenizer_pickle", ["--config.data.tokenizer_path={t}/pickle_tok.json"], "never opens pickles"),
    ("restore_shape_mismatch", ["--config.model.moe_intermediate_size=48"], "different config"),
]


@pytest.mark.parametrize("case,args,needle", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_cli(trained, tmp_path, case, args, needle):
    t = corpus_files(tmp_path)
    before = digest(trained)
    r = run("train.py", "--workdir", trained, *BASE, *[a.format(t=t) for a in args])
    check(r, needle, "train.py")
    assert digest(trained) == before


def test_train_unwritable_workdir(trained, tmp_path):
    t = corpus_files(tmp_path)
    before = digest(trained)
    r = run("train.py", "--workdir", f"{t}/afile/run", *BASE)
    check(r, "cannot write there", "train.py")
    assert digest(trained) == before


def test_train_resume_with_other_tokenizer(trained, tmp_path):
    """Same vocabulary size, different merges: the token ids under the checkpoint would change."""
    from dsv3_jax.data import bpe
    from dsv3_jax.io import tokenizer as tokenizer_io

    tok = bpe.train_tokenizer(["a different corpus of words, words and more words " * 50], 300)
    tokenizer_io.save_tokenizer(tok, str(tmp_path / "other.json"))
    before = digest(trained)
    r = run("train.py", "--workdir", trained, *BASE, f"--config.data.tokenizer_path={tmp_path}/other.json")
    check(r, "tokenizer of this run differs", "train.py")
    assert digest(trained) == before


INFER_CASES = [
    ("missing_workdir", ["--checkpoint=/nonexistent/run"], "no checkpoints in"),
    ("cache_dtype", ["--cache_dtype=flaot16"], "did you mean float16"),
    ("temperature", ["--temperature=-1"], "--temperature=-1"),
    ("top_p", ["--top_p=0"], "--top_p=0"),
    ("mesh_syntax", ["--mesh=garbage"], "--mesh 'garbage'"),
    ("max_new_tokens", ["--max_new_tokens=0"], "--max_new_tokens=0"),
    ("unknown_flag", ["--tempreature=1"], "tempreature"),
]


@pytest.mark.parametrize("case,args,needle", INFER_CASES, ids=[c[0] for c in INFER_CASES])
def test_infer_cli(trained, case, args, needle):
    before = digest(trained)
    r = run("infer.py", f"--checkpoint={trained}", "--prompt=The", *args)
    check(r, needle, "infer.py")
    assert digest(trained) == before


@pytest.mark.parametrize("script,args,needle", [
    ("infer.py", ["--prompt=The", "--temperature=-1"], "--temperature=-1"),
    ("infer.py", ["--prompt=The", "--mesh=data=2,data=2"], "--mesh 'data=2,data=2'"),
    ("serve.py", ["--batch_size=0"], "--batch_size=0"),
    ("serve.py", ["--mesh=garbage"], "--mesh 'garbage'"),
    ("infer.py", ["--prompt=The", "--keep_fp8"], "--keep_fp8 applies to --hf DIR"),
    ("serve.py", ["--keep_fp8"], "--keep_fp8 applies to --hf DIR"),
])
def test_flag_errors_come_before_jax_is_imported(script, args, needle):
    """A bad flag is answered from the flags alone: the process ends with its one line without importing JAX
    (checked from inside the process, at exit)."""
    probe = ("import atexit, runpy, sys; atexit.register(lambda: print('jax imported:', 'jax' in sys.modules, "
             f"file=sys.stderr)); sys.argv = [{script!r}] + {args!r}; runpy.run_path({script!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env=one_device_env())
    check(r, needle, script)
    assert "jax imported: False" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("case,src,mutate,needle", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_infer_hf_checkpoint(trained, hf_dir, tmp_path, case, src, mutate, needle):
    d = clone(hf_dir[src], tmp_path / "hf")
    mutate(d)
    before = digest(trained)
    r = run("infer.py", f"--hf={d}", "--prompt=The", "--max_new_tokens=2")
    check(r, needle, "infer.py")
    assert digest(trained) == before


def test_hf_load_refuses_without_reading_data(hf_dir, tmp_path):
    """The library path (hf.load) refuses the same checkpoints with the same UserError."""
    from dsv3_jax.cli import UserError
    from dsv3_jax.interop import hf

    d = clone(hf_dir["fp8"], tmp_path / "hf")
    m_no_scale(d)
    with pytest.raises(UserError, match="_scale_inv"):
        hf.load(d)


def test_convert_refuses_train_workdir(trained, hf_dir):
    before = digest(trained)
    for extra in ([], ["--overwrite"]):
        r = run("dsv3_jax.interop.convert", "--hf", hf_dir["bf16"], "--out", trained, *extra)
        check(r, "is a train.py workdir", "convert")
    assert digest(trained) == before


def test_convert_refuses_non_empty_and_foreign_tokenizer(trained, hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text('{"mine": true}')
    before = digest(out)
    check(run("dsv3_jax.interop.convert", "--hf", hf_dir["bf16"], "--out", str(out)), "is not empty", "convert")
    check(run("dsv3_jax.interop.convert", "--hf", hf_dir["bf16"], "--out", str(out), "--overwrite"),
          "not written by this converter", "convert")
    assert digest(out) == before


@pytest.mark.parametrize("args,needle", [
    (["--dtype", "float33"], "--dtype='float33'"),
    (["--mtp", "maybe"], "--mtp"),
])
def test_convert_bad_flags(hf_dir, tmp_path, args, needle):
    r = run("dsv3_jax.interop.convert", "--hf", hf_dir["bf16"], "--out", str(tmp_path / "o"), *args)
    check(r, needle, "convert")
    assert not (tmp_path / "o").exists()


def test_verbose_shows_traceback(trained):
    r = run("train.py", "--workdir", trained, *BASE, "--config.train.peak_lr=nan", "--verbose")
    assert r.returncode == 2 and "Traceback" in r.stderr and "config.train.peak_lr=nan" in r.stderr


# ---------------------------------------------------------------------------- corrupt checkpoints


def corrupt_data(step_dir):
    """Truncate the largest array data file of a checkpoint step to half its size."""
    files = [os.path.join(r, n) for r, _, ns in os.walk(os.path.join(step_dir, "state")) for n in ns]
    big = max(files, key=os.path.getsize)
    os.truncate(big, os.path.getsize(big) // 2)


def test_corrupt_latest_checkpoint_falls_back(trained, tmp_path):
    """The newest checkpoint is damaged: the run names it, resumes from step 1, keeps the bad one aside.
    The same run raises train.steps (2 -> 4) and the warmup, which changes the schedule: said with both rates."""
    from dsv3_jax.train.optim import lr_schedule

    wd = clone(trained, tmp_path / "run")
    corrupt_data(os.path.join(wd, "checkpoints", "2"))
    r = run("train.py", "--workdir", wd, *BASE, "--config.train.steps=4", "--config.train.warmup_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoint step 2" in r.stderr and "failed to restore" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "resumed from step 1" in r.stdout
    moved = os.listdir(os.path.join(wd, "checkpoints.corrupt"))
    assert len(moved) == 1 and moved[0].startswith("2-")  # kept, not deleted
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "3", "4"]  # keep=3
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("note: the schedule changed"))
    assert "train.steps 2 -> 4" in line and "train.warmup_steps 1 -> 2" in line
    old, new = lr_schedule(3e-3, 1, 0, 1, 0.1), lr_schedule(3e-3, 2, 1, 1, 0.1)  # tiny: constant_fraction 0.6
    assert float(old(1)) != float(new(1))
    assert f"at step 1 was {float(old(1)):.4g}, is now {float(new(1)):.4g}" in line
    records = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
    assert [x["step"] for x in records] == [1, 2, 3, 4]
    assert all(np.isfinite(x["loss"]) for x in records)


def test_no_checkpoint_restores(trained, tmp_path):
    wd = clone(trained, tmp_path / "run")
    corrupt_data(os.path.join(wd, "checkpoints", "2"))
    os.remove(os.path.join(wd, "checkpoints", "1", "meta", "metadata"))
    before = digest(wd)
    r = run("train.py", "--workdir", wd, *BASE, "--config.train.steps=3")
    check(r, "no checkpoint in", "train.py")
    assert "step 2" in r.stderr and "step 1" in r.stderr
    assert digest(wd) == before  # nothing moved or deleted


def test_controls_succeed(trained, hf_dir, tmp_path):
    """The same commands with good input work, so each case above fails for the reason it names."""
    r = run("infer.py", f"--checkpoint={trained}", "--prompt=The", "--max_new_tokens=3")
    assert r.returncode == 0 and r.stdout.startswith("The"), r.stderr[-2000:]
    r = run("infer.py", f"--hf={hf_dir['fp8']}", "--prompt=The", "--max_new_tokens=2")
    assert r.returncode == 0 and r.stdout.startswith("The"), r.stderr[-2000:]
    out = str(tmp_path / "converted")
    for extra in ([], ["--overwrite"]):  # --overwrite replaces the converter's own earlier output
        r = run("dsv3_jax.interop.convert", "--hf", hf_dir["bf16"], "--out", out, *extra)
        assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["checkpoints", "tokenizer.json"]


def test_convert_overwrite_keeps_a_replaced_tokenizer_and_retries_an_interrupted_run(hf_dir, tmp_path):
    out = tmp_path / "converted"
    assert run("dsv3_jax.interop.convert", "--hf", hf_dir["bf16"], "--out", str(out)).returncode == 0
    (out / "tokenizer.json").write_text('{"the user": "put this here"}')  # replaced after converting
    before = digest(out)
    check(run("dsv3_jax.interop.convert", "--hf", hf_dir["bf16"], "--out", str(out), "--overwrite"),
          "was not written by the converter", "convert")
    assert digest(out) == before
    # a conversion killed before its rename leaves only a temporary directory: retried with --overwrite
    os.remove(out / "tokenizer.json")
    shutil.rmtree(out / "checkpoints" / "0")
    (out / "checkpoints" / "0.orbax-checkpoint-tmp-123" / "state").mkdir(parents=True)
    check(run("dsv3_jax.interop.convert", "--hf", hf_dir["bf16"], "--out", str(out)),
          "interrupted conversion", "convert")
    r = run("dsv3_jax.interop.convert", "--hf", hf_dir["bf16"], "--out", str(out), "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(out / "checkpoints")) == ["0"]
