"""fastdense: fast dense self-supervised pretraining (SCRL, VICRegL, LEWEL, SelfPatch)."""

# fastdense._C links against torch's shared libraries, which only an imported torch has loaded.
import torch as _torch  # noqa: F401

__version__ = "0.1.0"


def _serve_source_checkout() -> None:
    """In a source checkout used through ``PYTHONPATH`` (no install), ``pipelines/`` and ``kernels/``
    sit beside this package while setup.py installs them inside it as ``fastdense.pipelines`` and
    ``fastdense.kernels``; searching the checkout root too makes both names resolve either way."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "pipelines", "__init__.py")) and root not in __path__:
        __path__.append(root)


_serve_source_checkout()
