#!/usr/bin/env bash
# Checks that need an NVIDIA GPU (CI has none): the CUDA noise-injection kernel against the reference, its
# benchmark against the bandwidth ceiling, `ds-distill report`, and the tiny finetune -> DMD2 -> export -> eval
# pipeline on one GPU (NCCL, bf16 autocast off: the tiny recipes are fp32), then DMD2 at the users' scale:
# Wan2.1-1.3B student and critic plus a 14B-shaped teacher (random weights, full layer counts) at 81x480x832,
# bf16, 3 iterations (benchmarks/real_scale_dmd2.py: peak GPU memory per role, seconds per iteration), on one
# GPU and, with >= 2 GPUs, on 2 ranks over NCCL and with sequence parallelism over all GPUs (training.sp_size = the
# GPU count, or the largest of 4, 2 dividing it that also divides the 12 and 40 heads).
# Usage: bash tools/gpu_check.sh [LOG_DIR]   (python3 must have ds_distill's requirements importable;
#        FT_STEPS / DMD_STEPS shorten the two training runs)
#        bash tools/gpu_check.sh --cpu-smoke  (the real-scale script at tiny size on the CPU; in the test suite)
# Each stage has its own time limit; a failing stage is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--cpu-smoke" ]; then
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DS_DISTILL_NO_TQDM=1 OMP_NUM_THREADS=1
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  ${PYTHON:-python3} benchmarks/real_scale_dmd2.py --tiny --workdir "$work"
  exit $?
fi
LOG=${1:-outputs/gpu_check}
WORK=${GPU_CHECK_WORK:-/tmp/ds_distill_gpu_check}
mkdir -p "$LOG" "$WORK"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DS_DISTILL_NO_TQDM=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}
if [ -z "${CUDA_HOME:-}" ]; then  # a toolkit has bin/nvcc and include/cuda_runtime.h (a bin/nvcc wrapper may not)
  for home in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /x/x/x)")")")"; do
    if [ -f "$home/include/cuda_runtime.h" ]; then export CUDA_HOME=$home; break; fi
  done
fi
status=0
stage() {  # stage NAME LIMIT_SECONDS CMD...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" > >(tee "$LOG/$name.log") 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0))s"
  [ $rc -eq 0 ] || status=1
}

nvidia-smi -L || true
"$PY" -c "import torch, deepspeed, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| deepspeed', deepspeed.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__, \
'| device', torch.cuda.get_device_name(0)); print('CUDA_HOME', '${CUDA_HOME:-unset}')"

stage cuda_op_tests 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_ops_cuda_build.py tests/test_rng.py \
  tests/test_ops.py -k "cuda or self_check"
stage report 120 "$PY" -m ds_distill.cli report
stage noise_bench 180 "$PY" benchmarks/noise_injection.py --device cuda --dtypes float32,bfloat16,float16 \
  --numel $((256 * 1024 * 1024)) --repeats 30 --eager-repeats 5

pipeline() {
  set -e
  local w=$WORK/pipeline
  rm -rf "$w"
  "$PY" -m ds_distill.cli make-tiny-wan "$w/tiny_wan"
  "$PY" -m ds_distill.cli make-toy-data "$w/toy_data" --model "$w/tiny_wan"
  local t0=$SECONDS
  "$PY" -m ds_distill.train --config recipes/tiny_finetune.yaml "roles.student.path=$w/tiny_wan" \
    "training.data_path=$w/toy_data/latents" "training.output_dir=$w/teacher_run" \
    "training.validation_dataset_file=$w/toy_data/validation.json" ${FT_STEPS:+training.max_train_steps=$FT_STEPS}
  echo "finetune took $((SECONDS - t0))s"
  "$PY" -m ds_distill.export "$w/teacher_run" "$w/teacher" --base "$w/tiny_wan"
  t0=$SECONDS
  # validation videos need imageio-ffmpeg, which a bare GPU image may lack: off here
  "$PY" -m ds_distill.train --config recipes/tiny_dmd2.yaml "roles.student.path=$w/teacher" \
    "roles.teacher.path=$w/teacher" "roles.critic.path=$w/teacher" "training.data_path=$w/toy_data/text_only" \
    "training.output_dir=$w/dmd2_run" "training.validation_dataset_file=$w/toy_data/validation.json" \
    training.log_validation=false ${DMD_STEPS:+training.max_train_steps=$DMD_STEPS}
  echo "DMD2 took $((SECONDS - t0))s"
  "$PY" -m ds_distill.export "$w/dmd2_run" "$w/student" --base "$w/teacher"
  "$PY" -m ds_distill.cli eval-toy --data "$w/toy_data" --teacher "$w/teacher" --student "$w/student"
}
export PY WORK
stage pipeline 420 bash -c "$(declare -f pipeline); pipeline"

# the users' scale, random weights: ~20 GB of model states on one GPU (teacher 28 GB bf16 before partitioning)
stage real_scale_1gpu 900 "$PY" benchmarks/real_scale_dmd2.py --workdir "$WORK"
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "${gpus:-0}" -ge 2 ]; then
  stage real_scale_2gpu 900 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 \
    benchmarks/real_scale_dmd2.py --workdir "$WORK"
  # sequence parallel over all GPUs where the heads (12 and 40) allow it, else over the largest group that does
  sp=1
  for s in "$gpus" 4 2; do
    if [ $((gpus % s)) -eq 0 ] && [ $((12 % s)) -eq 0 ] && [ $((40 % s)) -eq 0 ]; then sp=$s; break; fi
  done
  stage real_scale_sp 900 "$PY" -m torch.distributed.run --standalone --nproc_per_node "$gpus" \
    benchmarks/real_scale_dmd2.py --workdir "$WORK" --sp-size "$sp"
else
  echo "=== real_scale_2gpu, real_scale_sp: skipped ($gpus GPU visible)"
fi

echo "gpu_check: $([ $status -eq 0 ] && echo all stages passed || echo SOME STAGES FAILED), logs in $LOG"
exit $status
