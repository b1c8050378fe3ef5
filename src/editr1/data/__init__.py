"""Data: UniWorld-format folders and synthetic scenes, as a LightningDataModule."""

from editr1.data.datamodule import EditDataModule
from editr1.data.jsonl import JsonlEditDataset
from editr1.data.scenes import SceneConfig, SceneDataset

__all__ = ["EditDataModule", "JsonlEditDataset", "SceneConfig", "SceneDataset"]
