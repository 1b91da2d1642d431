"""fastdense: fast dense self-supervised pretraining (SCRL, VICRegL, LEWEL, SelfPatch)."""

# fastdense._C links against torch's shared libraries, which only an imported torch has loaded.
import torch as _torch  # noqa: F401

__version__ = "0.1.0"

# In a source checkout (PYTHONPATH=<repo>), kernels/ and pipelines/ sit beside this package rather
# than inside it, as setup.py's package_dir maps them. This finder resolves those two names there,
# exactly as an installed wheel or an editable install does, and nothing else: putting the repository
# root on the package path instead made every file beside it a submodule (``fastdense.setup`` ran
# setup.py on import; ``pkgutil.walk_packages`` found ``fastdense.fastdense`` and recursed forever).


def _install_source_checkout_finder() -> None:
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    homes = {f"{__name__}.{name}": os.path.join(root, name) for name in ("kernels", "pipelines")}
    inside = any(os.path.isfile(os.path.join(os.path.dirname(__file__), name, "__init__.py")) for name in ("kernels", "pipelines"))
    # A reload replaces this checkout's finder rather than adding another.
    sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "fastdense_source_checkout", None) != root]
    if inside or not all(os.path.isfile(os.path.join(home, "__init__.py")) for home in homes.values()):
        return  # an installed package: they are inside it

    class SourceCheckoutFinder:
        fastdense_source_checkout = root

        @staticmethod
        def find_spec(fullname, path=None, target=None):
            home = homes.get(fullname)
            if home is None:
                return None
            return importlib.util.spec_from_file_location(fullname, os.path.join(home, "__init__.py"), submodule_search_locations=[home])

    # First: the two names must resolve beside *this* package, not through another checkout's editable
    # install (setuptools' finder maps fastdense.kernels to wherever ``pip install -e`` ran).
    sys.meta_path.insert(0, SourceCheckoutFinder)


_install_source_checkout_finder()
del _install_source_checkout_finder
