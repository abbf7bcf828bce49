"""A Python without Ray, as on a GPU box or a deployment image that lacks it.

``HIDE_RAY`` starts a script for ``python -c``: after it, every ``import ray`` (or of a ``ray.`` module)
fails, so a test shows that what the script runs next needs no Ray.
"""

HIDE_RAY = """
import importlib.abc
import sys


class NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r} (the test hides Ray)")


sys.meta_path.insert(0, NoRay())
"""
