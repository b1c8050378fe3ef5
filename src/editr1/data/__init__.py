"""Data: UniWorld-format folders and synthetic scenes, as a LightningDataModule.

The names below load on first use, so ``editr1 make-shards --help`` (which needs only ``editr1.data.shards``)
does not import Lightning."""

from importlib import import_module

_HOMES = {
    "EditDataModule": "editr1.data.datamodule",
    "JsonlEditDataset": "editr1.data.jsonl",
    "SceneConfig": "editr1.data.scenes",
    "SceneDataset": "editr1.data.scenes",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'editr1.data' has no attribute {name!r}")
