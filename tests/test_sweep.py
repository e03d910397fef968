"""The quality sweep (evaluate.sweep): a row per setting, the best named by the criterion, resume
that redoes nothing finished, and changed inputs refused or redone; its measures against closed forms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.errors import UserError
from fid.kid import kid
from evaluate import sweep
from evaluate.sweep import Measured, Setting
from helpers import COLOURS, RES, colour_folder, image_size
from test_gradcam import classifier_checkpoint

CLASSES = ("blue", "green", "red")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, class_ckpt) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sweep")
    return {"root": root, "ckpt": class_ckpt, "judge": classifier_checkpoint(root / "judge.pt", 0, CLASSES),
            "real": colour_folder(root / "real", 3, seed=0), "test": colour_folder(root / "test", 2, seed=1)}


def argv(inputs, out: Path, *options: str, train: bool = True) -> list[str]:
    own = ["--ckpt", str(inputs["ckpt"]), "--judge", str(inputs["judge"]), "--real", f"folder:{inputs['real']}",
           "--test", f"folder:{inputs['test']}", "--guidance", "1,3", "--steps", "2,3", "--per-class", "2",
           "--out", str(out), "--device", "cpu", "--batch-size", "6", *options]
    trained = ["--train", "--", "--target", "class", "--resolution", str(RES), "--steps", "1", "--warmup-steps", "0",
               "--batch-size", "6"]
    return own + (trained if train else [])


def files_and_times(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "out"
    sweep.main(argv(inputs, out))
    return out


def test_one_row_per_setting_each_measured_and_trained(finished):
    summary = json.loads((finished / "sweep.json").read_text())
    names = ["real", "ddim-2-g1", "ddim-2-g3", "ddim-3-g1", "ddim-3-g3"]
    assert list(summary["rows"]) == names
    for name in names[1:]:
        assert len(list((finished / "sets" / name).rglob("*.png"))) == 6          # 2 per class x 3 classes
        assert (finished / "runs" / name / "seed0" / "checkpoint.pt").is_file()
    assert summary["images"] == 6 and summary["criterion"] == "accuracy"
    for name, row in summary["rows"].items():
        assert 0 <= row["conditioning"] <= 1 and row["fid"] >= 0 and 0 <= row["accuracy"] <= 100
        assert row["diversity"] > 0
        if name != "real":  # (the real row is a seeded subset of 6 of the 9 real images: not 2 per class)
            assert set(row["diversity_per_class"]) == set(CLASSES)
    best = max((n for n in names[1:]), key=lambda n: summary["rows"][n]["accuracy"])
    assert summary["best"] == best and f"**{best}** (best)" in (finished / "sweep.md").read_text()
    assert image_size(finished / "sweep.png")[0] > 300


def test_a_set_is_the_images_sample_py_writes_with_that_setting(finished, inputs, tmp_path):
    import sample
    sample.main(["--ckpt", str(inputs["ckpt"]), "--dataset-out", str(tmp_path / "set"), "--per-class", "2",
                 "--sampler", "ddim", "--steps", "3", "--guidance-scale", "3", "--device", "cpu"])
    ours = sorted((finished / "sets" / "ddim-3-g3").rglob("*.png"))
    theirs = sorted((tmp_path / "set").rglob("*.png"))
    assert [p.relative_to(finished / "sets" / "ddim-3-g3") for p in ours] == [p.relative_to(tmp_path / "set")
                                                                               for p in theirs]
    for a, b in zip(ours, theirs):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_the_best_follows_the_criterion_on_planted_numbers(finished, inputs, tmp_path):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(finished, out, ignore=shutil.ignore_patterns("runs"))  # (runs record their folders by path)
    for k, name in enumerate(["real", "ddim-2-g1", "ddim-2-g3", "ddim-3-g1", "ddim-3-g3"]):
        path = out / "measures" / f"{name}.json"
        saved = json.loads(path.read_text())
        saved["measures"].update(fid=[0.5, 9.0, 7.0, 3.0, 8.0][k], conditioning=[1.0, 0.2, 0.9, 0.4, 0.1][k],
                                 kid=[0.0, 0.3, 0.1, 0.2, 0.4][k])
        path.write_text(json.dumps(saved))
    no_train = [a for a in argv(inputs, out, train=False)]
    assert sweep.main(no_train)["best"] == "ddim-3-g1"                          # lowest FID; the real row never counts
    assert sweep.main(no_train + ["--criterion", "conditioning"])["best"] == "ddim-2-g3"
    assert sweep.main(no_train + ["--criterion", "kid"])["best"] == "ddim-2-g3"


def test_rerunning_redoes_nothing_finished(finished, inputs, monkeypatch, capsys):
    before = files_and_times(finished / "sets"), files_and_times(finished / "runs")

    def no(*args, **kwargs):
        raise AssertionError("redone")
    monkeypatch.setattr(sweep, "measured", no)  # (so the real row is the same 6 of the 9 real images as before)
    monkeypatch.setattr("evaluate.runs.run", no)
    monkeypatch.setattr("sampling.draw.Drawer.batch", no)
    import data.folder
    decoded, decode = [], data.folder.load_image
    monkeypatch.setattr(data.folder, "load_image", lambda path, *a, **k: decoded.append(path) or decode(path, *a, **k))
    summary = sweep.main(argv(inputs, finished))
    assert (files_and_times(finished / "sets"), files_and_times(finished / "runs")) == before
    assert summary["best"] == json.loads((finished / "sweep.json").read_text())["best"]
    real = [path for path in decoded if inputs["real"] in Path(path).parents]
    # Only the real row's 6 images, each decoded once (data.folder.decoding_once), though both its measures and
    # the check of its kept classifiers' data read them.
    assert len(set(real)) == 6 and len(real) == 6


def test_an_interrupted_sweep_continues_where_it_stopped(inputs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_fill = sweep.fill_dataset
    drawn = []

    def stop_at_the_third(draw, plan, writer):
        if len(drawn) == 2:
            raise KeyboardInterrupt
        drawn.append(writer.root.name)
        real_fill(draw, plan, writer)
    monkeypatch.setattr(sweep, "fill_dataset", stop_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        sweep.main(argv(inputs, out, train=False))
    kept = {name: files_and_times(out / "sets" / name) for name in drawn}
    monkeypatch.undo()
    calls = []
    monkeypatch.setattr("sampling.draw.Drawer.batch", lambda self, seeds, *a, **k: calls.append(len(seeds)) or
                        real_batch(self, seeds, *a, **k))
    summary = sweep.main(argv(inputs, out, train=False))
    assert {name: files_and_times(out / "sets" / name) for name in drawn} == kept
    assert sum(calls) == 2 * 6 and len(summary["rows"]) == 5                   # only the two sets left were drawn


from sampling.draw import Drawer  # noqa: E402  (the real method, kept before any monkeypatch)
real_batch = Drawer.batch


def test_changed_inputs_are_refused_or_redone(finished, inputs, tmp_path, capsys):
    import shutil
    before = files_and_times(finished)
    with pytest.raises(UserError, match="made with other options"):                # other seed: other images
        sweep.main(argv(inputs, finished, "--seed", "1"))
    for size in ("1", "3"):  # other sizes: a smaller set would keep the larger ones, a larger one extend them
        with pytest.raises(UserError, match=r"holds a sweep whose sets have 6 images \(--per-class 2\); rerun with "
                                            rf"--per-class 2 to continue it, or choose another --out for sets of "
                                            rf"{3 * int(size)} \(--per-class {size}\)"):
            sweep.main([a if a != "2" or i != argv(inputs, finished).index("--per-class") + 1 else size
                        for i, a in enumerate(argv(inputs, finished))])
    # A folder from before size.json: its finished table says the size.
    (finished / "size.json").rename(finished.parent / "size.kept")
    with pytest.raises(UserError, match=r"sets have 6 images \(--per-class 2\)"):
        sweep.main([a if a != "2" or i != argv(inputs, finished).index("--per-class") + 1 else "1"
                    for i, a in enumerate(argv(inputs, finished))])
    (finished.parent / "size.kept").rename(finished / "size.json")
    with pytest.raises(UserError, match="--steps 1 but this request gives --steps 2"):  # other training options
        sweep.main(argv(inputs, finished)[:-6] + ["--steps", "2", "--warmup-steps", "0", "--batch-size", "6"])
    other_test = colour_folder(tmp_path / "test2", 2, seed=5)                   # the kept classifiers were tested
    with pytest.raises(UserError, match="--test now names"):                    # on other images
        sweep.main([a.replace(str(inputs["test"]), str(other_test)) for a in argv(inputs, finished)])
    assert files_and_times(finished) == before
    # Without --train the measures alone depend on the test images: they are redone. (Runs record their
    # folders by path, so a copy of the sweep keeps its sets and measures, not its classifiers.)
    out = tmp_path / "out"
    shutil.copytree(finished, out, ignore=shutil.ignore_patterns("runs"))
    capsys.readouterr()
    sweep.main([a.replace(str(inputs["test"]), str(other_test)) for a in argv(inputs, out, train=False)])
    assert "measuring again" in capsys.readouterr().out
    assert all(files_and_times(out / "sets" / name) == files_and_times(finished / "sets" / name)
               for name in ("ddim-2-g1", "ddim-3-g3"))


def test_changed_test_images_or_another_write_best_set_are_refused_before_anything_is_drawn(inputs, tmp_path,
                                                                                             monkeypatch):
    """Both were refused only after the sets were drawn and measured (the measures overwritten), or, for
    --write-best, after the whole sweep."""
    import shutil
    test, out, best = shutil.copytree(inputs["test"], tmp_path / "test"), tmp_path / "out", tmp_path / "best"
    command = [a.replace(str(inputs["test"]), str(test)) for a in argv(inputs, out)]
    at = command.index("--train")
    first = command[:at] + ["--guidance", "1", "--steps", "2", "--write-best", str(best), "--write-per-class", "1"]
    sweep.main(first + command[at:])
    before = files_and_times(out)

    def drawn(*args, **kwargs):
        raise AssertionError("sets were drawn before the inputs were checked")
    monkeypatch.setattr(sweep, "draw_sets", drawn)
    with pytest.raises(UserError, match=r"--write-best \S+best holds a dataset made with other options than any "
                                        r"setting of this sweep would write \(.*seed 0 there, 1 now"):
        sweep.main(first + ["--seed", "1"] + command[at:])
    Image.new("RGB", (RES, RES), (0, 0, 0)).save(next(test.rglob("*.png")))   # one test image changes
    with pytest.raises(UserError, match=r"The images of --test .* changed since .*runs/real/seed0 was made"):
        sweep.main(command[:at] + ["--guidance", "1,2", "--steps", "2"] + command[at:])
    assert files_and_times(out) == before


def test_fewer_real_images_than_a_set_holds_make_the_real_row_of_all_of_them(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    command = argv(inputs, out)
    command[command.index("--per-class") + 1] = "4"                            # 12 images per set; 9 real
    summary = sweep.main(command)
    assert "--real holds 9 images, fewer than the 12 of each set" in capsys.readouterr().out
    assert summary["images"] == 12 and summary["real_images"] == 9
    config = json.loads((out / "runs" / "real" / "seed0" / "config.json").read_text())
    assert config["data"]["num_samples"] == 9                                  # every real image, not 12


def test_options_are_checked_before_any_work(inputs, tmp_path):
    out = tmp_path / "out"
    for options, message in ((["--criterion", "accuracy"], "needs the trained classifiers"),
                             # (in the sweep's options, where SamplingConfig names its fields)
                             (["--sampler", "pndm", "--steps", "2"], r"^--sampler pndm needs at least 4 steps, got 2\.$"),
                             (["--steps", "5000"], r"^--steps must be at most the model's T = \d+, got 5000\.$"),
                             (["--num", "5"], "use --per-class"),
                             (["--write-num", "4"], "add --write-best"),
                             (["--classes", "wind:3"], "not conditioned on parameters"),
                             (["--spacing", "uniform,leading"], r"^--spacing must be one of .*, got 'leading'\.$"),
                             (["--guidance", "1.5,1.5000001"], r"--guidance 1.5 and 1.5000001 both give the set "
                                                               r"ddim-2-g1.5"),
                             (["--guidance", "1,nan"], r"^--guidance takes finite scales, got nan\.$"),  # not sample.py's
                             (["--guidance", "inf"], r"^--guidance takes finite scales, got inf\.$")):   # --guidance-scale
        with pytest.raises(UserError, match=message):
            sweep.main(argv(inputs, out, *options, train=False))
        assert not out.exists() or not any((out / "sets").rglob("*.png"))
    command = argv(inputs, tmp_path / "never", train=False)
    command[command.index("--test") + 1] = f"folder:{inputs['real']}"  # the real row would be tested on itself
    with pytest.raises(UserError, match=r"^The test images are not held out: every image of --real \(.*\) is also "
                                        r"one of --test \(.*: 6 of its 9\); test on images"):  # sets of 6: a subset
        sweep.main(command)
    assert not (tmp_path / "never").exists()


def test_write_best_writes_the_full_set_with_the_chosen_setting(finished, inputs, tmp_path):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(finished, out, ignore=shutil.ignore_patterns("runs"))
    summary = sweep.main(argv(inputs, out, "--write-best", str(tmp_path / "best"), "--write-per-class", "3",
                              train=False))
    request = json.loads((tmp_path / "best" / "dataset.json").read_text())["request"]
    chosen = summary["settings"][summary["best"]]
    assert request["sampling"]["steps"] == chosen["steps"] and request["sampling"]["guidance_scale"] == chosen["guidance"]
    assert len(list((tmp_path / "best").rglob("*.png"))) == 9


# ---------------------------------------------------------------------------------------------
# the measures


def test_mean_pairwise_distance_and_diversity_against_closed_forms():
    square = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # 4 sides of 1, 2 diagonals of sqrt 2
    assert sweep.mean_pairwise_distance(square) == pytest.approx((4 + 2 * np.sqrt(2)) / 6)
    real = Measured(np.concatenate([square, 10 + square]), {"a": np.arange(4), "b": np.arange(4, 8)})
    half = Measured(np.concatenate([square / 2, 3 * square]), {"a": np.arange(4), "b": np.arange(4, 8)})
    result = sweep.diversity(half, real)
    assert result["diversity_per_class"] == pytest.approx({"a": 0.5, "b": 3.0})
    assert result["diversity"] == pytest.approx(1.75)


def test_distances_of_a_set_to_itself_are_zero_and_grow_with_a_shift():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 4)), rng.normal(size=(300, 4))
    assert sweep.distances(Measured(x, {}), Measured(x, {}), seed=0)["fid"] == pytest.approx(0, abs=1e-6)
    shifted = sweep.distances(Measured(x + 2, {}), Measured(x, {}), seed=0)
    assert shifted["fid"] == pytest.approx(16, rel=1e-6)                       # |mu1 - mu2|^2, covariances equal
    # KID (cubic kernel (x.y / d + 1)^3): two draws of one Gaussian are near 0, a shifted one far above.
    same = sweep.distances(Measured(y, {}), Measured(x, {}), seed=0)
    assert abs(same["kid"]) < 0.05 * shifted["kid"] and shifted["kid_subset_size"] == 300
    # Equal sets under 1000 images: KID on both whole sets, with no spread (each subset would be them);
    # a larger second set gives subsets that differ, and their spread.
    assert same["kid"] == pytest.approx(kid(y, x, num_subsets=1, subset_size=300)[0]) and same["kid_std"] is None
    larger = sweep.distances(Measured(y, {}), Measured(rng.normal(size=(400, 4)), {}), seed=0)
    assert larger["kid_subset_size"] == 300 and larger["kid_std"] > 0


def measured_rows(fids: dict[str, float], std: float = 0.0) -> dict[str, dict[str, float]]:
    """Rows of a sweep with these FIDs, each with the bootstrap std `std`."""
    return {name: {"fid": fid, "fid_std": std} for name, fid in fids.items()}


def test_paper_orderings_are_read_off_the_fids():
    settings = [Setting(s, n, 2.0) for s in ("ddim", "pndm", "ddpm") for n in (10, 50)]
    fids = {"ddim-10-g2": 20.0, "ddim-50-g2": 10.0, "pndm-10-g2": 15.0, "pndm-50-g2": 8.0, "ddpm-10-g2": 90.0,
            "ddpm-50-g2": 40.0}
    lines = sweep.paper_orderings(measured_rows(fids), settings)
    assert lines == ["PNDM better than DDIM at 50 steps: holds (FID 8 ± 0 against 10 ± 0: they differ by 2, beyond "
                     "the noise margin of 0, 2 combined standard deviations).",
                     "DDIM far better than DDPM at 10 steps: holds, 4.5x lower (FID 20 ± 0 against 90 ± 0: they differ "
                     "by 70, beyond the noise margin of 0, 2 combined standard deviations)."]
    fids["pndm-50-g2"], fids["ddpm-10-g2"] = 12.0, 19.0
    lines = sweep.paper_orderings(measured_rows(fids), settings)
    assert "does not hold (FID 12 ± 0 against 10 ± 0" in lines[0]
    assert lines[1].startswith("DDIM far better than DDPM at 10 steps: does not hold")


def test_an_order_the_fids_noise_could_swap_is_within_noise_and_says_its_margin():
    """The verdicts compared two FIDs with no margin: 8 against 8.1, from sets whose FIDs move by 0.5 when drawn
    again, was "holds"."""
    settings = [Setting(s, n, 2.0) for s in ("ddim", "pndm", "ddpm") for n in (10, 50)]
    fids = {"ddim-10-g2": 20.0, "ddim-50-g2": 8.1, "pndm-10-g2": 15.0, "pndm-50-g2": 8.0, "ddpm-10-g2": 21.0,
            "ddpm-50-g2": 40.0}
    # A margin of 2 * sqrt(0.5^2 + 0.5^2) = 1.41: differences of 0.1 and 1 are within it.
    lines = sweep.paper_orderings(measured_rows(fids, std=0.5), settings)
    assert lines == ["PNDM better than DDIM at 50 steps: within noise (FID 8 ± 0.5 against 8.1 ± 0.5: they differ "
                     "by 0.1, within the noise margin of 1.4, 2 combined standard deviations).",
                     "DDIM far better than DDPM at 10 steps: within noise (FID 20 ± 0.5 against 21 ± 0.5: they "
                     "differ by 1, within the noise margin of 1.4, 2 combined standard deviations)."]
    # Beyond the margin, each way.
    fids.update({"pndm-50-g2": 6.0, "ddpm-10-g2": 22.0})
    lines = sweep.paper_orderings(measured_rows(fids, std=0.5), settings)
    assert lines[0].startswith("PNDM better than DDIM at 50 steps: holds (FID 6 ± 0.5 against 8.1 ± 0.5: they "
                               "differ by 2.1, beyond the noise margin of 1.4")
    assert lines[1].startswith("DDIM far better than DDPM at 10 steps: holds, but not by far (FID 20 ± 0.5 against 22")
    fids.update({"pndm-50-g2": 10.0, "ddpm-10-g2": 18.0})
    lines = sweep.paper_orderings(measured_rows(fids, std=0.5), settings)
    assert lines[0].startswith("PNDM better than DDIM at 50 steps: does not hold (FID 10 ± 0.5 against 8.1")
    assert lines[1].startswith("DDIM far better than DDPM at 10 steps: does not hold (FID 20 ± 0.5 against 18")
    # A failed DDIM order within noise is no failure: the first step is not blamed for it.
    from ddpm.schedule import Schedule
    fids["ddpm-10-g2"] = 19.5
    cosine = sweep.paper_orderings(measured_rows(fids, std=0.5), settings, Schedule.from_name("cosine", 1000))
    assert "within noise" in cosine[1] and "first step" not in cosine[1]


def test_the_bootstrap_spread_of_fid_is_its_sampling_noise():
    """Features of N(delta, I) against many of N(0, I): FID is about |mean - 0|^2, whose estimate from n images
    moves by 2 |delta| / sqrt(n), so its spread must shrink by 2 when the set grows 4 times."""
    rng = np.random.default_rng(0)
    real = rng.normal(size=(20000, 4))
    delta = np.array([1.0, 0.0, 0.0, 0.0])
    spreads = {n: sweep.fid_spread(delta + rng.normal(size=(n, 4)), real, seed=0) for n in (400, 1600)}
    for n, spread in spreads.items():
        assert 0.7 * 2 / np.sqrt(n) < spread < 1.4 * 2 / np.sqrt(n), (n, spread)
    assert spreads[400] > 1.5 * spreads[1600]
    features = delta + rng.normal(size=(400, 4))
    assert sweep.fid_spread(features, real, seed=3) == sweep.fid_spread(features, real, seed=3)  # seeded
    assert sweep.distances(Measured(features, {}), Measured(real, {}), seed=3)["fid_std"] == sweep.fid_spread(
        features, real, seed=3)


def test_measures_kept_by_a_sweep_before_fids_noise_are_measured_again(finished, inputs, tmp_path, capsys,
                                                                        monkeypatch):
    """Rows an older sweep kept lack fid_std: the sweep goes on with them, measuring what they lack, and draws
    nothing."""
    import shutil
    out = tmp_path / "out"
    shutil.copytree(finished, out, ignore=shutil.ignore_patterns("runs"))
    kept = {}
    for path in (out / "measures").glob("*.json"):
        saved = json.loads(path.read_text())
        del saved["measures"]["fid_std"]
        kept[path.stem] = saved["measures"]
        path.write_text(json.dumps(saved))
    monkeypatch.setattr("sampling.draw.Drawer.batch", lambda *a, **k: pytest.fail("a set was drawn again"))
    capsys.readouterr()
    rows = sweep.main(argv(inputs, out, train=False))["rows"]
    assert "real.json was measured before the sweep estimated the noise of FID; measuring again" in capsys.readouterr().out
    assert set(rows) == set(kept)
    for name, row in rows.items():
        assert row["fid"] == pytest.approx(kept[name]["fid"]) and row["fid_std"] > 0
        assert json.loads((out / "measures" / f"{name}.json").read_text())["measures"]["fid_std"] == row["fid_std"]
    assert f"| {rows['real']['fid']:.3g} ± {rows['real']['fid_std']:.2g} |" in (out / "sweep.md").read_text()


def test_the_same_sweep_with_out_spelled_otherwise_redoes_nothing(finished, inputs, monkeypatch):
    """The sets' runs recorded --out as it was typed: the same folder, named relative to where the command runs
    (or from another folder), was refused as another set ("now names folder:out/sets/...")."""
    before = files_and_times(finished / "runs")

    def no(*args, **kwargs):
        raise AssertionError("redone")
    monkeypatch.setattr("evaluate.runs.run", no)
    monkeypatch.setattr("sampling.draw.Drawer.batch", no)
    for folder, out in ((finished.parent, "out"), (finished, "."), (finished / "sets", "../../out")):
        monkeypatch.chdir(folder)
        sweep.main(argv(inputs, Path(out)))
    assert files_and_times(finished / "runs") == before


def test_paper_orderings_are_read_per_timestep_spacing():
    settings = [Setting(s, 10, 2.0, spacing) for spacing in ("uniform", "trailing") for s in ("ddim", "ddpm")]
    assert [s.name for s in settings] == ["ddim-10-g2", "ddpm-10-g2", "ddim-10-g2-trailing", "ddpm-10-g2-trailing"]
    fids = dict(zip((s.name for s in settings), (39.0, 2.0, 1.0, 2.5)))
    lines = sweep.paper_orderings(measured_rows(fids, std=0.1), settings)
    assert lines == ["DDIM far better than DDPM at 10 steps (uniform spacing): does not hold (FID 39 ± 0.1 against "
                     "2 ± 0.1: they differ by 37, beyond the noise margin of 0.28, 2 combined standard deviations).",
                     "DDIM far better than DDPM at 10 steps (trailing spacing): holds, 2.5x lower (FID 1 ± 0.1 against "
                     "2.5 ± 0.1: they differ by 1.5, beyond the noise margin of 0.28, 2 combined standard "
                     "deviations)."]
    # Given the model's schedule, a failed order whose first step is short of pure noise says so, with the abar
    # there; trailing spacing starts at T - 1, and the linear schedule's abar at t = 900 is small enough.
    from ddpm.schedule import Schedule
    cosine = sweep.paper_orderings(measured_rows(fids, std=0.1), settings, Schedule.from_name("cosine", 1000))
    assert cosine[0].startswith(lines[0]) and "first step is at t = 900, where this schedule keeps abar = 0.024" in cosine[0]
    assert cosine[1] == lines[1]
    linear = sweep.paper_orderings(measured_rows(fids, std=0.1), settings, Schedule.from_name("linear", 1000))
    assert linear == lines


def test_spacings_are_swept_and_each_set_is_what_sample_py_writes_with_it(inputs, tmp_path):
    import sample
    out = tmp_path / "out"
    summary = sweep.main(argv(inputs, out, "--spacing", "uniform,trailing", "--steps", "2", "--guidance", "1",
                              train=False))
    assert list(summary["rows"]) == ["real", "ddim-2-g1", "ddim-2-g1-trailing"]
    sample.main(["--ckpt", str(inputs["ckpt"]), "--dataset-out", str(tmp_path / "set"), "--per-class", "2",
                 "--sampler", "ddim", "--steps", "2", "--guidance-scale", "1", "--spacing", "trailing",
                 "--device", "cpu"])
    files = sorted(p.relative_to(tmp_path / "set") for p in (tmp_path / "set").rglob("*.png"))
    differs = False
    for name in files:
        trailing = np.asarray(Image.open(out / "sets" / "ddim-2-g1-trailing" / name))
        assert np.array_equal(trailing, np.asarray(Image.open(tmp_path / "set" / name)))
        differs |= not np.array_equal(trailing, np.asarray(Image.open(out / "sets" / "ddim-2-g1" / name)))
    assert len(files) == 6 and differs  # the other spacing draws other images from the same seeds


def test_best_setting_ignores_the_real_row_and_nan():
    rows = {"real": {"fid": 0.0}, "a": {"fid": float("nan")}, "b": {"fid": 3.0}, "c": {"fid": 2.0}}
    assert sweep.best_setting(rows, "fid", higher=False) == "c"
    assert sweep.best_setting(rows, "fid", higher=True) == "b"
    assert sweep.best_setting({"real": {"fid": 1.0}}, "fid", higher=False) is None


def test_a_parameter_model_is_judged_by_the_bins_of_one_parameter(params_ckpt, inputs, tmp_path):
    judge = classifier_checkpoint(tmp_path / "judge.pt", 0, ("wind0", "wind1", "wind2"))
    for split, seed in (("real", 0), ("test", 1)):
        colour_folder(tmp_path / split, 2, seed)
        for k, colour in enumerate(COLOURS):
            (tmp_path / split / colour).rename(tmp_path / split / f"wind{k}")
    own = ["--ckpt", str(params_ckpt), "--judge", str(judge), "--real", f"folder:{tmp_path / 'real'}",
           "--test", f"folder:{tmp_path / 'test'}", "--num", "6", "--steps", "2", "--out", str(tmp_path / "out"),
           "--device", "cpu"]
    with pytest.raises(UserError, match="does not know blue, green, red of the --test images"):
        sweep.main(own[:7] + [f"folder:{inputs['test']}"] + own[8:] + ["--classes", "wind:3:-1:1"])
    with pytest.raises(UserError, match="add --classes"):
        sweep.main(own)
    with pytest.raises(UserError, match="does not know the classes heat0"):
        sweep.main(own + ["--classes", "heat:3"])
    summary = sweep.main(own + ["--classes", "wind:3:-1:1", "--guidance", "1,2"])
    assert list(summary["rows"]) == ["real", "ddim-2-g1", "ddim-2-g2"] and summary["criterion"] == "fid"
    written = sorted(p.parent.name for p in (tmp_path / "out" / "sets" / "ddim-2-g2").rglob("*.png"))
    assert len(written) == 6 and set(written) <= {"wind0", "wind1", "wind2"}
    assert all(0 <= row["conditioning"] <= 1 for name, row in summary["rows"].items() if name != "real")


def test_a_set_changed_after_its_classifier_was_trained_is_refused_in_the_sweeps_own_terms(inputs, tmp_path):
    out = tmp_path / "out"
    command = argv(inputs, out)
    command[command.index("--guidance") + 1], command[command.index("--steps") + 1] = "1", "2"
    sweep.main(command)
    image = next((out / "sets" / "ddim-2-g1").rglob("*.png"))
    Image.new("RGB", image_size(image), (255, 255, 0)).save(image)
    with pytest.raises(UserError, match=r"The images of the set of ddim-2-g1 \(folder:.*\) changed") as refused:
        sweep.main(command)
    assert "--synthetic" not in str(refused.value) and "row name" not in str(refused.value)


def test_the_table_shows_a_trained_error_to_four_significant_digits():
    """Mean absolute errors that differ in the third decimal (the best named by them) must differ in the table."""
    row = dict(conditioning=0.5, fid=1.0, fid_std=0.1, kid=0.01, diversity=1.0, accuracy_per_seed=[0.5868, 0.5870])
    rows = {"a": {**row, "accuracy": 0.5869, "accuracy_std": 0.00014}, "b": {**row, "accuracy": 0.5882,
                                                                                 "accuracy_std": 0.0021}}
    common = dict(rows=rows, best="a", images=4, test="folder:t", judge="j", conditioning_metric="agreement",
                  criterion="accuracy", orderings=[])
    table = sweep.markdown({**common, "trained_metric": "trained mean absolute error"})
    assert "| 0.5869 ± 0.00014 |" in table and "| 0.5882 ± 0.0021 |" in table
    assert "Best by trained mean absolute error: a." in table
    rows["a"].update(accuracy=73.456, accuracy_std=0.5)
    assert "| 73.46 ± 0.50 |" in sweep.markdown({**common, "trained_metric": "trained top-1 (%)"})


# ---------------------------------------------------------------------------------------------
# refusals before any work, and measures kept only when they still hold


def refused_before_drawing(monkeypatch):
    def drawn(*args, **kwargs):
        raise AssertionError("sets were drawn before the inputs were checked")
    monkeypatch.setattr(sweep, "draw_sets", drawn)


def test_a_write_best_folder_that_is_inside_or_around_the_sweep_is_refused_before_any_work(inputs, tmp_path,
                                                                                         monkeypatch):
    """It was refused only after the whole sweep (the dataset folder held the sweep's files, or the sweep's sets
    would be read as a class of the dataset), or it was written and the rerun refused --out for holding it."""
    refused_before_drawing(monkeypatch)
    out = tmp_path / "sweep"
    for best, where in ((out / "best", "lies inside"), (out, "is"), (tmp_path, "holds")):
        with pytest.raises(UserError, match=rf"--write-best \S+ {where} --out \S+sweep; give the dataset a folder"):
            sweep.main(argv(inputs, out, "--write-best", str(best), "--write-per-class", "3", train=False))
    assert not out.exists()


def test_outputs_inside_the_models_or_the_judges_images_are_refused_before_any_work(inputs, tmp_path, monkeypatch):
    """As sample.py refuses a --dataset-out there: the sets would be read as images of those folders."""
    from core.checkpoint import peek_checkpoint
    from data import folder_of, trained_datasets
    refused_before_drawing(monkeypatch)
    trained_on = folder_of(trained_datasets(peek_checkpoint(inputs["ckpt"]))["--dataset"])
    before = files_and_times(trained_on)
    into = ["--write-best", str(trained_on / "best"), "--write-per-class", "3"]
    for option, extra in (("--out", []), ("--write-best", into)):
        out = trained_on / "sweep" if option == "--out" else tmp_path / "out"
        with pytest.raises(UserError, match=rf"^{option} \S+ lies inside the image folder of the model's --dataset"):
            sweep.main(argv(inputs, out, *extra, train=False))
    judged = colour_folder(tmp_path / "judged", 1, seed=3)  # the images the judge was tested on
    judge = classifier_checkpoint(tmp_path / "judge.pt", 0, CLASSES, data={"test_dataset": f"folder:{judged}"})
    command = argv(inputs, judged / "sweep", train=False)
    command[command.index("--judge") + 1] = str(judge)
    with pytest.raises(UserError, match=r"^--out \S+ lies inside the image folder of the judge's --test-dataset"):
        sweep.main(command)
    assert files_and_times(trained_on) == before and not (judged / "sweep").exists()


def test_a_bad_judge_is_refused_in_the_sweeps_own_terms(inputs, tmp_path):
    """The messages named --features, an option of python -m fid, not of the sweep."""
    command = argv(inputs, tmp_path / "out", train=False)
    command[command.index("--judge") + 1] = str(inputs["ckpt"])              # a diffusion model as the judge
    with pytest.raises(UserError, match="from stage 'ddpm'") as refused:
        sweep.main(command)
    told = str(refused.value)
    assert "point --judge at a checkpoint of that stage" in told and "--features" not in told
    command[command.index("--judge") + 1] = str(tmp_path / "none.pt")
    with pytest.raises(UserError, match=r"^--judge \S+none.pt does not exist"):
        sweep.main(command)
    assert not (tmp_path / "out").exists()


def test_a_training_target_the_images_cannot_give_is_refused_before_anything_is_drawn(inputs, tmp_path, monkeypatch):
    """Each was refused when the first classifier started, after every set had been drawn and measured."""
    refused_before_drawing(monkeypatch)
    command = argv(inputs, tmp_path / "out")
    with pytest.raises(UserError, match=r"--target params \(train.py's, after --\) trains on parameters, and --real "
                                        r"would have none"):
        sweep.main([a if a != "class" else "params" for a in command])     # colour folders have no parameters
    fewer = colour_folder(tmp_path / "test", 2, seed=1, classes={k: v for k, v in COLOURS.items() if k != "green"})
    with pytest.raises(UserError, match=r"The classes of --real \(blue, green, red\) differ from those of --test "
                                        r"\(blue, red\)"):
        sweep.main([a.replace(str(inputs["test"]), str(fewer)) for a in command])
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def unconditional_ckpt(class_ckpt, tmp_path_factory) -> Path:
    import train
    from core.checkpoint import peek_checkpoint
    from data import trained_datasets
    from helpers import tiny_args
    run_dir = tmp_path_factory.mktemp("unconditional")
    train.main(tiny_args(run_dir, trained_datasets(peek_checkpoint(class_ckpt))["--dataset"], "--steps", "1"))
    return run_dir / "checkpoint.pt"


def test_an_unconditional_model_cannot_be_ranked_by_conditioning(inputs, unconditional_ckpt, tmp_path, monkeypatch):
    """Every set's conditioning is NaN, so no setting was named best and --write-best wrote nothing, silently."""
    refused_before_drawing(monkeypatch)
    command = [a for a in argv(inputs, tmp_path / "out", "--criterion", "conditioning", "--write-best",
                               str(tmp_path / "best"), "--write-num", "4", train=False)]
    command[command.index("--ckpt") + 1] = str(unconditional_ckpt)
    at = command.index("--guidance")
    command[at:at + 2] = []
    at = command.index("--per-class")
    command[at:at + 2] = ["--num", "6"]
    with pytest.raises(UserError, match="trained without conditioning, so no set has a conditioning to rank by"):
        sweep.main(command)
    assert not (tmp_path / "out").exists() and not (tmp_path / "best").exists()


