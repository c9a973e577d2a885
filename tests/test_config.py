"""config.py and pipeline.validate: the preset table, overrides, stored configs, and every field checked
before any work, with a message that names the field and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from config import (
    ADDED_FIELDS,
    GUIDANCE_RULE,
    PRESETS,
    apply_overrides,
    check_batches,
    check_fields,
    collect_overrides,
    config_from_dict,
    config_to_dict,
    make_config,
    override_keys,
    parse_value,
    read_config,
)
from modules import SAMPLERS
from pipeline import validate
from utils import UsageError


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_valid_and_round_trips_through_json(name: str) -> None:
    config = make_config(name)
    validate(config)
    assert config.preset == name
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config


def test_presets_are_fresh_objects() -> None:
    first = make_config("demo")
    first.vae_train.epochs = 99
    assert make_config("demo").vae_train.epochs == 3


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(UsageError, match="demo, adni, tiny"):
        make_config("huge")


def test_overrides_parse_every_field_type() -> None:
    config = make_config("demo")
    overrides = collect_overrides(
        [
            "--unet.channels",
            "8,16",
            "--unet.attention_levels=false,true",
            "--vae_train.lr",
            "3e-4",
            "--data.cache_dir",
            "none",
            "--unet_train.bf16",
            "off",
        ]
    )
    apply_overrides(config, overrides)
    assert config.unet.channels == (8, 16) and config.unet.attention_levels == (False, True)
    assert config.vae_train.lr == 3e-4 and config.data.cache_dir is None and config.unet_train.bf16 is False
    assert "unet_train.label_dropout" in override_keys() and "preset" not in override_keys()


@pytest.mark.parametrize(
    "tokens, message",
    [
        (["--vae.nonsense", "3"], "unknown option --vae.nonsense"),
        (["--vae_train.epochs"], "needs a value"),
        (["stray"], "unknown option stray"),
    ],
)
def test_bad_override_tokens(tokens: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        collect_overrides(tokens)


def test_an_unparsable_value_names_the_option() -> None:
    with pytest.raises(UsageError, match="--unet_train.bf16 maybe: expected true or false"):
        apply_overrides(make_config("demo"), {"unet_train.bf16": "maybe"})


def test_stored_configs_ignore_the_retired_unet_latent_channels(tmp_path: Path) -> None:
    """Runs written before latent channels were defined once (in vae) still load."""
    stored = config_to_dict(make_config("demo"))
    stored["unet"]["latent_channels"] = 4
    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert read_config(tmp_path) == make_config("demo")
    stored["unet"]["other"] = 1
    (tmp_path / "config.json").write_text(json.dumps(stored))
    with pytest.raises(UsageError, match="unet.other is unknown"):
        read_config(tmp_path)


@pytest.mark.parametrize("bf16", [True, False])
def test_a_stored_run_bf16_becomes_both_stages_bf16(tmp_path: Path, bf16: bool) -> None:
    """run.bf16 moved to each stage: a run that chose float32 before keeps float32 in both stages."""
    stored = config_to_dict(make_config("demo"))
    del stored["vae_train"]["bf16"], stored["unet_train"]["bf16"]
    stored["run"]["bf16"] = bf16
    (tmp_path / "config.json").write_text(json.dumps(stored))
    config = read_config(tmp_path)
    assert (config.vae_train.bf16, config.unet_train.bf16) == (bf16, bf16)
    assert stored["run"]["bf16"] is bf16, "reading a config must not change the caller's dict"
    stored["run"]["bf16"] = "yes"
    (tmp_path / "config.json").write_text(json.dumps(stored))
    with pytest.raises(UsageError, match="vae_train.bf16"):
        read_config(tmp_path)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("data.image_size", "63", "--data.image_size 63: must be a positive multiple of the VAE's downsampling factor 8"),
        ("data.image_size", "0", "--data.image_size 0"),
        ("data.val_fraction", "0", "--data.val_fraction 0.0: must lie in (0, 1)"),
        ("data.val_fraction", "nan", "--data.val_fraction nan"),
        ("vae.channels", ",", "--vae.channels : must be widths of at least 4"),
        ("unet.channels", "64,0", "--unet.channels 64,0: must be widths of at least 4"),
        ("unet.attention_levels", "true", "--unet.attention_levels true: needs one true/false per unet.channels level (3)"),
        ("unet.head_dim", "24", "--unet.head_dim 24: must split every unet.channels width (128,256,256) into equal heads"),
        ("unet.num_classes", "3", "--unet.num_classes 3: must be 2 (AD, NC)"),
        ("unet.label_tokens", "0", "--unet.label_tokens 0: must be at least 1"),
        ("unet.patch_size", "0", "--unet.patch_size 0: must be at least 1"),
        ("vae.recon_loss", "l3", "--vae.recon_loss l3: must be l1 or mse"),
        ("vae.kl_weight", "-1", "--vae.kl_weight -1.0: must be a finite number, 0 or more"),
        ("vae.fourier_weight", "nan", "--vae.fourier_weight nan: must be a finite number, 0 or more"),
        ("vae.adversarial_weight", "-1", "--vae.adversarial_weight -1.0: must be a finite number, 0 or more"),
        ("vae.adversarial_start", "-1", "--vae.adversarial_start -1: must be 0 or more"),
        ("vae.discriminator_channels", "0", "--vae.discriminator_channels 0: must be at least 1"),
        ("vae_train.betas", "0.5", "--vae_train.betas 0.5: must be two numbers in [0, 1)"),
        ("unet_train.betas", "0.9,1", "--unet_train.betas 0.9,1.0: must be two numbers in [0, 1)"),
        ("scheduler.prediction_type", "x0", "--scheduler.prediction_type x0: must be v or epsilon"),
        ("scheduler.beta_schedule", "quadratic", "--scheduler.beta_schedule quadratic"),
        ("scheduler.beta_start", "0.5", "--scheduler.beta_start 0.5: must be above 0 and below scheduler.beta_end"),
        ("vae_train.epochs", "0", "--vae_train.epochs 0: must be at least 1"),
        ("unet_train.images", "0", "--unet_train.images 0: must be at least 1, or none to count in epochs"),
        ("unet_train.batch_size", "0", "--unet_train.batch_size 0: must be at least 1"),
        ("vae_train.lr", "-1", "--vae_train.lr -1.0: must be a finite number above 0"),
        ("vae_train.lr", "0", "--vae_train.lr 0.0: must be a finite number above 0"),  # a run that never learns
        ("unet_train.lr", "0", "--unet_train.lr 0.0: must be a finite number above 0"),
        ("unet_train.lr", "nan", "--unet_train.lr nan: must be a finite number above 0"),
        ("unet_train.label_dropout", "1", "--unet_train.label_dropout 1.0: must lie in [0, 1)"),
        ("unet_train.ema_decay", "inf", "--unet_train.ema_decay inf"),
        ("run.sample_every", "0", "--run.sample_every 0: must be at least 1"),
        ("run.validate_every", "0", "--run.validate_every 0: must be at least 1"),
        ("run.keep_every", "-1", "--run.keep_every -1: must be 0 (no snapshots) or more"),
        ("run.checkpoint_minutes", "-1", "--run.checkpoint_minutes -1.0: must be a finite number of minutes, 0 or more"),
        ("run.checkpoint_minutes", "inf", "--run.checkpoint_minutes inf"),
        ("run.sample_steps", "1001", "--run.sample_steps 1001: must be 1 to scheduler.num_train_timesteps (1000)"),
        ("run.guidance_scale", "nan", "--run.guidance_scale nan: must be a number from 0 to 30"),
        ("run.guidance_scale", "30.5", "--run.guidance_scale 30.5: must be a number from 0 to 30"),
        ("run.guidance_scale", "-3", "--run.guidance_scale -3.0: must be a number from 0 to 30"),
        ("run.seed", "-1", "--run.seed -1: must be 0 or more"),
    ],
)
def test_every_field_is_range_checked(key: str, value: str, message: str) -> None:
    config = make_config("adni")
    apply_overrides(config, {key: value})
    try:
        validate(config)
    except UsageError as error:
        text = str(error)
    else:
        pytest.fail(f"--{key} {value} was accepted by the config checks; expected: {message}")
    assert text.startswith(message)
    assert "\n" not in text


def test_models_that_do_not_fit_are_found_on_the_meta_device(monkeypatch) -> None:
    """Past the field checks, both models are built and run once on the meta device: whatever a field rule
    misses (here a head size, with the field rules switched off) fails in a second, not after the VAE stage."""
    import pipeline

    monkeypatch.setattr(pipeline, "check_fields", lambda config: None)
    config = make_config("adni")
    config.unet.head_dim = 24
    with pytest.raises(
        UsageError, match=r"the model config does not fit together \(unflatten: .*\): check --vae.\* and --unet.\*"
    ):
        validate(config)
    # An image size that the VAE does not give back (a field rule would refuse it first): the size to choose,
    # the VAE's factor times 2 per UNet level below the first.
    for channels, multiple in (((16, 32), 8), ((8, 8, 8, 8), 32)):
        config = make_config("tiny")
        config.data.image_size, config.unet.channels, config.unet.attention_levels = 63, channels, (False,) * len(channels)
        with pytest.raises(UsageError) as error:
            validate(config)
        assert str(error.value) == (
            "--data.image_size 63 does not survive the VAE's 4x downsampling and the UNet's levels: "
            f"choose a multiple of {multiple}"
        )


def test_an_unknown_sampler_is_refused_naming_the_samplers() -> None:
    config = make_config("tiny")
    config.run.sampler = "euler"
    with pytest.raises(UsageError) as error:
        validate(config)
    assert str(error.value) == f"--run.sampler 'euler': must be one of {', '.join(SAMPLERS)}"


def test_a_slice_conditioned_model_is_checked_with_a_slice_position() -> None:
    config = make_config("tiny")
    config.unet.slice_conditioning = True
    validate(config)


def test_fields_added_later_keep_their_old_meaning_in_old_configs(tmp_path: Path) -> None:
    """A config.json written before a field existed reads with the value it meant then (ADDED_FIELDS),
    not with what the preset says now: an old adni VAE resumes with the betas it began with."""
    stored = config_to_dict(make_config("adni"))
    assert tuple(stored["vae_train"]["betas"]) != ADDED_FIELDS[("vae_train", "betas")]
    for section, name in ADDED_FIELDS:
        del stored[section][name]
    (tmp_path / "config.json").write_text(json.dumps(stored))
    config = read_config(tmp_path)
    for (section, name), old_value in ADDED_FIELDS.items():
        assert getattr(getattr(config, section), name) == old_value


@pytest.mark.parametrize(
    "section, name, value, message",
    [
        ("unet", "channels", "abc", 'config field unet.channels: "abc" is not a list such as [64, 128]'),
        ("unet", "channels", [32, "64"], 'config field unet.channels: "64" is not an integer'),
        ("unet", "channels", [32, 64.5], "config field unet.channels: 64.5 is not an integer"),
        ("data", "image_size", "64", 'config field data.image_size: "64" is not an integer'),
        ("run", "seed", True, "config field run.seed: true is not an integer"),
        ("vae", "kl_weight", "1e-6", 'config field vae.kl_weight: "1e-6" is not a number'),
        ("unet", "slice_conditioning", 1, "config field unet.slice_conditioning: 1 is not true or false"),
        ("data", "cache_dir", 5, "config field data.cache_dir: 5 is not a string"),
        ("run", "guidance_scale", float("nan"), "stored config field run.guidance_scale nan: must be a number from 0 to 30"),
        ("run", "guidance_scale", -3, "stored config field run.guidance_scale -3.0: must be a number from 0 to 30"),
        ("unet", "head_dim", 24, "stored config field unet.head_dim 24: must split every unet.channels width"),
    ],
)
def test_stored_values_go_through_the_command_lines_checks(section: str, name: str, value: object, message: str) -> None:
    """A value read from config.json or a checkpoint is trusted no more than a typed one: its JSON type
    must be the field's (no "abc" for widths, no 64.5 silently cut to 64) and its value in range."""
    stored = json.loads(json.dumps(config_to_dict(make_config("demo"))))
    stored[section][name] = value
    with pytest.raises(UsageError) as error:
        config_from_dict(stored)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_stored_whole_numbers_written_as_floats_still_read() -> None:
    stored = config_to_dict(make_config("demo"))
    stored["unet"]["channels"], stored["data"]["image_size"], stored["run"]["guidance_scale"] = [16.0, 32, 64, 128], 64.0, 2
    config = config_from_dict(stored)
    assert config.unet.channels == (16, 32, 64, 128) and config.data.image_size == 64 and config.run.guidance_scale == 2.0
    assert all(type(width) is int for width in config.unet.channels) and type(config.data.image_size) is int


