"""The one training loop every stage uses (`loop.py`) and its multi-process set-up (`distributed.py`)."""
