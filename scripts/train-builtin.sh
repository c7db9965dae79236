#!/usr/bin/env bash
# Makes the built-in model (weights/builtin/model.safetensors) from scratch, seeded, with the project's own
# commands: conversations made here, the motion auto-encoder, its decoder sharpened, its latents scaled, its
# canonical code set, data preparation, flow matching, the decoder's mouth (and optionally DPO).
# docs/training.md §6 says what each step is for and what it measured.
#
#   scripts/train-builtin.sh RUN_DIR            # then: cp RUN_DIR/mouth/model.safetensors weights/builtin/
#                                               # (the last line it prints names the file)
#
# Needs `make install-train` (espeak-ng, the face mesh, matplotlib's public-domain portrait). Step sizes can be
# changed through the environment (SEEDS, CONVERSATIONS, CONV_SECONDS, AE_STEPS, AE_UNTIL, DECODER_UNTIL,
# DECODER_STEPS, LATENT_SCALE, FM_STEPS, FM_SEED, MOUTH_STEPS, DPO_STEPS). Every step resumes or skips what an
# earlier run of the same command finished.
set -euo pipefail

RUN=${1:?usage: scripts/train-builtin.sh RUN_DIR}
PY=${PYTHON:-.venv/bin/python}
CLI=("$PY" -m avatar_forcing.cli)
SEEDS=${SEEDS:-"1 2 3"}
CONVERSATIONS=${CONVERSATIONS:-12}
SECONDS_EACH=${CONV_SECONDS:-20}
AE_STEPS=${AE_STEPS:-2500}
AE_UNTIL=${AE_UNTIL:-3000}
DECODER_UNTIL=${DECODER_UNTIL:-1750}
DECODER_STEPS=${DECODER_STEPS:-4500}
LATENT_SCALE=${LATENT_SCALE:-10}
FM_STEPS=${FM_STEPS:-15000}
FM_SEED=${FM_SEED:-1}
MOUTH_STEPS=${MOUTH_STEPS:-2500}
DPO_STEPS=${DPO_STEPS:-0}
mkdir -p "$RUN"
stamp() { echo "[$(date +%H:%M:%S)] $*"; }

# 1. Dyadic conversations: rigged looks of the packaged public-domain portrait, espeak-ng voices.
for seed in $SEEDS; do
    if [ ! -f "$RUN/convs/s$seed/manifest.jsonl" ]; then
        stamp "conversations, seed $seed"
        "${CLI[@]}" data conversations --out "$RUN/convs/s$seed" --count "$CONVERSATIONS" --seconds "$SECONDS_EACH" \
            --size 128 --seed "$seed"
    fi
done
# One manifest over all of them (paths relative to it).
"$PY" - "$RUN/convs" <<'EOF'
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
rows = []
for manifest in sorted(root.glob("s*/manifest.jsonl")):
    for line in manifest.read_text().splitlines():
        row = json.loads(line)
        rows.append({k: (f"{manifest.parent.name}/{v}" if k.endswith("_video") else v) for k, v in row.items()})
