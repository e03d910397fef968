"""Tests for the import of published DDPM U-Nets saved by diffusers (ddpm/published.py)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from core.checkpoint import load_checkpoint
from ddpm.published import from_diffusers, load_published_unet, published_keys, to_diffusers, unet2d_config
from ddpm.unet import UNet, UNetConfig
from helpers import RES, colour_folder, perturbed, tiny_args

LEGACY_ATTENTION = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}


def small_config(**overrides) -> UNetConfig:
    """Two 128-channel levels at 16 px with attention at 8 px: the smallest U-Net whose GroupNorms are
    diffusers' 32 groups (ours split narrower layers into fewer)."""
    fields = dict(image_size=RES, in_channels=3, base_channels=128, channel_mult=(1, 1), num_res_blocks=1,
                  attention_resolutions=(8,), dropout=0.0)
    return UNetConfig(**{**fields, **overrides})


def test_names_and_shapes_follow_unet2d_models_layout():
    cifar10 = dataclasses.replace(UNetConfig.ddpm_cifar10(), image_size=32, in_channels=3)
    keys = published_keys(cifar10)
    # Our 304 tensors, each of the 6 attention blocks' q|k|v weight and bias split into three: 4 more each.
    assert len(keys) == 304 + 4 * 6 and sum(math.prod(s) for s in keys.values()) == 35_746_307
    # Written out from UNet2DModel's layout: blocks numbered in the order they run, attention as linear layers.
    assert keys["time_embedding.linear_1.weight"] == (512, 128)
    assert keys["down_blocks.1.resnets.0.conv_shortcut.weight"] == (256, 128, 1, 1)
    assert keys["down_blocks.1.attentions.1.to_q.weight"] == (256, 256)
    assert keys["down_blocks.0.downsamplers.0.conv.weight"] == (128, 128, 3, 3)
    assert keys["mid_block.attentions.0.group_norm.weight"] == (256,)
    assert keys["mid_block.resnets.1.time_emb_proj.weight"] == (256, 512)
    assert keys["up_blocks.2.attentions.2.to_out.0.weight"] == (256, 256)
    assert keys["up_blocks.3.resnets.2.conv_shortcut.weight"] == (128, 256, 1, 1)
    assert keys["up_blocks.0.upsamplers.0.conv.weight"] == (256, 256, 3, 3)
    assert keys["conv_norm_out.weight"] == (128,)
    assert "down_blocks.3.downsamplers.0.conv.weight" not in keys and "up_blocks.3.upsamplers.0.conv.weight" not in keys
    legacy = published_keys(cifar10, "diffusers-legacy")
    assert legacy["down_blocks.1.attentions.0.proj_attn.weight"] == (256, 256) and len(legacy) == len(keys)
    conditional = published_keys(dataclasses.replace(cifar10, cond="class", num_classes=10))
    assert conditional["class_embedding.weight"] == (11, 512)  # the last row: the null class


