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
  python -c "import torch, transformers, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'triton', triton.__version__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# fresh machine: each step compiles first (about 25 s per model and side), so the limits include that
step kernels         ${T_KERNELS:-60}  python -m bench.kernels --device cuda --json
step pretrain_gpt2   ${T_GPT2:-150}    python -m bench.pretrain --device cuda --json --presets gpt2-124m --compile true
step pretrain_b32a4  ${T_B32A4:-150}   python -m bench.pretrain --device cuda --json --presets gpt2-124m --compile true --batch 32 --accum 4 --repeats 5
step pretrain_llama  ${T_LLAMA:-150}   python -m bench.pretrain --device cuda --json --presets llama-124m --compile true
step profile         ${T_PROFILE:-70}  python -m bench.step_profile --device cuda --json --top 25
step loop            ${T_LOOP:-70}     python -m bench.loop --device cuda --json
step generate        ${T_GENERATE:-80} python -m bench.generate --device cuda --json
step pretrain_eager  ${T_EAGER:-90}    python -m bench.pretrain --device cuda --json --compile off
step profile_nokern  ${T_NOKERN:-70}   python -m bench.step_profile --device cuda --json --loss-kernel false --top 25
echo "== done $(date +%T)" | tee -a "$OUT/log.txt"