def test_a_batch_larger_than_the_training_split_is_refused() -> None:
    config = make_config("tiny")
    config.vae_train.batch_size, config.unet_train.batch_size = 40, 21
    check_batches(config, 40, ("vae", "unet"))  # one step per epoch, on one process
    with pytest.raises(UsageError) as error:
        check_batches(config, 40, ("vae", "unet"), world_size=2)
    assert str(error.value) == (
        "--vae_train.batch_size 40 x 2 processes is larger than the training split (40 images): an epoch would train "
        "zero steps; lower --batch-size to at most 20 or add training images"
    )
    check_batches(config, 40, ("unet",), world_size=1)
    with pytest.raises(UsageError, match=r"^--unet_train.batch_size 21 x 2 processes is larger"):
        check_batches(config, 40, ("unet",), world_size=2)
    with pytest.raises(UsageError) as error:
        check_batches(config, 39, ("vae", "unet"))
    assert str(error.value) == (
        "--vae_train.batch_size 40 is larger than the training split (39 images): an epoch would train "
        "zero steps; lower --batch-size to at most 39 or add training images"
    )


# Each rule's edge: the last value it takes (accepted) and the first it refuses, in the tiny preset.
EDGES_ACCEPTED = {
    "data.image_size": ["8"],
    "data.val_fraction": ["0.999"],
    "data.split_seed": ["0"],
    "vae.adversarial_start": ["0"],
    "vae.channels": ["4"],
    "unet.channels": ["4,4"],
    "vae.in_channels": ["1"],
    "vae.latent_channels": ["1"],
    "vae.num_res_blocks": ["1"],
    "unet.num_res_blocks": ["1"],
    "unet.context_dim": ["1"],
    "unet.head_dim": ["1", "64"],
    "scheduler.prediction_type": ["v", "epsilon"],
    "unet.label_tokens": ["1"],
    "unet.patch_size": ["1"],
    "vae.discriminator_channels": ["1"],
    "vae.recon_loss": ["mse", "l1"],
    "vae.kl_weight": ["0"],
    "vae.ssim_weight": ["0"],
    "vae.fourier_weight": ["0"],
    "vae.adversarial_weight": ["0"],
    "scheduler.min_snr_gamma": ["0"],
    "scheduler.clip_sample": ["0"],
    "unet.dropout": ["0", "0.99"],
    "scheduler.num_train_timesteps": ["100000"],
    "scheduler.beta_schedule": ["linear", "scaled_linear", "cosine"],
    "vae_train.epochs": ["1"],
    "unet_train.images": ["none", "1"],
    "vae_train.batch_size": ["1"],
    "unet_train.lr": ["1e-12"],
    "vae_train.betas": ["0,0"],
    "unet_train.weight_decay": ["0"],
    "vae_train.warmup_steps": ["0"],
    "unet_train.min_lr_ratio": ["0", "1"],
    "vae_train.grad_clip": ["1e-6"],
    "unet_train.label_dropout": ["0"],
    "unet_train.ema_decay": ["0", "0.9999"],
    "run.seed": ["0", str(2**63 - 1)],
    "run.compile": ["none", "full", "regional", "reduce-overhead"],
    "run.log_every": ["1"],
    "run.sample_every": ["1"],
    "run.validate_every": ["1"],
    "run.grid_samples": ["1"],
    "run.keep_every": ["0"],
    "run.checkpoint_minutes": ["0"],
    "run.sample_steps": ["1", "1000"],
    "run.guidance_scale": ["0", "30"],
}