def test_write_best_without_a_best_setting_says_so(finished, inputs, tmp_path):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(finished, out, ignore=shutil.ignore_patterns("runs"))
    for path in (out / "measures").glob("*.json"):
        saved = json.loads(path.read_text())
        saved["measures"]["fid"] = float("nan")
        path.write_text(json.dumps(saved))
    with pytest.raises(UserError, match=r"No setting has a finite fid, so there is no best one to write into "
                                        r"--write-best"):
        sweep.main(argv(inputs, out, "--write-best", str(tmp_path / "best"), "--write-per-class", "3", train=False))
    assert "none (no finite value)" in (out / "sweep.md").read_text() and not (tmp_path / "best").exists()


def test_measures_are_redone_when_label_names_change_or_the_file_is_damaged(inputs, tmp_path, capsys):
    """A dataset's fingerprint counts labels by index: test folders renamed in their sorted order kept it, and
    the measures (which match classes by name) were reused; a measures file that is JSON but not ours crashed."""
    import shutil
    test = shutil.copytree(inputs["test"], tmp_path / "test")
    judge = classifier_checkpoint(tmp_path / "judge.pt", 0, (*CLASSES, "violet"))
    command = [a.replace(str(inputs["test"]), str(test)).replace(str(inputs["judge"]), str(judge))
               for a in argv(inputs, tmp_path / "out", "--guidance", "1", "--steps", "2", train=False)]
    first = sweep.main(command)["rows"]["ddim-2-g1"]
    assert set(first["diversity_per_class"]) == set(CLASSES)                 # per class: the test set has them
    (test / "red").rename(test / "violet")                                  # same images, same label indices
    capsys.readouterr()
    again = sweep.main(command)["rows"]["ddim-2-g1"]
    assert "measuring again" in capsys.readouterr().out
    assert set(again["diversity_per_class"]) == {"all"}                      # red is not a test class any more
    (tmp_path / "out" / "measures" / "ddim-2-g1.json").write_text("[]")
    assert sweep.main(command)["rows"]["ddim-2-g1"] == again
    assert "ddim-2-g1.json is damaged or incomplete; measuring again" in capsys.readouterr().out


