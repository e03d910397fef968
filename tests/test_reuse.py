"""Work that is reused is checked to be the work that was asked for (issue 19).

Every place that keeps an earlier result instead of computing it again (the results table's finished
and interrupted runs, a classifier's held-out set on resume, an inversion's real images on resume, the
latent cache, FID statistics files) is given a result made from other inputs than the current request,
and must refuse it (leaving every file as it was) or redo it, saying which.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

import fid.__main__ as fid_command
import train
from core.runtime import Runtime
import data.dataset
from data import DatasetInfo, ImageDataset
from evaluate import experiment
from fid.features import NETWORK, weights_fingerprint
from fid.stats import Provenance, Statistics, save_statistics
from fid.weights import build_fid_inception
from helpers import RES, colour_folder, image_size
from ldm.latents import cache_path, encode_dataset, latent_dataset
from vae.autoencoder import AutoencoderConfig, AutoencoderKL

# ---------------------------------------------------------------------------------------------
# what each kind of reuse starts from


def repaint(folder: Path) -> None:
    """Change the images of `folder` in place (every one, so that any seeded subset sees it): same paths,
    other pixels."""
    for k, path in enumerate(sorted(folder.rglob("*.png"))):
        Image.new("RGB", image_size(path), (255, 255, k)).save(path)


def experiment_argv(root: Path, *options: str, synthetic: Path | None = None, test: Path | None = None) -> list[str]:
    """The results table of real, gen and real+gen, one seed, --match-size; `options` go to every run."""
    return ["--real", f"folder:{root / 'real'}", "--synthetic", f"gen=folder:{synthetic or root / 'synth'}",
            "--test", f"folder:{test or root / 'test'}", "--seeds", "1", "--match-size", "--out", str(root / "out"),
            "--device", "cpu", "--", "--target", "class", "--resolution", str(RES), "--steps", "1",
            "--warmup-steps", "0", "--batch-size", "6", *options]


@pytest.fixture(scope="module")
def finished_experiment(tmp_path_factory) -> tuple[Path, Path]:
    """(root, a pristine copy of it): the folders real (12 images), synth (6), test (6), and a finished
    table in root/out (three runs of one step). Runs record their folders by path, so every test works
    in root itself, restored from the copy first."""
    root = tmp_path_factory.mktemp("experiment")
    colour_folder(root / "real", 4, seed=0)
    colour_folder(root / "synth", 2, seed=1)
    colour_folder(root / "test", 2, seed=2)
    experiment.main(experiment_argv(root))
    pristine = root.parent / f"{root.name}-pristine"
    shutil.copytree(root, pristine)
    return root, pristine


@pytest.fixture
def table(finished_experiment) -> Path:
    """The finished table's root, as it was when it finished."""
    root, pristine = finished_experiment

    def copy(source: str, target: str) -> None:
        # Checkpoints are only ever replaced (written beside, then renamed), never written into, so a
        # link is as good as a copy and saves copying 100 MB per test.
        if source.endswith(".pt"):
            Path(target).hardlink_to(source)
        else:
            shutil.copy2(source, target)

    shutil.rmtree(root)
    shutil.copytree(pristine, root, copy_function=copy)
    return root


