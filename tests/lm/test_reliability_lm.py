"""Issue 6, "Nothing lost", for the GRPO trainer: exact resume, crash-safe checkpoints, clean stops on SIGINT and
SIGTERM, reward and numerical faults, safe loading. The fault counts of docs/reliability.md are the constants here:
``FAULT_TABLE`` at the end declares this file's rows of its table from them, and a test compares the two cell by cell.

Every run is a tiny local model (conftest.py) on CPU with one thread, so "exact" means bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.smoke

pytest.importorskip("transformers")
import fault_table  # noqa: E402  (tests/, on sys.path under pytest)
from lm_helpers import tiny_config, weights  # noqa: E402  (tests/lm is on sys.path under pytest)

from policygrad import checkpointing  # noqa: E402
from policygrad.configs import config_to_dict  # noqa: E402
from policygrad.errors import UsageError  # noqa: E402
from policygrad.lm import trainer  # noqa: E402
from policygrad.lm import update as update_module  # noqa: E402
from policygrad.lm.config import GRPOConfig  # noqa: E402
from policygrad.lm.rewards import RewardError  # noqa: E402
from policygrad.lm.state import TRAINER_STATE, load_trainer_state  # noqa: E402
from policygrad.runs import latest_checkpoint  # noqa: E402
from policygrad.stopping import EXIT_DIVERGED, Stopped  # noqa: E402

POLICYGRAD = str(Path(sys.executable).with_name("policygrad"))


def _as_started(program: str) -> str:
    """How a resume command names ``program``: its short name where that is on the PATH, else its path."""
    found = shutil.which("policygrad")
    return "policygrad" if found and Path(found).resolve() == Path(program).resolve() else shlex.quote(program)


SRC = Path(__file__).resolve().parents[2] / "src"

KILLS_DURING_SAVE = 3  # SIGKILLs of a real training process while it writes a checkpoint (end to end)
KILLED_RUN_STEPS = 10  # the length of that run
REWARD_FAULTS = ("raises", "hangs", "wrong_count", "none", "nan", "inf")  # each under both policies
NONFINITE_KINDS = ("nan_loss", "inf_loss", "nan_grad")
UPDATES_PER_BATCH = 2  # clipped updates per batch in the exact-resume test
CHANGED_CONFIG = "group_size 3 -> 2; lr 0.01 -> 0.03"  # what a resume with a changed config names
DAMAGED_STEP, TRUNCATED_TO = 2, 100  # the periodic checkpoint whose trainer state is cut to 100 bytes
BAD_STEPS = (3, 4, 5)  # non-finite steps in a row, each with max_bad_steps = len(BAD_STEPS)


def _config(model: Path, prompts: Path, out: Path, **overrides) -> GRPOConfig:
    return tiny_config(model, prompts, out, **{"max_steps": 4, "micro_batch_size": 8, **overrides})


def _assert_same_weights(a: Path, b: Path) -> None:
    left, right = weights(a), weights(b)
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


TIMING = ("sample_time", "step_time", "tokens_per_s")


def _metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields (NaN compared as equal via its text)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [json.dumps({k: v for k, v in r.items() if not k.endswith("_time") and k not in TIMING}) for r in records]


NOISY_REWARD = """
import random

import numpy as np

from policygrad.lm.tasks import shaped_reward


def noisy(prompts, completions, **fields):
    # draws from Python's and NumPy's global generators: exact only if a resume restores both
    base = shaped_reward(prompts, completions, **fields)
    return [b + 1e-3 * random.random() + 1e-3 * float(np.random.rand()) for b in base]
