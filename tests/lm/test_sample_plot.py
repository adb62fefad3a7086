"""`policygrad sample`, `policygrad plot` and `policygrad eval --help`, on tiny local models and synthetic logs.

Most tests call :func:`policygrad.cli.main` in this process (the same parsing, error folding and exit codes as the
installed command, without paying the torch import again); one runs the installed command end to end.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from lm_helpers import write_tiny_prompts  # noqa: E402  (tests/lm, on sys.path under pytest)

from policygrad.cli import _parse, main  # noqa: E402
from policygrad.errors import UsageError  # noqa: E402
from policygrad.lm import tasks  # noqa: E402
from policygrad.lm.config import EvalConfig  # noqa: E402

POLICYGRAD = str(Path(sys.executable).with_name("policygrad"))
QUICK = ["--max-new-tokens", "6", "--device", "cpu", "--threads", "1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.smoke  # the CLI's sample, plot and eval commands


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """`--threads 1` sets torch's thread count for the whole process; give the next test back what it had."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, names: str) -> bool:
    lines = err.strip().splitlines()
    return code == 2 and len(lines) == 1 and names in lines[0] and "Traceback" not in err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_llama_chat) -> Path:
    """A 3-step training run of the tiny Llama: evaluated every step, a checkpoint at step 2, then final/."""
    folder = tmp_path_factory.mktemp("tiny-run")
    prompts = write_tiny_prompts(folder / "prompts.jsonl")
    threads = torch.get_num_threads()
    code = main(
        [
            "train",
            "--model",
            str(tiny_llama_chat),
            "--prompts",
            str(prompts),
            "--output-dir",
            str(folder / "run"),
            "--heldout-prompts",
            "2",
            "--prompts-per-step",
            "2",
            "--group-size",
            "2",
            "--max-new-tokens",
            "6",
            "--max-steps",
            "3",
            "--eval-every",
            "1",
            "--eval-size",
            "2",
            "--save-every",
            "2",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--no-progress",
            "--eval-decoding",
            "greedy",
            "sampled",
        ]
    )
    torch.set_num_threads(threads)
    assert code == 0
    return folder / "run"


# --------------------------------------------------------------------------------------------------------------
# sample
# --------------------------------------------------------------------------------------------------------------


