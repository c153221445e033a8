#!/usr/bin/env bash
# One device call for issue 17 (engine side). Stages, each under its own time limit, all output
# under $OUT:
#   tests   GPU tests: varlen attention vs float64, kernels, graphs (decode, mixed, async) vs eager, engine
#   attn    bench/kernel_check.py attention: varlen kernel vs the SDPA path, launch-config sweep
#   mixed   bench/mixed_step.py on the 48-layer qwen3-30b-a3b preset: step table (graphs / eager /
#           piecewise), prefill 8x2048 distinct, batch-1 loop vs replay, TTFT 1024
#   serve   bench/serve_load.py: moge serve under streaming loads vs the static engine rate
#   guide   guidellm against the server (wheels in .whl, if carried)
# Usage (device tool, from .dev/s17-engine): bash bench/gpu_s17.sh tests attn mixed serve
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source "$(dirname "$0")/device_env.sh"
export TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error
stages=${*:-tests attn mixed}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/gpu.txt"
python3 -m protos.generate >/dev/null 2>&1
for stage in $stages; do
  t0=$(date +%s)
  case $stage in
    tests)
      timeout ${T_TESTS:-150} python3 -m pytest -q -rs -p no:cacheprovider ${TESTS:-tests/gpu/test_varlen_attention.py \
        tests/gpu/test_cuda_graphs.py tests/gpu/test_kernels.py tests/gpu/test_engine_gpu.py tests/gpu/test_model_gpu.py} \
        > "$OUT/gpu_tests.txt" 2>&1
      grep -E "passed|failed|Error|error" "$OUT/gpu_tests.txt" | tail -8 ;;
    diag)
      timeout ${T_DIAG:-40} python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_cuda_graphs.py \
        -k "float32 and (full_bucket or padding)" > "$OUT/diag.txt" 2>&1
      grep -E "^E |Error|passed|failed|warn" "$OUT/diag.txt" | cut -c1-300 | head -24 ;;
    attn)
      timeout ${T_ATTN:-90} python3 bench/kernel_check.py --skip experts,norms --out "$OUT/attention.jsonl" 2>>"$OUT/bench.log" | cut -c1-400 ;;
    mixed)
      timeout ${T_MIXED:-300} python3 bench/mixed_step.py --model preset:qwen3-30b-a3b --device cuda \
        ${MIXED_ARGS:-} --out "$OUT/mixed.jsonl" 2>>"$OUT/mixed.log" | cut -c1-600
      grep -E "KV|CUDA graphs|scheduler" "$OUT/mixed.log" | cut -c1-900 ;;
    serve)
      then=""
      if [ -d ../../.whl ] || [ -d .whl ]; then  # guidellm and its missing dependencies, carried as wheels
        whl=$( [ -d .whl ] && echo .whl || echo ../../.whl )
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/glsite "$whl"/*.whl 2>&1 | tail -2
        python3 - <<'PY'  # a byte-level tokenizer for guidellm's synthetic prompts (ids 0..255 = bytes, as the preset's)
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import PreTrainedTokenizerFast
from tokenizers.pre_tokenizers import ByteLevel
vocab = {c: i for i, c in enumerate(ByteLevel.alphabet())}
tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=None).save_pretrained("/tmp/bytetok")
PY
        then="PYTHONPATH=/tmp/glsite:$PYTHONPATH python3 -m guidellm run --backend kind=openai_http,target={url},request_format=/v1/completions \
 --profile kind=concurrent,streams=${GL_STREAMS:-64} --constraint kind=max_duration,seconds=${GL_SECONDS:-30} \
 --data kind=synthetic_text,prompt_tokens=256,output_tokens=128 --tokenizer kind=huggingface_auto,model=/tmp/bytetok \
 --output kind=json,path=$OUT/guidellm.json --output kind=console --disable-progress"
      fi
      timeout ${T_SERVE:-420} python3 bench/serve_load.py --model preset:qwen3-30b-a3b --device cuda \
        --loads ${LOADS:-256x1024x256:36,128x32x128:24,1x32x128:12,1x1024x16:12} --duration-s ${DURATION:-30} --then-timeout-s ${GL_TIMEOUT:-60} \
        --logs-out "$OUT/serve" --out "$OUT/serve_load.jsonl" --then "$then" 2>>"$OUT/serve_bench.log" | cut -c1-900
      [ -f "$OUT/serve/then.log" ] && tail -c 2500 "$OUT/serve/then.log"
      grep -E "KV|CUDA graphs|scheduler" "$OUT/serve_bench.log" | cut -c1-900; tail -5 "$OUT/serve/serve.log" ;;
  esac
  echo "== $stage: $(( $(date +%s) - t0 )) s"
done
