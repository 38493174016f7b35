"""The world model and its files: what a checkpoint is, independent of how it was trained.

presets    -- model-size table and the frozen ModelConfig
math       -- symlog / two-hot regression and the running Q scale
world      -- WorldModel: networks and forward passes (no losses)
checkpoint -- official checkpoint files: read, convert old API, detect size, save; load_any
quantize   -- post-training quantization of a WorldModel and its file format

Imports only datapipe (task sets, atomic writes) and trainer.errors.
"""