"""


@pytest.fixture
def noisy_reward(tmp_path) -> str:
    path = tmp_path / "noisy_reward.py"
    path.write_text(NOISY_REWARD)
    return f"{path}:noisy"


def _exact_settings(noisy_reward: str) -> dict:
    """Every piece of state a step carries forward: AdamW moments, reinforce's baseline, the dynamic entropy weight,
    the KL reference, several clipped updates per batch, Python and NumPy generators (the reward draws from them)."""
    return dict(
        advantage="reinforce",
        entropy_weight="dynamic",
        entropy_coef=1e-3,
        kl_coef=0.05,
        updates_per_batch=UPDATES_PER_BATCH,
        rewards=(noisy_reward,),
        save_every=1,
        keep_checkpoints=2,
    )


# ------------------------------------------------------------------------------------------------------------------
# 1. Exact resume, and the config check
# ------------------------------------------------------------------------------------------------------------------


def test_n_steps_then_resume_to_2n_is_bit_identical_to_2n_steps(tiny_llama_chat, tiny_prompts, tmp_path, noisy_reward):
    settings = _exact_settings(noisy_reward)
    straight = trainer.train(_config(tiny_llama_chat, tiny_prompts, tmp_path / "straight", max_steps=4, **settings))
    split = tmp_path / "split"
    trainer.train(_config(tiny_llama_chat, tiny_prompts, split, max_steps=2, **settings))
    trainer.train(_config(tiny_llama_chat, tiny_prompts, split, max_steps=4, resume=True, **settings))

    _assert_same_weights(straight / "final", split / "final")
    assert _metrics(straight) == _metrics(split)  # rewards, advantages, losses, baseline, entropy weight: all equal
    saved = [load_trainer_state(run / "final") for run in (straight, split)]
    assert torch.equal(saved[0].advantage["mean"], saved[1].advantage["mean"])
    assert saved[0].advantage["mean"] != 0.0
    for a, b in zip(saved[0].optimizer["state"].values(), saved[1].optimizer["state"].values()):
        assert all(torch.equal(a[key], b[key]) for key in a)  # AdamW's moments and step counts
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step-000002", "step-000003"]  # keep 2


def test_a_checkpoint_written_before_issue_13_resumes_exactly(tiny_llama_chat, tiny_prompts, tmp_path, noisy_reward):
    """Run folders of the code before issue 13 hold the REINFORCE baseline as ``"baseline"`` (a float) and no
    ``"advantage"``: rewritten into that layout, a checkpoint still resumes to the same run."""
    settings = _exact_settings(noisy_reward)
    straight = trainer.train(_config(tiny_llama_chat, tiny_prompts, tmp_path / "straight", max_steps=3, **settings))
    split = tmp_path / "split"
    trainer.train(_config(tiny_llama_chat, tiny_prompts, split, max_steps=2, **settings))
    folder = split / "final"
    state = torch.load(folder / TRAINER_STATE, weights_only=True)
    state["baseline"] = float(state.pop("advantage")["mean"])  # the old layout, exactly as it was written
    torch.save(state, folder / TRAINER_STATE)
    manifest = json.loads((folder / checkpointing.MANIFEST).read_text())
    entry = manifest["files"][TRAINER_STATE]
    entry["sha256"] = checkpointing.sha256_file(folder / TRAINER_STATE)
    entry["bytes"] = (folder / TRAINER_STATE).stat().st_size
    (folder / checkpointing.MANIFEST).write_text(json.dumps(manifest))
    trainer.train(_config(tiny_llama_chat, tiny_prompts, split, max_steps=3, resume=True, **settings))
    _assert_same_weights(straight / "final", split / "final")
    assert _metrics(straight) == _metrics(split)


def test_resume_refuses_a_changed_config_and_names_the_fields(tiny_llama_chat, tiny_prompts, tmp_path):
    out = tmp_path / "run"
    trainer.train(_config(tiny_llama_chat, tiny_prompts, out, max_steps=1))
    with pytest.raises(UsageError) as info:
        trainer.train(_config(tiny_llama_chat, tiny_prompts, out, max_steps=2, resume=True, lr=3e-2, group_size=2))
    message = str(info.value)
    assert message.startswith("--resume: ") and "\n" not in message
    assert CHANGED_CONFIG in message and "--allow-config-change" in message
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # refused before anything was written
    # fields that do not change what a step does are free; the rest need the flag
    trainer.train(_config(tiny_llama_chat, tiny_prompts, out, max_steps=2, resume=True, save_every=5))
    trainer.train(
        _config(tiny_llama_chat, tiny_prompts, out, max_steps=3, resume=True, lr=3e-2, allow_config_change=True)
    )
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


# ------------------------------------------------------------------------------------------------------------------
# 2. Crash-safe checkpoints
# ------------------------------------------------------------------------------------------------------------------


def test_damaged_checkpoints_are_reported_and_passed_over(tiny_llama_chat, tiny_prompts, tmp_path, capsys):
    straight = trainer.train(_config(tiny_llama_chat, tiny_prompts, tmp_path / "straight", max_steps=4))
    out = tmp_path / "run"
    trainer.train(_config(tiny_llama_chat, tiny_prompts, out, max_steps=3, save_every=1))
    model_file = out / "final" / "model.safetensors"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, wrong checksum
    model_file.write_bytes(bytes(data))
    state = out / "checkpoints" / f"step-{DAMAGED_STEP:06d}" / TRAINER_STATE
    state.write_bytes(state.read_bytes()[:TRUNCATED_TO])  # truncated
    assert latest_checkpoint(out, warn=lambda line: None).name == f"step-{DAMAGED_STEP - 1:06d}"
    capsys.readouterr()
    trainer.train(_config(tiny_llama_chat, tiny_prompts, out, max_steps=4, resume=True))
    err = capsys.readouterr().err
    assert "final (step 3): model.safetensors is corrupted" in err
    assert f"step-{DAMAGED_STEP:06d} (step {DAMAGED_STEP}): trainer_state.pt is truncated ({TRUNCATED_TO} of " in err
    # resumed from step 1, the last good checkpoint, and still ends exactly where an uninterrupted run ends
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    _assert_same_weights(straight / "final", out / "final")


def test_resume_with_every_checkpoint_damaged_is_refused(tiny_llama_chat, tiny_prompts, tmp_path, capsys):
    """Nothing intact to resume from is a one-line error naming the run, not a quiet fresh start over the run's logs;
    the folder is left as it was, and --overwrite starts again."""
    out = tmp_path / "run"
    trainer.train(_config(tiny_llama_chat, tiny_prompts, out, max_steps=2, save_every=1))
    for folder in (out / "final", out / "checkpoints" / "step-000001"):
        state = folder / TRAINER_STATE
        state.write_bytes(state.read_bytes()[:100])
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    capsys.readouterr()
    with pytest.raises(UsageError) as info:
        trainer.train(_config(tiny_llama_chat, tiny_prompts, out, max_steps=3, resume=True))
    message = str(info.value)
    assert message.startswith("--resume: ") and "\n" not in message
    assert f"{out} holds no intact checkpoint" in message and "--overwrite" in message
    assert capsys.readouterr().err.count("skipping checkpoint") == 2  # each damaged one named first
    from policygrad.cli import main  # the command's exit status and line for the same refusal

    assert main(["train", "--recipe", str(out / "config.yaml"), "--resume"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"policygrad train: error: --resume: {out} holds no intact checkpoint (every one is damaged, see above); "
        "pass --overwrite instead of --resume to start the run again"
    )
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    trainer.train(_config(tiny_llama_chat, tiny_prompts, out, max_steps=1, overwrite=True))
    assert checkpointing.verify(out / "final") is None


def test_periodic_evaluation_starts_at_step_0_and_a_resume_does_not_repeat_it(tiny_llama_chat, tiny_prompts, tmp_path):
    """With eval_every, the untrained model is evaluated first and logged as step 0 (eval/ keys only), so a learning
    curve has its starting point; a resume keeps that line and does not evaluate again, so "2 steps, resume to 5"
    logs what 5 straight steps log (plus the first run's own final evaluation, at step 2)."""
    settings = dict(eval_every=3, eval_decoding=("greedy", "sampled"), save_every=1)
    straight = trainer.train(_config(tiny_llama_chat, tiny_prompts, tmp_path / "straight", max_steps=5, **settings))
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5, 5]  # step 0, steps 1-5, the final evaluation
    metrics = ("pass_rate", "length_rate", "digits_rate", "mean_reward", "nan_rewards", "mean_length", "truncated_rate")
    overall = {k for k in records[0] if k.count("/") == 2}  # the rates of each target S are eval/<d>/S=<S>/<rate>
    assert overall | {"step"} == {"step", *(f"eval/{d}/{k}" for d in ("greedy", "sampled") for k in metrics)}
    assert {k.split("/")[2] for k in set(records[0]) - overall - {"step"}} <= {f"S={s}" for s in range(5, 21)}
    assert [("eval/greedy/pass_rate" in r) for r in records] == [True, False, False, True, False, False, True]

    split = tmp_path / "split"
    trainer.train(_config(tiny_llama_chat, tiny_prompts, split, max_steps=2, **settings))
    trainer.train(_config(tiny_llama_chat, tiny_prompts, split, max_steps=5, resume=True, **settings))
    lines = _metrics(split)
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 2, 3, 4, 5, 5]  # step 0 once
    del lines[3]  # the first run's final evaluation
    assert lines == _metrics(straight)
    _assert_same_weights(straight / "final", split / "final")


