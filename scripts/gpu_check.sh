#!/usr/bin/env bash
# GPU check, one short script (a few minutes): the tests that need CUDA, a short bf16 training run,
# eval, and `ladderlm bench --json` on the visible CUDA device; then tokens/s and MFU against
# the device's bf16 peak, and a training step's peak memory with and without recomputed passes.
# Exits non-zero on any failure. Usage: bash scripts/gpu_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-$(mktemp -d)}
mkdir -p "$out"

python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu_check: torch sees no CUDA device" >&2; exit 1; }
python -c "import torch; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__)"

echo "== tests that need CUDA"
python -m pytest -q -m cuda tests

echo "== short training run (demo preset, bf16 autocast)"
[ -f "$out/data/meta.json" ] || ladderlm prepare --source stdlib --out "$out/data"
rm -rf "$out/run"  # a rerun into the same OUT_DIR trains afresh
ladderlm train --preset demo --data "$out/data" --out "$out/run" --no-progress \
  --set train.max_iters=300 --set train.batch_size=64 --set train.eval_interval=150 --set train.precision=bf16
ladderlm eval --ckpt "$out/run" --data "$out/data" --json --rows 256 | tee "$out/eval.json"

echo "== bench"
ladderlm bench --json | tee "$out/bench.json"

echo "== throughput and MFU"
python - "$out" <<'PY'
import json, statistics, sys, time
import torch
from ladderlm import checkpoint
from ladderlm.bench import train_flops_per_token

out = sys.argv[1]
records = [json.loads(line) for line in open(f"{out}/run/metrics.jsonl")]
rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][3:]
model, _, _ = checkpoint.load(f"{out}/run", "cuda")
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    a @ a
torch.cuda.synchronize()
start = time.perf_counter()
for _ in range(20):
    a @ a
torch.cuda.synchronize()
measured = 20 * 2 * 8192**3 / (time.perf_counter() - start)
name = torch.cuda.get_device_name()
table = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "RTX 4090": 165e12}
spec = next((v for k, v in table.items() if k in name), None)
train_rate = statistics.median(rates)
flops = train_flops_per_token(model) * train_rate
bench = json.load(open(f"{out}/bench.json"))
print(f"training (demo, bf16): {train_rate:,.0f} tokens/s = {flops / 1e12:.2f} TFLOP/s")
print(f"bf16 matmul peak measured: {measured / 1e12:.0f} TFLOP/s -> MFU {flops / measured:.2%}")
if spec:
    print(f"bf16 dense spec for {name}: {spec / 1e12:.0f} TFLOP/s -> MFU {flops / spec:.2%}")
print("bench train tokens/s:", bench["train_tokens_per_s"], "| decode tokens/s:", bench["decode_tokens_per_s"])
PY
echo "== training memory, with and without recomputed passes (fp32)"
python scripts/train_memory.py shakespeare-char-cpu shakespeare-char-cpu-ladder4 --batch 256 --device cuda

echo "gpu_check: all passed (outputs in $out)"
