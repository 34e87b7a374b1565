"""Config: presets validate, CLI overrides, bad values are rejected with the field named."""

import argparse
import json

import pytest

from neighbor_diffusion import config as C


@pytest.mark.parametrize("name", sorted(C.PRESETS))
def test_presets_build_and_round_trip(name):
    cfg = C.preset(name)
    assert cfg.preset == name
    again = C.Config.from_dict(json.loads(cfg.to_json()))
    assert again == cfg


def test_cli_overrides_any_field():
    parser = argparse.ArgumentParser()
    C.add_cli_arguments(parser)
    args = parser.parse_args(
        [
            "--preset",
            "cpu",
            "--model.block_out_channels",
            "64,128",
            "--model.attention_levels",
            "1",
            "--model.neighbor_levels",
            "1",
            "--train.lr",
            "0.01",
            "--train.offload",
            "false",
        ]
    )
    cfg = C.from_cli_args(args)
    assert cfg.model.block_out_channels == (64, 128)
    assert cfg.train.lr == 0.01 and cfg.train.offload is False
    assert cfg.text.encoder == "minilm"  # untouched fields keep the preset's value


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"model.block_out_channels": "12,32"}, "model.block_out_channels"),
        ({"model.neighbor_levels": "0"}, "model.neighbor_levels"),
        ({"model.image_size": "33"}, "model.image_size"),
        ({"model.norm_num_groups": "0"}, "model.norm_num_groups"),  # was a ZeroDivisionError
        ({"model.attention_head_dim": "-8"}, "model.attention_head_dim"),  # passed, failed in the UNet
        ({"diffusion.p_drop_text": "0.6", "diffusion.p_drop_neighbors": "0.6"}, "diffusion.p_drop_*"),
        ({"diffusion.sampler": "euler"}, "diffusion.sampler"),
        ({"diffusion.interleave_ratio": "1.5"}, "diffusion.interleave_ratio"),
        ({"diffusion.timestep_bias_portion": "1.5"}, "diffusion.timestep_bias_portion"),
        ({"diffusion.timestep_bias_multiplier": "0"}, "diffusion.timestep_bias_multiplier"),
        ({"train.zero_stage": "4"}, "train.zero_stage"),
        ({"train.offload": "true"}, "train.offload"),
        ({"train.lr": "fast"}, "train.lr"),
        ({"train.neighbor_lr_scale": "0"}, "train.neighbor_lr_scale"),
        ({"train.neighbor_gate_init": "nan"}, "train.neighbor_gate_init"),
        ({"serve.port": "70000"}, "serve.port"),
        ({"serve.max_guidance": "inf"}, "serve.max_guidance"),
        ({"model.no_such_field": "1"}, "model.no_such_field"),
    ],
)
def test_bad_values_are_rejected_with_the_field_named(overrides, field):
    with pytest.raises(C.ConfigError) as err:
        C.override(C.debug(), overrides)
    assert field in str(err.value)


def test_flat_names_every_field():
    flat = C.cpu().flat()
    assert flat["model.block_out_channels"] == (32, 64, 64)
    assert flat["train.zero_stage"] == 0
    assert len(flat) > 60