CHILD_SAVER = """
import sys
from pathlib import Path
from policygrad import checkpointing

root, start = Path(sys.argv[1]), int(sys.argv[2])
for step in range(start, 10**6):
    def write(tmp, step=step):
        for i in range(4):  # a few files of known content, one large enough to take a while
            (tmp / f"part{i}.bin").write_bytes(bytes([step % 251]) * (200_000 if i == 0 else 1000))
    checkpointing.save_atomic(root / "final", write, step)  # replaced in place: the two-rename path
    checkpointing.save_atomic(root / "checkpoints" / f"step-{step:06d}", write, step)
    checkpointing.prune(root / "checkpoints", 2)
    print(step, flush=True)
"""

SAVE_KILLS = 25  # SIGKILLs of a process that does nothing but save checkpoints


def test_sigkill_at_random_points_of_a_save_never_loses_the_last_checkpoint(tmp_path):
    """A process saving in a loop is killed at random moments inside a save; each time the newest complete checkpoint
    is intact, the save that was cut off is the only thing lost, and the next process goes on from it."""
    rng, table = random.Random(6), fault_table
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    start, outcomes, cut_short = 0, [], 0

    def saving() -> bool:  # a folder being written, or one being replaced: save_atomic under way
        return any(
            list(folder.glob(f".*{mark}*"))
            for folder in (tmp_path, tmp_path / "checkpoints")
            for mark in (".tmp-", ".old-")
        )

    for _ in range(SAVE_KILLS):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD_SAVER, str(tmp_path), str(start)], stdout=subprocess.PIPE, text=True, env=env
        )
        completed = int(child.stdout.readline())  # started and saved at least once
        for _ in range(100):  # almost every moment of the loop is inside a save: the first try nearly always kills
            time.sleep(rng.uniform(0.0, 0.15))
            if table.kill_inside_a_save(child, saving):
                break
        assert child.returncode == -signal.SIGKILL, "the saving process was never caught inside a save"
        rest = child.communicate()[0].split()
        completed = int(rest[-1]) if rest else completed
        cut_short += saving()  # what the kill cut short is still there, until recover() tidies it
        checkpointing.recover(tmp_path)
        checkpointing.recover(tmp_path / "checkpoints")
        newest = checkpointing.latest_good(
            [tmp_path / "final", *checkpointing.folders_in(tmp_path / "checkpoints")], warn=outcomes.append
        )
        step = checkpointing.read_manifest(newest)["step"]
        assert step >= completed  # every save that finished is still there (one cut short may be too)
        assert checkpointing.verify(newest) is None
        assert (newest / "part0.bin").read_bytes() == bytes([step % 251]) * 200_000
        assert not list(tmp_path.glob(".*")) and not list((tmp_path / "checkpoints").glob(".*"))  # tidied
        start = step + 1
    assert outcomes == []  # no checkpoint was ever left damaged: the atomic rename leaves nothing to skip
    assert cut_short == SAVE_KILLS  # every kill landed inside a save


