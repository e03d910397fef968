"""FID feature extraction: our Inception (fid/) against pytorch-fid's, same weights, same images.

    python bench/bench_fid.py                              # 200 random 32x32 images as a tensor, CPU or CUDA
    python bench/bench_fid.py --folder --side 64           # the same, written as PNGs and read from a folder
    python bench/bench_fid.py --compile                    # also ours through torch.compile (minutes on a CPU)

Both networks get one set of random weights (He-initialised convolutions, and batch norm statistics
drawn away from the identity so that folding them into the convolutions is exercised), so no download
is needed and the features must agree to float rounding. Ours is timed as a user runs it
(`FeatureExtractor.features`: input checks, layout, network); pytorch-fid as its `get_activations`
runs (its loop over a tensor's batches, or the function itself on a folder). The two are timed in
turn, A B A B, so a machine that gets busier or quieter biases neither.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import tempfile
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import alternating_seconds, setup  # noqa: E402
from fid.features import FeatureExtractor  # noqa: E402
from fid.inception import FIDInceptionV3  # noqa: E402
from fid.weights import build_fid_inception  # noqa: E402

PEER = "pytorch_fid"


def random_fid_weights(seed: int = 0) -> FIDInceptionV3:
    """Our network with random weights whose batch norms are not the identity (as trained ones are not)."""
    net = build_fid_inception("random")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.weight.uniform_(0.8, 1.2, generator=generator)
                module.bias.normal_(0.0, 0.1, generator=generator)
    return net


def pytorch_fid_network(state: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """pytorch-fid's InceptionV3 (pool3 features) with the weights `state` in place of the published download."""
    import pytorch_fid.inception as peer
    with mock.patch.object(peer, "load_state_dict_from_url", lambda *args, **kwargs: state):
        model = peer.InceptionV3([peer.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    return model.to(device).eval()


def pytorch_fid_features(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> np.ndarray:
    """What pytorch-fid's `get_activations` does with each batch, over a tensor's batches."""
    features = np.empty((images.shape[0], 2048))
    start = 0
    for batch in images.split(batch_size):
        with torch.no_grad():
            pred = model(batch.to(device))[0]
        pred = pred.squeeze(3).squeeze(2).cpu().numpy()
        features[start:start + pred.shape[0]] = pred
        start += pred.shape[0]
    return features


def write_pngs(images: torch.Tensor, folder: Path) -> None:
    from PIL import Image
    arrays = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(folder / f"{i:05d}.png")


def fid_features_row(device: str | torch.device, images: int | torch.Tensor, repeats: int, *, side: int = 32,
                     batch_size: int = 50, folder: bool = False, compile: bool = False) -> dict:
    """Images/s of our feature extraction and pytorch-fid's on the same images and weights, timed A B A B.

    images: a count of random `side` x `side` RGB images, or the images themselves (N, 3, H, W) in [0, 1].
    folder: write them as PNGs and time both from the folder (decoding included) instead of from the tensor.
    compile: also time ours through torch.compile (its compilation is in the untimed warm-up round).

    Returns ours_img_per_s, peer_img_per_s (None when pytorch-fid is not installed, peer_note says so),
    ratio (ours / peer), and max_abs_diff and max_rel_diff (relative to the largest feature) between
    the two networks' features; with compile, also ours_compiled_img_per_s, ratio_compiled and
    max_abs_diff_compiled (from our eager features).
    """
    device = torch.device(device)
    if isinstance(images, int):
        images = torch.rand(images, 3, side, side, generator=torch.Generator().manual_seed(0))
    assert images.dim() == 4 and images.shape[1] == 3, f"expected (N, 3, H, W) images, got {tuple(images.shape)}"
    count = images.shape[0]
    state = random_fid_weights().state_dict()
    peer_note = "" if importlib.util.find_spec(PEER) else f"{PEER} not installed (pip install pytorch-fid)"
    features: dict[str, np.ndarray] = {}

    def keeping(name: str, extract: Callable[[], np.ndarray]) -> Callable[[], None]:
        """`extract`, with its features kept under `name` for the comparison."""
        return lambda: features.__setitem__(name, extract())

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "random-fid-weights.pth"
        torch.save(state, weights)
        source: Path | torch.Tensor = images
        if folder:
            source = Path(tmp) / "images"
            source.mkdir()
            write_pngs(images, source)
        ours = FeatureExtractor(weights, device, batch_size, progress=False)
        fns = {"ours": keeping("ours", lambda: ours.features(source))}
        if compile:
            compiled = FeatureExtractor(weights, device, batch_size, progress=False, compile=True)
            fns["ours_compiled"] = keeping("ours_compiled", lambda: compiled.features(source))
        quiet = contextlib.nullcontext()
        if not peer_note:
            from pytorch_fid import fid_score
            model = pytorch_fid_network(state, device)
            if folder:
                files = sorted(source.glob("*.png"))
                fns["peer"] = keeping("peer", lambda: fid_score.get_activations(files, model, batch_size, 2048, device,
                                                                                num_workers=0))
            else:
                fns["peer"] = keeping("peer", lambda: pytorch_fid_features(model, images, batch_size, device))
            quiet = mock.patch.object(fid_score, "tqdm", lambda batches: batches)  # ours shows no progress bar either
        with quiet:
            seconds = alternating_seconds(fns, device, repeats)
    rate = {name: count / s for name, s in seconds.items()}
    result = {"device": str(device), "threads": torch.get_num_threads(), "images": count,
              "size": f"{images.shape[2]}x{images.shape[3]}", "batch_size": batch_size,
              "source": "folder" if folder else "tensor", "ours_img_per_s": rate["ours"],
              "peer_img_per_s": rate.get("peer"), "peer_note": peer_note, "ratio": None,
              "max_abs_diff": None, "max_rel_diff": None}
    if "peer" in features:
        difference = np.abs(features["ours"] - features["peer"]).max()
        result.update(ratio=rate["ours"] / rate["peer"], max_abs_diff=float(difference),
                      max_rel_diff=float(difference / np.abs(features["peer"]).max()))
    if compile:
        result.update(ours_compiled_img_per_s=rate["ours_compiled"],
                      ratio_compiled=rate["ours_compiled"] / rate["peer"] if "peer" in rate else None,
                      max_abs_diff_compiled=float(np.abs(features["ours_compiled"] - features["ours"]).max()))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="number of random images (default: 200)")
    parser.add_argument("--side", type=int, default=32, help="image side in pixels (default: 32)")
    parser.add_argument("--batch-size", type=int, default=50, help="images per forward pass (default: 50)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up (default: 3)")
    parser.add_argument("--folder", action="store_true", help="read the images from PNG files (default: a tensor)")
    parser.add_argument("--compile", action="store_true", help="also time ours through torch.compile (default: off)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    args = parser.parse_args()
    device, description = setup(args.device)
    print(f"{description}\n")
    result = fid_features_row(device, args.images, args.repeats, side=args.side, batch_size=args.batch_size,
                              folder=args.folder, compile=args.compile)
    for key, value in result.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
