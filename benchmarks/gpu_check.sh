#!/usr/bin/env bash
# The checks only a GPU machine can run, in at most 8 minutes, ending with one table (docs/scale.md):
#
#   1. the GPU-marked tests (`pytest -m gpu`: the accelerate configs of configs/accelerate, vLLM generation,
#      BDHS and online DPO on vLLM);
#   2. DPO training throughput, bf16 against fp32, with benchmarks/dpo_throughput.py's model and recipe runner
#      (a 336 px LLaVA with a 32k vocabulary), at small settings;
#   3. generation throughput, vLLM against the Hugging Face loop, greedy, on the same model.
#
# Each step has its own time limit and is skipped, with the reason, when what it needs is missing (a CUDA
# device, pytest, vLLM). Usage, from anywhere:  bash benchmarks/gpu_check.sh   (PYTHON=... picks the interpreter)
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
WORK="$(mktemp -d -t gpu_check.XXXXXX)"
RESULTS="$WORK/results.tsv"
: >"$RESULTS"

# Limits in seconds; their sum (plus start-up) stays under 8 minutes.
TESTS_LIMIT=270
DPO_LIMIT=100
VLLM_LIMIT=100

record() {  # step, status, result, seconds
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RESULTS"
}

limited() {  # seconds, command...: run with a time limit where `timeout` exists
  local seconds=$1
  shift
  if command -v timeout >/dev/null 2>&1; then timeout --signal=KILL "$seconds" "$@"; else "$@"; fi
}

has_module() {
  "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null
}

if ! "$PYTHON" -c "import torch, mmalign" 2>/dev/null; then
  echo "gpu_check: $PYTHON cannot import torch and mmalign (pip install -e '.[test]' first)" >&2
  exit 2
fi
CUDA="$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')")"
echo "gpu_check: python $PYTHON; device: ${CUDA:-none}; work directory $WORK"

# 1. The GPU-marked tests.
step="GPU-marked tests"
if [[ -z "$CUDA" ]]; then
  record "$step" skipped "no CUDA device" 0
elif ! has_module pytest; then
  record "$step" skipped "pytest not installed (pip install -e '.[test]')" 0
else
  start=$SECONDS
  limited "$TESTS_LIMIT" "$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider tests >"$WORK/tests.log" 2>&1
  code=$?
  summary="$(grep -E '(passed|failed|skipped|error|deselected)' "$WORK/tests.log" | tail -n 1 | tr -d '=' | xargs)"
  case $code in
    0) status=ok ;;
    5) status=skipped summary="no GPU test selected" ;;
    137) status=timeout summary="over ${TESTS_LIMIT}s; ${summary}" ;;
    *) status=FAILED ;;
  esac
  record "$step" "$status" "${summary:-see $WORK/tests.log}" $((SECONDS - start))
  [[ $status == FAILED ]] && grep -E '^(FAILED|ERROR)' "$WORK/tests.log" | head -n 20
fi

# 2. DPO throughput, bf16 against fp32 (the mmalign variant of benchmarks/dpo_throughput.py, small settings).
step="DPO train, bf16 vs fp32"
if [[ -z "$CUDA" ]]; then
  record "$step" skipped "no CUDA device" 0
else
  start=$SECONDS
  limited "$DPO_LIMIT" "$PYTHON" - "$WORK" >"$WORK/dpo.log" 2>&1 <<'EOF'
import statistics
import sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
from dpo_throughput import VARIANTS, prepare, run_mmalign

work = Path(sys.argv[1]) / "dpo"
steps, warmup, batch = 8, 3, 4
pairs, model = prepare(work, 16)
rate = {}
for name, extra in (("fp32", {}), ("bf16", {"mixed_precision": "bf16"})):
    res = run_mmalign(model, pairs, work / f"run-{name}", steps, batch, {**VARIANTS["mmalign"], **extra})
    rate[name] = batch / statistics.median(res["step_times"][warmup:])
print(f"RESULT bf16 {rate['bf16']:.1f} pairs/s, fp32 {rate['fp32']:.1f} pairs/s ({rate['bf16'] / rate['fp32']:.2f}x)")
EOF
  code=$?
  result="$(grep '^RESULT ' "$WORK/dpo.log" | tail -n 1 | cut -d' ' -f2-)"
  if [[ $code -eq 0 && -n $result ]]; then status=ok; elif [[ $code -eq 137 ]]; then status=timeout; else status=FAILED; fi
  record "$step" "$status" "${result:-see $WORK/dpo.log}" $((SECONDS - start))
fi

# 3. Generation throughput, vLLM against the Hugging Face loop (greedy, 32 new tokens, the same prompts).
step="generation, vLLM vs HF"
if [[ -z "$CUDA" ]]; then
  record "$step" skipped "no CUDA device" 0
elif ! has_module vllm; then
  record "$step" skipped "vLLM not installed (pip install 'mmalign[vllm]')" 0
else
  start=$SECONDS
  VLLM_ENABLE_V1_MULTIPROCESSING=0 limited "$VLLM_LIMIT" "$PYTHON" - "$WORK" >"$WORK/vllm.log" 2>&1 <<'EOF'
import sys
import time
from pathlib import Path

sys.path.insert(0, "benchmarks")
from dpo_throughput import prepare

from mmalign.data.loaders import load_samples
from mmalign.generation.hf import HFGenerator
from mmalign.generation.sampling import SamplingParams
from mmalign.generation.vllm import VllmGenerator
from mmalign.models.load import load_model

work = Path(sys.argv[1]) / "dpo"  # the DPO step's world and model, made here if that step did not run
model_dir = work / "model"
if not (model_dir / "config.json").exists():
    prepare(work, 16)
prompts = (load_samples(work / "world" / "captions.jsonl").samples * 64)[:64]
params = SamplingParams(temperature=0, max_new_tokens=32)


def rate(generator) -> float:
    generator.generate(prompts[:4], params=params)  # warm-up
    t0 = time.perf_counter()
    groups = generator.generate(prompts, params=params)
    return sum(len(g[0].token_ids) for g in groups) / (time.perf_counter() - t0)


loaded = load_model(model_dir)
hf = rate(HFGenerator(loaded.model.cuda(), loaded.processor, batch_size=64))
del loaded
vllm = rate(VllmGenerator(model_dir, gpu_memory_utilization=0.4, enforce_eager=True))
print(f"RESULT vLLM {vllm:.0f} tokens/s, HF {hf:.0f} tokens/s ({vllm / hf:.1f}x; {len(prompts)} prompts, eager)")
EOF
  code=$?
  result="$(grep '^RESULT ' "$WORK/vllm.log" | tail -n 1 | cut -d' ' -f2-)"
  if [[ $code -eq 0 && -n $result ]]; then status=ok; elif [[ $code -eq 137 ]]; then status=timeout; else status=FAILED; fi
  record "$step" "$status" "${result:-see $WORK/vllm.log}" $((SECONDS - start))
fi

echo
printf '%-26s | %-8s | %-6s | %s\n' "check" "status" "time" "result"
printf '%-26s-+-%-8s-+-%-6s-+-%s\n' "--------------------------" "--------" "------" "------"
failed=0
while IFS=$'\t' read -r name status result seconds; do
  printf '%-26s | %-8s | %5ss | %s\n' "$name" "$status" "$seconds" "$result"
  [[ $status == FAILED || $status == timeout ]] && failed=1
done <"$RESULTS"
echo "(device: ${CUDA:-none}; logs in $WORK)"
exit $failed
