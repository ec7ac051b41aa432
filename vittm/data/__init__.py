"""Datasets and the LightningDataModule (torchvision path)."""

from vittm.data.datamodule import DATASETS, DataConfigError, ImageDataModule
from vittm.data.fashion_mnist import FashionMNIST

__all__ = ["DATASETS", "DataConfigError", "FashionMNIST", "ImageDataModule"]
