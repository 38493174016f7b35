"""datapipe: MT30-format chunks -> verified, compressed stores -> TD-MPC2 training batches.

Data flow, one module per stage: `source` (read and check chunks) -> `build` / `units`
(write the store, resumably, on dask) -> `format` (the on-disk contract) -> `store` (open and
read a finished store) -> `shardreader` (fast checked episode reads) -> `sample` (which slices)
-> `loader` (SliceLoader: pooled batches on any device) / `stream` (WebDatasetStream).

Public API:

    store = datapipe.open_store(path)          # n_episodes, episode_length, task_names,
                                               # episodes_of_task(t), read_episode(i)
    loader = datapipe.SliceLoader(store, batch_size=256, horizon=3, device="cuda", seed=0)
    for obs, action, reward, task in loader:   # or batch.obs, batch.action, ...
        ...
"""

from datapipe.errors import (
    CorruptStoreError,
    DatapipeError,
    IncompleteStoreError,
    StorageAccessError,
    StoreFormatError,
    StoreNotFoundError,
    StoreVersionError,
)
from datapipe.loader import Batch, SliceLoader
from datapipe.store import Store, open_store
from datapipe.stream import WebDatasetStream

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "CorruptStoreError",
    "DatapipeError",
    "IncompleteStoreError",
    "SliceLoader",
    "StorageAccessError",
    "Store",
    "StoreFormatError",
    "StoreNotFoundError",
    "StoreVersionError",
    "WebDatasetStream",
    "open_store",
]
