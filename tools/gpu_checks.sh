#!/usr/bin/env bash
# The checks and benchmarks that need a CUDA GPU, in one command, each step under its own time limit so that a
# slow one cannot starve the others; logs, JSON figures and a summary go to OUT_DIR.
#
#   tools/gpu_checks.sh OUT_DIR [STEP ...]
#
# Steps, in the default order (most wanted first; name some to run only those):
#   cuda-tests  tests/test_cuda.py: fp16 extraction against the live encoder, the pinned-memory writer, batches
#               prefetched onto the device, steps that never wait for it, heads trained there      (limit 180 s)
#   extract     tools/bench_extract.py --device cuda: float16 extraction against the bare float16 forward, and
#               its write rate against the disk's                                                   (limit 150 s)
#   heads-speed tools/bench_heads.py --device cuda --sections speed: the adapter's epoch against its compute
#               bound, device-time profile, bfloat16 autocast against float32, --compile, live / store
#                                                                                                   (limit 300 s)
#   heads-k     tools/bench_heads.py --device cuda --sections k: K = 1, 4, 8 heads in one pass       (limit 420 s)
#               (both heads steps time each configuration once, --rounds 1: a lent device's minutes are few)
#   tests       the whole test suite on the GPU machine (pytest-xdist when installed)                (limit 480 s)
#
# Environment: DATA (CoNLL-2003 folder, default ../shared/data/conll2003), MODEL (encoder directory, default the
# packaged MiniLM), WORKDIR (stores, default /tmp/featstore-gpu), LIMIT_SCALE (multiplies every limit), DEVICE
# (default cuda; DEVICE=cpu runs the same steps on the CPU, e.g. to try this script on a small DATA).
# Needs a CUDA build of torch and featstore's dependencies importable (`pip install -e .` or PYTHONPATH).
set -uo pipefail
cd "$(dirname "$0")/.."

out=${1:?usage: tools/gpu_checks.sh OUT_DIR [cuda-tests extract heads-speed heads-k tests]}
shift
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(cuda-tests extract heads-speed heads-k tests)
data=${DATA:-../shared/data/conll2003}
workdir=${WORKDIR:-/tmp/featstore-gpu}
scale=${LIMIT_SCALE:-1}
model_args=()
[ -n "${MODEL:-}" ] && model_args=(--model "$MODEL")
device=${DEVICE:-cuda}
kind=${device%%:*}  # cuda or cpu: names the JSON files
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$out" "$workdir"

if [[ $device == cuda* ]]; then
    python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: these checks need one'
print('torch', torch.__version__, 'on', torch.cuda.get_device_name())" | tee "$out/device.txt" || exit 1
    nvidia-smi >> "$out/device.txt" 2>&1 || true
fi

run_step() {  # name, limit in seconds, command...
    local name=$1 limit
    limit=$(python3 -c "print(int($2 * $scale))")
    shift 2
    echo "== $name (limit ${limit} s): $*" | tee -a "$out/summary.txt"
    local started=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local status=$?
    echo "   exit $status after $((SECONDS - started)) s$([ $status = 124 ] && echo ' (time limit)')" \
        | tee -a "$out/summary.txt"
    tail -n 3 "$out/$name.log"
}

xdist=()
python3 -c "import xdist" 2>/dev/null && xdist=(-n 8)
for step in "${steps[@]}"; do
    case $step in
        cuda-tests) run_step cuda-tests 180 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py ;;
        extract) run_step extract 150 python3 tools/bench_extract.py --corpus "$data/train.txt" --device "$device" \
                     --workdir "$workdir/extract" --json "$out/extract-$kind.json" "${model_args[@]}" ;;
        heads-speed) run_step heads-speed 300 python3 tools/bench_heads.py --data "$data" --device "$device" \
                         --workdir "$workdir/heads" --json "$out/heads-$kind.json" --sections speed --rounds 1 \
                         "${model_args[@]}" ;;
        heads-k) run_step heads-k 420 python3 tools/bench_heads.py --data "$data" --device "$device" \
                     --workdir "$workdir/heads" --json "$out/heads-$kind.json" --sections k --rounds 1 \
                     "${model_args[@]}" ;;
        tests) run_step tests 480 python3 -m pytest -q -p no:cacheprovider -rs "${xdist[@]}" ;;
        *) echo "unknown step $step: choose cuda-tests extract heads-speed heads-k tests" >&2; exit 2 ;;
    esac
done
