"""The model card (README.md) of an exported policy, written from plain facts.

Pure: :func:`model_card` turns a dict of facts that :mod:`policygrad.serve.export` gathered (where the weights came
from, the run's recipe and held-out results, the export settings and how close the export stays to its source) into
Markdown with Hugging Face's metadata header, so that the hub, ``transformers`` and a person read the same folder.
:func:`heldout_results` picks the held-out numbers out of a run's ``metrics.jsonl`` records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["RECIPE_FIELDS", "heldout_results", "model_card"]

RECIPE_FIELDS = (
    "model",
    "task",
    "prompts",
    "target_length",
    "rewards",
    "advantage",
    "prompts_per_step",
    "group_size",
    "max_new_tokens",
    "temperature",
    "lr",
    "max_steps",
    "seed",
)
"""The fields of a run's config.yaml that the card lists (the whole file is shipped beside it)."""


def heldout_results(records: Sequence[Mapping[str, Any]], up_to_step: int | None = None) -> dict[str, Any] | None:
    """The first and the last held-out evaluation in a run's metrics records (greedy decoding, where logged), taking
    only steps ``<= up_to_step`` (the checkpoint's step) when given; None when the run never evaluated.

    Returns ``{"decoding", "first": {"step", <rates>}, "last": {"step", <rates>}}``, the rates being the
    ``eval/<decoding>/<rate>`` values without their prefix (``pass_rate``, ``length_rate``, ...).

    >>> records = [{"step": 0, "eval/greedy/pass_rate": 0.0}, {"step": 5, "loss": 1.0},
    ...            {"step": 10, "eval/greedy/pass_rate": 0.25}]
    >>> heldout_results(records)["last"]
    {'step': 10, 'pass_rate': 0.25}
    >>> heldout_results(records, up_to_step=5)["last"]["step"]
    0
    """
    for decoding in ("greedy", "sampled"):
        prefix = f"eval/{decoding}/"
        evaluated = [
            r
            for r in records
            if f"{prefix}pass_rate" in r and (up_to_step is None or int(r.get("step", 0)) <= up_to_step)
        ]
        if not evaluated:
            continue

        def rates(record: Mapping[str, Any], prefix: str = prefix) -> dict[str, Any]:
            values = {k[len(prefix) :]: v for k, v in record.items() if k.startswith(prefix) and k.count("/") == 2}
            return {"step": int(record.get("step", 0)), **values}

        return {"decoding": decoding, "first": rates(evaluated[0]), "last": rates(evaluated[-1])}
    return None


def _rate(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) else "n/a"


def model_card(facts: Mapping[str, Any]) -> str:
    """The README.md of an exported folder.

    ``facts`` (each optional unless said): ``name`` (required), ``base_model`` (a Hugging Face id, for the metadata
    header), ``base_model_note`` (a sentence about it), ``source`` (the folder exported, required), ``run`` (the run
    folder), ``step`` (the checkpoint's training step), ``recipe`` (the run's config as a dict), ``heldout``
    (:func:`heldout_results`), ``eval_prompts`` (how many held-out prompts an evaluation used), ``export``
    (``{"quantize", "method", "dtype", "bytes"}``), ``fidelity`` (``{"positions", "top1_agreement", "mean_kl"}``),
    ``versions`` (package -> version).

    >>> print(model_card({"name": "m", "source": "runs/x/final"}).splitlines()[0])
    ---
    """
    export = facts.get("export", {})
    tags = ["policygrad", "grpo", "reinforcement-learning"]
    if export.get("quantize") == "int8":
        tags += ["8-bit", export.get("method", "int8")]
    header = ["---", "library_name: transformers", "pipeline_tag: text-generation"]
    if facts.get("base_model"):
        header.append(f"base_model: {facts['base_model']}")
    header += ["tags:", *[f"- {tag}" for tag in tags], "---", ""]

    lines = [f"# {facts['name']}", ""]
    lines += [
        "A policy trained with policygrad (policy-gradient reinforcement learning for language models) and "
        "exported with `policygrad export`.",
        "",
        "## Where it comes from",
        "",
        f"- exported from: `{facts['source']}`" + (f" (training step {facts['step']})" if "step" in facts else ""),
    ]
    if facts.get("run"):
        lines.append(f"- training run: `{facts['run']}` (its config is shipped here as `policygrad_config.yaml`)")
    if facts.get("base_model"):
        lines.append(
            f"- base model: `{facts['base_model']}`"
            + (f"; {facts['base_model_note']}" if facts.get("base_model_note") else "")
        )
    recipe = facts.get("recipe") or {}
    if recipe:
        lines += ["", "## Recipe", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {key} | `{recipe[key]}` |" for key in RECIPE_FIELDS if key in recipe]

    lines += ["", "## Held-out results", ""]
    heldout = facts.get("heldout")
    if heldout:
        first, last = heldout["first"], heldout["last"]
        count = f" on {facts['eval_prompts']} held-out prompts" if facts.get("eval_prompts") else ""
        lines += [
            f"Measured by the training run ({heldout['decoding']} decoding{count}) on the weights before export:",
            "",
            "| step | pass rate | length rule | digit rule |",
            "| --- | --- | --- | --- |",
        ]
        rows = [first] if first["step"] == last["step"] else [first, last]
        for row in rows:
            lines.append(
                f"| {row['step']} | {_rate(row.get('pass_rate'))} | {_rate(row.get('length_rate'))} "
                f"| {_rate(row.get('digits_rate'))} |"
            )
    else:
        lines.append("The source has no held-out evaluation (not a run, or a run that never evaluated).")

    lines += ["", "## Export", ""]
    quantize = export.get("quantize", "none")
    if quantize == "int8":
        what = f"8-bit weights ({export.get('method')}); embeddings, norms and the output head stay in {export.get('dtype')}"
    elif quantize == "bf16":
        what = "bfloat16 weights"
    else:
        what = f"full precision ({export.get('dtype', 'float32')})"
    lines.append(
        f"- weights: {what}, `model.safetensors`" + (f", {export['bytes'] / 1e6:.0f} MB" if "bytes" in export else "")
    )
    fidelity = facts.get("fidelity")
    if fidelity:
        lines.append(
            f"- against the source, over {fidelity['positions']} next-token predictions of a probe prompt: the most "
            f"likely token agrees at {_rate(fidelity['top1_agreement'])} of positions, mean KL(source || export) "
            f"{fidelity['mean_kl']:.2e} nats"
        )
    versions = facts.get("versions") or {}
    if versions:
        lines.append("- exported with " + ", ".join(f"{name} {version}" for name, version in versions.items()))

    lines += [
        "",
        "## Use",
        "",
        "```bash",
        "policygrad serve THIS_FOLDER            # OpenAI-compatible server on 127.0.0.1:8000 (docs/serving.md)",
        "vllm serve THIS_FOLDER                  # on a GPU",
        "```",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")',
        'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")  # with its chat template',
        "```",
    ]
    if quantize == "int8" and export.get("method") == "bitsandbytes":
        lines += ["", "Loading the 8-bit weights needs `bitsandbytes` (CPU or GPU)."]
    if quantize == "int8" and export.get("method") == "torchao":
        lines += ["", "Loading the 8-bit weights needs `torchao`."]
    return "\n".join(header + lines) + "\n"
