"""What feeds the U-Net's conditioning slot, in one place: for training batches, preview grids and
the conditions a user asks for when sampling (a class, parameter values, a sweep, the two ends of
an interpolation).

The slot takes one of three things (see `ddpm.unet.UNet`): integer labels (B,) for cond="class",
parameters normalised to [-1, 1] over the training range (B, P) for cond="params", or vectors
already in the conditioning space (B, E), `cond_emb`, e.g. an interpolation between two classes'
embeddings. Users speak in class names and in the data's own units; this module translates.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from core.errors import UserError
from core.runtime import derive_seed
from data import DatasetInfo
from ddpm.unet import UNetConfig


@dataclass(frozen=True)
class Conditions:
    """One condition per image, ready for the U-Net, and what a manifest records about each."""
    cond: torch.Tensor | None = None       # labels (B,) or normalised parameters (B, P)
    cond_emb: torch.Tensor | None = None   # or vectors in the conditioning space (B, E)
    records: tuple[dict[str, Any], ...] = ()
    reference: torch.Tensor | None = None  # (E,) what guidance pushes away from, shared by all (None: the null embedding)

    def to(self, device: torch.device) -> Conditions:
        move = (lambda x: None if x is None else x.to(device))
        return Conditions(move(self.cond), move(self.cond_emb), self.records, move(self.reference))

    def __getitem__(self, rows: slice) -> Conditions:
        take = (lambda x: None if x is None else x[rows])
        return Conditions(take(self.cond), take(self.cond_emb), self.records[rows], self.reference)


def batch_condition(kind: str, info: DatasetInfo, batch: Any) -> torch.Tensor | None:
    """The condition of each item of a training batch (any named tuple with `label` and `params`)."""
    if kind == "class":
        return batch.label
    if kind == "params":
        return info.normalize_params(batch.params)
    return None


# The most columns of a grid that sweeps or interpolates a condition (--sweep's N, --frames): 256 images of 64 px
# make a picture 16,000 px wide already.
MAX_COLUMNS = 256

# Parameter k's sweep in a preview grid starts 3k images later, so that the parameters do not rise in lockstep.
PREVIEW_PARAM_OFFSET = 3


def preview_condition(unet: UNetConfig, n: int, device: torch.device) -> torch.Tensor | None:
    """Conditions for a preview grid: classes in turn, or parameters swept evenly across [-1, 1]."""
    if unet.cond == "class":
        return torch.arange(n, device=device) % unet.num_classes
    if unet.cond == "params":
        sweep = torch.linspace(-1, 1, n, device=device)
        return torch.stack([sweep.roll(PREVIEW_PARAM_OFFSET * k) for k in range(unet.num_params)], dim=1)
    return None


# ---------------------------------------------------------------------------------------------
# conditions a user asks for


def parse_class(name: str, info: DatasetInfo) -> int:
    """A class given by name or index."""
    names = list(info.class_names)
    if name in names:
        return names.index(name)
    if name.isdigit() and int(name) < len(names):
        return int(name)
    raise UserError(f"Unknown class {name!r}; choose one of {', '.join(names)} or an index below {len(names)}.")


def parse_param_values(items: Sequence[str], info: DatasetInfo, option: str = "--param", warn: bool = True
                       ) -> dict[str, float]:
    """NAME=VALUE items -> {name: value} in the data's units; each name at most once, finite values; with
    `warn`, a value outside the training range is warned of."""
    values = {}
    for item in items:
        name, _, text = item.partition("=")
        if name not in info.param_names or not text:
            raise UserError(f"{option} {item!r} is not NAME=VALUE with NAME one of {', '.join(info.param_names)}.")
        try:
            value = float(text)
        except ValueError:
            raise UserError(f"{option} {item!r} has a value that is not a number.") from None
        if not math.isfinite(value):
            raise UserError(f"{option} {item!r} must be a finite number.")
        if name in values:
            raise UserError(f"{option} gives {name} twice; give each parameter once.")
        if warn:
            _warn_outside_range(f"{option} {item!r} lies", (value,), info.param_ranges[info.param_names.index(name)])
        values[name] = value
    return values


def _warn_outside_range(what: str, values: Sequence[float], trained: tuple[float, float]) -> None:
    """Warn where `what` (an option and its value: "--param 'wind=3' lies", "--sweep ... reaches") asks for values
    beyond the `trained` range of a parameter."""
    low, high = trained
    if not all(low <= value <= high for value in values):
        warnings.warn(f"{what} outside the range the model was trained on ({low:g} to {high:g}): its images there "
                      "are an extrapolation.", stacklevel=3)


def check_request(kind: str, label: str | None, params: Sequence[str]) -> None:
    """Refuse a class for a parameter model, parameters for a class model, or either for an unconditional one."""
    if kind == "none" and (label is not None or params):
        raise UserError("This model was trained without conditioning; drop --class and --param.")
    if kind == "class" and params:
        raise UserError("This model is conditioned on classes, not parameters; use --class instead of --param.")
    if kind == "params" and label is not None:
        raise UserError("This model is conditioned on parameters, not classes; use --param NAME=VALUE instead of --class.")


# derive_seed(seed, k, PARAM_DRAW_KEY) seeds the parameters image k draws where none are given (a non-zero key:
# derive_seed pads its keys with zeros, so (seed, k, 0) would be image k's own noise seed).
PARAM_DRAW_KEY = 1


def requested(kind: str, info: DatasetInfo, indices: Sequence[int], seed: int, *, label: str | None = None,
              params: Sequence[str] = ()) -> Conditions:
    """The condition of image k for each k in `indices`: the class asked for (default: the classes in
    turn), or the parameters asked for, each one not given drawn uniformly from its training range
    with a seed of (seed, k), so image k's condition does not depend on which other images are drawn."""
    check_request(kind, label, params)
    if kind == "none":
        return Conditions(records=tuple({} for _ in indices))
    if kind == "class":
        names = info.class_names
        labels = [parse_class(label, info)] * len(indices) if label is not None else [k % len(names) for k in indices]
        return Conditions(cond=torch.tensor(labels), records=tuple({"class": names[y]} for y in labels))
    fixed = parse_param_values(params, info)
    rows = []
    for k in indices:
        generator = torch.Generator().manual_seed(derive_seed(seed, k, PARAM_DRAW_KEY))
        draw = torch.rand(len(info.param_names), generator=generator)
        rows.append([fixed.get(name, lo + (hi - lo) * float(u))
                     for name, (lo, hi), u in zip(info.param_names, info.param_ranges, draw)])
    return _from_raw_params(torch.tensor(rows, dtype=torch.float64), info)