RESUMABLE_RUN = """
import sys
from pathlib import Path
from policygrad.lm.config import load_config
from policygrad.lm.trainer import train

train(load_config(sys.argv[1], {"resume": sys.argv[2] == "resume"}))
"""


@pytest.mark.slow
def test_training_killed_during_saves_resumes_to_the_same_weights(tiny_llama_chat, tiny_prompts, tmp_path):
    """SIGKILL a real training run while it writes a checkpoint, several times, then let it finish: the final weights
    and metrics are those of a run that was never interrupted. Each kill lands inside a save: the run is stopped at
    a random moment after its save began, and killed only if that save (its temporary folder) is still under way."""
    settings = dict(save_every=1, keep_checkpoints=2, max_steps=KILLED_RUN_STEPS, epochs=KILLED_RUN_STEPS)
    straight = trainer.train(_config(tiny_llama_chat, tiny_prompts, tmp_path / "straight", **settings))
    assert [json.loads(line)["step"] for line in (straight / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, KILLED_RUN_STEPS + 1)
    )  # the steps the table says: the prompts do not run out first
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(config_to_dict(_config(tiny_llama_chat, tiny_prompts, out, **settings))))
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    rng, table = random.Random(66), fault_table
    kills, cut_short = 0, 0
    while kills < KILLS_DURING_SAVE:
        mode = "resume" if (out / "config.yaml").exists() else "fresh"
        child = subprocess.Popen(
            [sys.executable, "-c", RESUMABLE_RUN, str(recipe), mode], env=env, stderr=subprocess.DEVNULL
        )

        def saving(pid=child.pid) -> bool:  # this process's periodic save is under way (a leftover has another pid)
            return bool(list((out / "checkpoints").glob(f".*.tmp-{pid}")))

        deadline = time.monotonic() + 120
        while child.poll() is None and time.monotonic() < deadline:
            if saving():
                time.sleep(rng.uniform(0.0, 0.02))
                if table.kill_inside_a_save(child, saving):
                    kills += 1
                    break
            time.sleep(0.001)
        assert child.returncode == -signal.SIGKILL, f"the run ended (exit {child.returncode}) after {kills} kills"
        cut_short += saving(child.pid)  # the save it was killed in is left half done
    child = subprocess.Popen(
        [sys.executable, "-c", RESUMABLE_RUN, str(recipe), "resume"], env=env, stderr=subprocess.PIPE
    )
    _, err = child.communicate(timeout=300)
    assert child.returncode == 0, err.decode()
    assert kills == cut_short == KILLS_DURING_SAVE
    _assert_same_weights(straight / "final", out / "final")
    assert _metrics(straight) == _metrics(out)


