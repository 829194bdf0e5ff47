"""Training on Ray Train, in layers a reader can follow top to bottom:

- `driver.py`: load and check data, compute or load cached features, task weights, then build
  and run the `TorchTrainer`; write the run record.
- `loop.py`: the per-worker loop (stage 1 joint training, stage 2 covariance alignment), its
  per-epoch and per-batch functions.
- `sampler.py`: which task each batch comes from, and each rank's share of the data.
- `checkpoint.py`: checkpoints as safetensors + JSON (never pickled modules).
- `device.py`: device and precision selection (CPU here, CUDA + bf16 on GPU clusters).
"""
