"""Sharing a machine: the OpenMP wait policy set by the CLI and the thread count of run.threads."""

import os
import subprocess
import sys

import pytest
import torch

from tailaug.cli import main
from tailaug.engine import threads
from tailaug.engine.threads import PASSIVE_WAIT, apply_threads, default_threads, set_passive_wait


def test_passive_wait_is_set_without_overriding_the_user():
    env = {"KMP_BLOCKTIME": "200"}
    set_passive_wait(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "200"}


@pytest.mark.parametrize("env, cores, expected", [
    ({}, 2, 2),                                            # the free cores
    ({"OMP_NUM_THREADS": "3"}, 2, 3),                      # the user's (or torchrun's) setting wins
    ({"OMP_NUM_THREADS": " "}, 4, 4),                      # blank or invalid: ignored
    ({"OMP_NUM_THREADS": "0"}, 4, 4),
    ({"LOCAL_WORLD_SIZE": "2"}, 8, 4),                     # torchrun processes share the cores
    ({"LOCAL_WORLD_SIZE": "4"}, 2, 1),
])
def test_default_threads(env, cores, expected):
    assert default_threads(env, cores) == expected


def test_available_cores_follows_the_affinity():
    if hasattr(os, "sched_getaffinity"):
        assert threads.available_cores() == len(os.sched_getaffinity(0))


def test_apply_threads(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert apply_threads(3) == 3 and apply_threads(None) == 1 and apply_threads(2) == 2
    assert calls == [3, 1]  # 2 is already set


def test_the_cli_asks_for_passive_waiting_before_torch_loads(monkeypatch, capsys):
    for key in PASSIVE_WAIT:
        monkeypatch.delenv(key, raising=False)
    assert main(["datasets", "describe", "configs/fmnist_lt/demo.yaml"]) == 0
    assert {k: os.environ[k] for k in PASSIVE_WAIT} == PASSIVE_WAIT
    # the policy takes effect only if torch (and its OpenMP runtime) has not loaded yet
    probe = "import sys, tailaug.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_commands_apply_run_threads_first(monkeypatch, capsys, tmp_path):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    taken = tmp_path / "runs" / "taken" / "checkpoints"
    taken.mkdir(parents=True)
    (taken / "last.pt").write_bytes(b"x")
    # the run directory is taken: the command fails after setting the threads, before any work
    code = main(["train", "configs/fmnist_lt/demo.yaml", "run.threads=1", "run.name=taken",
                 f"run.output_dir={tmp_path / 'runs'}", "--no-progress"])
    assert code == 2 and calls == [1]
    assert "--resume" in capsys.readouterr().err


def test_run_threads_must_be_positive(capsys):
    assert main(["train", "configs/fmnist_lt/demo.yaml", "run.threads=0"]) == 2
    assert "run.threads" in capsys.readouterr().err
