#!/usr/bin/env bash
# The zero-shot grid of pipelines/toy/ZEROSHOT.md (issue 27): zegclip at its family defaults on
# unseen pairs never tuned on, 2 seeds, 200 / 1000 / 2000 steps; the same family trained on every
# class; fusion trained on the seen classes and on every class (batch 4, crop 160: zegclip's);
# zegclip transductive (self-training from half-way); the training-free clip baseline (input scale 1
# and 2).
# Every cell 1 thread; JOBS cells at a time; cells already trained are skipped.
#   bash pipelines/toy/zeroshot_grid.sh BASE_RUN OUT   (BASE_RUN: cam + refine with every label)
# env: PAIRS ("ball,boat star,flower ring,kite"), STEPS ("2000 200 1000": zegclip's step counts),
#      CELLS ("zeg fusion trans": which kinds), JOBS (2), CLIPES (clipes),
#      PREFIX (zegclip cell names: PREFIX_<pair>_<steps>_sN, PREFIXfull_..., PREFIXt_<pair>_sN; default
#      z, zfull, t), so a later grid of a changed recipe can share OUT with an earlier one.
# Each run evaluates its own cells (and the clip baseline), per pair, into OUT/eval_<tag>_<pair>.json;
# zeroshot_table.py merges every eval file of OUT.
set -euo pipefail
base=${1:?usage: zeroshot_grid.sh BASE_RUN OUT}; out=${2:?usage: zeroshot_grid.sh BASE_RUN OUT}
jobs=${JOBS:-2}; clipes=${CLIPES:-clipes}; export OMP_NUM_THREADS=1
pairs=${PAIRS:-"ball,boat star,flower ring,kite"}; steps=${STEPS:-"2000 200 1000"}
kinds=${CELLS:-"zeg fusion trans"}
zp=${PREFIX:-z}; fp=${PREFIX:-z}full; tp=${PREFIX:+${PREFIX}t}; tp=${tp:-t}
[ -d "$out" ] || cp -r "$base" "$out"
cells=()
for kind in $kinds; do case $kind in
  zeg) for st in $steps; do for p in $pairs; do for seed in 0 1; do
         cells+=("${zp}_${p/,/_}_${st}_s$seed --arch zegclip --unseen $p --steps $st --seed $seed"); done; done
         for seed in 0 1; do cells+=("${fp}_${st}_s$seed --arch zegclip --steps $st --seed $seed"); done; done ;;
  fusion) for seed in 0 1; do for p in $pairs; do
         cells+=("f_${p/,/_}_s$seed --arch fusion --unseen $p --batch-size 4 --crop-size 160 --seed $seed"); done
         cells+=("ffull_s$seed --arch fusion --batch-size 4 --crop-size 160 --seed $seed"); done ;;
  trans) for seed in 0 1; do for p in $pairs; do
         cells+=("${tp}_${p/,/_}_s$seed --arch zegclip --unseen $p --transductive --seed $seed"); done; done ;;
  *) echo "zeroshot_grid.sh: unknown cell kind '$kind' (zeg, fusion, trans)" >&2; exit 2 ;;
esac; done
"$clipes" train --run "$out" --arch clip --name clipv --device cpu --threads 1 >/dev/null 2>&1 || true
# the training-free baseline also at zegclip's toy-world input scale (its default resolves 2 here)
"$clipes" train --run "$out" --arch clip --name clipv2 --input-scale 2 --device cpu --threads 1 >/dev/null 2>&1 || true
printf '%s\n' "${cells[@]}" | xargs -P "$jobs" -I{} bash -c \
  'set -- {}; n=$1; shift; [ -f "'"$out"'/$n/model.pt" ] || "'"$clipes"'" train --run "'"$out"'" --name $n "$@" --device cpu --threads 1 > "'"$out"'/$n.log" 2>&1'
tag="${zp}-${kinds// /-}"
for p in $pairs; do  # this pair's cells, the cells trained on every class, and the clip baseline
  stages=(--stage clipv --stage clipv2)
  for c in "${cells[@]}"; do n=${c%% *}; case $n in *"${p/,/_}"*|*full_*) stages+=(--stage "$n");; esac; done
  "$clipes" eval --run "$out" --unseen "$p" "${stages[@]}" --json > "$out/eval_${tag}_${p/,/_}.json.tmp"
  mv "$out/eval_${tag}_${p/,/_}.json.tmp" "$out/eval_${tag}_${p/,/_}.json"
done