def drop_final_evaluation(run_dir: Path) -> None:
    """Make a finished run look interrupted: its checkpoint stays, its final held-out line goes."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(l for l in lines if json.loads(l)["split"] == "train") + "\n")


class Reuse(NamedTuple):
    again: Callable[[], Any]                    # the call that would reuse the earlier result
    kept: tuple[Path, ...] = ()                 # what a refusal must leave exactly as it was
    redone: Callable[[], None] | None = None    # checks that a redone result is the current inputs'


# -- the results table ------------------------------------------------------------------------


def table_again(root: Path, *options: str, **folders: Path) -> Reuse:
    """The results table of `root` asked for again (with `options` for every run, or other folders), which
    may touch nothing but root/out."""
    return Reuse(lambda: experiment.main(experiment_argv(root, *options, **folders)), (root / "out",))


def another_synthetic_folder(request) -> Reuse:
    root = request.getfixturevalue("table")
    other = colour_folder(root / "other", 2, seed=5)
    return table_again(root, synthetic=other)


def synthetic_folder_changed_in_place(request) -> Reuse:
    root = request.getfixturevalue("table")
    repaint(root / "synth")
    return table_again(root)


def mixed_rows_synthetic_part_changed(request) -> Reuse:
    root = request.getfixturevalue("table")
    shutil.rmtree(root / "out" / "runs" / "gen")    # so that the real+gen run is the first to meet the change
    repaint(root / "synth")
    return table_again(root)


def real_folder_changed_in_place(request) -> Reuse:
    root = request.getfixturevalue("table")
    repaint(root / "real")
    return table_again(root)


def another_test_folder(request) -> Reuse:
    root = request.getfixturevalue("table")
    other = colour_folder(root / "other-test", 2, seed=6)
    return table_again(root, test=other)


def another_test_folder_after_checkpoints_were_deleted(request) -> Reuse:
    root = request.getfixturevalue("table")
    for checkpoint in (root / "out").rglob("checkpoint.pt"):  # to save space: config.json still says what was done
        checkpoint.unlink()
    other = colour_folder(root / "other-test", 2, seed=6)
    return table_again(root, test=other)


def changed_test_set(request) -> Reuse:
    root = request.getfixturevalue("table")
    repaint(root / "test")
    return table_again(root)


def another_training_option(request) -> Reuse:
    root = request.getfixturevalue("table")
    return table_again(root, "--steps", "2")


def without_match_size(request) -> Reuse:
    root = request.getfixturevalue("table")
    argv = [a for a in experiment_argv(root) if a != "--match-size"]
    return Reuse(lambda: experiment.main(argv), (root / "out",))


def interrupted_run_of_another_folder(request) -> Reuse:
    """The run to resume is the third; the first, to be trained, must not be: the check comes first."""
    root = request.getfixturevalue("table")
    shutil.rmtree(root / "out" / "runs" / "real")
    drop_final_evaluation(root / "out" / "runs" / "gen" / "seed0")
    other = colour_folder(root / "other", 2, seed=5)
    return table_again(root, synthetic=other)


# -- resuming a classifier or an inversion ------------------------------------------------------


def classifier_test_folder_changed(request) -> Reuse:
    root = request.getfixturevalue("table")
    run_dir = root / "out" / "runs" / "real" / "seed0"
    repaint(root / "test")
    return Reuse(lambda: train.main(["--stage", "classify", "--run-dir", str(run_dir), "--device", "cpu", "--resume",
                                     "--steps", "2"]), (run_dir,))


def inversion_images_changed(request) -> Reuse:
    class_ckpt, tmp_path = request.getfixturevalue("class_ckpt"), request.getfixturevalue("tmp_path")
    images = tmp_path / "images"
    shutil.copytree(json.loads((class_ckpt.parent / "config.json").read_text())["data"]["dataset"][len("folder:"):],
                    images)
    run_dir = tmp_path / "run"
    train.main(["--stage", "invert", "--run-dir", str(run_dir), "--device", "cpu", "--model", str(class_ckpt),
                "--dataset", f"folder:{images}", "--resolution", str(RES), "--steps", "1", "--batch-size", "2",
                "--log-every", "1", "--sample-every", "0", "--preview-images", "1", "--preview-steps", "2",
                "--eval-images", "2", "--eval-timesteps", "1", "--cache-dir", str(tmp_path / "cache")])
    repaint(images)
    return Reuse(lambda: train.main(["--stage", "invert", "--run-dir", str(run_dir), "--device", "cpu", "--resume",
                                     "--steps", "2"]), (run_dir,))


# -- the latent cache ---------------------------------------------------------------------------


def planted_latent_cache(stored: Callable[[dict], dict]) -> Callable[[Any], Reuse]:
    """A cache file under the name of this autoencoder and these images, holding `stored(right contents)`."""
    def arrange(request) -> Reuse:
        tmp_path = request.getfixturevalue("tmp_path")
        torch.manual_seed(0)
        autoencoder = AutoencoderKL(AutoencoderConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                                      latent_channels=2, resolution=RES)).eval()
        info = DatasetInfo("planted", RES, 3, (), (), (), 4)
        images = ImageDataset(torch.randint(0, 256, (4, 3, RES, RES), dtype=torch.uint8),
                              torch.zeros(4, dtype=torch.long), torch.zeros(4, 0), info)
        right = {"moments": encode_dataset(autoencoder, images, 1, 4).numpy(), "vae_fingerprint": "ae0123",
                 "data_hash": images.fingerprint()}
        path = cache_path(tmp_path, info, "ae0123", images.fingerprint(), 1)
        path.parent.mkdir(parents=True)
        np.savez(path, **stored(right))
        run = lambda: latent_dataset(autoencoder, "ae0123", images, hflip=False, cache_dir=tmp_path, batch=4,
                                     runtime=Runtime(torch.device("cpu")))

        def redone() -> None:
            with np.load(path) as cached:                  # replaced by what these inputs give
                assert str(cached["vae_fingerprint"]) == "ae0123" and str(cached["data_hash"]) == right["data_hash"]
                assert np.array_equal(cached["moments"], right["moments"])
            assert torch.equal(run().moments, torch.from_numpy(right["moments"]))

        return Reuse(run, redone=redone)
    return arrange


# -- FID statistics files -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fid_net():
    return build_fid_inception("random")


def fid_reference(recorded: Callable[[str], Any], other_side: str) -> Callable[[Any], Reuse]:
    """A statistics file whose record is `recorded(fingerprint of this run's weights)`, compared with a
    folder (`other_side` "folder") or with a file recorded with this run's weights ("file")."""
    def arrange(request) -> Reuse:
        tmp_path, monkeypatch, net = (request.getfixturevalue(name) for name in ("tmp_path", "monkeypatch", "fid_net"))
        monkeypatch.setattr("fid.features.build_fid_inception", lambda weights: net)
        monkeypatch.setattr("fid.inception.INPUT_SIZE", 75)    # the smallest input Inception takes: 16x less work
        ours = weights_fingerprint(net)
        rng = np.random.default_rng(0)
        (tmp_path / "images").mkdir()
        for k in range(3):
            Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{k}.png")
        stats = Statistics(mu=rng.normal(size=2048), sigma=np.eye(2048))
        save_statistics(Statistics(stats.mu, stats.sigma, recorded(ours)), tmp_path / "reference.npz")
        save_statistics(Statistics(stats.mu, stats.sigma, Provenance(NETWORK, ours, "all", 3)), tmp_path / "ours.npz")
        other = str(tmp_path / ("images" if other_side == "folder" else "ours.npz"))
        return Reuse(lambda: fid_command.main([str(tmp_path / "reference.npz"), other, "--weights", "random", "--device",
                                           "cpu", "--num-workers", "0", "--no-kid"]))
    return arrange


