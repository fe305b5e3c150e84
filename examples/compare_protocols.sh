#!/usr/bin/env bash
# Compare the leak-free protocol with the paper's (leaky) one on the same folder and the same budget.
#
# What it shows: the command-line workflow of docs/protocols.md end to end.
#   1. `ecg-inception-audit` accounts for every file (duplicates, crop boxes) and writes audit.json;
#   2. `ecg-inception-split` writes one split manifest per protocol (same seed), printing per-split counts and,
#      for `paper`, how many duplicate groups cross splits;
#   3. `ecg-inception-train` trains once per protocol (experiment=leakfree / experiment=paper, which differ only
#      in data.protocol and the tags), each reusing its manifest via data.split_manifest; any extra arguments
#      are Hydra overrides given to BOTH runs, so the budget is the same;
#   4. the test metrics of the two metrics.json files are printed side by side.
#
# Usage:
#   examples/compare_protocols.sh DATA_ROOT [OUT_DIR] [hydra overrides...]
#
#   DATA_ROOT  a class-folder image set, e.g. the Mendeley folder as downloaded
#   OUT_DIR    where everything goes (default: ./compare_protocols); must not hold earlier results
#   SEED       environment variable: split and training seed (default 0)
#
# Both experiments default to ImageNet weights (model.pretrained=tv_in1k, downloaded once) and up to 200
# epochs. Offline, add model.pretrained_file=/path/to/inception_v3_tv_in1k.pth. A CPU smoke test (minutes,
# numbers meaningless):
#   examples/compare_protocols.sh /path/to/mendeley /tmp/cmp model.pretrained=false model/unfreeze=all \
#       model.aux_logits=false data.image_size=75 data.num_workers=0 trainer.max_epochs=1
set -euo pipefail

# shellcheck source=examples/_args.sh
source "$(dirname "$0")/_args.sh"
parse_example_args ./compare_protocols "$@"
OUT=$DIR
SEED=${SEED:-0}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
for protocol in leakfree paper; do
  if [ -e "$OUT/$protocol/run/metrics.json" ]; then
    echo "compare_protocols: $OUT/$protocol/run already holds a result; pick another OUT_DIR" >&2
    exit 2
  fi
done

echo "== audit: $ROOT"
ecg-inception-audit "$ROOT" --json "$OUT/audit.json"

for protocol in leakfree paper; do
  echo
  echo "== split: protocol $protocol, seed $SEED"
  ecg-inception-split "$ROOT" --protocol "$protocol" --seed "$SEED" --out "$OUT/$protocol/splits.csv"
done

for protocol in leakfree paper; do
  echo
  echo "== train: experiment=$protocol"
  ecg-inception-train "experiment=$protocol" "seed=$SEED" "data.root=$ROOT" \
    "data.split_manifest=$OUT/$protocol/splits.csv" "hydra.run.dir=$OUT/$protocol/run" \
    "paths.log_dir=$OUT/logs" "${OVERRIDES[@]}"
done

echo
python3 - "$OUT/leakfree/run/metrics.json" "$OUT/paper/run/metrics.json" <<'PY'
import json
import sys

runs = [json.load(open(path, encoding="utf-8")) for path in sys.argv[1:]]
names = [f"{m['protocol']}{' (LEAKY)' if m['leaky'] else ''}" for m in runs]


def cell(value):
    return "-" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))


rows = [
    ("test files", [sum(m["counts"]["test"].values()) for m in runs]),
    ("train files", [sum(m["counts"]["train"].values()) for m in runs]),
    ("epochs", [m["epochs"] for m in runs]),
    ("val/acc_best", [m["logged"].get("val/acc_best") for m in runs]),
]
for key in ("accuracy", "f1_macro", "precision_macro", "recall_macro", "auroc_macro", "loss"):
    rows.append((f"test {key}", [m["test"][key] for m in runs]))
for label in runs[0]["labels"]:
    rows.append((f"test recall {label}", [m["test"]["per_class"][label]["recall"] for m in runs]))

width = max(len(name) for name, _ in rows)
print(f"{'':{width}}  " + "  ".join(f"{n:>18}" for n in names))
for name, values in rows:
    print(f"{name:{width}}  " + "  ".join(f"{cell(v):>18}" for v in values))
if any(m["leaky"] for m in runs):
    print("\nLEAKY: the paper protocol puts copies of one ECG in train and test; its test score overstates")
    print("accuracy on unseen ECGs. Report the leak-free number.")
PY
