#!/usr/bin/env bash
# The main job on the embedded default (<= 25 min on a 2-core CPU): build the synthetic espeak
# corpus, train a tiny Hello-Chat from scratch stage by stage (thinker; speech tokenizer; then
# the corpus's speech tokens; talker; flow; vocoder), write models/tiny, evaluate both halves on
# the held-out test split and answer a held-out spoken question out loud with `hellochat chat`.
# Interrupted, it resumes where it stopped (every stage resumes from its last checkpoint; a
# finished stage is skipped). Extra arguments go to every `hellochat train` (key=value).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=runs/tiny
MODEL=models/tiny
start=$(date +%s)

hellochat data build synth
# The speech tokenizer and the vocoder need only the corpus: they train beside the thinker, in a
# second process (one stage alone leaves a fifth of the 2 cores idle and compiles on one). Their
# progress bars go to $RUN/beside_thinker.log; the thinker's show here.
mkdir -p "$RUN"
(
  # a TERM (the main job stopping) goes on to the running stage, which saves and stops
  stage=
  trap 'kill -TERM "$stage" 2>/dev/null; wait "$stage"; exit 143' TERM
  for name in speech_tokenizer hift; do
    hellochat train --config tiny --stage "$name" --resume "$@" &
    stage=$!
    wait "$stage"
  done
) > "$RUN/beside_thinker.log" 2>&1 &
beside=$!
echo "speech tokenizer, then vocoder: training beside the thinker (progress bars: $RUN/beside_thinker.log)"
hellochat train --config tiny --resume "$@" &
thinker=$!
# Ctrl-C or a TERM stops both sides the SIGTERM-safe way: each saves its step and stops, and
# the job resumes from there when run again.
stop_both() { kill -TERM "$thinker" "$beside" 2>/dev/null || true; wait || true; }
trap 'stop_both; exit 130' INT
trap 'stop_both; exit 143' TERM
trap stop_both EXIT
beside_failed() {
  tr '\r' '\n' < "$RUN/beside_thinker.log" | tail -n 5
  echo "error: the speech tokenizer or vocoder stage failed (log: $RUN/beside_thinker.log)"
  exit 1
}
# Whichever side ends first: a failed speech tokenizer or vocoder stops the job now, not after
# the thinker's last step.
wait -n "$thinker" "$beside" || true
if kill -0 "$thinker" 2>/dev/null; then
  wait "$beside" || beside_failed
fi
wait "$thinker"
wait "$beside" || beside_failed
trap - INT TERM EXIT
tr '\r' '\n' < "$RUN/beside_thinker.log" \
  | awk '/^starting stage/ {if (bar) print bar; bar = ""; print; next} /^train: 100%/ {bar = $0} END {if (bar) print bar}'
# The speech tokenizer goes into the model folder, then fills the corpus's speech tokens
# (cached per tokenizer: skipped when they are already there).
hellochat export --run "$RUN" --out "$MODEL"
hellochat data tokens --model "$MODEL"
hellochat train --config tiny --stage talker --resume "$@"
hellochat train --config tiny --stage flow --resume "$@"
hellochat export --run "$RUN" --out "$MODEL"

hellochat eval understand --model "$MODEL" --num 200 --json "$RUN/eval_understand.json"
hellochat eval tts --model "$MODEL" --num 40 --json "$RUN/eval_tts.json"

# A held-out spoken question, answered out loud (the reply text streams as it is generated).
hellochat data clip --split test --kind question --index 0 --out "$RUN/question.wav"
hellochat chat --model "$MODEL" --audio "$RUN/question.wav" --out-dir "$RUN/replies" --stream
echo "reply audio: $RUN/replies/question.wav (text: $RUN/replies/question.txt)"

python - "$RUN" <<'PY'
import json, sys
run = sys.argv[1]
table = {**json.load(open(f"{run}/eval_understand.json"))["metrics"], **json.load(open(f"{run}/eval_tts.json"))["metrics"]}
print("held-out (test split):")
for name in ("wer", "cer", "emotion_accuracy", "events_f1", "reply_word_accuracy", "tts_wer", "tts_wer_floor",
             "tts_wer_noise", "style_accuracy", "style_accuracy_floor"):
    value = table.get(name)
    print(f"{name} {value:.3f}" if isinstance(value, (int, float)) else f"{name} n/a")
PY
echo "main job: $(( $(date +%s) - start )) s"
