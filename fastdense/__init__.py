"""fastdense: fast dense self-supervised pretraining (SCRL, VICRegL, LEWEL, SelfPatch)."""

__version__ = "0.1.0"

# In a source checkout (PYTHONPATH=<repo>), kernels/ and pipelines/ sit beside this package rather
# than inside it; adding the repository root to the package path makes ``fastdense.kernels`` and
# ``fastdense.pipelines`` resolve there exactly as they do in an installed wheel.
import os as _os

_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")):
    __path__.append(_root)
del _os, _root
