#!/usr/bin/env bash
# One node, 8 GPUs, started by torchrun: each process reads RANK / WORLD_SIZE / LOCAL_RANK,
# takes its share of the plan and uses GPU LOCAL_RANK. No process group or server is needed:
# the output folder is the only shared state. Many nodes: add --nnodes/--node-rank/--rdzv-* as usual
# and put OUT on a filesystem every node sees.
set -euo pipefail
MANIFEST=${1:-manifests/demo.csv}
OUT=${2:-/shared/cxr_synth/demo}
torchrun --standalone --nproc-per-node=8 -m cxrgen generate "$MANIFEST" --out "$OUT" --num-images 4
# If a rank died: finish with any number of processes (here: this one, all local GPUs).
# cxrgen resume "$OUT"
