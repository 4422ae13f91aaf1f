#!/usr/bin/env bash
# Resolution / schedule sweep of the shipped recipe on a lent GPU (device tool),
# on the pack made by benchmarks/pack_for_device.py (train+val of the seed-42
# split, 224 px WebP). Runs "SIZE EPOCHS SEED [extra flags]" configs in order
# while time is left; each run's history comes back in $OUT. Decisions on val only.
#   device run:  bash benchmarks/device_sweep.sh   (carry .gpu)
#   ENSEMBLE=1 bash benchmarks/device_sweep.sh "224 8 42" "224 8 43" "224 8 44"   # + their mean
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/sweep-out}; mkdir -p "$OUT"
DEADLINE=${DEADLINE:-430}   # seconds after which no new run starts
PACK=${PACK:-.gpu}; DATA=$PACK/pbc
if [ -f "$PACK/pbc.tgz" ]; then mkdir -p /tmp/pack && tar xzf "$PACK/pbc.tgz" -C /tmp/pack && DATA=/tmp/pack/pbc; fi
nvidia-smi -L 2>/dev/null; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"
configs=("${@}")
[ ${#configs[@]} -gt 0 ] || configs=("224 8 42" "128 8 42" "224 16 42" "224 8 43" "128 8 43")
for c in "${configs[@]}"; do
  set -- $c; size=$1 epochs=$2 seed=$3; shift 3
  name="r${size}-e${epochs}-s${seed}$(echo "$*" | tr -cd 'a-z0-9.')"
  if [ "$SECONDS" -ge "$DEADLINE" ]; then echo "skip $name: out of time"; continue; fi
  echo "== $name (t=${SECONDS}s)"
  timeout $((DEADLINE + 120 - SECONDS)) python3 -m bloodcell.cli train --model lite0-recipe \
    --data "$DATA" --split-file "$PACK/split.csv" --weights "$PACK/lite0.safetensors" \
    --cache-dir /tmp/bc-cache --image-size "$size" --epochs "$epochs" --seed "$seed" "$@" \
    --out "/tmp/runs/$name" --no-progress >"$OUT/$name.log" 2>&1
  echo "rc=$? epoch val_acc seconds:"
  grep -E 'epoch [0-9]+: ' "$OUT/$name.log" | sed -E 's/.*epoch ([0-9]+): .*"val_accuracy": ([0-9.]+).*"seconds": ([0-9.]+).*/  \1 \2 \3/'
  tail -2 "$OUT/$name.log" | grep -i error
done
if [ "${ENSEMBLE:-0}" = 1 ]; then  # val accuracy of the mean of all finished runs
  runs=(/tmp/runs/*/model.json); runs=("${runs[@]%/model.json}")
  BLOODCELL_CACHE=/tmp/bc-cache python3 benchmarks/tta_val.py "${runs[0]}" --data "$DATA" \
    --ensemble "${runs[@]:1}" 2>&1 | grep -v " done$" | tee "$OUT/ensemble.txt"
fi
echo "total ${SECONDS}s"