# ------------------------------------------------------------------------------------------------------------------
# 3. Stopping cleanly on SIGINT and SIGTERM
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_the_step_saves_and_says_how_to_resume(signum, tiny_llama_chat, tiny_prompts, tmp_path):
    import yaml

    settings = dict(max_steps=40)
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(config_to_dict(_config(tiny_llama_chat, tiny_prompts, out, **settings))))
    child = subprocess.Popen([POLICYGRAD, "train", "--recipe", str(recipe)], stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1) and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signum)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signum, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"policygrad train: stopped by {signal.Signals(signum).name} after step ")
    stopped_at = int(line.split("after step ")[1].split()[0])
    assert 1 <= stopped_at < 40
    assert checkpointing.verify(out / "checkpoints" / f"step-{stopped_at:06d}") is None
    command = line.split("resume with: ")[1]
    # the program as it was started: .venv/bin/policygrad is not on the PATH of someone who used `make`
    assert command == f"{_as_started(POLICYGRAD)} train --recipe {shlex.quote(str(out / 'config.yaml'))} --resume"

    end = stopped_at + 2
    if signum == signal.SIGTERM:  # the printed command, as printed, finishes the run
        resumed = subprocess.run(
            [*shlex.split(command), "--max-steps", str(end)],  # the printed command, as printed
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert resumed.returncode == 0, resumed.stderr
    else:  # or in this process, from the run's own config.yaml
        from policygrad.lm.config import load_config

        trainer.train(load_config(out / "config.yaml", {"resume": True, "max_steps": end}))
    straight = trainer.train(_config(tiny_llama_chat, tiny_prompts, tmp_path / "straight", max_steps=end))
    _assert_same_weights(straight / "final", out / "final")
    assert _metrics(straight) == _metrics(out)


# ------------------------------------------------------------------------------------------------------------------
# 4. Faults in user code and numbers
# ------------------------------------------------------------------------------------------------------------------

FAULTY_REWARD = """
import math
import time

calls = -1  # call 0 is the trainer's trial before step 1 (the first prompt, an empty completion)


def faulty(prompts, completions, **fields):
    # fine on the first batch; on the second, KIND on sample 1 (or the whole batch)
    global calls
    calls += 1
    good = [float(len(c.strip()) % 3) for c in completions]
    if calls != 2 and len(completions) > 1:
        return good
    if len(completions) == 1:  # a re-run one sample at a time after the batch raised
        if "KIND" == "raises" and calls == 4:  # the second sample alone
            raise ValueError("cannot score this")
        return good
    if "KIND" == "raises":
        raise ValueError("cannot score this")
    if "KIND" == "hangs":
        time.sleep(2)
        return good
    if "KIND" == "wrong_count":
        return good[:-1]
    if "KIND" == "none":
        return None
    good[1] = math.nan if "KIND" == "nan" else math.inf
    return good
"""

EXPECTED_MESSAGE = {
    "raises": "raised ValueError on sample 1 (prompt",
    "hangs": "did not return within 0.3 s on a batch of 6 (first prompt",
    "wrong_count": "returned 5 rewards for 6 completions on a batch of 6 (first prompt",
    "none": "returned None on a batch of 6 (first prompt",
    "nan": "sample 1 (prompt",
    "inf": "sample 1 (prompt",
}
FAULTED_SAMPLES = {"raises": 1, "hangs": 6, "wrong_count": 6, "none": 6, "nan": 1, "inf": 1}


def _faulty(tmp_path: Path, kind: str) -> str:
    path = tmp_path / f"faulty_{kind}.py"
    path.write_text(FAULTY_REWARD.replace("KIND", kind))
    return f"{path}:faulty"


@pytest.mark.parametrize("kind", REWARD_FAULTS)
def test_reward_fault_error_policy_saves_and_stops_naming_function_prompt_completion(
    kind, tiny_llama_chat, tiny_prompts, tmp_path
):
    out = tmp_path / "run"
    config = _config(tiny_llama_chat, tiny_prompts, out, rewards=(_faulty(tmp_path, kind),), reward_timeout=0.3)
    with pytest.raises(RewardError) as info:
        trainer.train(config)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"reward {config.rewards[0]}: ")
    assert EXPECTED_MESSAGE[kind] in message and "completion" in message
    assert "saved the run at step 1 in" in message and "resume with: policygrad train --recipe" in message
    folder = out / "checkpoints" / "step-000001"
    assert checkpointing.verify(folder) is None and load_trainer_state(folder).step == 1
    assert latest_checkpoint(out) == folder  # what --resume continues from: nothing after step 1 is lost


