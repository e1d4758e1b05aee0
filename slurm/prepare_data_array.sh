#!/bin/bash
# Data preparation as a SLURM pipeline: tokenizer job -> job array of prepare.py shards ->
# merge job (--dependency=afterok), all with slurm/prepare_data.sbatch. Run from the repo root:
#
#   NUM_SHARDS=64 INPUTS="/shared/cc/crawl-data" DATA_DIR=/shared/data/cc \
#       bash slurm/prepare_data_array.sh [extra sbatch options, e.g. --partition=cpu]
#
# Prints the merge job id last (on its own line), to chain training:
#   merge=$(bash slurm/prepare_data_array.sh | tail -1)
#   sbatch --dependency=afterok:$merge slurm/codistill.sbatch
#
# Variables (besides those of prepare_data.sbatch: INPUTS, DATA_DIR, NUM_GROUPS, VOCAB_SIZE,
# EXTRA_ARGS, ACTIVATE, ...):
#   NUM_SHARDS        array size = slices of the sorted input list (default 4)
#   TOKENIZER         an existing SentencePiece model to share; empty: a first job trains one
#   TOKENIZER_INPUTS  what that job reads (default: INPUTS; a few files are enough - it reads
#                     all of them, then trains on at most --tokenizer_sample_mb)
#   SHARDS_DIR        per-task outputs (default DATA_DIR.shards; removed by nothing: delete it
#                     after the merge)
#   WAIT=1            submit the merge job with --wait (returns when the pipeline is done)
set -euo pipefail
: "${NUM_SHARDS:=4}"
: "${DATA_DIR:=data/prepared}"
: "${SHARDS_DIR:=${DATA_DIR}.shards}"
: "${TOKENIZER:=}"
: "${TOKENIZER_INPUTS:=${INPUTS:-}}"
: "${WAIT:=0}"
[[ -f slurm/prepare_data.sbatch ]] || { echo "ERROR: run from the repository root" >&2; exit 2; }
[[ "$NUM_SHARDS" =~ ^[1-9][0-9]*$ ]] || { echo "ERROR: NUM_SHARDS=$NUM_SHARDS is not a positive integer" >&2; exit 2; }
SHARDS_DIR="$(realpath -m "$SHARDS_DIR")"
DATA_DIR="$(realpath -m "$DATA_DIR")"
export DATA_DIR SHARDS_DIR NUM_SHARDS
dep=()
if [[ -z "$TOKENIZER" ]]; then
    tok=$(INPUTS="$TOKENIZER_INPUTS" STAGE=tokenizer OVERWRITE=1 \
          sbatch --parsable --job-name=prep_tokenizer --export=ALL "$@" slurm/prepare_data.sbatch)
    echo "tokenizer job: $tok" >&2
    TOKENIZER="$SHARDS_DIR/tokenizer/tokenizer.model"
    dep=(--dependency=afterok:${tok%%;*})
fi
TOKENIZER="$(realpath -m "$TOKENIZER")"
export TOKENIZER
arr=$(STAGE=shard sbatch --parsable --job-name=prep_shard --array=0-$((NUM_SHARDS - 1)) \
      --export=ALL "${dep[@]}" "$@" slurm/prepare_data.sbatch)
echo "shard array job: $arr (tasks 0-$((NUM_SHARDS - 1)), outputs in $SHARDS_DIR)" >&2
wait_opt=()
[[ "$WAIT" == 1 ]] && wait_opt=(--wait)
# afterok on an array job id waits for every task and needs all of them to succeed
merge=$(STAGE=merge sbatch --parsable --job-name=prep_merge --cpus-per-task=1 \
        --dependency=afterok:${arr%%;*} --export=ALL "${wait_opt[@]}" "$@" slurm/prepare_data.sbatch)
echo "merge job: $merge -> $DATA_DIR" >&2
echo "${merge%%;*}"
