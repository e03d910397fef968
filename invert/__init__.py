"""Diffusion inversion (Zhou et al. 2023, "Training on Thin Air"): one learned conditioning vector per
real image against a frozen diffusion model, and new training images drawn from variations of them.

    config.py      the run config and presets
    frozen.py      the frozen model: loaded read-only, fingerprinted, and the x0 it denoises
    embeddings.py  the embedding table and where each vector starts
    stage.py       the invert stage: objective, quality signal, preview, checkpoint records
    variations.py  an inversion checkpoint as a source of images: noise, interpolation, guidance
"""
