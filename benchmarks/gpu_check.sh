#!/usr/bin/env bash
# The GPU throughput check: megaforge's training step vs. Hugging Face GPT2LMHeadModel on the
# gpt-1.3b recipe (24 layers, 2048 hidden, 16 heads, vocab 50257 padded to 50304), seq 2048, bf16,
# one GPU, in well under 6 minutes. Run it from the repository root of a source tree:
#
#     bash benchmarks/gpu_check.sh            # prints everything, the tables included, to stdout
#
# Rows, each one process with its own time limit (a hang or a crash costs that row only):
#   1. bf16 eager, micro-batch 4, then one more step of each model under torch.profiler (top ops)
#   2. bf16 eager, micro-batch 4, megaforge with model.fused_cross_entropy=true, model.fused_qkv=true
#      and model.attention_backend=cudnn (cuDNN's fused attention on Hopper)
#   3. bf16 compiled, micro-batch 8, megaforge with trainer.compile_scope=layers, the fused loss and
#      fused q/k/v
#   4. bf16 compiled (torch.compile of both whole models), micro-batch 8, only if the time left is
#      more than row 3 took (plus a margin)
# each with WARMUP untimed + STEPS timed steps per model. At the end the rows of all runs are printed
# again as one markdown table (for docs/performance.md).
#
# The GPU image has torch and transformers but not omegaconf and antlr4-python3-runtime: their
# wheels are installed into /tmp/site from benchmarks/wheels/ (ignored by git; make them on a machine
# with network access, see docs/performance.md, and send the folder along with the tree).
#
# Knobs (environment): PYTHON (python3), SITE (/tmp/site), BUDGET_S (330: seconds for the whole
# script), WARMUP (3), STEPS (5), DEVICE (cuda), RECIPE (gpt-1.3b), SEQ (2048), EXTRA (more
# arguments for gpt_throughput.py, e.g. shape overrides for a smoke test on CPU), ATTENTION (cudnn: row
# 2's model.attention_backend; flash or math for a smoke test on CPU).
set -u

PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
BUDGET_S=${BUDGET_S:-330}
WARMUP=${WARMUP:-3}
STEPS=${STEPS:-5}
DEVICE=${DEVICE:-cuda}
RECIPE=${RECIPE:-gpt-1.3b}
SEQ=${SEQ:-2048}
EXTRA=${EXTRA:-}
ATTENTION=${ATTENTION:-cudnn}
START=$SECONDS
LOG=$(mktemp /tmp/gpu_check.XXXXXX.log)

cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

left() { echo $((BUDGET_S - (SECONDS - START))); }

echo "== gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $PWD, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total --format=csv
else
    echo "nvidia-smi: not found"
fi

echo "== Python packages missing from the image → $SITE"
if ls benchmarks/wheels/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        benchmarks/wheels/*.whl 2>&1 || echo "pip install of benchmarks/wheels failed (rc $?)"
else
    echo "benchmarks/wheels/*.whl: none here; relying on what is installed"
fi

echo "== versions and imports"
"$PYTHON" - <<'EOF' 2>&1
import sys
import torch
import transformers
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"available {torch.cuda.is_available()}), transformers {transformers.__version__}")
try:
    import antlr4
    import omegaconf
    print(f"omegaconf {omegaconf.__version__} from {omegaconf.__file__}; antlr4 {antlr4.__file__}")
    import toolkit.training.run  # noqa: F401 - the whole chain the benchmark imports (config → omegaconf)
    import toolkit.training.trainer  # noqa: F401
    from transformers import GPT2LMHeadModel  # noqa: F401
    print("imports ok: toolkit.training.run, toolkit.training.trainer, transformers.GPT2LMHeadModel")
except Exception as e:  # the rows below will fail the same way; say why once
    print(f"IMPORT FAILED: {type(e).__name__}: {e}")
EOF

# one benchmark invocation: row NAME, time cap CAP (s), minimum time worth starting MIN (s), args...
run_row() {
    local name=$1 cap=$2 min=$3
    shift 3
    local budget
    budget=$(left)
    if [ "$budget" -lt "$min" ]; then
        echo "== $name: skipped, ${budget}s of the ${BUDGET_S}s budget left (needs ${min}s)"
        return 0
    fi
    [ "$cap" -gt "$budget" ] && cap=$budget
    echo "== $name (limit ${cap}s; $((SECONDS - START))s elapsed)"
    local t0=$SECONDS
    # shellcheck disable=SC2086 # EXTRA is a list of words
    timeout -k 5 "$cap" "$PYTHON" -u benchmarks/gpt_throughput.py --device "$DEVICE" --recipe "$RECIPE" \
        --seq "$SEQ" --precisions bf16 --warmup "$WARMUP" --steps "$STEPS" "$@" $EXTRA 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    LAST_S=$((SECONDS - t0))
    case $rc in
        0) echo "== $name: done in $((SECONDS - t0))s" ;;
        124 | 137) echo "== $name: TIMED OUT after ${cap}s (rows printed above are complete)" ;;
        *) echo "== $name: FAILED (exit $rc) after $((SECONDS - t0))s" ;;
    esac
}

LAST_S=0
run_row "bf16 eager, micro-batch 4, profiled" 100 45 --micro-batch 4 --profile 25
run_row "bf16 eager, micro-batch 4, fused loss + fused qkv + $ATTENTION attention" 90 45 --micro-batch 4 \
    --set model.fused_cross_entropy=true --set model.fused_qkv=true --set model.attention_backend="$ATTENTION"
run_row "bf16 compiled per layer, micro-batch 8, fused loss + fused qkv" 200 120 --micro-batch 8 --compile \
    --set trainer.compile_scope=layers --set model.fused_cross_entropy=true --set model.fused_qkv=true
# the whole-model compile of both: start it only with the time the compiled row above took, and some
need=$((LAST_S + 20))
[ "$need" -lt 120 ] && need=120
run_row "bf16 compiled, micro-batch 8" 200 "$need" --micro-batch 8 --compile

echo
echo "== all rows ($((SECONDS - START))s in all)"
echo "| device | precision | mode | model | micro-batch × seq | tokens/s | MFU | peak memory | s/step | warm-up s | loss first → last |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
grep -E '^\| (cuda|cpu) \|' "$LOG" || echo "(no rows)"
grep -E '^(eager|compiled) ' "$LOG" | sort -u
rm -f "$LOG"
