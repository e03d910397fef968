"""Grad-CAM (Selvaraju et al. 2017): where in an image a classifier looks, and statistics that let
classifiers trained on real and on synthetic data be compared side by side.

    python -m evaluate.gradcam --ckpt runs/real/checkpoint.pt --ckpt runs/synth/checkpoint.pt \\
        --name real --name synthetic --images folder:test [--num 32] [--layer layer4] [--out DIR]

For a layer with activations A^k (k = channels) and a score y^c, Grad-CAM weighs each channel by the
spatial mean of its gradient, alpha_k = mean_ij dy^c / dA^k_ij (eq. 1), and keeps the positive part
of the weighted sum, ReLU(sum_k alpha_k A^k) (eq. 2). It is computed here with a forward hook (the
activations) and a tensor hook (their gradient) on any named layer, for a whole batch in one forward
and one backward pass; the classifier's weights get no gradient. The map is upsampled bilinearly to
the image and divided by its maximum (an all-zero map, where no location raises the score, stays 0).

Statistics of a map m, with p = m / sum(m) read as a distribution over pixels:
- focus: the share of the map's mass in its most active 10% of pixels (0.1 for a uniform map, 1 when
  all mass is in fewer pixels than that);
- entropy: -sum p log p / log(H W), the spread as normalised spatial entropy (0: one pixel, 1: uniform);
- spread: sqrt(sum p |x - centroid|^2) in units of the image side, the spatial standard deviation
  around the map's centroid;
- intensity: the mean of the [0, 1]-normalised map.

Writes DIR/overlays.png (a row per image: the image, then each classifier's map over it),
DIR/stats.csv (one row per image and classifier), DIR/summary.md and DIR/summary.json (per
classifier: mean ± std of each statistic, and accuracy on these images when they are labelled).
Images of a class folder the classifiers do not know are explained as the others (their predicted
class), marked "unknown class" in overlays.png and stats.csv, and left out of the accuracy.
"""

from __future__ import annotations

from core import cli

if __name__ == "__main__":  # before the imports below, which take seconds (torch)
    cli.catch_early_sigterm()

import argparse
import contextlib
import math
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from classify.model import Classifier, load_classifier
from core.checkpoint import peek_checkpoint
from core.errors import UserError
from core.lock import OutputFolder, check_output_folder
from core.runtime import atomic_write, resolve_device, write_csv, write_json
from data import check_output_outside, check_spec, folder_classes, folder_of, load_dataset, trained_datasets
from data.dataset import subset_indices
from data.imageio import atomic_save_image, from_uint8, make_grid
from evaluate import note_capped

STATISTICS = ("focus", "entropy", "spread", "intensity")
DEFAULT_NUM = 32  # images explained where --num is not given
TOP_SHARE = 0.10  # the "most active 10% of pixels" of the focus score


@contextlib.contextmanager
def _captured(module: nn.Module) -> Iterator[dict[str, Tensor]]:
    """The module's output in the forward pass and its gradient in the backward pass; hooks are
    removed however the block ends."""
    seen: dict[str, Tensor] = {}

    def forward(_module, _inputs, output):
        seen["calls"] = seen.get("calls", 0) + 1
        seen["activation"] = output
        output.register_hook(lambda grad: seen.__setitem__("gradient", grad))
        # What runs next gets a copy: the network may change its input in place (torchvision's ResNet adds the
        # shortcut into a block's bn2 output and applies ReLU in place), which would alter the activation kept
        # here. The gradient still reaches `output` through the copy.
        return output.clone()

    handle = module.register_forward_hook(forward)
    try:
        yield seen
    finally:
        handle.remove()


# Layers whose output has no positions left (pooled, flattened, the output layer): nothing to map.
NOT_SPATIAL = (nn.Linear, nn.AdaptiveAvgPool2d, nn.Flatten)


