"""datapipe: MT30-format chunks -> verified, compressed stores -> TD-MPC2 training batches.

Data flow, one module per stage: `source` (read and check chunks) -> `build` / `units`
(write the store, resumably, on dask) -> `format` (the on-disk contract) -> `store` (open and
read a finished store).
"""

__version__ = "0.1.0"
