#!/usr/bin/env bash
# One call on a CUDA machine (the lent device, or any GPU box): build fastpeft._C for this GPU's
# arch against the python3 there, then run the stages named in $1 (comma-separated):
#   tests   TRITON_INTERPRET=0 pytest -m gpu tests (compiled Triton kernels, CUDA extension)
#   bench   pytest bench --bench-device cuda ($BENCH_ARGS appended, -k "$BENCH_K" when set)
#   profile tools/gpu_profile.py (step times, GPU-busy fraction, top kernels; $PROFILE_ARGS)
#   ops     the op rows only (-k "not e2e"), faster than a whole bench
#   host    the host-overhead mode (pytest bench --bench-host: ViT-Ti, 5 tokens, batch 1, one CPU
#           thread, Triton launches stubbed) on this machine's CPU
#   vitb    ViT-B/16 train rows at batch $VITB_BATCHES (8 64 128) x $VITB_PRECISIONS (tf32 bf16):
#           fp32 model with TF32 matmuls (float32_matmul_precision high), and the same under bf16
#           autocast; contenders eager, compile, peft, timm-ckpt, patch, patch-recompute,
#           patch+compile and both compiles with mode="reduce-overhead" (CUDA graphs); compile rows
#           for the methods in $VITB_COMPILE (default AdaptFormer,SSF,LoRA; "all" for every one),
#           $VITB_ROUNDS timed rounds (10); one results file per setting, tagged vit_base_b<B>_<prec>.
#           Split across calls (each call is capped at 10 min) by setting VITB_BATCHES / VITB_PRECISIONS.
# Logs and results land in $OUT (default /tmp/fastpeft-gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fastpeft-gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
STAGES=${1:-tests}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, triton, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'timm', timm.__version__)"
  nvcc --version | tail -2
} 2>&1 | tee "$OUT/env.txt"

arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=$arch FASTPEFT_BUILD_BACKEND=cuda MAX_JOBS=${MAX_JOBS:-16}
# A build from an earlier call can be carried back in (its $OUT files _C.so.gz and _build_info.json
# in a folder .devbuild/, named in the call's carry): reused when it loads against this torch.
if [ -f .devbuild/_C.so.gz ]; then
  gunzip -c .devbuild/_C.so.gz >"fastpeft/_C.cpython-$($PY -c 'import sys; print("%d%d" % sys.version_info[:2])')-x86_64-linux-gnu.so"
  cp .devbuild/_build_info.json fastpeft/
fi
if ! $PY -c "import sys, fastpeft._ext as e; s = e.probe(); print(s.reason or '', file=sys.stderr); sys.exit(0 if s.has_cuda else 1)"; then
  start=$(date +%s)
  $PY -m pip install -e . --no-build-isolation --no-deps -q >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  echo "build (sm_${arch/./}): $(( $(date +%s) - start )) s"
  gzip -c fastpeft/_C*.so >"$OUT/_C.so.gz" && cp fastpeft/_build_info.json "$OUT/"
fi
$PY -c "import json, fastpeft._ext as e; print(json.dumps(e.build_info()))" | tee -a "$OUT/env.txt"

rc=0
if [[ ",$STAGES," == *",tests,"* ]]; then
  $PY -m pytest -m gpu tests -q -rfE -p no:cacheprovider -n ${WORKERS:-6} --timeout 300 \
      --junitxml="$OUT/gpu-tests.xml" ${TEST_ARGS:-} >"$OUT/gpu-tests.log" 2>&1 || rc=1
  grep -E "^(FAILED|ERROR)" "$OUT/gpu-tests.log" | cut -c1-300 | head -40
  tail -3 "$OUT/gpu-tests.log"
fi
if [[ ",$STAGES," == *",profile,"* ]]; then
  $PY tools/gpu_profile.py --out "$OUT" ${PROFILE_ARGS:-} >"$OUT/profile.log" 2>&1 || rc=1
  grep -v Warn "$OUT/profile.log" | head -${PROFILE_LINES:-200}
fi
if [[ ",$STAGES," == *",host,"* ]]; then
  $PY -m pytest bench -p no:cacheprovider --bench-host --bench-save "$OUT" ${HOST_ARGS:-} >"$OUT/host.log" 2>&1 || rc=1
  grep -vE "^(bench/|\s*$)" "$OUT/host.log" | tail -80
fi
if [[ ",$STAGES," == *",vitb,"* ]]; then
  for b in ${VITB_BATCHES:-8 64 128}; do
    for prec in ${VITB_PRECISIONS:-tf32 bf16}; do
      args=(--bench-device cuda --bench-model vit_base_patch16_224 --bench-batch "$b" --bench-dtype fp32
            --bench-matmul-precision high --bench-compile "${VITB_COMPILE:-AdaptFormer,SSF,LoRA}"
            --bench-rounds "${VITB_ROUNDS:-10}" --bench-tag "vit_base_b${b}_${prec}" -k "test_e2e and train")
      [[ $prec == bf16 ]] && args+=(--bench-autocast bf16)
      log="$OUT/vitb_b${b}_${prec}.log"
      $PY -m pytest bench -p no:cacheprovider --bench-save "$OUT" "${args[@]}" ${BENCH_ARGS:-} >"$log" 2>&1 || rc=1
      echo "== ViT-B/16 batch $b $prec"; grep -E "^e2e:|results written" "$log" | cut -c1-140
    done
  done
fi
for stage in bench ops; do
  [[ ",$STAGES," == *",$stage,"* ]] || continue
  sel=(-k "${BENCH_K:-not nothing}"); [[ $stage == ops ]] && sel=(-k "not e2e")
  $PY -m pytest bench -p no:cacheprovider --bench-device cuda --bench-save "$OUT" "${sel[@]}" ${BENCH_ARGS:-} \
      >"$OUT/$stage.log" 2>&1 || rc=1
  grep -vE "^(bench/|\s*$)" "$OUT/$stage.log" | tail -60
done
exit $rc
