#!/usr/bin/env bash
# The GPU work of the project in four commands, for a GPU lent for minutes: the GPU speed table and the engine, a
# backbone trained for the time given, batch-1 latency compiled, and the backbone step before and after. Needs a
# CUDA GPU, torch, timm and safetensors (no Ray, no gymnasium); speed and latency run evaluate.py's code, which
# needs numpy, pandas, scipy, scikit-learn, tqdm, tabulate and matplotlib too (the device image has them all),
# checked by an import before any step. CIFAR-10 under .data/cifar10/ as train.tar and test.tar (or .tar.gz,
# unpacked on first use). Wheels in .whl/ (e.g. the timm version the project is tested with) are installed
# first, for this run only. From the repository root:
#
#   bash benchmarks/gpu_session.sh speed OUT                # evaluate.py's table in bf16 and the engine
#   bash benchmarks/gpu_session.sh backbone OUT SECONDS     # a backbone trained within SECONDS, all included
#   bash benchmarks/gpu_session.sh latency OUT              # batch 1, eager and as CUDA graphs
#   bash benchmarks/gpu_session.sh step OUT                 # backbone_step at 256, then 512 and 1024 compiled
#
# Each writes its console to OUT/<mode>.log and packs what its steps made into OUT/<mode>.tar.gz (JSON, results
# tables, the backbone's export: model.safetensors, config.json and MODEL_CARD.md with its test accuracy), so
# that a machine that can send back only a few files sends everything. The backbone is the reference recipe at 512 images per
# step, compiled, for as many epochs as fit (backbone.py --time-budget). Expected on an H100: the step under
# 1.5 s per 45,000-image epoch; the pruned rows faster than the unpruned one at batch 1024, and, compiled, at
# batch 1 (latency: benchmarks/batch1_latency.py, each forward replayed as one CUDA graph).
# PYTHON (default python3), DEVICE (default cuda) and BACKBONE_FLAGS (more backbone.py flags) override, e.g.
# for a smoke test on a CPU: DEVICE=cpu BACKBONE_FLAGS="--limit 512 --batch-size 64" ... backbone OUT 120
set -uo pipefail

usage="usage: bash benchmarks/gpu_session.sh speed|backbone|latency|step OUT [SECONDS] (SECONDS for backbone)"
mode=${1:?$usage}
out=${2:?$usage}
case $mode in  # checked before anything runs or is written: device time is short
speed|latency|step) ;;
backbone) [ -n "${3:-}" ] || { echo "$usage" >&2; exit 2; } ;;
*) echo "unknown mode $mode; $usage" >&2; exit 2 ;;
esac
for split in train test; do  # the step times random images; the other modes read CIFAR-10
    [ "$mode" = step ] || [ -f ".data/cifar10/$split.tar" ] || [ -f ".data/cifar10/$split.tar.gz" ] || {
        echo "no .data/cifar10/$split.tar(.gz): gzip ../shared/data/cifar10/*.tar into .data/cifar10/ and carry" \
             "it" >&2
        exit 2; }
done
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
data=.data
work=$(mktemp -d)
began=$(date +%s)
failed=0
export PYTHONUNBUFFERED=1
mkdir -p "$out"
exec > >(tee "$out/$mode.log") 2>&1

section() { echo; echo "== $1 ($(( $(date +%s) - began )) s in)"; }
pack() { tar czf "$out/$mode.tar.gz.tmp" -C "$work" --exclude=site --exclude='train_state.*' . &&
         mv "$out/$mode.tar.gz.tmp" "$out/$mode.tar.gz" &&
         echo "packed $out/$mode.tar.gz ($(du -h "$out/$mode.tar.gz" | cut -f1))"; }
# a failed step does not stop the others; what each step made is packed when it ends, so a run killed later
# (SIGKILL runs no trap) still brings it back
step() { "$@" || { echo "FAILED ($?): $*"; failed=1; }; pack; }
trap pack EXIT  # what is done comes back even when a step fails or the time runs out

section "machine"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --target "$work/site" .whl/*.whl
    export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "$device" != cpu ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
"$python" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
case $mode in  # a package evaluate.py needs and the machine lacks fails here, in seconds, not after a step
speed|latency) "$python" -c "import evaluate" || { echo "FAILED: evaluate.py does not import here"; exit 1; } ;;
esac
for split in train test; do
    [ "$mode" = step ] || [ -f "$data/cifar10/$split.tar" ] || gunzip -k "$data/cifar10/$split.tar.gz"
done

case $mode in
step)
    section "backbone step: the reference recipe (batch 256), then batch 512 and 1024 compiled"
    step "$python" -m benchmarks.backbone_step --device "$device" --output "$work/step_b256.json"
    for batch in 512 1024; do
        step "$python" -m benchmarks.backbone_step --device "$device" --batch-size "$batch" --compile --steps 20 \
            --output "$work/step_b${batch}_compiled.json"
    done
    ;;
speed)
    section "speed table: the reference backbone and policy, bf16, batch 1, 256 and 1024"
    step "$python" evaluate.py --data-dir "$data" --device "$device" --dtype bfloat16 \
        --speed-batch-sizes 1,256,1024 --output-dir "$work/speed_table" \
        --checkpoints-per-budget 0.3=reference/marl_policy,0.7=reference/marl_policy
    section "the pruning engine: episodes/s at 64, 256 and 1024 images per call, float32 and bf16"
    step "$python" -m benchmarks.engine_throughput --data-dir "$data" --device "$device" --limit 1024 \
        --engine-images 64 256 1024 --precision fp32 bf16 --seconds 5 --output "$work/engine.json"
    ;;
backbone)
    seconds=$3
    section "backbone: the reference recipe at batch 512, compiled, within $seconds s"
    # the training state is not sent back, so it is written once, at the end (--save-every), not every epoch
    # shellcheck disable=SC2086  # BACKBONE_FLAGS is a list of flags
    left=$(( seconds - ($(date +%s) - began) ))
    if [ "$left" -le 0 ]; then echo "FAILED: the set-up took the whole $seconds s"; exit 1; fi
    step "$python" backbone.py --data-dir "$data" --output-dir "$work/backbone" --device "$device" \
        --batch-size 512 --compile --save-every 100000 --time-budget "$left" ${BACKBONE_FLAGS:-}
    ;;
latency)
    section "batch 1, bf16: the unpruned model, the policy and two heuristics, eager then compiled (CUDA graphs)"
    step "$python" -m benchmarks.batch1_latency --data-dir "$data" --device "$device" --dtype bfloat16 \
        --output "$work/batch1_bfloat16.json"
    ;;
esac
section "done"
exit $failed