def find_layer(net: nn.Module, name: str) -> nn.Module:
    layers = dict(net.named_modules())
    if name not in layers or not name or isinstance(layers[name], NOT_SPATIAL):
        some = [n for n, m in layers.items() if n and "." not in n and not isinstance(m, NOT_SPATIAL)]
        if name in layers and name:
            raise UserError(f"--layer {name} leaves no image positions to map (Grad-CAM weighs a convolutional "
                            f"layer's feature maps); pass one of {', '.join(some)}.")
        raise UserError(f"The classifier has no layer {name!r}; pass --layer one of {', '.join(some)} (or a nested "
                        f"name such as layer4.1.conv2).")
    return layers[name]


def grad_cam(net: nn.Module, images: Tensor, layer: str, target: Tensor, *, raw: bool = False) -> Tensor:
    """Grad-CAM maps of `net` at `layer` for the output `target[b]` of each image b: (B, H, W) in
    [0, 1] at the image's size, or with `raw` the unnormalised maps at the layer's own size.

    The layer must run once per forward pass: a module called twice (torchvision's blocks reuse one
    ReLU) has two activations and no single map."""
    assert images.dim() == 4 and target.shape == (images.shape[0],), (
        f"images (B, C, H, W) and one target per image, got {tuple(images.shape)} and {tuple(target.shape)}")
    module = find_layer(net, layer)
    was_training = net.training
    net.eval()
    requires = [p.requires_grad for p in net.parameters()]
    net.requires_grad_(False)  # gradients flow to the activations only, never into the weights
    try:
        with torch.enable_grad(), _captured(module) as seen:
            x = images.detach().clone().requires_grad_(True)   # so the graph exists with frozen weights
            out = net(x).float()
            if seen["calls"] != 1:
                raise UserError(f"--layer {layer} runs {seen['calls']} times in one forward pass (torchvision's "
                                f"residual blocks reuse their relu), so it has no single activation to explain; pass a "
                                f"layer that runs once, such as the block itself or one of its conv or bn layers.")
            if not ((target >= 0) & (target < out.shape[1])).all():
                raise UserError(f"Grad-CAM targets must be outputs 0 to {out.shape[1] - 1} of the network, got "
                                f"{target.tolist()}.")
            score = out[torch.arange(len(target), device=out.device), target]
            # Each image's score depends on that image only, so one backward of the sum gives each its own gradient.
            score.sum().backward()
        activation, gradient = seen["activation"].detach().float(), seen["gradient"].float()
    finally:
        for p, r in zip(net.parameters(), requires):
            p.requires_grad_(r)
        net.train(was_training)
    weights = gradient.mean(dim=(2, 3), keepdim=True)                 # alpha_k (eq. 1)
    maps = F.relu((weights * activation).sum(dim=1))                  # eq. 2, (B, h, w)
    if raw:
        return maps
    maps = F.interpolate(maps[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = maps.flatten(1).max(dim=1).values.clamp(min=1e-12).view(-1, 1, 1)
    return (maps / peak).clamp(0, 1)


def map_statistics(maps: Tensor) -> dict[str, Tensor]:
    """Focus, entropy, spread and intensity of each map (B, H, W) (see the module docstring); an
    all-zero map has focus, entropy and spread NaN (there is no mass to describe) and intensity 0."""
    b, h, w = maps.shape
    flat = maps.double().flatten(1)
    mass = flat.sum(dim=1, keepdim=True)
    p = flat / mass                                                   # NaN rows for all-zero maps
    top = max(1, round(TOP_SHARE * h * w))
    focus = p.sort(dim=1, descending=True).values[:, :top].sum(dim=1)
    entropy = -(p * p.clamp(min=1e-300).log()).sum(dim=1) / math.log(h * w)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64) / h, torch.arange(w, dtype=torch.float64) / w,
                            indexing="ij")
    cy, cx = (p * ys.flatten()).sum(dim=1, keepdim=True), (p * xs.flatten()).sum(dim=1, keepdim=True)
    spread = ((p * ((ys.flatten() - cy) ** 2 + (xs.flatten() - cx) ** 2)).sum(dim=1)).sqrt()
    return {"focus": focus, "entropy": entropy, "spread": spread, "intensity": flat.mean(dim=1)}