def with_weights(weights: str | None, network: str | None = None) -> Callable[[str], Any]:
    """A record of `weights` (None: this run's) and `network` (None: ours)."""
    return lambda ours: Provenance(network or NETWORK, weights or ours, "pytorch-fid", 3)


# ---------------------------------------------------------------------------------------------
# the table


class Case(NamedTuple):
    reuse: str                                  # what keeps an earlier result
    arrange: Callable[[Any], Reuse]             # makes it from other inputs than the request
    outcome: str                                # "refused", "redone", or "warned" (nothing recorded to check)
    message: str                                # what the error, or the output, says (a regular expression)


CASES = {
    "table: another folder under the row's name": Case(
        "experiment", another_synthetic_folder, "refused",
        r"^--synthetic gen now names folder:\S+/other but \S+/runs/gen/seed0 was trained on folder:\S+/synth; "
        r"choose another --out or another row name\.$"),
    "table: the row's folder changed in place": Case(
        "experiment", synthetic_folder_changed_in_place, "refused",
        r"^The images of --synthetic gen \(folder:\S+/synth\) changed since \S+/runs/gen/seed0 was made with them; "
        r"restore them, or choose another --out or another row name\.$"),
    "table: a mixed row's synthetic part changed": Case(
        "experiment", mixed_rows_synthetic_part_changed, "refused",
        r"^The images of --synthetic gen \(folder:\S+/synth\) changed since \S+/runs/real\+gen/seed0 was made"),
    "table: the real folder changed in place": Case(
        "experiment", real_folder_changed_in_place, "refused",
        r"^The images of --real \(folder:\S+/real\) changed since \S+/runs/real/seed0 was made with them; restore "
        r"them, or choose another --out\.$"),
    "table: another test folder": Case(
        "experiment", another_test_folder, "refused",
        r"^--test now names folder:\S+/other-test but \S+/runs/real/seed0 was trained on folder:\S+/test; "
        r"choose another --out\.$"),
    "table: another test folder, the runs' checkpoints deleted": Case(
        "experiment", another_test_folder_after_checkpoints_were_deleted, "refused",
        r"^--test now names folder:\S+/other-test but \S+/runs/real/seed0 was trained on folder:\S+/test; "
        r"choose another --out\.$"),
    "table: the test folder changed in place": Case(
        "experiment", changed_test_set, "refused",
        r"^The images of --test \(folder:\S+/test\) changed since \S+/runs/real/seed0 was made with them"),
    "table: another training option": Case(
        "experiment", another_training_option, "refused",
        r"^\S+/runs/real/seed0 was trained with --steps 1 but this request gives --steps 2 "),
    "table: another --match-size count": Case(
        "experiment", without_match_size, "refused",
        r"^\S+/runs/real/seed0 was trained on 6 images of folder:\S+/real but this request trains on all "
        r"\(--match-size, --synthetic-multiple\)"),
    "table: an interrupted run of another folder": Case(
        "experiment", interrupted_run_of_another_folder, "refused",
        r"^--synthetic gen now names folder:\S+/other but \S+/runs/gen/seed0 was trained on folder:\S+/synth"),
    "classifier resume: the test folder changed": Case(
        "resume", classifier_test_folder_changed, "refused", r"^The data changed since .*held-out test images"),
    "inversion resume: the real images changed": Case(
        "resume", inversion_images_changed, "refused", r"^The data changed since .*content fingerprint"),
    "latent cache: another autoencoder's latents": Case(
        "latent cache", planted_latent_cache(lambda right: {**right, "vae_fingerprint": "other0"}), "redone",
        r"Latent cache \S+ was encoded by another autoencoder \(weights other0, not ae0123\); encoding again\."),
    "latent cache: other images' latents": Case(
        "latent cache", planted_latent_cache(lambda right: {**right, "moments": right["moments"][::-1].copy(),
                                                            "data_hash": "0ther"}), "redone",
        r"Latent cache \S+ was encoded from other images \(data 0ther, not \w+\); encoding again\."),
    "latent cache: latents of another shape": Case(
        "latent cache", planted_latent_cache(lambda right: {**right, "moments": right["moments"][:2]}), "redone",
        r"Latent cache \S+ holds float16 latents of shape \(2, 1, 4, 8, 8\), not float16 \(4, 1, 4, 8, 8\); "
        r"encoding again\."),
    "FID statistics: other weights than this run's": Case(
        "fid", fid_reference(with_weights("feedfacefeedface"), "folder"), "refused",
        r"^statistics file \S+reference.npz was computed with feature weights feedfacefeedface but this run's "
        r"features \(weights random\) with \w+; recompute the statistics with --save-stats and the same --weights\.$"),
    "FID statistics: another feature network": Case(
        "fid", fid_reference(with_weights(None, "SomeOtherNet/pool"), "folder"), "refused",
        r"^statistics file \S+reference.npz holds features of SomeOtherNet/pool but this run's features"),
    "FID statistics: two files of different weights": Case(
        "fid", fid_reference(with_weights("feedfacefeedface"), "file"), "refused",
        r"^statistics file \S+reference.npz was computed with feature weights feedfacefeedface but statistics "
        r"file \S+ours.npz with"),
    "FID statistics: an old file that records nothing": Case(
        "fid", fid_reference(lambda ours: None, "folder"), "warned",
        r"warning: statistics file \S+reference.npz does not record which feature network and weights computed it"),
}