def _from_raw_params(raw: torch.Tensor, info: DatasetInfo) -> Conditions:
    records = tuple(dict(zip(info.param_names, map(float, row))) for row in raw)
    return Conditions(cond=info.normalize_params(raw.float()), records=records)


# ---------------------------------------------------------------------------------------------
# sweeps and interpolation


def sweep_columns(spec: str, kind: str, info: DatasetInfo, base: Conditions, *, label: str | None = None,
                  params: Sequence[str] = ()) -> tuple[list[Conditions], list[str]]:
    """The conditions of each column of a sweep grid, and a label per column.

    `spec` is NAME=START:STOP:N for a parameter model (the other parameters keep each row's value in
    `base`), or "class" (every class) or "class=A,B,..." for a class model. Rows are `base`'s images,
    drawn for `label` and `params` (as `requested` takes them), which must not fix what the sweep sets.
    """
    if kind == "none":
        raise UserError("--sweep needs a conditional model; this one was trained without conditioning.")
    name, _, values = spec.partition("=")
    if kind == "class":
        if name != "class":
            raise UserError(f"--sweep {spec!r}: this model is conditioned on classes; use --sweep class or class=A,B,...")
        if label is not None:
            raise UserError(f"--sweep {spec} sets the class of each column, so --class {label} would be ignored; "
                            f"drop --class.")
        labels = [parse_class(v, info) for v in values.split(",")] if values else list(range(len(info.class_names)))
        twice = next((y for k, y in enumerate(labels) if y in labels[:k]), None)
        if twice is not None:  # (by name or by index): two columns of one condition, which show nothing more
            raise UserError(f"--sweep {spec} names the class {info.class_names[twice]} twice; name each class once.")
        columns = [Conditions(cond=torch.full((len(base.records),), y),
                              records=tuple({"class": info.class_names[y]} for _ in base.records)) for y in labels]
        return columns, [info.class_names[y] for y in labels]
    if name not in info.param_names or values.count(":") != 2:
        raise UserError(f"--sweep {spec!r} is not NAME=START:STOP:N with NAME one of {', '.join(info.param_names)}.")
    try:
        start, stop, count = values.split(":")
        start, stop, count = float(start), float(stop), int(count)
    except ValueError:
        raise UserError(f"--sweep {spec!r}: START and STOP must be numbers and N a whole number.") from None
    if count < 2 or count > MAX_COLUMNS or not (math.isfinite(start) and math.isfinite(stop)):
        raise UserError(f"--sweep {spec!r}: give finite START and STOP and N from 2 to {MAX_COLUMNS} (the columns of "
                        f"one grid).")
    fixed = [item for item in params if item.partition("=")[0] == name]
    if fixed:
        raise UserError(f"--sweep {spec} sets {name} in each column, so --param {fixed[0]} would be ignored; drop "
                        f"that --param.")
    column = info.param_names.index(name)
    _warn_outside_range(f"--sweep {spec!r} reaches", (start, stop), info.param_ranges[column])  # as a --param is
    raw = torch.tensor([[r[p] for p in info.param_names] for r in base.records], dtype=torch.float64)
    columns = []
    for value in torch.linspace(start, stop, count, dtype=torch.float64):
        swept = raw.clone()
        swept[:, column] = value
        columns.append(_from_raw_params(swept, info))
    return columns, [f"{name}={float(v):.3g}" for v in torch.linspace(start, stop, count)]


