#!/usr/bin/env bash
# The GPU rows (issue 18, item 3) in one run, on a machine with a CUDA GPU and no network:
#
#     bash scripts/gpu_rows.sh OUT_DIR
#
# 1. a virtual environment over the machine's own CUDA torch (--system-site-packages), with the test
#    references installed from the wheels in .whl/ at the repository's root (README, "Speed and
#    memory", says how to download them; about 22 MB) and nothing fetched;
# 2. tests/test_gpu.py: fp32 against diffusers (1e-4), fp16 eager and optimize()d against fp32
#    (5e-3), a 512×512 fp16 image's peak memory, a 768×768 fp16 image without NaN, tiled decoding;
# 3. scripts/benchmark.py's GPU modes against diffusers in one process: fp16 eager, fp16 compiled and
#    bf16, the UNet step at 512² and 768², the VAE decode at 768², a whole 512² image, peak memory;
# 4. one JSON file, OUT_DIR/gpu_rows.json: the date, the device, the versions, each stage's exit
#    status and the tests' summary line, and the benchmark's rows (ratios ours / diffusers).
#
# Each stage has its own time limit, so the whole finishes within 8 minutes on an H200 (GPU time
# is lent 15 minutes a session: one run and one rerun must fit). Logs go to OUT_DIR beside the JSON.
set -uo pipefail
OUT=${1:?usage: bash scripts/gpu_rows.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
BEGAN=$(date +%s)
PY=${PYTHON:-python3}
VENV=${VENV:-/tmp/sd-scratch-gpu-venv}

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, keep the status
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo $? >"$OUT/$name.status"
    tail -n 3 "$OUT/$name.log"
}

stage install 120 bash -c "
    set -e
    '$PY' -m venv --system-site-packages '$VENV'
    '$VENV/bin/python' -m pip install --quiet --no-index --no-deps .whl/*.whl
    '$VENV/bin/python' -m pip install --quiet --no-index --no-deps --no-build-isolation -e .
    '$VENV/bin/python' -c 'import torch, diffusers, transformers; assert torch.cuda.is_available(), \"no CUDA GPU\"'"
PY="$VENV/bin/python"

stage test_gpu 200 env PYTHONUNBUFFERED=1 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py
stage benchmark 240 env PYTHONUNBUFFERED=1 "$PY" scripts/benchmark.py --device cuda \
    --modes fp16 fp16-compiled bf16 --rows unet decode image --unet-sizes 512 768 --decode-size 768 \
    --image-size 512 --repeats 3 --warmup 1 --json "$OUT/benchmark.json"

"$PY" - "$OUT" "$BEGAN" <<'EOF'
import json, sys, time
from pathlib import Path

out, began = Path(sys.argv[1]), int(sys.argv[2])
def status(name):
    path = out / f"{name}.status"
    return int(path.read_text()) if path.exists() else None
def last_line(name):
    path = out / f"{name}.log"
    lines = [l for l in path.read_text(errors="replace").splitlines() if l.strip()] if path.exists() else []
    return lines[-1] if lines else ""
result = {"date": time.strftime("%Y-%m-%d"), "seconds": int(time.time()) - began,
          "stages": {name: {"status": status(name), "last_line": last_line(name)}
                     for name in ("install", "test_gpu", "benchmark")}}
try:
    import diffusers, torch, transformers
    result |= {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
               "transformers": transformers.__version__}
except Exception as err:  # the install stage failed: say so in the file
    result["versions_error"] = repr(err)
bench = out / "benchmark.json"
result["benchmark"] = json.loads(bench.read_text()) if bench.exists() else None
(out / "gpu_rows.json").write_text(json.dumps(result, indent=2))
print(json.dumps({k: v for k, v in result.items() if k != "benchmark"}, indent=2))
EOF
