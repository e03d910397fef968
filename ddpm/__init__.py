"""Denoising diffusion: schedules, the U-Net, samplers, guidance, the training objective and the pixel stage.

Read in this order: `schedule.py` (the forward process and its tables), `unet.py` (the network),
`objective.py` (the training loss), `samplers.py` (the reverse process), `guidance.py`,
`conditioning.py` (what feeds the U-Net's conditioning slot), `generate.py` (network -> sampler ->
images), `stage.py` (pixel diffusion as a training stage). The latent stage (`ldm/`) reuses all of it.
"""
