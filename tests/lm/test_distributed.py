"""Data-parallel training under torchrun (issue 15, docs/distributed.md, policygrad.distributed), end to end on this
CPU: gloo, the tiny model of conftest.py, two processes of one thread each, launched the way a user launches them
(``.venv/bin/torchrun --standalone --nproc-per-node 2 -m policygrad train ...``).

The 1-vs-2-process comparison is to 1e-6, not bit for bit, and the sampled completions, rewards and every number
computed from them are exactly equal: sampling is seeded per prompt (a prompt's completions do not depend on the
split), but each process pads its prompts and completions to its own longest row, so the forward and backward passes
run on other shapes and round differently in the last float32 bits (1.7e-7 after 3 AdamW steps at lr 1e-2 when
recorded). A resumed 2-process run is bit for bit the uninterrupted one: same shapes, same arithmetic.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lm_helpers import tiny_config, weights, write_tiny_prompts  # tests/lm, on sys.path under pytest

from policygrad import checkpointing
from policygrad.configs import config_to_dict

pytestmark = pytest.mark.smoke

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
TIMING = ("sample_time", "step_time", "tokens_per_s")
EXACT = ("reward_mean", "reward_std", "advantage_mean", "advantage_std", "advantage_min", "advantage_max")
EXACT += ("entropy_weight", "completion_tokens", "zero_spread_groups", "pass_rate", "length_rate", "truncated")
ONE_VS_TWO = 1e-6  # parameters after 3 steps (see the module docstring)

EVAL_FAULT_REWARD = """
import os


def eval_fault(prompts, completions, **fields):
    # fails on rank 1's evaluation batches only (2 completions; training calls it with 3, the setup trial with 1)
    if os.environ.get("RANK") == "1" and len(completions) == 2:
        raise ValueError("rank 1 cannot score this")
    return [float(len(c)) for c in completions]
"""

HALF_FLAT_REWARD = """
def half_flat(prompts, completions, **fields):
    # no spread for the even-numbered notes ("Note 4: cats nap."), the completion's length for the odd ones
    return [0.0 if int(p.split()[1].rstrip(":")) % 2 == 0 else float(len(c)) for p, c in zip(prompts, completions)]
"""

LETHAL_REWARD = """
import os
import signal

CALLS = [0]


