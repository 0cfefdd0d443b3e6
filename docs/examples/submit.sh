#!/bin/bash
# Submit the participant array and the group job that waits for all of it.
#   BIDS_DIR=/data/ds OUTPUT_DIR=/data/out SIF=/images/brainage-xai.sif ./submit.sh
# MAX_PARALLEL (default 50) caps how many participant tasks run at once.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

: "${BIDS_DIR:?set BIDS_DIR}" "${OUTPUT_DIR:?set OUTPUT_DIR}" "${SIF:?set SIF}"
export BIDS_DIR OUTPUT_DIR SIF

n=$(find "$BIDS_DIR" -mindepth 1 -maxdepth 1 -type d -name 'sub-*' | wc -l)
if [ "$n" -eq 0 ]; then
    echo "no sub-* folders in $BIDS_DIR" >&2
    exit 66
fi

# --parsable prints "<jobid>[;<cluster>]"
array=$(sbatch --parsable --array="1-${n}%${MAX_PARALLEL:-50}" --export=ALL "$here/participant.sbatch")
array=${array%%;*}
# afterok on an array job: start only when every task has exited 0.
group=$(sbatch --parsable --dependency="afterok:${array}" --kill-on-invalid-dep=yes \
    --export=ALL "$here/group.sbatch")
echo "participant array ${array} (${n} subjects), group job ${group%%;*}"
