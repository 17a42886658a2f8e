#!/usr/bin/env bash
# The fine-tuning figures of docs/finetuning.md: gatortron-tiny pretrained with its shipped recipe,
# then each gatortron-tiny fine-tuning recipe (NCBI disease and the four synthetic clinical tasks)
# from random weights and from that pretraining, all at once, each evaluated on its test split.
#
#   bash docs/scripts/measure_finetune.sh RUNS_DIR [COMMAND...]     # COMMAND defaults to: megaforge
#   bash docs/scripts/measure_finetune.sh runs/measure python3 -m toolkit
#
# Prints each run's test metrics; RUNS_DIR/<recipe>-<random|pretrained>/eval_test.json keeps them.
# The ten fine-tunes run in parallel with one CPU thread each (a 16-core machine or a GPU; on a
# 2-core laptop run them one by one instead).
set -u
runs=${1:?usage: measure_finetune.sh RUNS_DIR [COMMAND...]}
shift
if [ $# -eq 0 ]; then set -- megaforge; fi
mkdir -p "$runs"
"$@" train gatortron-tiny trainer.run_dir="$runs/gatortron-tiny" logging.wandb.enabled=false -q \
    > "$runs/gatortron-tiny.log" 2>&1 || { echo "pretraining failed:"; tail -5 "$runs/gatortron-tiny.log"; exit 1; }
for task in ncbi-disease clinical-ner clinical-note-type clinical-nli clinical-sts; do
    for start in random pretrained; do
        run="$runs/gatortron-tiny-$task-$start"
        init=()
        if [ "$start" = pretrained ]; then init=(checkpoint.init_from="$runs/gatortron-tiny"); fi
        ( "$@" finetune "gatortron-tiny-$task" trainer.run_dir="$run" trainer.num_threads=1 "${init[@]}" -q \
              > "$run.log" 2>&1 \
          && "$@" evaluate "$run" --split test >> "$run.log" 2>&1 ) &
    done
done
wait
for log in "$runs"/gatortron-tiny-*.log; do
    echo "$(basename "$log" .log): $(grep -h '^evaluated' "$log" || tail -1 "$log")"
done
