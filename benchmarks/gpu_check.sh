#!/usr/bin/env bash
# Issue 15's prepared GPU check, for a machine the device tool lends (one call; its steps are sized for minutes on
# one GPU, each under a timeout, but it has not run on a GPU yet):
#
#   bash benchmarks/gpu_check.sh 2>&1 | tee "$OUT/gpu_check.txt"        # $OUT: where the results come back
#
# 1. the suite's GPU tests (tests/lm/test_cuda.py: a tiny run on CUDA, LoRA + gradient checkpointing there, torchrun's
#    NCCL path with one process, with and without --fsdp), which skip on a machine without a GPU;
# 2. the peak memory of one whole GRPO update of the reference recipe's shape (Qwen2.5-0.5B architecture, random
#    weights; 128 rows in 8 micro-batches) for full fine-tuning, LoRA and gradient checkpointing (benchmarks/memory.py);
# 3. three steps of `policygrad train` on that model with transformers generation on the GPU, 16 prompts x 8
#    completions of up to 64 tokens: step time, sampling time and tokens per second from its metrics.jsonl.
# Not in it yet: TRL's step on the same work, and vLLM generation (policygrad has no vLLM sampling engine yet).
# SHAPE=tiny runs the same steps at a tiny shape on the CPU, to check the script itself (no GPU needed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
DEVICE=cuda; PROMPTS=16; GROUP=8; TOKENS=64; STEPS=3; MICRO=8; PROMPT_TOKENS=160
if [ "${SHAPE:-}" = tiny ]; then DEVICE=cpu; PROMPTS=2; GROUP=2; TOKENS=4; STEPS=1; MICRO=1; PROMPT_TOKENS=8; fi

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

if [ "$DEVICE" = cuda ]; then
  echo "== 1. GPU tests"
  timeout 240 python -m pytest -q -p no:cacheprovider tests/lm/test_cuda.py
fi

echo "== 2. peak memory of one update"
timeout 240 python benchmarks/memory.py --device "$DEVICE" --micro-batches "$MICRO" --prompt-tokens "$PROMPT_TOKENS" --out "$OUT/memory-$DEVICE.json"

echo "== 3. GRPO steps of the Qwen2.5-0.5B-shape model"
MODEL="$(mktemp -d)/qwen2.5-0.5b-shape"
python - "$MODEL" <<'PY'
import sys
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
sys.path.insert(0, "benchmarks")
from memory import QWEN25_05B
from policygrad.lm.models import load_model
_, tokenizer = load_model("default")  # the embedded model's tokenizer: its ids fit Qwen's larger vocabulary
torch.manual_seed(0)
Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).save_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[1])
PY
RUN="$(mktemp -d)/run"
timeout 300 python -m policygrad train --model "$MODEL" --prompts pydoc --max-passage-tokens 128 \
  --prompts-per-step "$PROMPTS" --group-size "$GROUP" --max-new-tokens "$TOKENS" --micro-batch-size 16 \
  --max-steps "$STEPS" --device "$DEVICE" --precision auto --eval-every 0 --eval-size 0 --no-progress \
  --no-save-optimizer --output-dir "$RUN" --seed 0
python - "$RUN/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if '"step_time"' in line]
for r in rows:
    print(f"step {r['step']}: {r['step_time']:.2f} s (sampling {r['sample_time']:.2f} s), {r['tokens_per_s']:.1f} tokens/s, {r['completion_tokens']:.1f} tokens per completion")
PY
cp "$RUN/metrics.jsonl" "$OUT/gpu-steps-metrics.jsonl" 2>/dev/null || true