@pytest.mark.parametrize("cond", ["none", "class"])
def test_to_and_from_diffusers_round_trip(cond):
    config = small_config(cond=cond, num_classes=3 if cond == "class" else 0)
    state = perturbed(UNet(config), scale=0.03).state_dict()
    for naming in ("diffusers", "diffusers-legacy"):
        back = from_diffusers(to_diffusers(state, config, naming), config)
        assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def save_unet2d(folder, config: UNetConfig, *, legacy: bool = False, seed: int = 0):
    """diffusers' own UNet2DModel at `config`, its weights moved off their initial values, saved by
    save_pretrained (with legacy: its weights renamed as diffusers wrote them before 0.14)."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (bench extra)")
    torch.manual_seed(seed)
    peer = diffusers.UNet2DModel(**unet2d_config(config)).eval()
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(0.03 * torch.randn_like(p))
    peer.save_pretrained(folder)
    if legacy:
        state = peer.state_dict()
        for new, old in LEGACY_ATTENTION.items():
            state = {k.replace(new, old): v for k, v in state.items()}
        (folder / "diffusion_pytorch_model.safetensors").unlink()
        torch.save(state, folder / "diffusion_pytorch_model.bin")
    return peer


@pytest.mark.parametrize("cond, legacy", [("none", False), ("none", True), ("class", False)])
def test_a_unet2d_model_saved_by_diffusers_computes_the_same_here(tmp_path, cond, legacy):
    """The reference: UNet2DModel, saved by diffusers, loaded from its folder (config.json checked)."""
    config = small_config(cond=cond, num_classes=3 if cond == "class" else 0, scale_shift_norm=cond == "class")
    peer = save_unet2d(tmp_path / "unet", config, legacy=legacy)
    ours = UNet(config).eval()
    load_published_unet(ours, tmp_path / "unet")
    x, t = torch.randn(2, 3, RES, RES), torch.tensor([3, 870])
    with torch.no_grad():
        if cond == "class":
            labels = torch.tensor([2, 0])
            expected = peer(x, t, class_labels=labels).sample
            got = ours(x, t, cond=labels)
            # diffusers' last class row is our null embedding, the unconditional model of guidance
            torch.testing.assert_close(ours(x, t, cond=None), peer(x, t, class_labels=torch.tensor([3, 3])).sample,
                                       rtol=0, atol=2e-5)
        else:
            expected, got = peer(x, t).sample, ours(x, t)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
    assert expected.abs().max() > 0.1


# The config.json of Ho et al.'s CIFAR-10 model as diffusers published it (google/ddpm-cifar10-32, written by
# diffusers 0.0.4: no attention_head_dim, attn_norm_num_groups or resnet_time_scale_shift yet).
GOOGLE_DDPM_CIFAR10 = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu",
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"], "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}


def test_the_ddpm_cifar10_preset_is_the_published_cifar10_model(tmp_path):
    """google/ddpm-cifar10-32's config.json passes the check against --preset ddpm-cifar10: it predates
    attention_head_dim, and its model has DDPM's one head per attention block, as ours."""
    from ddpm.config import ddpm_cifar10
    from ddpm.published import _config_mismatch
    cifar10 = dataclasses.replace(ddpm_cifar10().unet, image_size=32, in_channels=3)
    assert _config_mismatch(GOOGLE_DDPM_CIFAR10, cifar10) == ("", "")
    fixed, options = _config_mismatch({**GOOGLE_DDPM_CIFAR10, "up_block_types": ["UpBlock2D"] * 4}, cifar10)
    assert fixed == "" and "up_block_types" in options and "--attention-resolutions" in options


def test_a_config_json_of_another_network_is_refused_and_a_bare_file_warned_about(tmp_path):
    config = small_config()
    save_unet2d(tmp_path / "unet", config)
    fields = json.loads((tmp_path / "unet" / "config.json").read_text())
    net = UNet(config)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cannot = r"\), which this U-Net cannot express; it cannot be imported\.$"
    for change, message in [({"flip_sin_to_cos": True}, r"\(flip_sin_to_cos True" + cannot),
                            ({"downsample_padding": 1}, r"\(downsample_padding 1" + cannot),
                            ({"norm_num_groups": 16}, r"norm_num_groups 16 \(this U-Net normalises 128 channels in 32"),
                            ({"attention_head_dim": 8}, r"attention_head_dim 8: 16 at 128 channels \(these options: 1; "
                                                        r"--head-channels 8\)"),
                            ({"layers_per_block": 2}, r"layers_per_block 2 \(these options: 1; --num-res-blocks\)"),
                            ({"_class_name": "UNet2DConditionModel"}, "a diffusers UNet2DConditionModel, not a UNet2DModel")]:
        (tmp_path / "unet" / "config.json").write_text(json.dumps({**fields, **change}))
        with pytest.raises(ValueError, match=message):
            load_published_unet(net, tmp_path / "unet")
    (tmp_path / "unet" / "config.json").write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=r"a model of 3-channel images, and the data has 1 channels"):
        load_published_unet(UNet(small_config(in_channels=1)), tmp_path / "unet")
    (tmp_path / "unet" / "config.json").write_text(json.dumps({**fields, "out_channels": 6}))
    with pytest.raises(ValueError, match=r"\(out_channels 6 for in_channels 3" + cannot):
        load_published_unet(net, tmp_path / "unet")
    (tmp_path / "unet" / "config.json").write_text(json.dumps({**fields, "attention_head_dim": 128}))
    load_published_unet(net, tmp_path / "unet")  # one head of 128 channels: the same network, said another way
    (tmp_path / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not a readable JSON config"):
        load_published_unet(net, tmp_path / "unet")
    net.load_state_dict(before)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    fields.pop("flip_sin_to_cos")  # an older config.json: diffusers' default (True), not DDPM's, is what it meant
    (tmp_path / "unet" / "config.json").write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=r"\(flip_sin_to_cos True\)"):
        load_published_unet(net, tmp_path / "unet")
    (tmp_path / "unet" / "config.json").unlink()
    with pytest.warns(UserWarning, match="no diffusers config.json beside it"):
        load_published_unet(net, tmp_path / "unet" / "diffusion_pytorch_model.safetensors")


