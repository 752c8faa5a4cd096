#!/usr/bin/env bash
# The GPU pass in one command: the cuda-marked tests, bench/gpu_serve.py, bench/gpu_train.py and
# bench/gpu_profile.py, each under its own time limit and writing its own output, so a part that
# fails or runs out of time leaves the others' results.
#
#   bench/gpu_pass.sh OUT            # on a GPU machine; installs wheels found in .whl/ first
#   bench/gpu_pass.sh --smoke OUT    # here, on the CPU: the same steps on tiny shapes (tests skip)
#   PARTS="pytest_cuda gpu_train" bench/gpu_pass.sh OUT   # some parts only
#   PROFILE_ARGS="--parts training --rows floor sbora_fa" ...  # what gpu_profile measures
#
# OUT receives pass.txt (machine, versions, each part's exit code and time), one log per part and
# the three JSON reports. The wheels: bitsandbytes and the transformers/peft this project pins,
# for an image that lacks them (`pip download --no-deps ... -d .whl`, see docs of the device).
set -u
smoke=""
if [ "${1:-}" = "--smoke" ]; then smoke="--smoke"; shift; fi
out=${1:?usage: bench/gpu_pass.sh [--smoke] OUT}
mkdir -p "$out"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
if [ -z "$smoke" ] && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed" >>"$out/pass.txt"; exit 1; }
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
scratch=/tmp
if [ -w /dev/shm ] && [ "$(df -k --output=avail /dev/shm | tail -1)" -gt 40000000 ]; then scratch=/dev/shm; fi

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)"
    echo "scratch: $scratch"
} >>"$out/pass.txt" 2>&1

PARTS=${PARTS:-pytest_cuda gpu_serve gpu_train gpu_profile}
part() {  # part NAME LIMIT_S COMMAND...
    local name=$1 limit=$2 start rc
    shift 2
    case " $PARTS " in *" $name "*) ;; *) return ;; esac
    start=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc after $(($(date +%s) - start)) s (limit $limit s)" | tee -a "$out/pass.txt"
}

part pytest_cuda 110 "$PY" -m pytest -m cuda -p no:cacheprovider -q --durations=8 \
    tests/sbora_core/test_cuda.py tests/sbora_core/test_static_decode.py
part gpu_serve 150 "$PY" bench/gpu_serve.py $smoke --out "$out/gpu_serve.json"
# The 8B shape: the rows its ratios need (floor, FA, FB) and the checkpointed NF4 peak; the
# comparisons with PEFT are made at the 1B shape.
part gpu_train 230 "$PY" bench/gpu_train.py $smoke --warmup 2 --steps 5 --scratch "$scratch" \
    --methods-8b floor sbora_fa sbora_fb qsbora_fa_checkpointed --out "$out/gpu_train.json"
# shellcheck disable=SC2086  # PROFILE_ARGS is a list of arguments
part gpu_profile 70 "$PY" bench/gpu_profile.py $smoke ${PROFILE_ARGS:-} --scratch "$scratch" --out "$out/gpu_profile.json"
