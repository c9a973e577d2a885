#!/usr/bin/env bash
# Mutation testing (mutmut 3) of the core code against the test file that owns it; slow, so not in CI.
#
#   bash tests/mutate.sh modules   # scheduler, samplers, loss, conditions, EMA  <- tests/test_modules.py (~2 min on 2 cores)
#   bash tests/mutate.sh train     # epoch loop, optimizer, checkpoints  <- test_train.py, test_checkpoints.py, test_run_integrity.py (~20 min)
#
# It works on a copy in a temporary folder, never on this tree. mutmut 3 skips decorated functions, so the
# copy applies @torch.no_grad() after the class bodies instead (same behaviour) to get them mutated too.
set -euo pipefail
target="${1:?usage: bash tests/mutate.sh modules|train}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
(cd "$repo" && tar --exclude=.git --exclude=mutants -cf - .) | tar -xf - -C "$work"
cd "$work"
python -m pip install --quiet --disable-pip-version-check "mutmut>=3.3,<4"
python - <<'EOF'
source = open("modules.py").read()
for name in ("sample_steps", "sample(", "update("):
    source = source.replace("    @torch.no_grad()\n    def " + name, "    def " + name)
source += ("\nNoiseScheduler.sample_steps = torch.no_grad()(NoiseScheduler.sample_steps)"
           "\nNoiseScheduler.sample = torch.no_grad()(NoiseScheduler.sample)\nEMA.update = torch.no_grad()(EMA.update)\n")
open("modules.py", "w").write(source)
EOF
case "$target" in
  modules)
    sources="modules.py"; tests="tests/test_modules.py"
    names=("modules.x_make_betas__mutmut_*" "modules.xǁNoiseSchedulerǁ*" "modules.xǁConditionsǁ*" "modules.xǁEMAǁ*"
           "modules.x_unwrap_model__mutmut_*") ;;
  train)
    sources="train.py pipeline.py utils.py modules.py"; tests="tests/test_train.py tests/test_checkpoints.py tests/test_run_integrity.py"
    names=("train.x_train_one_epoch__mutmut_*" "modules.x_make_optimizer__mutmut_*" "pipeline.x_restore_stage__mutmut_*"
           "train.x_seed_epoch__mutmut_*" "train.x_prepare_for_training__mutmut_*" "train.x_start_stage__mutmut_*"
           "pipeline.x_checkpoint_state__mutmut_*" "pipeline.x_load_stage_checkpoint__mutmut_*"
           "pipeline.x_load_weights__mutmut_*" "utils.x_save_checkpoint__mutmut_*" "utils.x_load_checkpoint__mutmut_*") ;;
  *) echo "error: unknown target $target: use modules or train" >&2; exit 2 ;;
esac
# setup.cfg lists take one value per indented line.
{
  echo "[mutmut]"
  echo "source_paths = ${sources// /$'\n    '}"
  echo "also_copy = $(ls -- *.py | tr '\n' ' ' | sed 's/ $//; s/ /\n    /g')"
  echo "pytest_add_cli_args_test_selection = ${tests// /$'\n    '}"
  echo "pytest_add_cli_args = -p no:cacheprovider"
} > setup.cfg
OMP_NUM_THREADS=1 mutmut run --max-children 2 "${names[@]}" > mutmut.log 2>&1 || true
mutmut results --all true | grep -E "$(printf '%s|' "${names[@]}" | sed 's/\*//g; s/|$//')" | awk -F': ' '{print $2}' | sort | uniq -c
echo "survivors (inspect each with: cd $work && mutmut show NAME):"
mutmut results | grep -E "$(printf '%s|' "${names[@]}" | sed 's/\*//g; s/|$//')" || true