def test_the_pseudo_numerical_samplers_are_named_as_their_paper_names_them():
    settings = [Setting(s, 50, 1.0) for s in ("ddim", "spndm")]
    lines = sweep.paper_orderings(measured_rows({"ddim-50-g1": 3.0, "spndm-50-g1": 2.0}), settings)
    assert lines[0].startswith("S-PNDM better than DDIM at 50 steps: holds (FID 2 ± 0 against 3 ± 0")


def test_the_line_that_names_the_written_setting_gives_every_option_that_changes_its_images(inputs, tmp_path,
                                                                                            capsys):
    """It left out --spacing (and --seed): sample.py with the options it gave drew other images."""
    summary = sweep.main(argv(inputs, tmp_path / "out", "--guidance", "1", "--steps", "2", "--spacing", "trailing",
                              "--seed", "3", "--write-best", str(tmp_path / "best"), "--write-per-class", "1",
                              train=False))
    assert summary["best"] == "ddim-2-g1-trailing"
    assert ("with ddim-2-g1-trailing (sample.py --sampler ddim --steps 2 --guidance-scale 1 --spacing trailing "
            "--seed 3)") in capsys.readouterr().out


def test_bins_that_no_image_of_a_set_falls_in_are_refused_before_anything_is_drawn(params_ckpt, tmp_path, monkeypatch):
    """Two images in three bins: the sets' classifiers lacked a class of the test images, and the first was
    refused (in train.py's terms) after every set had been drawn and the real row trained."""
    refused_before_drawing(monkeypatch)
    judge = classifier_checkpoint(tmp_path / "judge.pt", 0, ("wind0", "wind1", "wind2"))
    for split, seed in (("real", 0), ("test", 1)):
        colour_folder(tmp_path / split, 2, seed)
        for k, colour in enumerate(COLOURS):
            (tmp_path / split / colour).rename(tmp_path / split / f"wind{k}")
    command = ["--ckpt", str(params_ckpt), "--judge", str(judge), "--real", f"folder:{tmp_path / 'real'}", "--test",
               f"folder:{tmp_path / 'test'}", "--classes", "wind:3:-1:1", "--num", "2", "--steps", "2", "--out",
               str(tmp_path / "out"), "--device", "cpu", "--train", "--", "--target", "class", "--steps", "1",
               "--warmup-steps", "0"]
    with pytest.raises(UserError, match=r"No image of a set falls in the bins wind\d of --classes wind:3:-1:1, so its "
                                        r"classifier could not be tested .*; raise --num"):
        sweep.main(command)
    assert not (tmp_path / "out").exists()


