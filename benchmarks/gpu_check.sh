#!/usr/bin/env bash
# The GPU check (issue 22): one command for a session that has a device, in stages of a minute or
# two, each writing its results under $OUT as soon as it ends (so a run cut short still returns
# what it finished). Ray stages last. Here, first:
#
#   ../shared/device/pack-ray.sh .device && mkdir -p .git/info && echo /.device/ >> .git/info/exclude
#
# then `run` with carry [".device"] and command `bash benchmarks/gpu_check.sh` (timeout 600 s; the
# stages are capped at 530 s together and should take about 4 minutes).
# With DEVICE=cpu it runs the same stages on this machine's CPU (a dry run; no bundle needed), and
# THROUGHPUT_ARGS="--prompts 2 --input-len 16 --output-len 4 --repeats 1" keeps stage 2 short.
#
#   0-stages.txt       each stage's exit status, time and last line; logs.txt: all their output
#   1-gpu-tests        pytest -m gpu: engine parity on CUDA vs transformers, memory_fraction sizing,
#                      cuda_ipc between two processes, the profile on a GPU (its summary: 0-stages)
#   2-throughput.json  engine vs transformers generate, SmolLM2 shapes (random weights), bf16,
#                      32 x 128 in / 64 out, decode steps at batch 1/8/32/128, prefills 128..2048
#   3-transfer.json    cuda_ipc fetch GB/s between two processes vs copy_, 16/64/256 MiB
#   4-served-*.json    1 prefill + 1 decode instance sharing one GPU (num_gpus 0.5 each), KV through
#                      cuda_ipc, then ray: outputs vs the in-process engine, every block free after
set -u
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
root=$(pwd)

if [ -f .device/ray-py312.tar.xz ]; then  # Ray and msgspec, which the device machine lacks
  mkdir -p /tmp/site && tar -xJf .device/ray-py312.tar.xz -C /tmp/site
  export PATH=/tmp/site/bin:$PATH
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The repository root is the `tandem` package: import it through a link, no install needed.
mkdir -p /tmp/pkg && ln -sfn "$root" /tmp/pkg/tandem
export PYTHONPATH=/tmp/pkg:$root${PYTHONPATH:+:$PYTHONPATH}
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

stage() {  # stage NAME SECONDS COMMAND...: run it, its output appended to logs.txt (few files
  local name=$1 limit=$2  # come back from a device run), its exit status, time and last line
  shift 2                 # to 0-stages.txt
  local start=$SECONDS
  echo "=== $name: $*" >> "$OUT/logs.txt"
  timeout "$limit" "$@" > "$OUT/stage.tmp" 2>&1
  local rc=$?
  cat "$OUT/stage.tmp" >> "$OUT/logs.txt"
  echo "$name rc=$rc ${limit}s-limit took=$((SECONDS - start))s: $(tail -n 1 "$OUT/stage.tmp")" | tee -a "$OUT/0-stages.txt"
  rm -f "$OUT/stage.tmp"
}

python3 - > "$OUT/0-env.txt" 2>&1 <<'EOF'
import sys, torch
print(sys.version)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory >> 20, "MiB")
import tandem, msgspec
print("tandem from", tandem.__file__)
EOF

if [ "$DEVICE" = cuda ]; then
  stage 1-gpu-tests 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/unit -o addopts="" -rs
fi
stage 2-throughput 120 python3 -m benchmarks.engine_throughput --device "$DEVICE" --model smollm2-random \
  --dtype bfloat16 --repeats 3 --out "$OUT/2-throughput.json" ${THROUGHPUT_ARGS:-}
if [ "$DEVICE" = cuda ]; then
  stage 3-transfer 90 python3 -m benchmarks.gpu_transfer --out "$OUT/3-transfer.json"
  stage 4-served-cuda_ipc 100 python3 -m benchmarks.gpu_served --device cuda --transfer cuda_ipc \
    --out "$OUT/4-served-cuda_ipc.json"
fi
stage 4-served-ray 100 python3 -m benchmarks.gpu_served --device "$DEVICE" --transfer ray \
  --out "$OUT/4-served-ray.json"
