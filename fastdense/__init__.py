"""fastdense: fast dense self-supervised pretraining (SCRL, VICRegL, LEWEL, SelfPatch)."""

# fastdense._C links against torch's shared libraries, which only an imported torch has loaded.
import torch as _torch  # noqa: F401

__version__ = "0.1.0"
