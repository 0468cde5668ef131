"""resnet18-dist: distributed ResNet18 training on Ray Train, DALI pipelines, export and serving."""

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"

# The sweep's code lives in the checkout's top-level tuning/ folder (the product's layout), but
# its import name is `resnet18_dist.tuning`, so that installing the project never puts a
# top-level `tuning` module into site-packages, where another package of that name would
# collide with it. pyproject.toml maps the folder there for wheels and editable installs
# (setuptools' package-dir). A checkout that is imported from PYTHONPATH without being
# installed (a fresh clone run as `python launch/...`, or the `ray job submit --working-dir .`
# upload that a cluster's workers import before anything installed) has no such mapping: this
# finder gives it the same name. setuptools offers nothing for a checkout it did not install.
_CHECKOUT_TUNING = Path(__file__).resolve().parent.parent / "tuning"


class _CheckoutTuningFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, name: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name != f"{__name__}.tuning":
            return None
        return importlib.util.spec_from_file_location(
            name,
            _CHECKOUT_TUNING / "__init__.py",
            submodule_search_locations=[str(_CHECKOUT_TUNING)],
        )


if (_CHECKOUT_TUNING / "__init__.py").is_file() and importlib.machinery.PathFinder.find_spec(
    f"{__name__}.tuning", __path__
) is None:
    # First: the tuning/ beside this checkout, before an editable install's finder, which maps
    # the name to the installed checkout's folder whichever checkout was imported.
    sys.meta_path.insert(0, _CheckoutTuningFinder())