def test_each_rules_edge_value_is_accepted() -> None:
    for key, values in EDGES_ACCEPTED.items():
        for value in values:
            config = make_config("tiny")
            apply_overrides(config, {key: value})
            try:
                check_fields(config)
            except UsageError as error:
                pytest.fail(f"--{key} {value} lies inside its range but was refused: {error}")
    config = make_config("tiny")
    apply_overrides(config, {"scheduler.num_train_timesteps": "1", "run.sample_steps": "1"})
    check_fields(config)
    for channels, head_dim in (("5,5", "8"), ("16,16", "6")):  # one head of 5; two heads of 8 (16 // 6 = 2 heads)
        config = make_config("tiny")
        apply_overrides(config, {"unet.channels": channels, "unet.head_dim": head_dim})
        check_fields(config)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("data.image_size", "4", "--data.image_size 4: must be a positive multiple of the VAE's downsampling factor 4"),
        ("data.val_fraction", "1", "--data.val_fraction 1.0: must lie in (0, 1)"),
        ("data.split_seed", "-1", "--data.split_seed -1: must be 0 or more"),
        ("data.data_dir", "", "--data.data_dir : must name the dataset folder"),
        ("vae.channels", "3", "--vae.channels 3: must be widths of at least 4, e.g. 32,64,128"),
        ("vae.adversarial_start", "-1", "--vae.adversarial_start -1: must be 0 or more (VAE steps)"),
        ("unet.head_dim", "0", "--unet.head_dim 0: must be at least 1"),
        ("unet.head_dim", "10", "--unet.head_dim 10: must split every unet.channels width (16,32) into equal heads, e.g. 32"),
        ("scheduler.beta_schedule", "quadratic", "--scheduler.beta_schedule quadratic: must be linear, scaled_linear or cosine"),
        ("scheduler.prediction_type", "x0", "--scheduler.prediction_type x0: must be v or epsilon"),
        ("vae.in_channels", "0", "--vae.in_channels 0: must be at least 1"),
        ("vae.latent_channels", "0", "--vae.latent_channels 0: must be at least 1"),
        ("vae.num_res_blocks", "0", "--vae.num_res_blocks 0: must be at least 1"),
        ("unet.num_res_blocks", "0", "--unet.num_res_blocks 0: must be at least 1"),
        ("unet.context_dim", "0", "--unet.context_dim 0: must be at least 1"),
        ("vae.ssim_weight", "-1", "--vae.ssim_weight -1.0: must be a finite number, 0 or more"),
        ("vae.kl_weight", "inf", "--vae.kl_weight inf: must be a finite number, 0 or more"),
        ("scheduler.min_snr_gamma", "-1", "--scheduler.min_snr_gamma -1.0: must be a finite number, 0 or more"),
        ("scheduler.clip_sample", "nan", "--scheduler.clip_sample nan: must be a finite number, 0 or more"),
        ("unet.dropout", "1", "--unet.dropout 1.0: must lie in [0, 1)"),
        ("scheduler.num_train_timesteps", "0", "--scheduler.num_train_timesteps 0: must be 1 to 100000"),
        ("scheduler.num_train_timesteps", "100001", "--scheduler.num_train_timesteps 100001: must be 1 to 100000"),
        (
            "scheduler.beta_start",
            "0",
            "--scheduler.beta_start 0.0: must be above 0 and below scheduler.beta_end (0.0195), which must be below 1",
        ),
        (
            "scheduler.beta_end",
            "1",
            "--scheduler.beta_start 0.0015: must be above 0 and below scheduler.beta_end (1.0), which must be below 1",
        ),
        (
            "scheduler.beta_end",
            "0.0015",
            "--scheduler.beta_start 0.0015: must be above 0 and below scheduler.beta_end (0.0015), which must be below 1",
        ),
        ("unet_train.images", "0", "--unet_train.images 0: must be at least 1, or none to count in epochs"),
        ("vae_train.betas", "1,0.5", "--vae_train.betas 1.0,0.5: must be two numbers in [0, 1), e.g. 0.9,0.999"),
        ("vae_train.betas", "0.9,0.99,0.5", "--vae_train.betas 0.9,0.99,0.5: must be two numbers in [0, 1), e.g. 0.9,0.999"),
        ("unet_train.weight_decay", "-1", "--unet_train.weight_decay -1.0: must be 0 or more"),
        ("vae_train.warmup_steps", "-1", "--vae_train.warmup_steps -1: must be 0 or more"),
        ("unet_train.min_lr_ratio", "1.01", "--unet_train.min_lr_ratio 1.01: must lie in [0, 1]"),
        ("vae_train.grad_clip", "0", "--vae_train.grad_clip 0.0: must be a finite number above 0"),
        ("unet_train.label_dropout", "-0.1", "--unet_train.label_dropout -0.1: must lie in [0, 1)"),
        ("unet_train.ema_decay", "1", "--unet_train.ema_decay 1.0: must lie in [0, 1)"),
        ("run.seed", str(2**63), f"--run.seed {2**63}: must be 0 or more"),
        ("run.compile", "fast", "--run.compile fast: must be one of none, full, regional, reduce-overhead"),
        ("run.log_every", "0", "--run.log_every 0: must be at least 1"),
        ("run.grid_samples", "0", "--run.grid_samples 0: must be at least 1"),
        ("run.keep_every", "-1", "--run.keep_every -1: must be 0 (no snapshots) or more (UNet epochs between snapshots)"),
        ("run.sample_steps", "0", "--run.sample_steps 0: must be 1 to scheduler.num_train_timesteps (1000)"),
        ("run.guidance_scale", "30.01", f"--run.guidance_scale 30.01: {GUIDANCE_RULE}"),
        ("run.guidance_scale", "-0.01", f"--run.guidance_scale -0.01: {GUIDANCE_RULE}"),
    ],
)
def test_each_rule_refuses_the_first_value_past_its_edge(key: str, value: str, message: str) -> None:
    config = make_config("tiny")
    apply_overrides(config, {key: value})
    with pytest.raises(UsageError) as error:
        check_fields(config)
    assert str(error.value) == message


