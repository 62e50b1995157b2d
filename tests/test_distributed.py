"""Multi-host training: two processes on localhost (CPU, gloo collectives, 2 devices each) train the
micro config on a 4-device data x expert mesh and log the same losses as one process with 4 devices."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from dsv3_jax import distributed

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "distributed_worker.py")
MESH = json.dumps({"data": 2, "expert": 2})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items()  # (the session's compilation cache kept: see conftest.py)
           if not (k.startswith("JAX_") and "CACHE" not in k) and k != "XLA_FLAGS"}
    env.update(extra)
    return env


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _two_processes(workdir, *extra) -> list[dict]:
    """Run the worker as 2 processes of one localhost cluster (2 CPU devices each); their final JSON lines."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, WORKER, str(workdir), MESH, "2", *extra], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                       JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def _prepared_corpus(tmp_path) -> str:
    from dsv3_jax.data import bpe, prepare
    from dsv3_jax.data.corpus import default_corpus
    from dsv3_jax.io import tokenizer as tokenizer_io

    docs = default_corpus()
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "docs.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    tokenizer_io.save_tokenizer(bpe.train_tokenizer(docs, 600), str(tmp_path / "tok.json"))
    prepared = str(tmp_path / "prepared")
    prepare.prepare([str(tmp_path / "in")], str(tmp_path / "tok.json"), prepared, val_fraction=0.05, progress=False,
                    log=lambda _: None)
    return prepared


def test_two_processes_match_one_and_read_their_own_rows(tmp_path):
    """Two processes of one localhost cluster (2 CPU devices each) train from a prepared corpus as one process
    with 4 devices does: the same logged losses, gradient norms, MaxVio and evaluation, and the same checkpoints.
    Each process reads only its devices' rows of every global batch: the two sets are disjoint and together are
    the whole global batch (positions p .. p + 7 of the shuffled windows, which the one process reads alone)."""
    prepared = _prepared_corpus(tmp_path)
    one = tmp_path / "one"
    r = subprocess.run([sys.executable, WORKER, str(one), MESH, "4", prepared], env=_env(), check=True, timeout=600,
                       capture_output=True, text=True)
    alone = json.loads(r.stdout.strip().splitlines()[-1])
    two = tmp_path / "two"
    outs = _two_processes(two, prepared)
    assert [(o["process"], o["processes"], o["devices"]) for o in outs] == [(0, 2, 4), (1, 2, 4)]
    ref, got = _losses(one), _losses(two)  # metrics.jsonl is written by process 0 only
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [2, 4, 6, 8]
    for key in ("loss", "mtp_loss", "grad_norm", "max_vio", "val_loss"):
        a = np.array([r[key] for r in ref if key in r])
        b = np.array([r[key] for r in got if key in r])
        assert len(a) == len(b) > 0
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-6, err_msg=key)
    # process 1 computed the same losses locally (replicated scalars), and wrote no second metrics file
    np.testing.assert_allclose(outs[1]["losses"], outs[0]["losses"], rtol=0, atol=0)
    assert len(outs[0]["losses"]) == 4
    assert sorted(os.listdir(two / "checkpoints")) == sorted(os.listdir(one / "checkpoints"))
    assert sorted(map(int, outs[0]["reads"])) == sorted(map(int, outs[1]["reads"])) == list(range(0, 64, 8))
    for batch in outs[0]["reads"]:  # 8 steps of 8 rows: batch k holds positions 8k .. 8k + 7
        a, b = set(outs[0]["reads"][batch]), set(outs[1]["reads"][batch])
        assert a and b and not a & b, (batch, a, b)
        assert sorted(a | b) == sorted(alone["reads"][batch]) == list(range(int(batch), int(batch) + 8))


@pytest.mark.parametrize("cfg,env,needle", [
    (dict(num_processes=2), {}, "coordinator_address"),
    (dict(num_processes=2, coordinator_address="h:1"), {}, "process_id"),
    (dict(), {"JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "h", "JAX_PROCESS_ID": "0"}, "needs a port"),
    (dict(num_processes=2, coordinator_address="h:1", process_id=2), {}, r"\[0, 2\)"),
])
def test_distributed_settings_errors(cfg, env, needle, monkeypatch):
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=needle):
        distributed.settings(cfg)


def test_distributed_settings_resolution(monkeypatch):
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.settings({}) is None  # one process: nothing to start
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert distributed.settings({}) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                        "process_id": 3, "auto": False}
    # config keys win over the environment
    got = distributed.settings(dict(coordinator_address="h:9", num_processes=2, process_id=1))
    assert got == {"coordinator_address": "h:9", "num_processes": 2, "process_id": 1, "auto": False}