def test_train_imports_published_weights_with_zero_steps(tmp_path):
    import train
    config = small_config()
    peer = save_unet2d(tmp_path / "unet", config)
    images = colour_folder(tmp_path / "images", per_class=2, seed=0)
    wide = ["--base-channels", "128", "--channel-mult", "1", "1", "--dropout", "0", "--no-scale-shift-norm"]
    (tmp_path / "unet" / "config.json").write_text(
        json.dumps({**json.loads((tmp_path / "unet" / "config.json").read_text()), "freq_shift": 0}))
    with pytest.raises(ValueError, match="freq_shift 0"):  # refused at start-up: no run folder is made
        train.main(tiny_args(tmp_path / "never", images, *wide, "--pretrained", str(tmp_path / "unet"), steps=0))
    assert not (tmp_path / "never").exists()
    (tmp_path / "unet" / "config.json").write_text(
        json.dumps({**json.loads((tmp_path / "unet" / "config.json").read_text()), "freq_shift": 1}))
    train.main(tiny_args(tmp_path / "run", images, *wide, "--pretrained", str(tmp_path / "unet"), steps=0))
    payload = load_checkpoint(tmp_path / "run" / "checkpoint.pt", "ddpm")
    ours = UNet(config)
    ours.load_state_dict(payload["ema"]["model"])
    expected = to_diffusers(ours.state_dict(), config)
    assert all(torch.equal(expected[k], v) for k, v in peer.state_dict().items())


def test_grey_images_fine_tune_published_rgb_weights_as_rgb_and_resume_exactly(tmp_path, capsys):
    """A folder of grey photos and an RGB model: each image is given to it as RGB with three equal channels
    (refused before, as if the weights file were not a U-Net's), and a resumed run goes on in RGB."""
    import numpy as np
    from PIL import Image

    import train
    save_unet2d(tmp_path / "unet", small_config())
    grey = tmp_path / "grey"
    grey.mkdir()
    for k in range(4):
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (RES, RES), dtype=np.uint8), "L").save(grey / f"{k}.png")
    options = ["--base-channels", "128", "--channel-mult", "1", "1", "--dropout", "0", "--no-scale-shift-norm",
               "--pretrained", str(tmp_path / "unet")]
    train.main(tiny_args(tmp_path / "whole", grey, *options, steps=2))
    assert "is greyscale and the published U-Net takes RGB images" in capsys.readouterr().out
    train.main(tiny_args(tmp_path / "split", grey, *options, steps=1))
    train.main(["--run-dir", str(tmp_path / "split"), "--resume", "--steps", "2", "--device", "cpu"])
    assert "is greyscale and this run's U-Net takes RGB images" in capsys.readouterr().out
    whole, split = (load_checkpoint(tmp_path / run / "checkpoint.pt", "ddpm") for run in ("whole", "split"))
    assert whole["config"]["unet"]["in_channels"] == 3 and whole["data_info"]["channels"] == 3
    assert all(torch.equal(v, split["ema"]["model"][k]) for k, v in whole["ema"]["model"].items())


