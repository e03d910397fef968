"""The headline demo as a user runs it: `python train.py --stage ldm` in an empty folder.

About 25 minutes on 2 CPU cores, so skipped by default; run with `python -m pytest -m slow`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sample
import train


@pytest.mark.slow
def test_latent_demo_from_an_empty_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train.main(["--stage", "ldm"])  # trains runs/vae-demo first, then runs/ldm-demo

    heldout = [json.loads(line) for line in Path("runs/vae-demo/metrics.jsonl").read_text().splitlines()
               if '"heldout"' in line]
    assert heldout[-1]["psnr"] > 30, heldout[-1]  # reconstructions of plumes the autoencoder never saw

    out = sample.main(["--ckpt", "runs/ldm-demo/checkpoint.pt", "--param", "wind=-1", "--param", "temperature=2",
                       "--guidance-scale", "3", "--sampler", "pndm", "--steps", "25", "--gif", "--num", "16"])
    images = np.stack([np.asarray(Image.open(p), dtype=float) / 255 for p in sorted((out / "images").iterdir())])
    # Plumes: smoke on a black sky, so most pixels are near black and every image has some bright smoke.
    assert (images.max(axis=-1) < 0.1).mean() > 0.5
    assert (images.reshape(len(images), -1).max(axis=1) > 0.5).all()
    assert (out / "reverse.gif").is_file()
