#!/usr/bin/env bash
# Mutation testing (mutmut 3) of the core code against the test file that owns it; slow, so not in CI.
#
#   bash tests/mutate.sh modules   # scheduler, samplers, loss, conditions, EMA  <- tests/test_modules.py (~2 min on 2 cores)
#   bash tests/mutate.sh train     # epoch loop, optimizer, checkpoints  <- test_train.py, test_checkpoints.py, test_run_integrity.py (~20 min)
#   bash tests/mutate.sh library   # pipeline, metrics, classifier, dataset splits/transform/cache, config checks (~20 min)
#                                  #   <- their own test files, without the golden test (docs/testing.md)
#
# It works on a copy in a temporary folder, never on this tree. mutmut 3 skips decorated functions, so the
# copy applies @torch.no_grad() after the class bodies instead (same behaviour) to get them mutated too.
# MUTATE_CHILDREN sets mutmut's --max-children (default 2).
set -euo pipefail
deselect=""
target="${1:?usage: bash tests/mutate.sh modules|train|library}"
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
source = open("pipeline.py").read()
for name in ("encode(", "decode(", "sample("):
    source = source.replace("    @torch.no_grad()\n    def " + name, "    def " + name)
source += "".join(f"\nPipeline.{name} = torch.no_grad()(Pipeline.{name})" for name in ("encode", "decode", "sample")) + "\n"
open("pipeline.py", "w").write(source)
source = open("classifier.py").read().replace("@torch.no_grad()\ndef classify(", "def classify(")
open("classifier.py", "w").write(source + "\nclassify = torch.no_grad()(classify)\n")
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
  library)
    sources="pipeline.py metrics.py classifier.py dataset.py config.py"
    tests="tests/test_pipeline.py tests/test_metrics.py tests/test_classifier.py tests/test_dataset.py tests/test_config.py"
    tests+=" tests/test_bad_input.py tests/test_modules.py"
    # Tests that run a script in a fresh interpreter elsewhere: mutmut's copy cannot run there (no setup.cfg).
    for name in odd_names_are_skipped_and_reported_without_traceback encrypted_zip_from_the_command_line_has_no_traceback \
                killed_demo_build_takes_its_workers_along_and_is_cleaned_up sigterm_stops_a_demo_build_at_once_and_leaves_nothing \
                images_too_large_for_the_memory_limit_are_refused_before_decoding; do
      deselect+=" tests/test_bad_input.py::test_$name"
    done
    # The two yardstick trainings (10 s each) would run for every dataset mutant: over the time budget.
    for name in classifier_learns_the_tiny_dataset yardstick_reads_reconstructions_of_an_undertrained_vae_like_real_slices; do
      deselect+=" tests/test_classifier.py::test_$name"
    done
    # Left out: figure and caption writers (save_reconstructions, save_sample_grids, describe_reconstructions),
    # the classifier's architecture and training loop (train_classifier: only the two trainings test it),
    # the run-folder code whose tests train a run per mutant (load_run, snapshots, check_run_outputs, ...),
    # and the checkpoint functions, which the train target covers.
    names=("pipeline.x_validate__mutmut_*" "pipeline.x_normalise_slices__mutmut_*" "pipeline.xǁLatentDatasetǁ*"
           "pipeline.x_encode_split__mutmut_*" "pipeline.x_set_latent_scale__mutmut_*" "pipeline.x_vae_validation_scores__mutmut_*"
           "pipeline.x_unet_validation_loss__mutmut_*" "pipeline.x_check_sampling_options__mutmut_*"
           "pipeline.x_sampling_options__mutmut_*" "pipeline.x_batch_generator__mutmut_*" "pipeline.xǁPipelineǁ*"
           "pipeline.x_check_trained_on__mutmut_*" "pipeline.x_fingerprint__mutmut_*" "pipeline.x_build_unet__mutmut_*"
           "metrics.x_*"
           "classifier.x_gaussian_blur__mutmut_*" "classifier.x_checkerboard__mutmut_*" "classifier.x_with_decoder_artefacts__mutmut_*"
           "classifier.x_classify__mutmut_*" "classifier.x_accuracy__mutmut_*"
           "classifier.x_position_balancing_weights__mutmut_*" "classifier.x_check_position_balance__mutmut_*"
           "classifier.x_classifier_fingerprint__mutmut_*" "classifier.x_train_yardstick__mutmut_*"
           "classifier.x_cached_yardstick__mutmut_*" "classifier.x_load_or_train_yardstick__mutmut_*"
           "classifier.x_slice_position_only_predictions__mutmut_*" "classifier.x_classifier_controls__mutmut_*"
           "dataset.x_make_splits__mutmut_*" "dataset.x_check_disjoint__mutmut_*" "dataset.x_save_splits__mutmut_*"
           "dataset.x_load_splits__mutmut_*" "dataset.x__damaged_splits__mutmut_*" "dataset.x_scans_in_both__mutmut_*"
           "dataset.x_scans_in_both_classes__mutmut_*" "dataset.xǁDatasetIndexǁ*" "dataset.x_prepare_image__mutmut_*"
           "dataset.x_to_model_range__mutmut_*" "dataset.xǁSliceDatasetǁ*" "dataset.x__cache_key__mutmut_*"
           "dataset.x_decode_images__mutmut_*" "dataset.x__read_cache__mutmut_*" "dataset.x__decode_one__mutmut_*"
           "dataset.x_load_split_datasets__mutmut_*"
           "config.x__finite__mutmut_*" "config.x__data_rules__mutmut_*" "config.x__model_rules__mutmut_*"
           "config.x__scheduler_rules__mutmut_*" "config.x__stage_rules__mutmut_*" "config.x__run_rules__mutmut_*"
           "config.x__problems__mutmut_*" "config.x_check_fields__mutmut_*" "config.x_check_batches__mutmut_*"
           "config.x_parse_value__mutmut_*" "config.x__from_json_value__mutmut_*" "config.x_config_from_dict__mutmut_*"
           "config.x_collect_overrides__mutmut_*" "config.x_apply_overrides__mutmut_*") ;;
  *) echo "error: unknown target $target: use modules, train or library" >&2; exit 2 ;;
esac
# setup.cfg lists take one value per indented line.
{
  echo "[mutmut]"
  echo "source_paths = ${sources// /$'\n    '}"
  echo "also_copy = $(ls -- *.py | tr '\n' ' ' | sed 's/ $//; s/ /\n    /g')"
  echo "pytest_add_cli_args_test_selection = ${tests// /$'\n    '}"
  echo "pytest_add_cli_args = -p no:cacheprovider"
  for node in ${deselect:-}; do echo "    --deselect=$node"; done
} > setup.cfg
OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 mutmut run --max-children "${MUTATE_CHILDREN:-2}" "${names[@]}" > mutmut.log 2>&1 || true
mutmut results --all true | grep -E "$(printf '%s|' "${names[@]}" | sed 's/\*//g; s/|$//')" | awk -F': ' '{print $2}' | sort | uniq -c
echo "survivors (inspect each with: cd $work && mutmut show NAME):"
mutmut results | grep -E "$(printf '%s|' "${names[@]}" | sed 's/\*//g; s/|$//')" || true
