#!/usr/bin/env bash
# The main job on the embedded default: build the synthetic espeak corpus (offline, ~2 min on
# 2 cores), train a tiny Hello-Chat from scratch on it (<= 15 min on a 2-core CPU), export the
# run as a model folder and ask that folder about one held-out test-split clip.
# Training prints held-out emotion accuracy, event F1 and WER/CER next to a constant guess's
# scores and writes runs/tiny/{metrics.jsonl,curves.png}; the model folder is models/tiny.
set -euo pipefail
cd "$(dirname "$0")/.."
hellochat data build synth
hellochat train --config configs/tiny.yaml "$@"
hellochat export --run runs/tiny --out models/tiny
# A clip the model never saw, with its true labels printed beside it.
hellochat data clip --split test --index 0 --out runs/tiny/test_clip.wav
# The instructions the corpus trains with (hellochat_jax/data/pipeline.py INSTRUCTIONS); the
# folder's hellochat.json says the model was trained without a system prompt, so none is sent.
hellochat understand --model models/tiny --audio runs/tiny/test_clip.wav --max-new-tokens 40 \
    --prompt "Transcribe the speech." \
    --prompt "What emotion does the speaker express?" \
    --prompt "Which background sounds can you hear?"