# ---------------------------------------------------------------------------------------------
# pictures


def colour_map(values: Tensor) -> Tensor:
    """A blue-cyan-green-yellow-red ramp (piecewise linear, like "jet") of values in [0, 1]:
    (..., ) -> (..., 3) RGB in [0, 1]."""
    stops = torch.tensor([[0.0, 0.0, 0.5], [0.0, 0.3, 1.0], [0.0, 0.9, 0.9], [0.2, 0.85, 0.2], [1.0, 0.9, 0.0],
                          [0.85, 0.05, 0.0]], dtype=values.dtype, device=values.device)
    position = values.clamp(0, 1) * (len(stops) - 1)
    low = position.floor().long().clamp(max=len(stops) - 2)
    t = (position - low).unsqueeze(-1)
    return stops[low] * (1 - t) + stops[low + 1] * t


UNKNOWN_CAPTION = "unknown class"  # beside the rows of images whose class the classifiers do not know


GRID_PADDING = 2  # pixels around each cell of overlays.png


def overlay_rows(images: Tensor, maps: Sequence[Tensor], batch_size: int) -> np.ndarray:
    """The grid of overlays.png, a row per image: the image (uint8 (B, C, H, W), grey as RGB), then each map
    (B, H, W) over it, as one uint8 (H', W', 3) array. Made `batch_size` rows at a time, so that only those are
    ever held as floats; the rows are those of one `make_grid` over all of them."""
    parts = []
    for s in range(0, len(images), batch_size):
        part = from_uint8(images[s:s + batch_size])
        columns = [part.expand(-1, 3, -1, -1)] + [overlay(part, m[s:s + batch_size]) for m in maps]
        grid = make_grid(torch.stack(columns, dim=1).flatten(0, 1), nrow=len(columns), padding=GRID_PADDING)
        parts.append(grid if not parts else grid[GRID_PADDING:])  # (the padding above a part's first row: once)
    return np.concatenate(parts)


