#!/usr/bin/env bash
# One study under the held-out-validation protocol (experiments/README.md), from the repository root:
#   bash experiments/run_study.sh NAME 'SWEEP' ['SWEEP' ...]
# For each SWEEP (Hydra overrides; a value list like rw_head=lin,ca or a preset like sweep=rw_heads is swept):
#   1. tune: seed 0 over the learning-rate grid $LRS, every configuration of the sweep;
#   2. seeds: seeds 1 and 2 of each configuration at the rate its validation split chose (python -m vittm.studies.tune).
# Then the report pools both stages: python -m vittm.studies.report ... --tune optimizer.lr --out experiments/NAME.
# Jobs run two at a time (joblib), one thread each. $BUDGET replaces the common budget below.
set -euo pipefail
name=$1
shift
out=outputs/studies/$name
lrs=${LRS:-2e-3,4e-3,8e-3}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline
read -r -a budget <<< "${BUDGET:-data.train_subset=12800 data.val_subset=2000 trainer.max_epochs=3}"
common=("${budget[@]}" trainer.enable_progress_bar=false logger=none checkpoint.every_n_steps=0
        hydra/launcher=joblib hydra.launcher.n_jobs=2)
python=${PYTHON:-python}
i=0
for spec in "$@"; do
  i=$((i + 1))
  read -r -a sweep <<< "$spec"
  fixed=()  # the spec's single values (not swept, not a preset): stage 2 needs them too
  for arg in "${sweep[@]}"; do [[ $arg == *,* || $arg == sweep=* ]] || fixed+=("$arg"); done
  $python run.py -m "${sweep[@]}" optimizer.lr="$lrs" seed=0 "${common[@]}" hydra.sweep.dir="$out/tune$i"
  $python -m vittm.studies.tune "$out/tune$i" | sed 's/ *#.*//' | while read -r -a best; do
    folder=$(echo "${best[*]}" | tr -c 'A-Za-z0-9.\n-' '_')
    $python run.py -m "${fixed[@]}" "${best[@]}" seed=1,2 "${common[@]}" hydra.sweep.dir="$out/seeds$i/$folder"
  done
done
echo "study $name: jobs under $out"