def state(paths: tuple[Path, ...]) -> dict[str, Any]:
    """Every file under `paths` with its size and modification time (None for a path that is absent);
    lock files, which a refused command takes and gives back, aside."""
    seen: dict[str, Any] = {}
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []
        seen[str(path)] = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.name != ".lock"]
    return seen


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_a_reused_result_made_from_other_inputs_is_refused_or_redone(case, request, capsys):
    reuse = case.arrange(request)
    capsys.readouterr()
    before = state(reuse.kept)
    if case.outcome == "refused":
        with pytest.raises(ValueError) as refused:
            reuse.again()
        assert re.search(case.message, str(refused.value)), str(refused.value)
        assert state(reuse.kept) == before                 # nothing trained, written or reported
        return
    reuse.again()
    captured = capsys.readouterr()
    assert re.search(case.message, captured.out + captured.err), captured
    if reuse.redone is not None:
        reuse.redone()


def test_the_same_request_keeps_every_finished_run(table, capsys, monkeypatch):
    """The control: asked again for what it holds, the table trains nothing and reports the same numbers; and
    though every row's runs check their data, no image is decoded twice."""
    import data.folder
    decoded, decode = [], data.folder.load_image
    monkeypatch.setattr(data.folder, "load_image", lambda path, *a, **k: decoded.append(path) or decode(path, *a, **k))
    before = state((table / "out" / "runs",))
    summary = experiment.main(experiment_argv(table))
    assert decoded and len(decoded) == len(set(decoded))
    assert "Training on" not in capsys.readouterr().out and state((table / "out" / "runs",)) == before
    assert summary["rows"] == json.loads((table / "out" / "results.json").read_text())["rows"]


