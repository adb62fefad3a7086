"""`policygrad sweep` and `compare` on tiny language-model runs (issue 19): the arms' held-out numbers in the table
are the runs' own final evaluations."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from policygrad.cli import main  # noqa: E402
from policygrad.compare import mean_interval  # noqa: E402


@pytest.mark.smoke
def test_an_lm_sweep_and_its_comparison(tiny_llama_chat, tiny_prompts, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {tiny_llama_chat}\nprompts: {tiny_prompts}\nheldout_prompts: 2\nprompts_per_step: 2\ngroup_size: 3\n"
        "max_new_tokens: 8\nmax_steps: 2\nmicro_batch_size: 4\neval_every: 1\neval_size: 2\nrewards: [shaped]\n"
        "device: cpu\nprecision: float32\nthreads: 1\n"
    )
    out = tmp_path / "sweep"
    argv = ["sweep", str(recipe), "--set", "lr=0.01,0.02", "--seeds", "0", "1", "--parallel", "2"]
    assert main([*argv, "--output-dir", str(out)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["compare", str(out), "--threshold", "0", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["kind"] == "train" and sorted(table["arms"]) == ["lr=0.01", "lr=0.02"]
    for arm, row in table["arms"].items():
        finals = [json.loads((out / arm / f"seed-{s}" / "eval.json").read_text()) for s in (0, 1)]
        mean, half = mean_interval([f["greedy"]["pass_rate"] for f in finals])
        assert row["n"] == 2 and row["final"] == [pytest.approx(mean), pytest.approx(half)]
        assert row["reached"] == 2 and row["steps_to_threshold"] == 0  # pass rate >= 0 at the step-0 evaluation
    assert main(["compare", str(out), "--out", str(tmp_path / "c.svg")]) == 0
    assert (tmp_path / "c.svg").is_file()