def test_a_class_table_without_the_null_class_is_named_as_such(tmp_path):
    config = small_config(cond="class", num_classes=3)
    weights = to_diffusers(UNet(config).state_dict(), config)
    weights["class_embedding.weight"] = weights["class_embedding.weight"][:3]  # a model trained without guidance
    torch.save(weights, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="3 class embeddings for the data's 3 classes and no null class"):
        with pytest.warns(UserWarning, match="no diffusers config.json"):
            load_published_unet(UNet(config), tmp_path)


def test_a_model_of_another_conditioning_or_schedule_is_refused_naming_the_options(tmp_path):
    from ddpm.config import DiffusionConfig
    from ddpm.published import check_published_schedule, read_published_unet
    config = small_config()
    save_unet2d(tmp_path / "unet", config)
    with pytest.raises(ValueError, match=r"holds an unconditional model \(no class table\), and this U-Net is "
                                         r"class-conditional; drop --cond class"):
        read_published_unet(tmp_path / "unet", small_config(cond="class", num_classes=1), names_only=True)
    scheduler = {"_class_name": "DDPMScheduler", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                 "num_train_timesteps": 1000, "prediction_type": "epsilon", "variance_type": "fixed_large"}
    (tmp_path / "unet" / "scheduler_config.json").write_text(json.dumps(scheduler))
    check_published_schedule(tmp_path / "unet", DiffusionConfig(schedule="linear", prediction="eps"))
    with pytest.raises(ValueError, match=r"trained with --schedule linear \(these options: cosine\); --prediction eps "
                                         r"\(these options: v\)"):
        check_published_schedule(tmp_path / "unet", DiffusionConfig(schedule="cosine", prediction="v"))
    with pytest.raises(ValueError, match=r"--beta-range 0.0001 0.02 \(these options: 0.0002 0.02\)"):
        check_published_schedule(tmp_path / "unet", DiffusionConfig(beta_range=(0.0002, 0.02)))
    with pytest.raises(ValueError, match=r"--num-timesteps 1000 \(these options: 500\)"):
        check_published_schedule(tmp_path / "unet", DiffusionConfig(num_timesteps=500))
    for change, message in [({"num_train_timesteps": 500}, r"--num-timesteps 500 \(these options: 1000\); --beta-range "
                                                            r"0.0001 0.02 \(these options: 0.0002 0.04\)"),
                            ({"rescale_betas_zero_snr": True}, r"asks for rescale_betas_zero_snr True, which this "
                                                               r"toolkit's schedules cannot express")]:
        (tmp_path / "unet" / "scheduler_config.json").write_text(json.dumps({**scheduler, **change}))
        with pytest.raises(ValueError, match=message):
            check_published_schedule(tmp_path / "unet", DiffusionConfig(schedule="linear", prediction="eps"))
    from ddpm.published import _config_mismatch
    two_widths = small_config(channel_mult=(1, 2), attention_resolutions=(16, 8), num_heads=4)
    fields = {"block_out_channels": [128, 256], "attention_head_dim": None}  # one head in every block
    assert "(these options: 4, 4; --num-heads 1)" in _config_mismatch(fields, two_widths)[1]
    with pytest.raises(ValueError, match="UNet2DModel keeps one head width in every attention block"):
        unet2d_config(small_config(channel_mult=(1, 2), attention_resolutions=(16, 8), num_heads=4))


def test_a_config_json_diffusers_did_not_write_is_not_read_as_one(tmp_path):
    """Beside weights in one of our run folders, say: it names no diffusers class, so it says nothing of them."""
    config = small_config()
    torch.save(to_diffusers(perturbed(UNet(config), scale=0.03).state_dict(), config), tmp_path / "unet.bin")
    (tmp_path / "config.json").write_text(json.dumps({"unet": {"base_channels": 32}, "train": {"steps": 3}}))
    with pytest.warns(UserWarning, match="no diffusers config.json beside it"):
        load_published_unet(UNet(config), tmp_path / "unet.bin")