def test_the_same_folders_written_otherwise_keep_every_finished_run(table, capsys, monkeypatch):
    """Kept runs compared their datasets' paths as typed: the same --real relative to where the table runs, or
    --synthetic through "..", was refused as another folder ("--real now names folder:real but ...")."""
    before = state((table / "out" / "runs",))
    kept = json.loads((table / "out" / "results.json").read_text())["rows"]
    monkeypatch.chdir(table)
    argv = experiment_argv(table, synthetic=table / "test" / ".." / "synth")
    argv[argv.index("--real") + 1] = "folder:real"
    summary = experiment.main(argv)
    assert "Training on" not in capsys.readouterr().out and state((table / "out" / "runs",)) == before
    assert {name: row["values"] for name, row in summary["rows"].items()} == {name: row["values"]
                                                                               for name, row in kept.items()}


def test_the_python_api_refuses_statistics_of_other_weights_too(tmp_path):
    from fid import FeatureOptions, fid_between
    mu, sigma = np.zeros(4), np.eye(4)
    for name, weights in (("a.npz", "0123abcd"), ("b.npz", "4567ef01"), ("c.npz", "0123abcd")):
        save_statistics(Statistics(mu, sigma, provenance=Provenance(NETWORK, weights, "pytorch-fid", 10)),
                        tmp_path / name)
    with pytest.raises(ValueError, match="computed with feature weights 0123abcd but .* with 4567ef01"):
        fid_between(tmp_path / "a.npz", tmp_path / "b.npz", FeatureOptions(device="cpu"))
    on_cpu = FeatureOptions(device="cpu")
    assert fid_between(tmp_path / "a.npz", tmp_path / "c.npz", on_cpu).fid == pytest.approx(0.0, abs=1e-9)


