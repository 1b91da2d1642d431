"""fastdense: fast dense self-supervised pretraining (SCRL, VICRegL, LEWEL, SelfPatch)."""

__version__ = "0.1.0"
