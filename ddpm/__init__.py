"""Pixel-space denoising diffusion: schedules, the U-Net, samplers, guidance and the training stage.

Read in this order: `schedule.py` (the forward process and its tables), `unet.py` (the network),
`samplers.py` (the reverse process), `guidance.py`, `generate.py` (network -> sampler), `stage.py`.
"""
