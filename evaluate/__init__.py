"""Judging synthetic data: tools that read image folders and checkpoints and report on them.

    experiment.py   python -m evaluate.experiment: the results table (real, synthetic and mixed training sets,
                    each tested on held-out real images)
    gradcam.py      python -m evaluate.gradcam: where classifiers look, side by side
    consistency.py  python -m evaluate.consistency: does a conditional model draw what it is asked for

FID and KID live in fid/; the classifier these tools train and load is the classify stage.
"""
