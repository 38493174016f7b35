"""Experiments over training runs and their reports: `trainer experiment`, `trainer report`,
`trainer curve`.

folder     -- an experiment folder: its file names and format, read into runs and arms
experiment -- a spec (TOML) run as arms x seeds of training and reference evaluations
report     -- the statistics over an experiment folder and report.json
markdown   -- report.md rendered from report.json
figures    -- the report's PNG figures
curve      -- one comparison across several experiments (e.g. data sizes)

The top of the flow: imports trainer.training, trainer.evaluation, trainer.model, datapipe.
"""
