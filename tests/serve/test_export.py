"""policygrad export: the fidelity math, the model card, resolving a run, the exported folder, and the one-line errors
that never lose work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from serve_helpers import make_run

from policygrad import checkpointing
from policygrad.serve.card import heldout_results, model_card
from policygrad.serve.export import EXPORT_FILE, ExportConfig, export, next_token_fidelity, resolve_source

# ---- the math and the card ------------------------------------------------------------------------------------------


@pytest.mark.exact
def test_fidelity_against_a_hand_computed_kl():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3); argmax p = 0 (tie), argmax q = 1
    ref = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    out = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1]]))
    found = next_token_fidelity(ref, out)
    assert found["positions"] == 2
    assert found["top1_agreement"] == pytest.approx(0.5)
    assert found["mean_kl"] == pytest.approx(0.5 * 0.5 * math.log(4 / 3), rel=1e-5)


@pytest.mark.property
def test_fidelity_is_perfect_for_identical_logits_and_shift_invariant():
    logits = torch.randn(7, 11, generator=torch.Generator().manual_seed(0))
    found = next_token_fidelity(logits, logits + 3.0)  # softmax ignores a constant shift
    assert found["top1_agreement"] == 1.0
    assert found["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        next_token_fidelity(logits, logits[:3])


@pytest.mark.exact
def test_heldout_results_take_the_evaluations_up_to_the_checkpoint():
    from serve_helpers import METRICS

    whole = heldout_results(METRICS)
    assert whole["decoding"] == "greedy"
    assert whole["first"] == {"step": 0, "pass_rate": 0.0, "length_rate": 0.25, "digits_rate": 0.0}
    assert whole["last"]["step"] == 2 and whole["last"]["pass_rate"] == 0.5
    assert heldout_results(METRICS, up_to_step=1)["last"]["step"] == 0
    assert heldout_results([{"step": 1, "loss": 1.0}]) is None


@pytest.mark.exact
def test_model_card_states_base_model_recipe_results_and_export():
    card = model_card(
        {
            "name": "policy-int8",
            "source": "runs/x/final",
            "step": 2,
            "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "recipe": {"task": "length_digits", "lr": 5e-5},
            "heldout": heldout_results(
                [{"step": 0, "eval/greedy/pass_rate": 0.0}, {"step": 2, "eval/greedy/pass_rate": 0.5}]
            ),
            "eval_prompts": 4,
            "export": {"quantize": "int8", "method": "bitsandbytes", "dtype": "float32", "bytes": 2_000_000},
            "fidelity": {"positions": 10, "top1_agreement": 0.9, "mean_kl": 0.01},
        }
    )
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "| 2 | 50.0% |" in card and "on 4 held-out prompts" in card
    assert "8-bit weights (bitsandbytes)" in card and "2 MB" in card and "90.0%" in card
    assert "| lr | `5e-05` |" in card


# ---- what a path resolves to ----------------------------------------------------------------------------------------


@pytest.mark.exact
def test_a_run_resolves_to_its_final_weights_else_its_latest_checkpoint(tiny_run, tiny_model, tmp_path):
    found = resolve_source(str(tiny_run))
    assert found.folder == tiny_run / "final" and found.run == tiny_run and found.step == 2
    assert resolve_source(str(tiny_run / "final")).run == tiny_run
    unfinished = make_run(tmp_path / "unfinished", tiny_model, final=False)
    found = resolve_source(str(unfinished))
    assert found.folder.name == "step-000001" and found.step == 1
    plain = resolve_source(str(tiny_model))
    assert plain.run is None and plain.step is None


@pytest.mark.exact
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "missing", "no such folder"),
        (lambda tmp: _file(tmp / "weights.bin"), "is a file"),
        (lambda tmp: _folder(tmp / "empty"), "neither a run folder"),
    ],
)
def test_a_wrong_source_is_one_line(tmp_path, make, message):
    with pytest.raises(Exception, match=message) as caught:
        resolve_source(str(make(tmp_path)))
    assert "\n" not in str(caught.value)


def _file(path: Path) -> Path:
    path.write_text("x")
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.exact
def test_a_damaged_checkpoint_is_refused(tiny_run, tmp_path):
    import shutil

    copy = tmp_path / "final"
    shutil.copytree(tiny_run / "final", copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(Exception, match="damaged: model.safetensors is truncated"):
        resolve_source(str(copy))


# ---- the exported folder --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_export(tiny_run, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("exports") / "policy-int8"
    facts = export(ExportConfig(source=str(tiny_run), output=out, quantize="int8", threads=1))
    return out, facts


@pytest.mark.smoke
def test_int8_export_loads_as_is_with_tokenizer_template_and_card(int8_export):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, facts = int8_export
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", EXPORT_FILE, "manifest.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    assert config["quantization_config"]["load_in_8bit"] is True
    assert checkpointing.verify(out) is None  # every file as hashed when written
    model = AutoModelForCausalLM.from_pretrained(out)  # no arguments: the folder says how to load it
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.int8
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<|user|>hi"
    card = (out / "README.md").read_text()
    assert "| 2 | 50.0% | 75.0% | 50.0% |" in card  # the run's last held-out evaluation
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert (out / "policygrad_config.yaml").is_file()
    fidelity = facts["fidelity"]
    assert fidelity["positions"] > 50 and 0.5 <= fidelity["top1_agreement"] <= 1.0 and fidelity["mean_kl"] < 0.5


@pytest.mark.smoke
@pytest.mark.parametrize(("quantize", "dtype"), [("none", "F32"), ("bf16", "BF16")])
def test_full_and_bf16_exports_keep_their_dtype_and_agree(tiny_model, tmp_path, quantize, dtype):
    from safetensors import safe_open

    out = tmp_path / quantize
    facts = export(ExportConfig(source=str(tiny_model), output=out, quantize=quantize, threads=1))
    with safe_open(str(out / "model.safetensors"), framework="pt") as weights:
        name = next(iter(weights.keys()))
        assert weights.get_slice(name).get_dtype() == dtype
    assert facts["fidelity"]["top1_agreement"] >= (1.0 if quantize == "none" else 0.9)
    assert "held-out evaluation" in (out / "README.md").read_text()  # a plain folder has none to report


# ---- one-line errors that never lose work ---------------------------------------------------------------------------


def _cli_error(run, capsys, *argv: str) -> str:
    assert run("export", list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.exact
def test_cli_wrong_path_is_one_line(policygrad_cli, capsys, tmp_path):
    err = _cli_error(policygrad_cli, capsys, str(tmp_path / "nope"), "--output", str(tmp_path / "out"))
    assert err.startswith("policygrad export: error: CHECKPOINT_OR_RUN: no such folder")


@pytest.mark.exact
def test_cli_bad_quantize_and_missing_output_are_one_line(policygrad_cli, capsys, tiny_model):
    assert "--quantize" in _cli_error(policygrad_cli, capsys, str(tiny_model), "--output", "x", "--quantize", "int4")
    assert "--output" in _cli_error(policygrad_cli, capsys, str(tiny_model))


@pytest.mark.exact
def test_an_existing_folder_is_kept_without_overwrite(policygrad_cli, capsys, tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = _cli_error(policygrad_cli, capsys, str(tiny_model), "--output", str(out))
    assert "exists and is not empty; pass --overwrite" in err
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.exact
def test_a_run_or_the_source_is_never_overwritten(policygrad_cli, capsys, tiny_run, tiny_model, tmp_path):
    err = _cli_error(policygrad_cli, capsys, str(tiny_model), "--output", str(tiny_run / "final"), "--overwrite")
    assert "is a training run or checkpoint; it is never replaced" in err
    err = _cli_error(policygrad_cli, capsys, str(tiny_run), "--output", str(tiny_run / "export"))
    assert "inside the training run" in err
    err = _cli_error(policygrad_cli, capsys, str(tiny_model), "--output", str(tiny_model))
    assert "is the source folder" in err
    assert checkpointing.verify(tiny_run / "final") is None


@pytest.mark.exact
def test_the_current_folder_or_one_above_is_never_the_output(policygrad_cli, capsys, tiny_model, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # empty: `--output .` would pass the "not empty" check and then fail to be renamed
    for output in (".", "..", "/"):
        err = _cli_error(policygrad_cli, capsys, str(tiny_model), "--output", output, "--overwrite")
        assert "is the current folder, one above it or the root" in err, err
    assert list(work.iterdir()) == []


@pytest.mark.smoke
def test_overwrite_replaces_a_previous_export(policygrad_cli, capsys, tiny_model, tmp_path):
    out = tmp_path / "out"
    assert policygrad_cli("export", [str(tiny_model), "--output", str(out), "--no-verify", "--threads", "1"]) == 0
    assert "serve it with: policygrad serve" in capsys.readouterr().out
    assert policygrad_cli("export", [str(tiny_model), "--output", str(out), "--quantize", "bf16", "--overwrite"]) == 0
    assert json.loads((out / EXPORT_FILE).read_text())["export"]["quantize"] == "bf16"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
