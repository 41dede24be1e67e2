#!/usr/bin/env bash
# From a real label table to a synthetic set whose positives a classifier confirmed, in two commands:
#   cxrgen manifest from-labels LABELS --target N -o m.csv     (every finding reaches N positives, real + synthetic)
#   cxrgen generate m.csv --verify                              (each image remade until its positive labels show)
# The verifier is torchxrayvision's CheXpert-only DenseNet (densenet121-res224-chex): the generator learned from
# MIMIC-CXR, so a judge that never saw MIMIC-CXR is the more independent one; `cxrgen evaluate` keeps its own,
# different default, so its adherence figures are not circular. Needs `pip install "cxrgen[evaluate]"`.
#
#   examples/verified_dataset.sh CheXpert-v1.0-small/train.csv 500 aug_out
set -euo pipefail
LABELS=${1:?usage: examples/verified_dataset.sh LABELS.csv [TARGET] [OUT]}
TARGET=${2:-500}
OUT=${3:-verified_out}
MANIFEST="${OUT%/}.csv"

# 0. once, where there is internet: the model, the text encoder and the verifier's weights (28 MB)
cxrgen download --verifier

# 1. a class-balanced manifest of report-style prompts whose 0/1 label columns agree with the prompts
cxrgen manifest from-labels "$LABELS" --target "$TARGET" -o "$MANIFEST"

# 2. every image with a positive label is scored from its file and made again (next attempt's seed, up to
#    --max-attempts 8) until each positive label reaches --min-score 0.5; an image whose attempts all fail keeps
#    its best one with verified = false. Killed? Run the same line again, or `cxrgen resume "$OUT"`.
cxrgen generate "$MANIFEST" --out "$OUT" --verify

# per finding: planned, verified, acceptance at the first attempt and overall, attempts spent, and the findings
# the model rarely draws at this threshold (rephrase their prompts, or lower --min-score for a new run)
cxrgen status "$OUT"

# only the confirmed images, as an imagefolder that `datasets` loads (or --format webdataset)
cxrgen export "$OUT" --format imagefolder --verified-only --to "${OUT%/}_verified"
