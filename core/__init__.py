"""What every stage and entry point shares, and nothing that trains: runtime pieces, typed configs, the
checkpoint format, published weight files, and the contract between stages and the training loop."""
