#!/usr/bin/env bash
# The CUDA checks, prepared to run once on a machine with an NVIDIA GPU (under 8 minutes in all):
#   1. the CUDA-marked tests (fp16 + loss scaler, bf16, auto, bitsandbytes int8 + LoRA, NCCL with 2+ GPUs)
#   2. the real-task benchmark (MiniLM bert2bert on codespell, ours vs HF Seq2SeqTrainer + PEFT), bf16, one round
#   3. the bart-base-sized method matrix, bf16 and fp16
# Every table goes to one folder (default benchmarks/results/gpu). Without a GPU it says so and exits 0.
#   bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu}
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device here; skipped (run it on a machine with an NVIDIA GPU)"
    exit 0
fi
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
status=0
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0), 'bf16:', torch.cuda.is_bf16_supported())" \
    | tee "$OUT/device.txt"
echo "== 1. CUDA tests"
timeout 150 python -m pytest -q -m cuda tests/test_cuda.py 2>&1 | tee "$OUT/tests.txt" || status=1
echo "== 2. real task, bf16"
timeout 200 python benchmarks/bench_real.py --precision bf16 --rounds 1 --out "$OUT/real_bf16" 2>&1 \
    | tail -12 || status=1
echo "== 3. bart-base-sized matrix"
timeout 240 python benchmarks/bench_train.py --models bart-base --checkpointing off --precisions bf16 fp16 \
    --methods full lora int8-lora dora qlora --src-len 64 --tgt-len 64 --warmup 2 --steps 6 --out "$OUT/bart_base" 2>&1 \
    | tail -12 || status=1
echo "gpu_check: tables in $OUT (exit $status)"
exit $status