def test_test_samples_beyond_the_test_images_are_said_before_anything_is_drawn(inputs, tmp_path, capsys, monkeypatch):
    """--test-samples after -- asking for more images than --test holds became all of them in every run, unsaid."""
    class Drawn(Exception):
        pass

    def folder_lock(out):
        raise Drawn
    monkeypatch.setattr(sweep, "FolderLock", folder_lock)
    with pytest.raises(Drawn):
        sweep.main(argv(inputs, tmp_path / "out") + ["--test-samples", "50"])  # (after --)
    said = capsys.readouterr().out.splitlines()
    assert f"--test-samples 50 asks for more images than --test folder:{inputs['test']} holds (6); using 6." in said


def test_a_rerun_hashes_each_set_once_though_every_measure_and_kept_run_checks_it(finished, inputs, monkeypatch):
    """Each set's measures and each kept run's check hashed its images again: the --test folder 10 times."""
    import data.dataset
    hashed, compute = [], data.dataset.content_hash
    monkeypatch.setattr(data.dataset, "content_hash", lambda *tensors: hashed.append(tensors) or compute(*tensors))
    sweep.main(argv(inputs, finished))
    assert len(hashed) == 6                                                     # --test, the real row and 4 sets
    assert len({compute(*tensors) for tensors in hashed}) == 6