def lethal(prompts, completions, **fields):
    # rank 1 kills itself on its third call: the trial call of setup, step 1, then in step 2
    CALLS[0] += 1
    if os.environ.get("RANK") == "1" and CALLS[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return [float(len(c)) for c in completions]
"""


def _recipe(tmp_path: Path, name: str, model: Path, prompts: Path, **overrides) -> Path:
    """A recipe of a tiny run in ``tmp_path/name``: 2 prompts x 3 completions a step, one micro-batch of 3 rows per
    process, the batch-wide numbers all in play (batch std, dynamic entropy weight, KL to the reference)."""
    settings = {
        "max_steps": 3,
        "micro_batch_size": 3,
        "scale_rewards": "batch",
        "entropy_weight": "dynamic",
        "entropy_coef": 1e-3,
        "kl_coef": 0.05,
        "log_completions": 6,
        **overrides,
    }
    config = tiny_config(model, prompts, tmp_path / name, **settings)
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(config_to_dict(config)))
    return recipe


def _torchrun(processes: int, *args: str) -> list[str]:
    return [TORCHRUN, "--standalone", "--nproc-per-node", str(processes), "-m", "policygrad", "train", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(processes: int, recipe: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _torchrun(processes, "--recipe", str(recipe), *flags), capture_output=True, text=True, env=_env(), timeout=120
    )


def _ours(stderr: str) -> list[str]:
    """The lines policygrad itself printed (not torchrun's report or transformers' progress bars)."""
    return [line for line in stderr.splitlines() if line.startswith("policygrad train:")]


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _untimed(run: Path) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIMING} for record in _metrics(run)]


@pytest.fixture(scope="module")
def plain_runs(tiny_llama_chat, tmp_path_factory) -> dict[int, Path]:
    """The runs of :func:`_recipe` on 1 and 2 data-parallel processes, made once for the tests that compare with them."""
    tmp = tmp_path_factory.mktemp("plain")
    prompts = write_tiny_prompts(tmp / "prompts.jsonl")
    for processes in (1, 2):
        done = _train(processes, _recipe(tmp, f"p{processes}", tiny_llama_chat, prompts))
        assert done.returncode == 0, done.stderr
    return {processes: tmp / f"p{processes}" for processes in (1, 2)}


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_train_the_parameters_of_one(sharding, plain_runs, tiny_llama_chat, tiny_prompts, tmp_path):
    # ddp: whole copies, gradients summed by hand; fsdp: FSDP2 shards (weights, gradients, AdamW's moments), the
    # gradients reduce-scattered in the backward passes; both must be one process on the same global batch
    one, two = plain_runs[1], plain_runs[2]
    if sharding == "fsdp":
        two = tmp_path / "fsdp"
        done = _train(2, _recipe(tmp_path, "fsdp", tiny_llama_chat, tiny_prompts, fsdp=True))
        assert done.returncode == 0, done.stderr
    # the same prompts, the same completions (seeded per prompt), so the same rewards and batch-wide numbers
    assert (one / "completions.jsonl").read_text() == (two / "completions.jsonl").read_text()
    for a, b in zip(_metrics(one), _metrics(two), strict=True):
        assert {k: a[k] for k in EXACT} == {k: b[k] for k in EXACT}
        for key in ("loss", "pg_loss", "entropy", "kl", "grad_norm"):  # summed over the processes
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    expected, got = weights(one / "final"), weights(two / "final")
    initial = weights(tiny_llama_chat)
    assert max((expected[k] - initial[k]).abs().max() for k in expected) > 1e-3  # it trained
    assert sorted(got) == sorted(expected)  # FSDP's gathered weights: the tied head once, as one process saves it
    for name, tensor in expected.items():
        assert torch.allclose(got[name], tensor, rtol=0, atol=ONE_VS_TWO), name
    assert not (two / "checkpoints").exists() and sorted(p.name for p in two.iterdir()) == sorted(
        p.name for p in one.iterdir()
    )  # rank 0 wrote what one process writes, and nobody else wrote anything


def test_two_nodes_train_what_one_node_trains(plain_runs, tiny_llama_chat, tiny_prompts, tmp_path):
    # two torchrun launchers, one process each, meeting at a c10d rendezvous as two machines would (here both on
    # localhost): the same run as one launcher with two processes, bit for bit (the same ranks, shards and shapes)
    two_nodes = _recipe(tmp_path, "nodes", tiny_llama_chat, tiny_prompts)
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    launch = [TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
    launch += ["--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "two-nodes"]
    nodes = [
        subprocess.Popen(
            [*launch, "--node-rank", str(rank), "-m", "policygrad", "train", "--recipe", str(two_nodes)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for rank in (0, 1)
    ]
    errors = [node.communicate(timeout=120)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errors
    for name, tensor in weights(plain_runs[2] / "final").items():
        assert torch.equal(weights(tmp_path / "nodes" / "final")[name], tensor), name
    assert _untimed(tmp_path / "nodes") == _untimed(plain_runs[2])


def test_a_reward_fault_in_another_ranks_evaluation_is_one_line(tiny_llama_chat, tiny_prompts, tmp_path):
    # rank 1 scores the second evaluation batch and fails: every rank stops with its message, said once by rank 0
    reward = tmp_path / "eval_fault.py"
    reward.write_text(EVAL_FAULT_REWARD)
    settings = dict(eval_every=1, eval_size=4, heldout_prompts=4, eval_decoding=("greedy",), micro_batch_size=2)
    recipe = _recipe(tmp_path, "run", tiny_llama_chat, tiny_prompts, rewards=(f"{reward}:eval_fault",), **settings)
    started = time.monotonic()
    done = _train(2, recipe)
    assert time.monotonic() - started < 60 and done.returncode != 0
    lines = _ours(done.stderr)
    assert len(lines) == 1 and "rank 1 cannot score this" in lines[0], done.stderr


@pytest.mark.parametrize("lora", [False, True])
def test_a_resumed_fsdp_run_is_bit_identical(lora, tiny_llama_chat, tiny_prompts, tmp_path):
    # the checkpoint holds the gathered weights (with LoRA: the gathered adapters) and AdamW's gathered state; the
    # resume shards both again
    if lora:
        pytest.importorskip("peft", reason="the lora extra (PEFT) is part of make install")
    adapters = {"lora_rank": 4} if lora else {}
    straight = _recipe(tmp_path, "straight", tiny_llama_chat, tiny_prompts, fsdp=True, **adapters)
    split = _recipe(tmp_path, "split", tiny_llama_chat, tiny_prompts, fsdp=True, max_steps=2, **adapters)
    for recipe in (straight, split):
        done = _train(2, recipe)
        assert done.returncode == 0, done.stderr
    resumed = _train(2, tmp_path / "split" / "config.yaml", "--resume", "--max-steps", "3")
    assert resumed.returncode == 0, resumed.stderr
    saved = _adapter if lora else weights
    expected, got = saved(tmp_path / "straight" / "final"), saved(tmp_path / "split" / "final")
    assert expected
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert _untimed(tmp_path / "split") == _untimed(tmp_path / "straight")


def test_fsdp_without_torchrun_is_one_line(tiny_llama_chat, tiny_prompts, tmp_path):
    recipe = _recipe(tmp_path, "run", tiny_llama_chat, tiny_prompts, fsdp=True)
    done = subprocess.run(
        [sys.executable, "-m", "policygrad", "train", "--recipe", str(recipe)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "policygrad train: error: --fsdp: shards the model over the processes of a torchrun launch: start the run "
        "with torchrun"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_train_the_lora_adapters_of_one(sharding, tiny_llama_chat, tiny_prompts, tmp_path):
    # ddp: the adapters' gradients summed by hand; fsdp: the frozen base weights and the adapters sharded together
    # (FSDP2 shards each parameter, trainable or not), the checkpoint's adapter gathered from the shards
    pytest.importorskip("peft", reason="the lora extra (PEFT) is part of make install")
    from safetensors.torch import load_file

    adapters = {}
    for processes in (1, 2):
        # the KL reference is the adapters switched off; the gradients summed are the adapters' alone
        sharded = {"fsdp": True} if sharding == "fsdp" and processes == 2 else {}
        recipe = _recipe(tmp_path, f"lora{processes}", tiny_llama_chat, tiny_prompts, lora_rank=4, **sharded)
        done = _train(processes, recipe)
        assert done.returncode == 0, done.stderr
        adapters[processes] = load_file(str(tmp_path / f"lora{processes}" / "final" / "adapter_model.safetensors"))
    assert adapters[1].keys() == adapters[2].keys()
    assert max(t.abs().max() for k, t in adapters[1].items() if "lora_B" in k) > 1e-3  # it trained
    for name, tensor in adapters[1].items():
        assert torch.allclose(adapters[2][name], tensor, rtol=0, atol=ONE_VS_TWO), name


def test_two_processes_sample_dynamically_as_one_does(tiny_llama_chat, tiny_prompts, tmp_path):
    # groups without spread replaced by fresh prompts' groups, drawn round the ranks (a round of one fresh prompt
    # leaves rank 1 without any), picked from every rank's draws: the batch one process trains on
    reward = tmp_path / "half_flat.py"
    reward.write_text(HALF_FLAT_REWARD)
    settings = dict(max_extra_groups=3, rewards=(f"{reward}:half_flat",), max_steps=4)
    for processes in (1, 2):
        done = _train(processes, _recipe(tmp_path, f"d{processes}", tiny_llama_chat, tiny_prompts, **settings))
        assert done.returncode == 0, done.stderr
    one, two = tmp_path / "d1", tmp_path / "d2"
    assert (one / "completions.jsonl").read_text() == (two / "completions.jsonl").read_text()
    dynamic = ("dynamic/extra_groups", "dynamic/first_zero_spread")
    for a, b in zip(_metrics(one), _metrics(two), strict=True):
        assert {k: a[k] for k in EXACT + dynamic} == {k: b[k] for k in EXACT + dynamic}
    extra = [record["dynamic/extra_groups"] for record in _metrics(two)]
    assert sum(extra) > 0 and 1.0 in extra, extra  # it drew, once a single fresh prompt (one rank had none)
    # to 1e-5, not 1e-6: the same padding rounding as above over 4 AdamW steps, one of them on a gradient of norm
    # 0.08 that AdamW's normalisation scales up (3.3e-6 when recorded)
    expected, got = weights(one / "final"), weights(two / "final")
    for name, tensor in expected.items():
        assert torch.allclose(got[name], tensor, rtol=0, atol=1e-5), name


def test_two_processes_share_the_evaluation_and_report_the_numbers_of_one(tiny_llama_chat, tiny_prompts, tmp_path):
    # 6 held-out prompts in generation batches of 3: rank 0 generates and scores the first, rank 1 the second
    settings = dict(max_steps=1, eval_every=1, eval_size=6, heldout_prompts=6, eval_decoding=("greedy", "sampled"))
    evaluations = {}
    for processes in (1, 2):
        recipe = _recipe(tmp_path, f"e{processes}", tiny_llama_chat, tiny_prompts, **settings)
        done = _train(processes, recipe)
        assert done.returncode == 0, done.stderr
        evaluations[processes] = _metrics(tmp_path / f"e{processes}")[0]  # step 0: the same weights on both
    one, two = evaluations[1], evaluations[2]
    assert one["step"] == 0 and "eval/greedy/pass_rate" in one and "eval/sampled/mean_length" in one
    assert one == two  # generated in the same batches, seeded per prompt: equal to the last bit
    assert any(key.startswith("eval/greedy/S=") for key in two)  # the per-target rows, gathered from both ranks


def test_a_resumed_two_process_run_is_bit_identical_and_keeps_its_launch(tiny_llama_chat, tiny_prompts, tmp_path):
    settings = dict(advantage="reinforce", updates_per_batch=2, entropy_weight="constant", scale_rewards="group")
    straight = _recipe(tmp_path, "straight", tiny_llama_chat, tiny_prompts, **settings)
    split = _recipe(tmp_path, "split", tiny_llama_chat, tiny_prompts, **{**settings, "max_steps": 1})
    for recipe in (straight, split):
        done = _train(2, recipe)
        assert done.returncode == 0, done.stderr
    config = str(tmp_path / "split" / "config.yaml")
    other = _train(1, Path(config), "--resume", "--max-steps", "3")  # another number of processes: refused
    assert other.returncode != 0  # torchrun exits 1 when a process fails, whatever its own status (2)
    assert _ours(other.stderr) == [
        "policygrad train: error: --resume: final was saved by torchrun with 2 processes and this is torchrun with 1 "
        "process; resume with the launch that started the run (the same number of processes: the shards, the "
        "sampling seeds and every rank's generators are part of its state)"
    ]
    resumed = _train(2, Path(config), "--resume", "--max-steps", "3")
    assert resumed.returncode == 0, resumed.stderr
    for name, tensor in weights(tmp_path / "straight" / "final").items():
        assert torch.equal(weights(tmp_path / "split" / "final")[name], tensor), name
    assert _untimed(tmp_path / "split") == _untimed(tmp_path / "straight")  # the moving baseline included
    assert "baseline" in _metrics(tmp_path / "split")[-1]


def test_a_batch_that_does_not_split_evenly_is_one_line_before_anything_loads(tiny_llama_chat, tiny_prompts, tmp_path):
    recipe = _recipe(tmp_path, "run", tiny_llama_chat, tiny_prompts, prompts_per_step=3)
    done = _train(2, recipe)
    assert done.returncode != 0
    assert _ours(done.stderr) == [
        "policygrad train: error: --prompts-per-step: 3 prompts per step do not split evenly over the 2 processes "
        "of this torchrun launch (each takes whole prompt groups); use a multiple of 2"
    ]
    assert not (tmp_path / "run").exists()


def test_a_killed_process_ends_the_run_with_one_line_naming_it(tiny_llama_chat, tiny_prompts, tmp_path):
    reward = tmp_path / "lethal.py"
    reward.write_text(LETHAL_REWARD)
    recipe = _recipe(tmp_path, "run", tiny_llama_chat, tiny_prompts, max_steps=10, rewards=(f"{reward}:lethal",))
    started = time.monotonic()
    done = _train(2, recipe)
    assert time.monotonic() - started < 60
    assert done.returncode != 0
    # torchrun itself SIGTERMs the survivors once it sees rank 1 die; under torchrun that signal is noted without a
    # word (the stop would say it), so the loss is said exactly once, and nothing else is
    lines = _ours(done.stderr)
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("policygrad train: rank 1 of 2 ended (killed or crashed; its own output says why); ")
    assert lines[0].endswith(
        f"--nproc-per-node 2 -m policygrad train --recipe {shlex.quote(str(tmp_path / 'run' / 'config.yaml'))} --resume"
    )


def test_sigint_to_torchrun_saves_once_and_prints_the_resume_command(tiny_llama_chat, tiny_prompts, tmp_path):
    recipe = _recipe(tmp_path, "run", tiny_llama_chat, tiny_prompts, max_steps=40)
    out = tmp_path / "run"
    child = subprocess.Popen(
        _torchrun(2, "--recipe", str(recipe)), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=_env()
    )
    deadline = time.monotonic() + 60
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 1):
        assert time.monotonic() < deadline and child.poll() is None, "the run did not start"
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)  # to the launcher, as Ctrl-C or a scheduler would
    _, err = child.communicate(timeout=60)
    lines = _ours(err)
    assert [line.split(";")[0] for line in lines] == ["policygrad train: got SIGINT", lines[-1].split(";")[0]], err
    stopped = lines[-1]
    assert stopped.startswith("policygrad train: stopped by SIGINT after step ")
    step = int(stopped.split("after step ")[1].split()[0])
    assert 1 <= step < 40
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{step:06d}"]  # saved once, by rank 0
    assert checkpointing.verify(out / "checkpoints" / f"step-{step:06d}") is None
    command = stopped.split("resume with: ")[1]
    assert command == (
        f"{shlex.quote(TORCHRUN)} --nproc-per-node 2 -m policygrad train --recipe "
        f"{shlex.quote(str(out / 'config.yaml'))} --resume"
    ) or command.startswith("torchrun --nproc-per-node 2 -m policygrad train --recipe ")
    resumed = subprocess.run(
        [*shlex.split(command), "--max-steps", str(step + 1)], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in _metrics(out)] == list(range(1, step + 2))
