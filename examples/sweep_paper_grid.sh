#!/usr/bin/env bash
# The seed paper's Keras grid search as one Hydra multirun, every job on the same split.
#
# What it shows:
#   - `hparams_search=paper_grid`: batch size 16/32/64 x lr 0.001/0.01/0.1 x dropout 0.3/0.5 x unfrozen tail
#     keras_minus3/keras_minus10/blocks1 = 54 jobs (Hydra's basic sweeper, one job after another);
#   - one shared split manifest: it is written ONCE here with `ecg-inception-split` and handed to every job with
#     data.split_manifest, so all grid points train, validate and test on exactly the same files. (Without it,
#     paper_grid's `shared_split_manifest` makes the first job write <sweep dir>/splits.csv and the others reuse it.)
#   - reading the results: one run directory per job (<sweep dir>/<job number>/ with metrics.json and
#     .hydra/overrides.yaml); the table is ranked by val/acc_best (the sweep's optimized_metric). Pick by
#     validation, then read that job's test score; never pick by test.
#
# Usage:
#   examples/sweep_paper_grid.sh DATA_ROOT [SWEEP_DIR] [hydra overrides...]
#
#   EXPERIMENT  environment variable: paper (default, the seed's leaky protocol) or leakfree
#   SEED        environment variable: split and training seed (default 0)
#
# The full grid is 54 trainings of up to 200 epochs each: a GPU job (add trainer=gpu). Overrides given here
# apply to every job, and an override of a swept key replaces that axis of the grid, e.g. a 2-job CPU smoke
# test (numbers meaningless):
#   examples/sweep_paper_grid.sh /path/to/mendeley /tmp/grid model.pretrained=false model.aux_logits=false \
#       data.image_size=75 data.num_workers=0 trainer.max_epochs=1 data.batch_size=8 \
#       model.optimizer.lr=0.001 model/unfreeze=all model.drop_rate=0.3,0.5
set -euo pipefail

# shellcheck source=examples/_args.sh
source "$(dirname "$0")/_args.sh"
parse_example_args ./paper_grid "$@"
SWEEP=$DIR
EXPERIMENT=${EXPERIMENT:-paper}
SEED=${SEED:-0}
mkdir -p "$SWEEP"
SWEEP=$(cd "$SWEEP" && pwd)
if compgen -G "$SWEEP/[0-9]*/metrics.json" >/dev/null; then
  echo "sweep_paper_grid: $SWEEP already holds sweep results; pick another SWEEP_DIR" >&2
  exit 2
fi

echo "== split: protocol $EXPERIMENT, seed $SEED -> $SWEEP/splits.csv"
ecg-inception-split "$ROOT" --protocol "$EXPERIMENT" --seed "$SEED" --out "$SWEEP/splits.csv"

echo
echo "== multirun: experiment=$EXPERIMENT hparams_search=paper_grid"
ecg-inception-train -m "experiment=$EXPERIMENT" hparams_search=paper_grid "seed=$SEED" "data.root=$ROOT" \
  "data.split_manifest=$SWEEP/splits.csv" "hydra.sweep.dir=$SWEEP" "paths.log_dir=$SWEEP/logs" "${OVERRIDES[@]}"

echo
python3 - "$SWEEP" <<'PY'
import json
import sys
from pathlib import Path

rows = []
for run in sorted(Path(sys.argv[1]).glob("[0-9]*"), key=lambda p: int(p.name) if p.name.isdigit() else -1):
    metrics_file = run / "metrics.json"
    if not run.name.isdigit() or not metrics_file.is_file():
        continue
    m = json.loads(metrics_file.read_text(encoding="utf-8"))
    overrides_file = run / ".hydra" / "overrides.yaml"
    swept = []
    if overrides_file.is_file():
        for line in overrides_file.read_text(encoding="utf-8").splitlines():
            item = line.lstrip("- ").strip()
            if item.split("=", 1)[0] in ("data.batch_size", "model.optimizer.lr", "model.drop_rate", "model/unfreeze"):
                swept.append(item)
    rows.append((m["logged"].get("val/acc_best") or 0.0, m["test"]["accuracy"], int(run.name), " ".join(swept), m))

if not rows:
    sys.exit("no finished jobs found")
rows.sort(key=lambda r: (-r[0], r[2]))
leaky = rows[0][4]["leaky"]
print(f"{len(rows)} jobs, protocol {rows[0][4]['protocol']}{' (LEAKY)' if leaky else ''}, ranked by val/acc_best")
print(f"{'job':>4}  {'val/acc_best':>12}  {'test acc':>8}  overrides")
for val_best, test_acc, job, swept, _ in rows:
    print(f"{job:>4}  {val_best:12.4f}  {test_acc:8.4f}  {swept}")
best = rows[0]
print(f"\nselected by validation: job {best[2]} ({best[3]}); its test accuracy {best[1]:.4f}")
if leaky:
    print("LEAKY protocol: copies of one ECG sit in train and test; this test score overstates accuracy.")
PY