def interpolation_end(kind: str, info: DatasetInfo, start: Conditions, to: Sequence[str]) -> Conditions:
    """The condition at the far end of an interpolation from `start` (one image).

    `to` is a class (class models; default: the class after start's) or NAME=VALUE items (parameter
    models; each parameter not named is mirrored within its training range, so wind=-1 goes to wind=1).
    """
    if kind == "class":
        if len(to) > 1:
            raise UserError("--interpolate-to takes one class for a class-conditional model.")
        current = info.class_names.index(start.records[0]["class"])
        y = parse_class(to[0], info) if to else (current + 1) % len(info.class_names)
        return Conditions(cond=torch.tensor([y]), records=({"class": info.class_names[y]},))
    given = parse_param_values(to, info, option="--interpolate-to")
    row = [given.get(name, lo + hi - start.records[0][name]) for name, (lo, hi) in zip(info.param_names, info.param_ranges)]
    return _from_raw_params(torch.tensor([row], dtype=torch.float64), info)


def interpolate_conditions(a: Conditions, b: Conditions, weights: torch.Tensor, embed) -> Conditions:
    """Conditions along the straight line from `a` to `b` (one image each) at `weights` in [0, 1].

    Parameters are interpolated in the data's (normalised) units; classes, which have no values in
    between, through their learned embeddings, `embed(cond) -> (1, E)`.
    """
    w = weights.view(-1, 1)
    if a.cond is not None and a.cond.is_floating_point():
        cond = (1 - w) * a.cond + w * b.cond
        records = tuple({k: (1 - float(x)) * a.records[0][k] + float(x) * b.records[0][k] for k in a.records[0]}
                        for x in weights)
        return Conditions(cond=cond, records=records)
    emb_a, emb_b = embed(a.cond), embed(b.cond)
    names = (a.records[0]["class"], b.records[0]["class"])
    records = tuple({"class": f"{names[0]}->{names[1]}@{float(x):.2f}"} for x in weights)
    return Conditions(cond_emb=(1 - w) * emb_a + w * emb_b, records=records)


def slerp(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two noise tensors (Shoemake 1985), one result per weight.

    Gaussian noise of dimension d lies near the sphere of radius sqrt(d); a straight line between two
    such draws passes well inside it (at the midpoint the norm shrinks by about 1/sqrt(2)), where the
    model never saw x_T. Along the great circle every point has the norm of a real draw.
    """
    assert a.shape == b.shape, f"slerp needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}"
    fa, fb = a.flatten().double(), b.flatten().double()
    cos = torch.dot(fa, fb) / (fa.norm() * fb.norm())
    omega = torch.arccos(cos.clamp(-1, 1))
    w = weights.double().view(-1, 1)
    if omega.abs() < 1e-6:  # (nearly) parallel: the arc is the line
        out = (1 - w) * fa + w * fb
    else:
        out = (torch.sin((1 - w) * omega) * fa + torch.sin(w * omega) * fb) / torch.sin(omega)
    return out.to(a.dtype).view(len(weights), *a.shape)
