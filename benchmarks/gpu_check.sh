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
#    completions of up to 64 tokens: step time, sampling time and tokens per second from its metrics.jsonl;
# 4. policygrad's step against TRL's on grpo_vs_trl.py's work (benchmarks/gpu_step.py), transformers generation;
# 5. vLLM, if it installs (into a separate environment: it pins its own torch): the tests of decoder vllm against
#    the real engine (tests/lm/test_cuda.py, vllm-marked), then step 3 with --decoder vllm, then step 4 with --vllm
#    (both trainers with vLLM colocated).
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

echo "== 4. policygrad against TRL on the GPU (transformers generation)"
python -c "import trl" 2>/dev/null || pip install --quiet -c constraints.txt -e ".[bench]" "$(grep -o 'torch==[0-9.]*' Makefile | head -1)" >/dev/null 2>&1 || pip install --quiet "trl>=1.0" >/dev/null 2>&1
if [ "$DEVICE" = cuda ]; then
  timeout 300 python benchmarks/gpu_step.py --warmup 1 --steps 3
else
  timeout 300 python benchmarks/gpu_step.py --device cpu --warmup 0 --steps 1
fi

if [ "$DEVICE" = cuda ]; then
  echo "== 5. vLLM (a separate environment)"
  VENV="$(mktemp -d)/vllm-env"
  if python -m venv "$VENV" && timeout 240 "$VENV/bin/pip" install --quiet vllm "trl>=1.0" && \
     "$VENV/bin/pip" install --quiet -e ".[lm,lora]" pytest; then
    "$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
    timeout 120 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/lm/test_cuda.py -k vllm
    timeout 180 "$VENV/bin/python" -m policygrad train --model "$MODEL" --prompts pydoc --max-passage-tokens 128 \
      --prompts-per-step "$PROMPTS" --group-size "$GROUP" --max-new-tokens "$TOKENS" --micro-batch-size 16 \
      --max-steps "$STEPS" --device cuda --precision auto --eval-every 0 --eval-size 0 --no-progress \
      --no-save-optimizer --output-dir "$RUN-vllm" --seed 0 --decoder vllm --tis-cap 2
    "$VENV/bin/python" - "$RUN-vllm/metrics.jsonl" <<'PY'
import json, sys
for r in (json.loads(line) for line in open(sys.argv[1]) if '"step_time"' in line):
    print(f"vllm step {r['step']}: {r['step_time']:.2f} s (sampling {r['sample_time']:.2f} s), {r['tokens_per_s']:.1f} tokens/s, logprob gap {r.get('tis/logprob_gap', float('nan')):.4f}, capped {r.get('tis/capped_fraction', float('nan')):.4f}")
PY
    timeout 300 "$VENV/bin/python" benchmarks/gpu_step.py --vllm --warmup 1 --steps 3
  else
    echo "vLLM did not install here: steps 5 skipped"
  fi
fi
