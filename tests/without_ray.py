"""A Python without the packages only RL training needs (Ray, gymnasium), as on a GPU box or a deployment image
that lacks them.

``HIDE_RL_PACKAGES`` starts a script for ``python -c``: after it, every import of ``ray`` or ``gymnasium`` (or of
one of their modules) fails, so a test shows that what the script runs next needs torch and timm, not them.
"""

HIDE_RL_PACKAGES = """
import importlib.abc
import sys


class HideRLPackages(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("ray", "gymnasium"):
            raise ModuleNotFoundError(f"No module named {name!r} (the test hides it)")


sys.meta_path.insert(0, HideRLPackages())
"""