@pytest.mark.parametrize("kind", REWARD_FAULTS)
def test_reward_fault_skip_policy_zeroes_the_samples_counts_and_logs(kind, tiny_llama_chat, tiny_prompts, tmp_path):
    out = tmp_path / "run"
    config = _config(
        tiny_llama_chat,
        tiny_prompts,
        out,
        rewards=(_faulty(tmp_path, kind),),
        reward_timeout=0.3,
        reward_fault="skip",
        max_steps=3,
        log_completions=6,
    )
    trainer.train(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward_faults"] for r in records] == [0, FAULTED_SAMPLES[kind], 0]
    faults = [json.loads(line) for line in (out / "faults.jsonl").read_text().splitlines()]
    assert {f["step"] for f in faults} == {2} and all(f["prompt"] and "completion" in f for f in faults)
    step2 = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()][6:12]
    assert sum(math.isnan(s["reward"]) for s in step2) == FAULTED_SAMPLES[kind]  # NaN reward: advantage 0
    assert all(math.isfinite(r["loss"]) for r in records)
    assert checkpointing.verify(out / "final") is None


def test_a_stopped_run_resumes_with_skip_after_a_reward_fault(tiny_llama_chat, tiny_prompts, tmp_path):
    out = tmp_path / "run"
    reward = _faulty(tmp_path, "raises")
    with pytest.raises(RewardError):
        trainer.train(_config(tiny_llama_chat, tiny_prompts, out, rewards=(reward,)))
    trainer.train(_config(tiny_llama_chat, tiny_prompts, out, rewards=(reward,), resume=True, reward_fault="skip"))
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_stuck_reward_calls_do_not_pile_up():
    """A call past its timeout is left running (Python cannot kill a thread); at three alive, scoring refuses to go
    on whatever the policy, and says so in one line."""
    from policygrad.lm.rewards import MAX_ABANDONED_CALLS, RewardFunction, RewardSet

    def stuck(prompts, completions, **fields):
        time.sleep(1.0)
        return [0.0] * len(completions)

    rewards = RewardSet([RewardFunction("stuck", stuck)])
    for _ in range(MAX_ABANDONED_CALLS):
        scores = rewards.score(["p"], ["c"], {}, on_fault="skip", timeout=0.05)
        assert [f.kind for f in scores.faults] == ["timeout"] and math.isnan(scores.rewards[0])
    with pytest.raises(RewardError, match="3 reward calls that timed out are still running"):
        rewards.score(["p"], ["c"], {}, on_fault="skip", timeout=0.05)


