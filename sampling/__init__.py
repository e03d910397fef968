"""Drawing images from a trained model: what `sample.py` does, for tools that draw images too.

    draw.py     Drawer (batches of seeded images) and the four outputs: numbered images with a grid and
                manifest, a sweep, interpolations, a labelled dataset
    command.py  the sample.py run: option checks, the output folder, the checkpoint picked when none is given

What is drawn from comes as a `ddpm.source.ImageSource` (a trained model, what image k is conditioned
on, the options it accepts), which each generative stage's `load_source` makes from a checkpoint.
Image k of any output is drawn from a seed derived from (seed, k) alone, so it can be redrawn by itself.
"""
