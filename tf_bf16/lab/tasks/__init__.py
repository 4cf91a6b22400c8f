"""Tasks of `python -m tf_bf16 compare`: one module each, discovered here."""

import importlib
import pkgutil

from tf_bf16.lab.tasks.base import MIXED, STOCK, VARIANTS, Task, TaskData  # noqa: F401


def all_tasks():
    """name -> Task, for every module in this package that defines TASK."""
    tasks = {}
    for module_info in pkgutil.iter_modules(__path__):
        if module_info.name == "base" or module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        task = getattr(module, "TASK", None)
        if task is not None:
            tasks[task.name] = task
    return dict(sorted(tasks.items()))


def get_task(name):
    tasks = all_tasks()
    if name not in tasks:
        raise KeyError(f"Unknown task {name!r}; `python -m tf_bf16 list` shows the tasks: "
                       f"{', '.join(tasks)}")
    return tasks[name]