def _poison(monkeypatch, kind: str, bad_calls: set[int]) -> None:
    """Make grpo_loss non-finite on the given calls (one call per step here: one micro-batch, one update)."""
    original, calls = update_module.grpo_loss, [0]

    def poisoned(logprobs, *args, **kwargs):
        loss, metrics = original(logprobs, *args, **kwargs)
        calls[0] += 1
        if calls[0] in bad_calls:
            if kind == "nan_grad":  # finite loss, NaN gradient: d sqrt(x)/dx at 0 is inf, times 0
                loss = loss + torch.sqrt(logprobs.sum() * 0.0)
            else:
                loss = loss * (math.nan if kind == "nan_loss" else math.inf)
        return loss, metrics

    monkeypatch.setattr(update_module, "grpo_loss", poisoned)


@pytest.mark.parametrize("kind", NONFINITE_KINDS)
def test_a_non_finite_update_is_skipped_and_logged(kind, tiny_llama_chat, tiny_prompts, tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, kind, {2})
    out = trainer.train(_config(tiny_llama_chat, tiny_prompts, tmp_path / "run", max_steps=3))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_updates"] for r in records] == [0, 1, 0]
    assert capsys.readouterr().err.count("non-finite loss or gradient norm") == 1  # the warning, for step 2 only
    assert all(torch.isfinite(t).all() for t in weights(out / "final").values())


@pytest.mark.parametrize("kind", NONFINITE_KINDS)
def test_non_finite_steps_in_a_row_stop_with_the_state_from_before_the_first(
    kind, tiny_llama_chat, tiny_prompts, tmp_path, monkeypatch
):

    good = BAD_STEPS[0] - 1  # the last good step
    two = trainer.train(_config(tiny_llama_chat, tiny_prompts, tmp_path / "two", max_steps=good))
    _poison(monkeypatch, kind, {*BAD_STEPS, BAD_STEPS[-1] + 1})
    out = tmp_path / "run"
    with pytest.raises(Stopped) as info:
        trainer.train(
            _config(tiny_llama_chat, tiny_prompts, out, max_steps=8, max_bad_steps=len(BAD_STEPS), save_every=1)
        )
    assert info.value.exit_code == EXIT_DIVERGED
    assert f"{len(BAD_STEPS)} steps in a row" in str(info.value) and f"(step {good})" in str(info.value)
    folder = latest_checkpoint(out)
    assert folder.name == f"step-{good:06d}" and load_trainer_state(folder).step == good
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, BAD_STEPS[-1] + 1)
    )  # stopped after the last bad step, not later
    _assert_same_weights(two / "final", folder)  # bit for bit the weights after the last good step


