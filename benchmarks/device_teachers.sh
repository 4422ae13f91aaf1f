#!/usr/bin/env bash
# Teachers for distillation (issue 14) on a lent GPU (device tool): EfficientNet-Lite2
# with the shipped recipe at 224 px on the pack of benchmarks/pack_for_device.py
# (--variants lite2), then scripts/crossfit_splits.py's two folds. Each run's log and
# its predictions.csv come back in $OUT:
#   full:  train split -> predictions on train + val (`--split all`); its val accuracy
#          is the bigger-backbone figure
#   fold-a / fold-b: half of train each -> predictions on the other half (`--split test`
#          of the fold manifests), i.e. teacher answers on images the teacher never saw
#   full2: the full run again with seed 43 (seed spread; predictions on val only)
#   device run:  bash benchmarks/device_teachers.sh   (carry .gpu/p14)
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/teach-out}; mkdir -p "$OUT"
PACK=${PACK:-.gpu/p14}; DEADLINE=${DEADLINE:-400}; EPOCHS=${EPOCHS:-8}; SIZE=${SIZE:-224}
RUNS=${RUNS:-"full fold-a fold-b full2"}; EXTRA=${EXTRA:-}
mkdir -p /tmp/pack && tar xzf "$PACK/pbc.tgz" -C /tmp/pack; DATA=/tmp/pack/pbc
nvidia-smi -L 2>/dev/null; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"
for name in $RUNS; do
  if [ "$SECONDS" -ge "$DEADLINE" ]; then echo "skip $name: out of time"; continue; fi
  split=$PACK/$name.csv; pred=test; seed=42
  [ "$name" = full ] && { split=$PACK/split.csv; pred=all; }
  [ "$name" = full2 ] && { split=$PACK/split.csv; pred=val; seed=43; }
  echo "== $name (t=${SECONDS}s)"
  python3 -m bloodcell.cli train --model lite2-recipe --data "$DATA" --split-file "$split" \
    --weights "$PACK/lite2.safetensors" --cache-dir /tmp/bc-cache --image-size "$SIZE" \
    --epochs "$EPOCHS" --seed $seed --out "/tmp/runs/$name" --no-progress $EXTRA >"$OUT/$name.log" 2>&1
  grep -E 'epoch [0-9]+: ' "$OUT/$name.log" | sed -E 's/.*epoch ([0-9]+): .*"val_accuracy": ([0-9.]+).*"seconds": ([0-9.]+).*/  \1 \2 \3/'
  python3 -m bloodcell.cli evaluate --model "/tmp/runs/$name" --data "$DATA" --split-file "$split" \
    --split $pred --out "/tmp/runs/$name/ev" --cache-dir /tmp/bc-cache --no-progress >>"$OUT/$name.log" 2>&1
  cp "/tmp/runs/$name/ev/predictions.csv" "$OUT/$name.pred.csv" && grep -i "accuracy" "/tmp/runs/$name/ev/metrics.json" | head -1
  if [ "$name" = full ]; then  # the teacher itself, fp16 (a returned file holds at most 16 MiB)
    cp "/tmp/runs/full/model.json" "$OUT/teacher.json"
    python3 -c "from safetensors.torch import load_file, save_file; import sys; \
save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(sys.argv[1]).items()}, sys.argv[2])" \
      /tmp/runs/full/model.safetensors "$OUT/teacher.safetensors"
  fi
done
echo "total ${SECONDS}s"