def test_within_decoding_once_a_folder_is_decoded_once_and_a_rewritten_file_again(tmp_path, monkeypatch):
    import data.folder
    from data.folder import decoding_once, load_folder
    folder = colour_folder(tmp_path / "images", 2, seed=0)
    decoded, decode = [], data.folder.load_image
    monkeypatch.setattr(data.folder, "load_image", lambda path, *a, **k: decoded.append(path) or decode(path, *a, **k))
    plain = load_folder(folder, RES)
    assert len(decoded) == 6
    with decoding_once():
        first, again = load_folder(folder, RES), load_folder(folder, RES, num_samples=3, seed=1)
        assert len(decoded) == 12                       # once each, the subset taken from the same decodes
        assert torch.equal(first.images, plain.images)
        assert torch.equal(again.images, plain.images[[plain.files.index(f) for f in again.files]])
        rewritten = folder / "red" / "0.png"
        Image.new("RGB", (RES, RES), (1, 2, 3)).save(rewritten)  # another size on disk: another file
        changed = load_folder(folder, RES)
        assert decoded[12:] == [rewritten]
        assert (changed.images[plain.files.index("red/0.png")] == torch.tensor([1, 2, 3])[:, None, None]).all()
        with pytest.warns(UserWarning, match="enlarged"):
            load_folder(folder, RES * 2)                # another size: decoded anew
        assert len(decoded) == 19
    load_folder(folder, RES)                            # after the block: decoded again, as any load is
    assert len(decoded) == 25



def test_within_decoding_once_a_folder_set_is_hashed_once_and_a_rewritten_file_again(tmp_path, monkeypatch):
    import data.dataset
    from data.folder import decoding_once, load_folder
    folder = colour_folder(tmp_path / "images", 2, seed=0)
    hashed, compute = [], data.dataset.content_hash
    monkeypatch.setattr(data.dataset, "content_hash", lambda *tensors: hashed.append(1) or compute(*tensors))

    def fresh(dataset) -> str:  # its fingerprint, computed from its tensors
        return compute(dataset.images, dataset.labels, dataset.params)
    plain = load_folder(folder, RES).fingerprint()
    with decoding_once():
        assert [load_folder(folder, RES).fingerprint() for _ in range(3)] == [plain] * 3
        some = load_folder(folder, RES, num_samples=3, seed=1)
        assert some.fingerprint() == some.fingerprint() == fresh(some)
        assert len(hashed) == 3                         # the plain one, then once for the three loads, once for some
        part = load_folder(folder, RES).subset(torch.tensor([0, 2]))
        assert part.fingerprint() == part.fingerprint() == fresh(part) and len(hashed) == 4
        grey = load_folder(folder, RES, channels=1)     # the same files read otherwise: hashed on their own
        assert grey.fingerprint() == fresh(grey) != plain and len(hashed) == 5
        Image.new("RGB", (RES, RES), (1, 2, 3)).save(folder / "red" / "0.png")  # another size on disk: another file
        changed = load_folder(folder, RES)
        assert changed.fingerprint() == fresh(changed) != plain and len(hashed) == 6
    load_folder(folder, RES).fingerprint()              # after the block: hashed again, as any set is
    assert len(hashed) == 7


def test_a_table_of_several_seeds_hashes_each_set_of_a_folder_once_and_a_rewritten_one_again(tmp_path, monkeypatch):
    """Every run hashed the images of its sets again for its checkpoint (and every check of a kept run), though
    `decoding_once` decoded them once: a table of 3 rows and 2 seeds hashed the --test folder 6 times."""
    for name, seed, per_class in (("real", 0, 4), ("synth", 1, 2), ("test", 2, 2)):
        colour_folder(tmp_path / name, per_class, seed=seed)
    hashed, fingerprint = [], ImageDataset.fingerprint
    compute = data.dataset.content_hash

    def spy(dataset: ImageDataset) -> str:  # a fingerprint, and whether it was computed for it
        count = len(computed)
        value = fingerprint(dataset)
        if len(computed) > count:
            hashed.append((dataset.info.name, dataset.files, value))
        return value
    computed = []
    monkeypatch.setattr(data.dataset, "content_hash", lambda *tensors: computed.append(1) or compute(*tensors))
    monkeypatch.setattr(ImageDataset, "fingerprint", spy)
    argv = experiment_argv(tmp_path)
    argv[argv.index("--seeds") + 1] = "2"
    experiment.main(argv)
    counts: dict[tuple, int] = {}
    for name, files, _ in hashed:
        counts[name, files] = counts.get((name, files), 0) + 1
    folders = {f"folder:{(tmp_path / name).resolve()}" for name in ("real", "synth", "test")}
    assert folders < {name for name, _ in counts} and any("+" in name for name, _ in counts)  # (a mixed row's too)
    assert set(counts.values()) == {1}, counts
    test = f"folder:{(tmp_path / 'test').resolve()}"
    before = {value for name, _, value in hashed if name == test}
    hashed.clear()
    repaint(tmp_path / "test")                          # between two commands
    with pytest.raises(ValueError, match=r"^The images of --test \(folder:.*\) changed since"):
        experiment.main(argv)
    assert {value for name, _, value in hashed if name == test}.isdisjoint(before)


