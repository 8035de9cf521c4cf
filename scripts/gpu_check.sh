#!/usr/bin/env bash
# GPU smoke check (issue 14 class 12), ≤ 8 minutes on one GPU: every method trains a few steps on CUDA in
# bf16-mixed with SmolLM2-135M, evaluates, and writes its checkpoint and adapter; one run's checkpoint is
# re-evaluated through `python -m reprpo_pl.eval` and its adapter loaded by plain peft. Writes a JSON
# summary (one record per check: exit code, seconds, the error line) to $OUT/gpu_check.json, or
# gpu_check.json here when $OUT is unset.
#
#   bash scripts/gpu_check.sh            # from the repository root, after `make install` (a CUDA torch)
#   ACCELERATOR=cpu PRECISION=32-true MODEL=tiny_random bash scripts/gpu_check.sh   # the script itself, on a CPU
set -uo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-.}
WORK=$(mktemp -d)
RECORDS="$WORK/records.jsonl"
METHODS=(dpo innerdpo innerpo mse prefvec projbp projgrad rank topk)
# a few optimizer steps, two small targets: the check is that everything runs on CUDA, not what it learns
ACCELERATOR=${ACCELERATOR:-gpu}
PRECISION=${PRECISION:-bf16-mixed}
MODEL=${MODEL:-smollm2_135m}
FAST=("model=$MODEL" "trainer.accelerator=$ACCELERATOR" "trainer.precision=$PRECISION" data.n_train=16 data.batch_size=4
      eval.n_samples=8 callbacks.generations.max_new_tokens=8
      "dataset.targets=[{name:math,shift:in_domain},{name:math_easy,shift:difficulty}]")

record() {  # name, exit code, seconds, stderr file
  "$PY" - "$@" >>"$RECORDS" <<'EOF'
import json, sys
name, code, seconds, err = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
lines = open(err, errors="replace").read().splitlines()
error = next((l for l in reversed(lines) if l.startswith("error:") or "Error" in l), lines[-1] if lines and code else "")
print(json.dumps({"check": name, "exit_code": code, "seconds": round(seconds, 1), "error": error[:500]}))
EOF
}

run_check() {  # name, command...
  local name=$1; shift
  local start=$SECONDS
  timeout 120 "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"
  record "$name" $? $((SECONDS - start)) "$WORK/$name.err"
  echo "$name: exit $(tail -1 "$RECORDS" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["exit_code"])')"
}

DEVICE=$([ "$ACCELERATOR" = cpu ] && echo cpu || echo cuda)
"$PY" -c "import torch; assert '$DEVICE' == 'cpu' or torch.cuda.is_available(), 'no CUDA device'" \
  || { echo '{"error": "no CUDA device"}' >"$OUT/gpu_check.json"; exit 1; }

for method in "${METHODS[@]}"; do
  run_check "train_$method" "$PY" -m reprpo_pl.train "method=$method" "${FAST[@]}" "hydra.run.dir=$WORK/runs/$method"
done
run_check eval_from_checkpoint "$PY" -m reprpo_pl.eval "ckpt_path=$WORK/runs/innerdpo" eval.n_samples=8 \
  "targets=[math]" "out_dir=$WORK/runs/innerdpo/eval/check"
run_check adapter_with_peft "$PY" - <<EOF
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from reprpo_pl.models.loading import load_base_model
from omegaconf import OmegaConf
from hydra import compose, initialize_config_module
with initialize_config_module("reprpo_pl.conf", version_base=None):
    model_cfg = compose("train", overrides=["model=$MODEL"]).model
base, _ = load_base_model(model_cfg)  # the tiny model is built, SmolLM2 read from its converted folder
model = PeftModel.from_pretrained(base.to("$DEVICE"), "$WORK/runs/innerdpo/adapter")
out = model.generate(torch.tensor([[1, 2, 3]], device="$DEVICE"), max_new_tokens=4, min_new_tokens=4)
assert out.device.type == "$DEVICE" and out.shape[1] == 7, out
EOF

"$PY" - "$RECORDS" "$OUT/gpu_check.json" "$WORK/runs" "$PRECISION" "$MODEL" <<'EOF'
import json, pathlib, sys
import torch
records = [json.loads(l) for l in open(sys.argv[1])]
results = {p.parent.name: {k: json.loads(p.read_text()).get(k) for k in ("objective", "timing")}
           for p in pathlib.Path(sys.argv[3]).glob("*/results.json")}
summary = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__, "precision": sys.argv[4], "model": sys.argv[5],
           "passed": sum(r["exit_code"] == 0 for r in records), "failed": [r["check"] for r in records if r["exit_code"]],
           "checks": records, "results": results}
pathlib.Path(sys.argv[2]).write_text(json.dumps(summary, indent=2) + "\n")
print(f"{summary['passed']} of {len(records)} checks passed; failed: {summary['failed'] or 'none'} → {sys.argv[2]}")
sys.exit(1 if summary["failed"] else 0)
EOF
