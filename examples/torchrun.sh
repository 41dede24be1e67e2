#!/usr/bin/env bash
# One node, 8 GPUs, started by torchrun: each process reads RANK / WORLD_SIZE / LOCAL_RANK,
# takes its share of the plan and uses GPU LOCAL_RANK. No process group or server is needed:
# the output folder is the only shared state. Many nodes: add --nnodes/--node-rank/--rdzv-* as usual
# and put OUT on a filesystem every node sees. The number of images is the manifest's: demo.csv has
# 5 rows whose num_images column says 2, so 10 images.
set -euo pipefail
MANIFEST=${1:-manifests/demo.csv}
OUT=${2:-/shared/cxr_synth/demo}

# A rank whose share is done waits for the others (torchrun would stop every rank as soon as one
# exited non-zero), so all ranks exit 0 together when the run is complete. If a rank dies, torchrun
# stops the launch; what was written is kept and the line after finishes it.
if ! torchrun --standalone --nproc-per-node=8 -m cxrgen generate "$MANIFEST" --out "$OUT"; then
    echo "cxrgen: the launch stopped early (see above); finishing what is left in one process" >&2
fi

# Outside torchrun cxrgen is no rank: it drives the whole plan with every local GPU. status exits 0
# when the run is complete (nothing to do).
cxrgen status "$OUT" > /dev/null || cxrgen resume "$OUT"