def test_subsets_of_a_kept_set_are_keyed_by_their_positions_alone(tmp_path):
    """Subsets keyed by the raw bytes of their index tensors: int64 [1] and int32 [1, 0] are the same bytes, and
    the second subset was given the first one's fingerprint. Positions may be a list, an array or a mask."""
    from data.folder import decoding_once, load_folder
    folder = colour_folder(tmp_path / "images", 2, seed=0)
    with decoding_once():
        dataset = load_folder(folder, RES)
        one, two = dataset.subset(torch.tensor([1])), dataset.subset(torch.tensor([1, 0], dtype=torch.int32))
        for part in (one, two):
            assert part.fingerprint() == data.dataset.content_hash(part.images, part.labels, part.params)
        assert one.fingerprint() != two.fingerprint()
        mask = torch.zeros(len(dataset), dtype=torch.bool)
        mask[[0, 2]] = True
        same = [dataset.subset(indices) for indices in ([0, 2], np.array([0, 2]), mask, torch.tensor([0, 2]))]
        assert len({part.fingerprint() for part in same}) == 1 and all(len(part) == 2 for part in same)


def test_a_table_made_with_relative_folders_keeps_its_runs_from_another_directory(tmp_path, capsys, monkeypatch):
    """A run recorded its --dataset as typed ("folder:real"), so the same table from another directory, its
    folders named from there, refused its own runs as made from other inputs."""
    for name, seed, per_class in (("real", 0, 4), ("synth", 1, 2), ("test", 2, 2)):
        colour_folder(tmp_path / name, per_class, seed=seed)
    monkeypatch.chdir(tmp_path)
    first = experiment.main(experiment_argv(Path(".")))
    assert "Training on" in capsys.readouterr().out
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = experiment.main(experiment_argv(Path("..")))
    assert "Training on" not in capsys.readouterr().out
    assert {name: row["values"] for name, row in again["rows"].items()} == {name: row["values"]
                                                                             for name, row in first["rows"].items()}


def test_a_run_started_on_a_relative_folder_resumes_from_another_directory(tmp_path, monkeypatch):
    """Its --dataset was recorded as typed: from elsewhere the resume looked for the folder there ("the folder
    real does not exist"), and the same folder named from there was refused as a changed --dataset."""
    import train
    from helpers import tiny_args
    colour_folder(tmp_path / "real", 2, seed=0)
    run_dir = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    train.main(tiny_args(run_dir, "folder:real", steps=1))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    train.main(["--run-dir", str(run_dir), "--resume", "--steps", "2", "--device", "cpu"])
    train.main(["--run-dir", str(run_dir), "--resume", "--steps", "3", "--device", "cpu", "--dataset", "folder:../real"])
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 3
    other = colour_folder(tmp_path / "other", 2, seed=1)
    with pytest.raises(ValueError, match=r"^--dataset \(the run's: folder:.*real\) cannot change when resuming"):
        train.main(["--run-dir", str(run_dir), "--resume", "--steps", "4", "--device", "cpu", "--dataset",
                    f"folder:{other}"])