def test_sample_json_through_the_installed_command(tiny_llama_chat):
    result = subprocess.run(
        [
            POLICYGRAD,
            "sample",
            "--model",
            str(tiny_llama_chat),
            "--prompt",
            "Say hi.",
            "--prompt",
            "Count to 3.",
            "--num-samples",
            "3",
            "--json",
            *QUICK,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert [p["prompt"] for p in document["prompts"]] == ["Say hi.", "Count to 3."]
    assert [len(p["completions"]) for p in document["prompts"]] == [3, 3]
    assert all(
        isinstance(c["completion"], str) and isinstance(c["truncated"], bool)
        for p in document["prompts"]
        for c in p["completions"]
    )
    assert document["pass_counts"] is None  # free-form prompts: no task verdict


def test_sample_is_repeatable_by_seed_and_greedy_gives_one_per_prompt(capsys, tiny_llama_chat):
    args = ["sample", "--model", str(tiny_llama_chat), "--prompt", "abc", "--num-samples", "4", "--json", *QUICK]
    first, second = (json.loads(cli(capsys, *args)[1]) for _ in range(2))
    assert first == second
    other = json.loads(cli(capsys, *args, "--seed", "1")[1])
    assert other["prompts"][0]["completions"] != first["prompts"][0]["completions"]
    greedy = json.loads(cli(capsys, *args, "--greedy")[1])
    assert greedy["num_samples"] == 1 and len(greedy["prompts"][0]["completions"]) == 1


def test_sample_task_prompts_carry_the_checkers_verdict(capsys, tiny_llama_chat, tiny_prompts):
    base = ["sample", "--model", str(tiny_llama_chat), "--prompts", str(tiny_prompts), "--num-prompts", "2", *QUICK]
    code, out, _ = cli(capsys, *base, "--num-samples", "2", "--json")
    assert code == 0
    document = json.loads(out)
    assert len(document["prompts"]) == 2 and document["pass_counts"]["checked"] == 4
    for prompt in document["prompts"]:
        for item in prompt["completions"]:
            found = tasks.check(item["completion"], prompt["target_length"], prompt["target_digit_sum"])
            assert (item["length"], item["digit_sum"], item["passed"]) == (found.length, found.digit_sum, found.passed)

    code, out, _ = cli(capsys, *base, "--num-samples", "2")  # the tables
    assert code == 0
    assert "prompt 1/2" in out and "digit sum" in out and "passed " in out and "/4" in out


def test_sample_a_run_uses_its_final_model_and_held_out_prompts(capsys, tiny_run):
    trained = [json.loads(line) for line in (tiny_run / "completions.jsonl").read_text().splitlines()]
    for model, expected in [(tiny_run, tiny_run / "final"), (tiny_run / "checkpoints" / "step-000002", None)]:
        code, out, err = cli(capsys, "sample", "--model", str(model), "--json", *QUICK)
        assert code == 0, err
        document = json.loads(out)
        assert document["model"] == str(expected or model)
        assert len(document["prompts"]) == 2  # the run held out 2 prompts
        assert all(p["target_length"] == 8 for p in document["prompts"])
        assert not {p["prompt"] for p in document["prompts"]} & {t["prompt"] for t in trained}  # never trained on


@pytest.mark.parametrize(
    "args, names",
    [
        (["--prompt", "a", "--prompts", "p.jsonl"], "--prompt"),
        (["--num-samples", "0"], "--num-samples"),
        (["--top-p", "0"], "--top-p"),
        (["--model", "/no/such/model", "--prompt", "a"], "/no/such/model"),
        (["--prompts", "/no/such/prompts.jsonl"], "prompts.jsonl"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_bad_sample_input_is_one_line(capsys, args, names, tiny_llama_chat):
    code, _, err = cli(capsys, "sample", "--model", str(tiny_llama_chat), *QUICK, *args)
    assert one_line_error(code, err, names), err


def test_sample_a_run_that_saved_nothing_is_one_line(capsys, tmp_path):
    (tmp_path / "config.yaml").write_text("model: default\n")
    (tmp_path / "metrics.jsonl").write_text("")
    code, _, err = cli(capsys, "sample", "--model", str(tmp_path), *QUICK)
    assert one_line_error(code, err, "saved no model"), err


# --------------------------------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------------------------------


def is_png(path: Path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG_MAGIC)


def panels(figure) -> dict:
    """title -> (x label, y label, [(label, xs, ys) of each drawn line]) of every panel of ``figure``."""
    return {
        ax.get_title(): (
            ax.get_xlabel(),
            ax.get_ylabel(),
            [(line.get_label(), list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines],
        )
        for ax in figure.axes
    }


def logged(path: Path, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` in a metrics.jsonl read line by line here: the last value logged for each step
    wins (the final evaluation is a second line for the last step); a line cut short at the end is skipped."""
    values = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if key in record:
            values[record["step"]] = record[key]
    return sorted(values), [values[step] for step in sorted(values)]


def synthetic_metrics(folder: Path, steps: int = 60) -> Path:
    """A metrics.jsonl as the trainer writes it: the evaluation before training as step 0, training keys every step,
    eval/ keys every 20 steps and a second line for the last step with the final evaluation, and a last line cut off
    mid-write."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": 0, "eval/greedy/pass_rate": 0.05, "eval/sampled/pass_rate": 0.02})]
    for step in range(1, steps + 1):
        record = {
            "step": step,
            "reward_mean": step / steps,
            "reward_std": 0.1,
            "entropy": 2 - step / steps,
            "entropy_weight": 0.0,
            "grad_norm": 1.0,
            "completion_chars": 50.0,
            "pass_rate": step / (2 * steps),
            "tokens_per_s": 900.0,
            "step_time": 2.0,
        }
        if step % 20 == 0:
            record.update({"eval/greedy/pass_rate": step / steps / 2, "eval/sampled/pass_rate": step / steps / 3})
        lines.append(json.dumps(record))
    lines.append(json.dumps({"step": steps, "eval/greedy/pass_rate": 0.6, "eval/sampled/pass_rate": 0.4}))
    path = folder / "metrics.jsonl"
    path.write_text("\n".join(lines) + '\n{"step": 61, "rew')
    return path


def test_plot_draws_the_logged_metrics_of_a_synthetic_log(capsys, tmp_path, figures):
    from policygrad.lm.plot import plot_run, read_metrics, wall_times

    log = synthetic_metrics(tmp_path / "run")
    code, out, err = cli(capsys, "plot", str(tmp_path / "run"))
    assert code == 0, err
    assert is_png(tmp_path / "run" / "curves.png") and "curves.png" in out and "(8 panels from 60 steps)" in out

    # what was drawn is what was logged: each panel's lines against the log, read here line by line
    (figure,) = figures
    assert figure.get_suptitle() == f"{tmp_path / 'run'}  (60 steps)"
    drawn = panels(figure)
    assert list(drawn) == [
        "reward",
        "held-out pass rate vs step",
        "held-out pass rate vs wall time",
        "training pass rate",
        "entropy",
        "gradient norm",
        "completion length",
        "throughput",
    ]
    steps, rewards = logged(log, "reward_mean")
    assert steps == list(range(1, 61))
    (_, xs, ys), (mean_label, mean_xs, means) = drawn["reward"][2]  # 60 points: raw, then a 2-step mean
    assert (xs, ys, mean_xs) == (steps, rewards, steps) and mean_label == "reward_mean (2-step mean)"
    assert means == pytest.approx([rewards[0]] + [(a + b) / 2 for a, b in zip(rewards, rewards[1:])])
    assert drawn["reward"][:2] == ("step", "mean reward (band: ± std)")
    for title, key in [("entropy", "entropy"), ("gradient norm", "grad_norm"), ("throughput", "tokens_per_s")]:
        assert drawn[title][2][0][1:] == logged(log, key)
    assert drawn["training pass rate"][2][0][1:] == logged(log, "pass_rate")
    assert drawn["training pass rate"][2][1][0] == "pass_rate (2-step mean)"  # the only training rate logged
    for against, x in [("step", lambda s: s), ("wall time", lambda s: 2.0 * s)]:  # step_time 2.0 s per step
        xlabel, ylabel, lines = drawn[f"held-out pass rate vs {against}"]
        assert xlabel == ("step" if against == "step" else "training wall time (s)") and ylabel == "pass rate"
        assert [label for label, _, _ in lines] == ["greedy", "sampled"]
        for (_, xs, ys), decoding in zip(lines, ["greedy", "sampled"]):
            steps, values = logged(log, f"eval/{decoding}/pass_rate")
            assert steps == [0, 20, 40, 60] and (xs, ys) == ([x(s) for s in steps], values)

    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(0, 61))  # the final eval merged into step 60, the cut line gone
    assert records[-1]["eval/greedy/pass_rate"] == 0.6 and records[-1]["reward_mean"] == 1.0
    assert records[0] == {"step": 0, "eval/greedy/pass_rate": 0.05, "eval/sampled/pass_rate": 0.02}
    assert wall_times(records)[0] == 0.0 and wall_times(records)[60] == 120.0  # step 0: before any training time
    titles = plot_run(records, tmp_path / "again.png", "t")
    assert "held-out pass rate vs wall time" in titles and "entropy weight" not in titles  # constant: left out

    code, _, err = cli(capsys, "plot", str(tmp_path / "run" / "metrics.jsonl"), "--out", str(tmp_path / "c.png"))
    assert code == 0 and is_png(tmp_path / "c.png"), err


def test_plot_a_real_tiny_run(capsys, tiny_run, tmp_path, figures):
    """The run evaluated every step, so its log opens with the untrained model's evaluation as step 0."""
    from policygrad.lm.plot import heldout_series, read_metrics

    lines = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 0 and "reward_mean" not in lines[0]
    assert {"eval/greedy/pass_rate", "eval/sampled/pass_rate"} <= set(lines[0])
    records = read_metrics(tiny_run / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert heldout_series(records)[1] == {"greedy": "eval/greedy/pass_rate", "sampled": "eval/sampled/pass_rate"}
    out = tmp_path / "tiny.png"
    code, stdout, err = cli(capsys, "plot", str(tiny_run), "--out", str(out))
    assert code == 0, err
    assert is_png(out) and "from 3 steps" in stdout
    (figure,) = figures
    drawn = panels(figure)
    assert figure.get_suptitle().startswith(f"{tiny_run}  (3 steps)\nmodel ")
    assert drawn["reward"][2][0][1:] == logged(tiny_run / "metrics.jsonl", "reward_mean")  # one raw line, steps 1-3
    _, _, lines = drawn["held-out pass rate vs step"]
    for (label, xs, ys), decoding in zip(lines, ["greedy", "sampled"]):
        assert label == decoding and (xs, ys) == logged(tiny_run / "metrics.jsonl", f"eval/{decoding}/pass_rate")
        assert xs == [0, 1, 2, 3]  # evaluated before training and after each step


def _empty(folder: Path) -> None:
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("")


def _malformed(folder: Path) -> None:
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')


def _foreign(folder: Path) -> None:
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"step": 1, "episode_return": 10}\n')


@pytest.mark.parametrize(
    "make, extra, names",
    [
        (None, [], "no such folder"),
        (lambda f: f.mkdir(), [], "has no metrics.jsonl"),
        (_empty, [], "holds no steps"),
        (_malformed, [], "metrics.jsonl:2"),
        (_foreign, [], "none of the training metrics"),
        (lambda f: synthetic_metrics(f), ["--out", "curves.gif"], "--out"),
        (lambda f: synthetic_metrics(f), ["--out", "/no/such/folder/c.png"], "/no/such/folder"),
    ],
)
def test_bad_plot_input_is_one_line(capsys, tmp_path, make, extra, names):
    folder = tmp_path / "run"
    if make is not None:
        make(folder)
    code, _, err = cli(capsys, "plot", str(folder), *extra)
    assert one_line_error(code, err, names), err
    assert not (folder / "curves.png").exists()


def test_plot_without_a_folder_is_one_line(capsys):
    code, _, err = cli(capsys, "plot")
    assert one_line_error(code, err, "RUN_DIR"), err


# --------------------------------------------------------------------------------------------------------------
# eval --help
# --------------------------------------------------------------------------------------------------------------


def test_eval_help_describes_evaluation_and_recipes_still_apply(capsys, tmp_path):
    """`eval --help` lists what an evaluation reads, not training's ~60 flags; both commands name --recipe (issue
    16: `train --help` never mentioned it)."""
    for command, expected, other in [("eval", "Evaluate", "Train a lang"), ("train", "Train a lang", "Evaluate")]:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert expected in out and other not in out
        assert "--recipe FILE.yaml" in out
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    flags = set(re.findall(r"^[│| ]+(--[a-z][a-z-]*)", out, flags=re.M))
    assert {"--model", "--eval-size", "--max-new-tokens", "--threads", "--json"} <= flags
    assert not flags & {"--lr", "--group-size", "--output-dir", "--resume", "--kl-coef", "--save-every"}, flags
    assert len(flags) <= 25

    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_new_tokens: 12\neval_size: 5\nlr: 1.0e-4\n")  # a training recipe: lr is left out
    config = _parse(["eval", "--recipe", str(recipe), "--eval-size", "3"])
    assert isinstance(config, EvalConfig)
    assert (config.max_new_tokens, config.eval_size) == (12, 3)
    recipe.write_text("lr: -1\n")  # ...but checked like train's
    with pytest.raises(UsageError, match="--lr"):
        _parse(["eval", "--recipe", str(recipe)])
