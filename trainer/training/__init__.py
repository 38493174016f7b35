"""Training a world model on a store: `trainer train` and `trainer distill`.

config      -- TrainConfig: one field per flag, checked before anything runs
agent       -- TDMPC2Agent: optimisers, the update step, reward distillation
train       -- the training loop (and compile_update, load_teacher)
runfolder   -- a run folder: config.json, summary.json, resume checks
runstate    -- our training checkpoints (exact resume) and export to the official format
runlog      -- metrics files, step timing, peak memory
distributed -- data-parallel training under torchrun (DDP, per-rank streams)
traineval   -- evaluation during training (through trainer.evaluation)

Imports trainer.model, trainer.evaluation and datapipe; nothing imports it but the study
layer, the CLI and tools.
"""