@pytest.mark.parametrize(
    "text, value", [("none", None), ("NULL", None), ("", None), *[(t, True) for t in ("1", "true", "Yes", "ON")]]
)
def test_every_spelling_of_none_and_true(text: str, value: object) -> None:
    assert parse_value(text, bool | None) is value


@pytest.mark.parametrize("text", ["0", "false", "No", "OFF"])
def test_every_spelling_of_false(text: str) -> None:
    assert parse_value(text, bool) is False


def test_a_token_without_its_dashes_is_not_an_option() -> None:
    with pytest.raises(ValueError, match="unknown option xxdata.image_size"):
        collect_overrides(["xxdata.image_size", "64"])


def test_stored_configs_default_to_adni_and_refuse_unknown_sections() -> None:
    stored = config_to_dict(make_config("adni"))
    del stored["preset"]
    assert config_from_dict(stored) == make_config("adni")  # configs from before presets were recorded
    assert config_from_dict({"vae": {"kl_weight": 1e-6}}).preset == "adni"  # sections without every field
    for section, values in (("nonsense", {}), ("preset_table", {"a": 1}), ("run", [1, 2])):
        with pytest.raises(UsageError) as error:
            config_from_dict({"preset": "tiny", section: values})
        assert str(error.value) == f"config section {section!r} is unknown to this version of brainLDM"
    old = config_to_dict(make_config("tiny"))
    old["run"]["compile"] = True  # run.compile was true/false
    assert config_from_dict(old).run.compile == "full"
