"""Judging synthetic data: tools that read image folders and checkpoints and report on them.

    experiment.py   python -m evaluate.experiment: the results table (real, synthetic and mixed training sets,
                    each tested on held-out real images)
    gradcam.py      python -m evaluate.gradcam: where classifiers look, side by side
    consistency.py  python -m evaluate.consistency: does a conditional model draw what it is asked for

FID and KID live in fid/; the classifier these tools train and load is the classify stage.
"""


def note_capped(option: str, asked: int, source: str, holds: int) -> int:
    """The count to use for `option`, which asked for `asked` images of `source`: all it holds where that is fewer,
    said in one line (not refused: a tool that takes every image there is has done what it could)."""
    if asked <= holds:
        return asked
    print(f"{option} {asked} asks for more images than {source} holds ({holds}); using {holds}.", flush=True)
    return holds
