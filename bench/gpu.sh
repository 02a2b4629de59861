#!/usr/bin/env bash
# Every GPU measurement in one go, most important first, each under its own time limit, so a short lease still
# returns the headline numbers. Results (stdout of each bench, JSON last lines) go to $OUT (default bench/results/gpu).
#   OUT=/tmp/gpu bash bench/gpu.sh
set -u
OUT=${OUT:-bench/results/gpu}
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "bench/gpu.sh: no CUDA GPU visible to torch here; run it on a GPU machine (the CPU benches take --quick)" >&2
  exit 2
fi
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.}
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$OUT/log.txt"
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  echo "   rc=$? $(tail -c 600 "$OUT/$name.txt" | tail -n 2 | head -c 400)" | tee -a "$OUT/log.txt"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
step pretrain        ${T_PRETRAIN:-300} python bench/pretrain.py --device cuda --json
step loop            ${T_LOOP:-70}      python bench/loop.py --device cuda --json
step pretrain_nofuse ${T_NOFUSE:-80}   python bench/pretrain.py --device cuda --json --presets gpt2-124m --compile on --fused-loss off
step generate        ${T_GENERATE:-80} python bench/generate.py --device cuda --json
step pretrain_b32    ${T_B32:-60}      python bench/pretrain.py --device cuda --json --presets gpt2-124m --compile on --batch 32
echo "== done $(date +%T)" | tee -a "$OUT/log.txt"