# ------------------------------------------------------------------------------------------------------------------
# 6. Safe loading
# ------------------------------------------------------------------------------------------------------------------


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_tampered_trainer_state_is_refused_without_running_it(tiny_llama_chat, tiny_prompts, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer.train(_config(tiny_llama_chat, tiny_prompts, out, max_steps=1))
    final = out / "final"
    torch.save({"step": 1, "baseline": 0.0, "evil": _Payload()}, final / TRAINER_STATE)
    manifest = json.loads((final / checkpointing.MANIFEST).read_text())  # even with a matching checksum
    entry = manifest["files"][TRAINER_STATE]
    entry["sha256"] = checkpointing.sha256_file(final / TRAINER_STATE)
    entry["bytes"] = (final / TRAINER_STATE).stat().st_size
    (final / checkpointing.MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=r"^--resume: .*trainer_state.pt cannot be read safely"):
        trainer.train(_config(tiny_llama_chat, tiny_prompts, out, max_steps=2, resume=True))
    assert not (tmp_path / "PWNED").exists()


def test_nothing_in_the_package_unpickles_unsafely():
    """Every torch.load passes weights_only=True and nothing calls pickle's loaders."""
    for path in (SRC / "policygrad").rglob("*.py"):
        text = path.read_text()
        assert "pickle.load" not in text and "pickle.Unpickler" not in text, path
        for chunk in text.split("torch.load(")[1:]:
            assert "weights_only=True" in chunk.split(")")[0] + chunk.split("\n")[0], path


def _fault_table_rows() -> list:
    """This file's rows of docs/reliability.md's fault table, from the constants the tests above inject."""
    from policygrad.lm.rewards import MAX_ABANDONED_CALLS

    Row, numbers = fault_table.Row, fault_table.numbers
    faulted = sorted(set(FAULTED_SAMPLES.values()))  # one sample, or the whole batch
    return [
        Row("Stop after N steps, resume to 2N", "train", "1", [2, UPDATES_PER_BATCH, 2], "nothing"),
        Row("Resume with a changed config", "train", "1", numbers(CHANGED_CONFIG), "nothing (refused before writing)"),
        Row(
            "One flipped byte in `final/model.safetensors`",
            "train",
            "1 + 1",
            [f"{DAMAGED_STEP:06d}", TRUNCATED_TO, f"{DAMAGED_STEP - 1:06d}"],
            "the steps after the last good checkpoint, re-done identically",
        ),
        Row("Every checkpoint of the run damaged", "train", "1", [f"{1:06d}", 2], "nothing (refused before writing)"),
        Row(
            "SIGKILL of a process that saves checkpoints in a loop",
            "shared",
            f"{SAVE_KILLS}",
            [SAVE_KILLS, SAVE_KILLS],
            "only the save in flight",
        ),
        Row(
            "SIGKILL of a training run while it writes a checkpoint",
            "train",
            f"{KILLS_DURING_SAVE}",
            [KILLS_DURING_SAVE, KILLS_DURING_SAVE, KILLED_RUN_STEPS],
            "nothing",
        ),
        Row("SIGTERM to `policygrad train`", "train", "1", [128 + signal.SIGTERM], "nothing"),
        Row("SIGINT (Ctrl-C) to `policygrad train`", "train", "1", [128 + signal.SIGINT], "nothing"),
        Row("Reward function raises / hangs", "train", f"{len(REWARD_FAULTS)} (one each)", [f"{1:06d}"], "nothing"),
        Row(
            "The same faults, policy `skip`",
            "train",
            f"{len(REWARD_FAULTS)} (one each)",
            [*faulted, 0],
            "the faulted samples' learning signal only",
        ),
        Row(
            "A reward call stuck past its timeout",
            "train",
            f"{MAX_ABANDONED_CALLS} + 1",
            [MAX_ABANDONED_CALLS, MAX_ABANDONED_CALLS, MAX_ABANDONED_CALLS + 1],
            "the stuck calls' samples only",
        ),
        Row("Reward fault under `error`, then `--resume --reward-fault skip`", "train", "1", [], "nothing"),
        Row(
            "NaN loss / inf loss / finite loss with NaN gradient",
            "train",
            f"{len(NONFINITE_KINDS)} (one each)",
            [1],
            "that one batch",
        ),
        Row(
            "The same faults, on steps",
            "train",
            f"{len(NONFINITE_KINDS)} (one each)",
            [*BAD_STEPS, len(BAD_STEPS), EXIT_DIVERGED, BAD_STEPS[0] - 1],
            "nothing",
        ),
        Row("`trainer_state.pt` replaced by a pickle", "train", "1", [], "nothing"),
    ]


def test_the_fault_table_rows_are_these_tests():
    """docs/reliability.md's rows for this file say, cell by cell, what the tests above inject and assert."""
    fault_table.check("lm/test_reliability_lm.py", _fault_table_rows())


def test_the_fault_table_check_fails_on_any_changed_number():
    """Each number of this file's rows, changed alone in a copy of the page, fails the check above."""
    assert fault_table.check_catches_every_change("lm/test_reliability_lm.py", _fault_table_rows()) >= 30