def save_overlays(grid: np.ndarray, captions: Sequence[str], path: Path) -> None:
    """The grid of `overlay_rows` (a row per image) as one PNG; with any non-empty caption, a column of captions in
    front (white on black, as the grid's padding), one per row."""
    grid = Image.fromarray(grid)
    if any(captions):
        font = ImageFont.load_default()
        probe = ImageDraw.Draw(grid)
        width = max(probe.textbbox((0, 0), c, font=font)[2] for c in captions) + 6
        captioned = Image.new("RGB", (width + grid.width, grid.height))
        captioned.paste(grid, (width, 0))
        draw, side = ImageDraw.Draw(captioned), (grid.height - GRID_PADDING) // len(captions)  # a cell: image, padding
        for k, caption in enumerate(captions):
            top, bottom = draw.textbbox((0, 0), caption, font=font)[1::2]
            draw.text((3, 2 + k * side + (side - 2 - (bottom - top)) // 2 - top), caption, fill="white", font=font)
        grid = captioned
    atomic_save_image(grid, path)


def overlay(images: Tensor, maps: Tensor, alpha: float = 0.5) -> Tensor:
    """Maps (B, H, W) in [0, 1] coloured and blended over images (B, C, H, W) in [-1, 1]; result in [-1, 1]."""
    base = (images.expand(-1, 3, -1, -1) + 1) / 2
    heat = colour_map(maps).permute(0, 3, 1, 2)
    return ((1 - alpha) * base + alpha * heat) * 2 - 1


# ---------------------------------------------------------------------------------------------
# comparing classifiers


def explained_targets(classifier: Classifier, predicted: Tensor, labels: Tensor, explain: str, class_name: str | None,
                      output: str | None) -> Tensor:
    """Which output each map explains: the predicted class (`predicted`, the classifier's prediction for each
    image), the true label, a named class, or a regressor's named parameter (default: its first)."""
    names = classifier.output_names
    if classifier.config.target == "params":
        index = names.index(output) if output else 0
        return torch.full((len(predicted),), index, dtype=torch.long)
    if class_name is not None:
        return torch.full((len(predicted),), names.index(class_name), dtype=torch.long)
    if explain == "label":
        return labels.clone()
    return predicted


def compare(classifiers: Sequence[tuple[str, Classifier]], images: Tensor, labels: Tensor | None, *, layer: str,
            explain: str = "pred", class_name: str | None = None, output: str | None = None,
            batch_size: int = 64, unknown: Sequence[str] = ()) -> tuple[dict[str, Tensor], list[dict], dict[str, dict]]:
    """Grad-CAM of each classifier on the same images: (maps per classifier, one stats row per image and
    classifier, a summary per classifier). `images` (B, C, H, W) are uint8 as a dataset holds them, each batch
    made floats in [-1, 1] only as it is used (the floats of them all take 4 times the memory), or such floats
    already. `labels` index the classifiers' classes and then `unknown`, classes of the images that the classifiers
    do not know: an image of one is explained as the others are (its predicted class, or --class) and left out of
    the accuracy. No pass through a network takes more than `batch_size` images."""
    def batches() -> Iterator[tuple[slice, Tensor]]:
        for s in range(0, len(images), batch_size):
            part = images[s:s + batch_size]
            yield slice(s, s + batch_size), from_uint8(part) if part.dtype == torch.uint8 else part

    all_maps, rows, summary = {}, [], {}
    for name, classifier in classifiers:
        device = classifier.device
        # (The class --explain pred explains, and the accuracy.)
        predicted = torch.cat([classifier.predict(part, batch_size) for _, part in batches()])
        targets = explained_targets(classifier, predicted, labels if labels is not None else torch.zeros(0), explain,
                                    class_name, output)
        maps = torch.cat([grad_cam(classifier.net, classifier.prepare(part).to(device), layer, targets[at].to(device))
                          .cpu() for at, part in batches()])
        stats = map_statistics(maps)
        all_maps[name] = maps
        is_class = classifier.config.target == "class"
        for k in range(len(images)):
            row = {"image": k, "classifier": name, "explained": classifier.output_names[int(targets[k])]}
            if is_class:
                row["predicted"] = classifier.output_names[int(predicted[k])]
                if labels is not None:
                    row["label"] = [*classifier.output_names, *unknown][int(labels[k])]
                    row["unknown_class"] = int(labels[k] >= len(classifier.output_names))
            rows.append({**row, **{s: float(stats[s][k]) for s in STATISTICS}})
        entry = {}
        for s in STATISTICS:
            values = stats[s][~stats[s].isnan()].numpy()
            entry[s] = {"mean": float(values.mean()) if len(values) else math.nan,
                        "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
        entry["empty_maps"] = int(stats["focus"].isnan().sum())
        known = labels < len(classifier.output_names) if is_class and labels is not None else None
        if known is not None and known.any():
            entry["accuracy"] = float((predicted[known] == labels[known]).float().mean())
        summary[name] = entry
    return all_maps, rows, summary


def check_labels_known(spec: str, classes: Sequence[str], classifier: Classifier, name: str) -> None:
    """Refuse --explain label for a set (`spec`, of `classes`) with classes the classifier has no output for: an
    image of one has no label to explain (--explain pred explains it, as any other)."""
    unknown = [c for c in classes if c not in classifier.output_names]
    if not unknown:
        return
    folder = folder_of(spec)
    remove = (f"move the folders {', '.join(str(folder.resolve() / c) for c in unknown)} out of it"
              if folder is not None else "pass images of its classes")
    raise UserError(f"--explain label explains each image's own class, and the classes {', '.join(unknown)} of "
                    f"--images are not classes of {name} ({', '.join(classifier.output_names)}); {remove}, or use "
                    f"--explain pred, which explains those images too.")


def summary_table(summary: dict[str, dict]) -> str:
    head = "| classifier | " + " | ".join(STATISTICS) + " | accuracy |"
    lines = [head, "|" + "---|" * (len(STATISTICS) + 2)]
    for name, entry in summary.items():
        cells = [f"{entry[s]['mean']:.3f} ± {entry[s]['std']:.3f}" for s in STATISTICS]
        accuracy = f"{100 * entry['accuracy']:.1f}%" if "accuracy" in entry else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {accuracy} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="python -m evaluate.gradcam", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", action="append", type=cli.path_option, required=True,
                        help="a classify checkpoint; repeat to compare classifiers side by side (required)")
    parser.add_argument("--name", action="append", type=cli.text_option, default=[],
                        help="a name per --ckpt, in order (default: each checkpoint's run folder)")
    parser.add_argument("--images", required=True, help="the images: folder:PATH | plumes | cifar10 (required)")
    parser.add_argument("--num", type=cli.int_option, default=None,
                        help=f"images, a seeded subset (default: {DEFAULT_NUM}, or all there are where fewer)")
    parser.add_argument("--seed", type=cli.seed_option, default=0, help="seed of the subset (default: 0)")
    parser.add_argument("--layer", type=cli.text_option, default="layer4", help="layer whose activations are explained (default: layer4, "
                                                         "the last residual stage)")
    parser.add_argument("--explain", choices=("pred", "label"), default="pred",
                        help="class whose score is explained: the predicted one or the true label (default: pred)")
    parser.add_argument("--class", dest="class_name", type=cli.text_option, default=None, help="explain this class for every image instead")
    parser.add_argument("--output", type=cli.text_option, default=None,
                        help="for a parameter regressor: the parameter whose value is explained (default: the first)")
    parser.add_argument("--out", type=cli.path_option, default=None, help="output folder (default: RUN_DIR/gradcam of the first --ckpt)")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out (default: off)")
    parser.add_argument("--batch-size", type=cli.int_option, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error instead of one line (or set {cli.DEBUG_ENV}=1) (default: off)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    for option, value in (("--num", args.num), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{option} must be at least 1, got {value}.")
    if args.name and len(args.name) != len(args.ckpt):
        raise UserError(f"Give one --name per --ckpt ({len(args.ckpt)}), or none.")
    names = args.name or [p.parent.name for p in args.ckpt]
    if len(set(names)) != len(names):
        raise UserError(f"The classifiers need distinct names, got {', '.join(names)}; pass --name for each.")
    check_spec(args.images, "--images")
    device = resolve_device(args.device)
    classifiers = [(name, load_classifier(path, device, option="--ckpt")) for name, path in zip(names, args.ckpt)]
    first = classifiers[0][1]
    for name, c in classifiers[1:]:
        if (c.info.resolution, c.config.target) != (first.info.resolution, first.config.target):
            raise UserError(f"Classifier {name} takes {c.info.resolution} px images for target {c.config.target}, "
                            f"{names[0]} {first.info.resolution} px for {first.config.target}; compare classifiers "
                            f"of one resolution and target.")
    if args.class_name is not None and args.explain == "label":
        raise UserError(f"--explain label explains each image's own label, and --class {args.class_name} that class in "
                        f"every image; give one of them.")
    for name, c in classifiers:
        find_layer(c.net, args.layer)
        if c.config.target == "params" and (args.class_name is not None or args.explain == "label"):
            given = "--class" if args.class_name is not None else "--explain label"
            raise UserError(f"{name} is a parameter regressor, whose maps explain the parameter --output names, not "
                            f"a class; drop {given}.")
        if args.class_name is not None and args.class_name not in c.output_names:
            raise UserError(f"--class {args.class_name} is not a class of {name} ({', '.join(c.output_names)}).")
        if args.output is not None and (c.config.target != "params" or args.output not in c.output_names):
            raise UserError(f"--output {args.output} is not a parameter {name} predicts; it applies to parameter "
                            f"regressors only.")
    if args.explain == "label" and first.config.target == "class" and folder_of(args.images) is not None:
        # By listing the folder, before any image is decoded (a set that is no folder is checked once loaded).
        check_labels_known(args.images, folder_classes(args.images), first, names[0])
    out = args.out or args.ckpt[0].parent / "gradcam"
    # Nor inside a classifier's training or test images: the overlays would be read as images of that set.
    read = {"--images": args.images}
    for name, path in zip(names, args.ckpt):
        read.update({f"classifier {name}'s {option}": spec
                     for option, spec in trained_datasets(peek_checkpoint(path) or {}).items()})
    check_output_outside(out, "--out", read)
    check_output_folder(out, args.overwrite)

    with OutputFolder(out):
        data = load_dataset(args.images, first.info.resolution, channels=first.info.channels)
        num = (min(DEFAULT_NUM, len(data)) if args.num is None  # (the default takes what there is, unsaid)
               else note_capped("--num", args.num, f"--images {args.images}", len(data)))
        keep = subset_indices(len(data), num, args.seed, f"--images {args.images}")
        data = data.subset(keep)
        images = data.images  # uint8: each batch becomes floats as it is used (`compare`, `overlay_rows`)
        labels, unknown = None, []
        if data.info.class_names and first.config.target == "class":
            # Matched by name: a set of some of the classes (sample.py --dataset-out --class red) is labelled too.
            # Classes the classifier does not know are labelled after its own.
            if args.explain == "label":
                check_labels_known(args.images, data.info.class_names, first, names[0])
            unknown = [n for n in data.info.class_names if n not in first.output_names]
            known_then_unknown = [*first.output_names, *unknown]
            labels = torch.tensor([known_then_unknown.index(n) for n in data.info.class_names])[data.labels]
            for name, c in classifiers[1:]:  # the labels index the first one's classes
                if c.output_names != first.output_names:
                    raise UserError(f"Classifier {name} has the classes ({', '.join(c.output_names)}) and {names[0]} "
                                    f"({', '.join(first.output_names)}), in this order, and these labelled images "
                                    f"are scored by both; compare classifiers of one list of classes.")
        elif args.explain == "label":
            raise UserError("--explain label needs labelled images (class folders); use --explain pred.")
        maps, rows, summary = compare(classifiers, images, labels, layer=args.layer, explain=args.explain,
                                      class_name=args.class_name, output=args.output, batch_size=args.batch_size,
                                      unknown=unknown)
        of_unknown = [] if labels is None else (labels >= len(first.output_names)).tolist()  # per image
        save_overlays(overlay_rows(images, [maps[name] for name in names], args.batch_size),
                      [UNKNOWN_CAPTION if u else "" for u in of_unknown], out / "overlays.png")
        write_csv(rows, out / "stats.csv")
        shown = sorted({unknown[int(y) - len(first.output_names)] for y, u in zip(labels, of_unknown) if u}
                       ) if any(of_unknown) else []
        note = (f"\n{sum(of_unknown)} of the {len(images)} images are of classes the classifiers do not know "
                f"({', '.join(shown)}): each map explains the predicted class, and the accuracy leaves them "
                f"out.\n") if shown else ""
        table = summary_table(summary) + note
        atomic_write(out / "summary.md", lambda f: f.write(table.encode()))
        write_json({"images": args.images, "num": len(images), "layer": args.layer,
                    "explain": args.explain if args.class_name is None else f"class {args.class_name}",
                    "unknown_class_images": sum(of_unknown),
                    "classifiers": {n: str(p) for n, p in zip(names, args.ckpt)}, "summary": summary},
                   out / "summary.json")
    print(table)
    marked = f"; rows marked '{UNKNOWN_CAPTION}': images of classes the classifiers do not know" if shown else ""
    print(f"Wrote {out}: overlays.png (rows: image, then {', '.join(names)}{marked}), stats.csv, summary.md, "
          f"summary.json")
    return out


if __name__ == "__main__":
    cli.main(main)
