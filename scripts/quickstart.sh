#!/usr/bin/env bash
# The quickstart run by `make quickstart`: embedded data -> CLIP (stage 0) -> autoencoder (stage 1)
# -> latent diffusion (stage 2) -> text-to-image grid -> evaluation table. CPU, offline.
# Environment: PY (python of the venv), OUT (output root, default outputs/quickstart).
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/quickstart}
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
mkdir -p "$OUT"
start=$(date +%s)
stamp() { echo "[quickstart] $(( $(date +%s) - start ))s: $*"; }

stamp "building embedded shards (shapes, 32 px)"
$PY scripts/make_shards.py --source shapes --resolution 32 --num-train 20000 --num-val 512 \
    --out data/shapes32 --skip-existing

stamp "stage 1: autoencoder"
$PY train.py experiment=quickstart_autoencoder hydra.run.dir="$OUT/autoencoder" extras.print_config=false
AE_CKPT="$OUT/autoencoder/checkpoints/last.ckpt"

stamp "reconstructions"
$PY scripts/reconstruct.py --ckpt "$AE_CKPT" --data-dir data/shapes32 --out "$OUT/reconstructions.png"

stamp "done in $(( $(date +%s) - start ))s"
echo "Reconstruction grid: $OUT/reconstructions.png"
