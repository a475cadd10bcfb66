#!/usr/bin/env bash
# The three stages on embedded data, offline on CPU (`make quickstart` runs it for the shapes):
#   embedded shards -> stage 0 CLIP || stage 1 autoencoder (in parallel, one core each; stage 1 takes both cores
#                                                          once stage 0 is done)
#   -> latents and text features cached once (scripts/encode_latents.py)
#   -> stage 2 text-to-image latent diffusion on the cache (both cores) -> pictures + evaluation table.
#     bash scripts/pipeline.sh                 # shapes: experiments quickstart_{clip,autoencoder,ldm}
#     SET=digits bash scripts/pipeline.sh      # digits: experiments digits_{clip,autoencoder,ldm}
# Environment: PY (python of the venv), SET (shapes | digits), OUT (output root, default outputs/<set>),
#              CFG (guidance scale of the evaluation, default 1.5 for shapes, 2 for digits), N (images per prompt, default 12),
#              SAMPLER (of the evaluation, default dpmpp_2m_sde),
#              FIGURES (optional: copy the pictures there, e.g. docs/images for the README),
#              SEED (optional: the seed of all three stages, default the configs' 42; repeat the recipe with others
#              to see its run-to-run spread).
set -euo pipefail
PY=${PY:-.venv/bin/python}
SET=${SET:-shapes}
case "$SET" in
    shapes) PREFIX=quickstart; DATA=shapes32; CONTEXT=32; GUIDANCE=1.5 ;;   # CONTEXT: text tokens per caption in stage 2
    digits) PREFIX=digits; DATA=digits32; CONTEXT=77; GUIDANCE=2 ;;         # GUIDANCE: measured best (BENCHMARKS.md)
    *) echo "SET=$SET: choose shapes or digits" >&2; exit 2 ;;
esac
OUT=${OUT:-outputs/$SET}
CFG=${CFG:-$GUIDANCE}
SAMPLER=${SAMPLER:-dpmpp_2m_sde}   # SDE-DPM-Solver++(2M); dpmpp_2m is its deterministic (ODE) form
N=${N:-12}
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
start=$(date +%s)
stamp() { echo "[$SET $(( $(date +%s) - start ))s] $*"; }
# Hydra runs of this script land in $OUT/<stage>, without re-printing the whole config.
run_args() { echo "hydra.run.dir=$OUT/$1 extras.print_config=false logger=csv${SEED:+ seed=$SEED}"; }

stamp "building the embedded $SET shards (32 px; kept if they exist)"
$PY scripts/prepare_data.py data=$DATA hydra.run.dir="$OUT/prepare_data" hydra.output_subdir=null

stamp "stage 0 (CLIP) and stage 1 (autoencoder) in parallel, one core each; logs in $OUT/*.log"
OMP_NUM_THREADS=1 $PY train.py experiment=${PREFIX}_clip $(run_args clip) > "$OUT/clip.log" 2>&1 &
clip_pid=$!
OMP_NUM_THREADS=1 $PY train.py experiment=${PREFIX}_autoencoder $(run_args autoencoder) > "$OUT/autoencoder.log" 2>&1 &
ae_pid=$!
status=0
wait $clip_pid || { echo "CLIP stage failed; see $OUT/clip.log"; tail -20 "$OUT/clip.log"; status=1; }
# Stage 0 is the shorter: its core goes to stage 1, which widens its torch threads on SIGUSR2 (ldm/utils/cpu_threads.py).
if jobs -rp | grep -qx "$ae_pid" && kill -USR2 "$ae_pid" 2>/dev/null; then
    stamp "stage 0 done; stage 1 continues on both cores"
fi
wait $ae_pid || { echo "autoencoder stage failed; see $OUT/autoencoder.log"; tail -20 "$OUT/autoencoder.log"; status=1; }
[ $status -eq 0 ] || exit 1
CLIP_CKPT="$OUT/clip/checkpoints/last.ckpt"
AE_CKPT="$OUT/autoencoder/checkpoints/last.ckpt"
stamp "stages 0 and 1 done: $CLIP_CKPT, $AE_CKPT"

# Stage 2 sees every image several times: encoding the images and captions once (latent posterior moments and
# the frozen text tower's output) is cheaper than running both encoders at every step.
stamp "caching the autoencoder latents and the text tower's features of every caption"
TEXT_ENCODER="{arch: ldm-tiny-clip, pretrained: '$CLIP_CKPT', layer: last, context_length: $CONTEXT}"
$PY scripts/encode_latents.py ckpt="$AE_CKPT" data=$DATA text_encoder="$TEXT_ENCODER" out="$OUT/latents" \
    progress=false force=true
shards() { local n; n=$(ls "$OUT/latents/$1"-*.tar | wc -l); printf "%s/%s-{000000..%06d}.tar" "$OUT/latents" "$1" $((n - 1)); }

stamp "stage 2: latent diffusion conditioned on the stage-0 text tower, on the cached latents and text"
$PY train.py experiment=${PREFIX}_ldm $(run_args ldm) data=${DATA}_latents \
    data.train_shards="'$(shards train)'" data.val_shards="'$(shards val)'" \
    model.first_stage_config.ckpt_path="$AE_CKPT" model.cond_stage_config.pretrained="$CLIP_CKPT" \
    model.cond_stage_config.context_length=$CONTEXT
LDM_CKPT="$OUT/ldm/checkpoints/last.ckpt"

stamp "pictures: autoencoder reconstructions and training curves"
$PY scripts/plot_reconstructions.py --ckpt "$AE_CKPT" --shards "data/$DATA/val-000000.tar" \
    --out "$OUT/reconstructions.png"
$PY scripts/plot_training.py --run "$OUT/clip" --run "$OUT/autoencoder" --run "$OUT/ldm" \
    --out "$OUT/training_curves.png"

stamp "evaluation: $N images per $SET prompt, $SAMPLER 20 steps, guidance $CFG"
$PY scripts/evaluate.py ckpt="$LDM_CKPT" prompt_set=$SET n_per_prompt=$N sampler=$SAMPLER steps=20 \
    cfg_scale=$CFG clip_ckpt="$CLIP_CKPT" real_shards="data/$DATA/val-000000.tar" out="$OUT/eval"
if [ "$SET" = shapes ]; then  # what the default prompts do not ask: size, grid cell and background (docs/evaluation.md)
    stamp "evaluation of the detailed prompts: 4 images per prompt naming size, grid cell and background too"
    $PY scripts/evaluate.py ckpt="$LDM_CKPT" prompt_set=shapes_detailed n_per_prompt=4 sampler=$SAMPLER steps=20 \
        cfg_scale=$CFG out="$OUT/eval_detailed"
fi

if [ -n "${FIGURES:-}" ]; then
    mkdir -p "$FIGURES"
    cp "$OUT/eval/samples.png" "$FIGURES/${PREFIX}_samples.png"
    cp "$OUT/reconstructions.png" "$FIGURES/${PREFIX}_reconstructions.png"
    cp "$OUT/training_curves.png" "$FIGURES/${PREFIX}_training_curves.png"
    stamp "copied the pictures to $FIGURES"
fi

stamp "done in $(( $(date +%s) - start ))s"
echo "Reconstruction grid: $OUT/reconstructions.png"
echo "Training curves:     $OUT/training_curves.png"
echo "Text-to-image grid:  $OUT/eval/samples.png"
if [ "$SET" = shapes ]; then echo "Detailed prompts:    $OUT/eval_detailed/metrics.md"; fi
