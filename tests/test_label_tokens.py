"""How the label reaches the UNet. Several learned context tokens per label (unet.label_tokens): why
they exist, what the null label gets, and that runs saved before the field existed keep their single
token. The label in every ResBlock (unet.label_in_resblocks): it reaches the levels without attention,
and runs saved before it are built and loaded without it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from config import UNetConfig, config_to_dict, make_config, read_config
from modules import Conditions, UNet

SMALL_UNET = UNetConfig(channels=(16, 32), num_res_blocks=1, attention_levels=(False, True), head_dim=8, context_dim=16)


def cross_attention_gradients(label_tokens: int) -> list[tuple[float, float]]:
    """|grad| sums of every cross-attention's query and key projection after one backward pass of a UNet
    whose zero-initialised output layers are made random (else no gradient reaches inside at all)."""
    torch.manual_seed(0)
    unet = UNet(dataclasses.replace(SMALL_UNET, label_tokens=label_tokens), latent_channels=4)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.normal_(0, 0.2)
    x, t = torch.randn(4, 4, 8, 8), torch.tensor([10, 200, 500, 900])
    unet(x, t, Conditions(torch.tensor([0, 1, 0, Conditions.ABSENT]))).square().mean().backward()
    blocks = [module.cross_attention for module in unet.modules() if hasattr(module, "cross_attention")]
    assert blocks, "the small UNet should have transformer blocks"
    return [
        (float(block.to_q.weight.grad.abs().sum()), float(block.to_kv.weight.grad.chunk(2)[0].abs().sum())) for block in blocks
    ]


def test_one_label_token_leaves_cross_attention_query_and_key_without_gradient() -> None:
    """Why label_tokens exists: over one token the softmax is 1 whatever the query and key are, so their
    projections get no gradient (up to rounding: a million times less than with four tokens)."""
    several = cross_attention_gradients(label_tokens=4)
    one = cross_attention_gradients(label_tokens=1)
    smallest = min(min(pair) for pair in several)
    assert smallest > 1e-4
    assert max(max(pair) for pair in one) < 1e-6 * smallest


@pytest.mark.parametrize("slice_conditioning", [False, True])
def test_each_label_and_the_null_label_get_their_own_tokens(slice_conditioning: bool) -> None:
    torch.manual_seed(0)
    config = dataclasses.replace(SMALL_UNET, label_tokens=3, slice_conditioning=slice_conditioning)
    unet = UNet(config, latent_channels=4)
    labels = torch.tensor([0, 1, 1, 0])
    conditions = Conditions(labels, torch.tensor([0.1, 0.5, 0.9, 0.3]) if slice_conditioning else None)
    dropped = conditions.where(torch.tensor([False, False, True, True]))  # what guidance dropout makes
    context = unet.context(dropped)
    assert context.shape == (4, 3 + slice_conditioning, 16)
    rows = unet.label_embedding.weight.view(3, 3, 16)  # (labels + "no label", tokens, context_dim)
    for item, row in enumerate([0, 1, unet.null_label, unet.null_label]):
        assert torch.equal(context[item, :3], rows[row])
    assert not torch.equal(rows[0, 0], rows[0, 1]), "the tokens of a label start different"
    if slice_conditioning:
        assert torch.equal(context[2, 3], unet.null_slice.detach()) and not torch.equal(context[0, 3], context[1, 3])


def test_runs_saved_before_label_tokens_keep_one_token(tmp_path: Path) -> None:
    """A config.json without the field means one token (its weights have that shape), whatever the
    preset's default is or becomes."""
    stored = config_to_dict(make_config("demo"))
    del stored["unet"]["label_tokens"]
    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert read_config(tmp_path).unet.label_tokens == 1
    stored["unet"]["label_tokens"] = 2
    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert read_config(tmp_path).unet.label_tokens == 2


def test_the_state_dict_of_one_token_is_the_old_layout() -> None:
    """An old unet.pt (one token per label) loads into a UNet with label_tokens = 1 unchanged."""
    unet = UNet(dataclasses.replace(SMALL_UNET, label_tokens=1), latent_channels=4)
    assert isinstance(unet.label_embedding, nn.Embedding) and unet.label_embedding.weight.shape == (3, 16)


def first_resblock_outputs(label_in_resblocks: bool, labels: list[int]) -> torch.Tensor:
    """The full-resolution level's first ResBlock output (B, C, h, w) of one noisy latent under each label."""
    torch.manual_seed(0)
    unet = UNet(dataclasses.replace(SMALL_UNET, label_in_resblocks=label_in_resblocks), latent_channels=4)
    with torch.no_grad():
        for parameter in unet.parameters():  # zero-initialised output convolutions would hide the time embedding
            parameter.normal_(0, 0.2)
    outputs = []
    unet.down_blocks[0][0].register_forward_hook(lambda module, inputs, output: outputs.append(output))
    x = torch.randn(1, 4, 8, 8).expand(len(labels), -1, -1, -1)
    unet(x, torch.full((len(labels),), 300), Conditions(torch.tensor(labels)))
    return outputs[0]


def test_label_in_resblocks_reaches_the_level_without_attention() -> None:
    """SMALL_UNET has no attention at full resolution: there the label is felt only with label_in_resblocks,
    each label and "no label" (guidance's null condition) differently."""
    labels = [0, 1, Conditions.ABSENT]
    without = first_resblock_outputs(False, labels)
    assert torch.equal(without[0], without[1]) and torch.equal(without[0], without[2])
    with_label = first_resblock_outputs(True, labels)
    for first, second in ((0, 1), (0, 2), (1, 2)):
        assert (with_label[first] - with_label[second]).abs().max() > 1e-3


def test_runs_saved_before_label_in_resblocks_load_without_it(tmp_path: Path) -> None:
    """A config.json without the field means no label in the ResBlocks, so its unet.pt loads strictly."""
    stored = config_to_dict(make_config("demo"))
    del stored["unet"]["label_in_resblocks"]
    (tmp_path / "config.json").write_text(json.dumps(stored))
    config = read_config(tmp_path).unet
    assert config.label_in_resblocks is False
    old = UNet(config, latent_channels=4).state_dict()
    assert not any(key.startswith("resblock_label_embedding") for key in old)
    UNet(config, latent_channels=4).load_state_dict(old)