(root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
EOF

# 2. The motion auto-encoder from random weights (the flow heads start still), on pairs the face rig renders on
# the fly from the conversations' looks, with the driving frame's expression as numbers: the first motion
# magnitudes learn to equal them (--code-weight, with their own learning rate), a share of the pairs decode the
# known expression (--teacher), and the error where the frames differ counts extra (--moving-weight).
# a) 2500 steps with half the pairs teacher-forced; b) the same run resumed under a longer schedule, fewer forced
# pairs and more weight on structure, stopped at 3000. Why each: docs/training.md §6.
if [ ! -f "$RUN/encoder/model.safetensors" ]; then
    stamp "auto-encoder, $AE_STEPS steps"
    AE=("${CLI[@]}" train autoencoder --rig-looks 24 --out "$RUN/ae" --config builtin --weights none --device cpu
        --batch 8 --warmup 100 --ema 0.995 --code-weight 10 --motion-lr-scale 10 --moving-weight 1.0
        --save-every 250 --seed 0 --no-progress)
    "${AE[@]}" --steps "$AE_STEPS" --lr 1e-3 --teacher 0.5
    "${AE[@]}" --steps 5500 --until "$AE_UNTIL" --lr 5e-4 --teacher 0.25 --ssim-weight 1.0 --gradient-weight 1.0
    mkdir -p "$RUN/encoder" && cp "$RUN/ae/model.safetensors" "$RUN/encoder/"
fi
# c) From here the motion latents are fixed (the encoder and the motion directions).

# 3. The decoder alone, on from the encoder (--freeze-motion: every motion latent stays as it is), its finest level
# learning faster: the frames sharpen. Run as it was made: 1750 steps of a 3000-step schedule, then on under a
# 4500-step one (DECODER_UNTIL / DECODER_STEPS).
if [ ! -f "$RUN/decoder/done" ]; then
    DEC=("${CLI[@]}" train autoencoder --rig-looks 24 --out "$RUN/decoder" --config builtin
         --weights "$RUN/encoder/model.safetensors" --freeze-motion --finest-lr-scale 5 --device cpu --batch 8
         --lr 5e-4 --warmup 50 --ema 0.995 --moving-weight 1.0 --ssim-weight 1.0 --gradient-weight 1.0
         --save-every 250 --seed 1 --no-progress)
    stamp "decoder, to step $DECODER_UNTIL of 3000, then $DECODER_STEPS"
    "${DEC[@]}" --steps 3000 --until "$DECODER_UNTIL"
    "${DEC[@]}" --steps "$DECODER_STEPS"
    touch "$RUN/decoder/done"
fi

# 4. Motion latents about 10x larger, frames unchanged (an exact reparametrisation): this auto-encoder's latents
# vary by about 0.04 per dimension against flow matching's unit noise, so the sampler could not resolve the
# motion and the transformer's heads barely moved (docs/training.md §6).
"${CLI[@]}" train scale-latents --weights "$RUN/decoder/model.safetensors" --config builtin \
    --factor "$LATENT_SCALE" --out "$RUN/autoencoder.safetensors"
# 4b. The canonical code (the `canonical_code` extension): the 24 training looks' mean appearance and motion
# codes, which every served portrait is animated in, so a face the auto-encoder never saw keeps its shape and
# talks (model/canonical.py). Set after the scaling: the codes are the scaled ones.
"${CLI[@]}" train canonical-code --weights "$RUN/autoencoder.safetensors" --config builtin --rig-looks 24 \
    --out "$RUN/autoencoder.safetensors"
# 4c. The user-expression maps (the `user_expression` extension): the user's webcam is read by the face mesh and
# turned into the latent the encoder gives a training look making the same expression, because this encoder,
# which knows one face, barely reads a real person's (model/user_expression.py). Fitted on 100 rig renders of
# each training look.
"${CLI[@]}" train user-expression --weights "$RUN/autoencoder.safetensors" --config builtin --rig-looks 24 \
    --renders 100 --seed 0 --out "$RUN/autoencoder.safetensors"

# 5. Training shards: motion latents of both sides and the (frozen, seeded) audio features. The conversations are
# face crops already, so every frame is encoded whole (no detection). The user's side is read as the server reads
# a webcam, here by the face mesh and the maps of 4c, so the transformer learns from the latents it is served.
stamp "prepare"
"${CLI[@]}" data prepare --manifest "$RUN/convs/manifest.jsonl" --out "$RUN/shards" --config builtin \
    --weights "$RUN/autoencoder.safetensors" --device cpu --whole-frames --no-progress

# 6. Diffusion-forcing flow matching. Sampling uses only the audio-only, user-only and unconditional branches, so
# each gets 30 % of the windows (the reference's 10 % left the user branch, listening, barely trained). Its
# export carries the auto-encoder it started from: it is the built-in model. Seed 1: of seeds 0 and 1 on the same
# shards, it answered more of the held-out smiles (weights/builtin/MODEL_CARD.md).
stamp "flow matching, $FM_STEPS steps"
"${CLI[@]}" train transformer --data "$RUN/shards" --out "$RUN/fm" --config builtin \
    --weights "$RUN/autoencoder.safetensors" --device cpu --steps "$FM_STEPS" --batch 16 --lr 1e-3 --warmup 200 \
    --branch-dropout 0.3 0.3 0.3 --save-every 1000 --seed "$FM_SEED" --no-progress
MODEL="$RUN/fm/model.safetensors"

# 6b. The decoder once more, its mouth first (--mouth-weight 10: the L1 on the box around the lips counts ten
# times): the decoder drew an open rig mouth at about 40 % of its width, without the dark interior, and the
# transformer can only generate what the decoder draws (benchmarks/builtin_mouth.py). --freeze-motion keeps every
# motion latent, so the transformer trained on them stays valid; only the decoder's synthesis changes.
if [ "$MOUTH_STEPS" -gt 0 ]; then
    if [ ! -f "$RUN/mouth/done" ]; then
        stamp "decoder, mouth first, $MOUTH_STEPS steps"
        "${CLI[@]}" train autoencoder --rig-looks 24 --out "$RUN/mouth" --config builtin --weights "$MODEL" \
            --freeze-motion --finest-lr-scale 5 --device cpu --batch 8 --lr 5e-4 --warmup 50 --ema 0.995 \
            --moving-weight 1.0 --ssim-weight 1.0 --gradient-weight 1.0 --mouth-weight 10 --save-every 250 \
            --seed 2 --no-progress --steps "$MOUTH_STEPS"
        touch "$RUN/mouth/done"
    fi
    MODEL="$RUN/mouth/model.safetensors"
fi

# 7. Label-free DPO: off by default (DPO_STEPS=200 turns it on). As measured so far it made the face drift
# within 20 s (docs/training.md §6).
if [ "$DPO_STEPS" -gt 0 ]; then
    stamp "DPO, $DPO_STEPS steps"
    "${CLI[@]}" train dpo --data "$RUN/shards" --out "$RUN/dpo" --config builtin --weights "$MODEL" \
        --device cpu --steps "$DPO_STEPS" --batch 16 --lr 1e-4 --warmup 20 --ema 0.99 --save-every 100 --seed 0 \
        --no-progress
    MODEL="$RUN/dpo/model.safetensors"
fi
stamp "done: $MODEL"
