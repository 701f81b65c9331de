"""Evaluation of frozen encoders: linear probe and k-NN on procedural or ImageFolder data."""

from online_stablerep.eval.datasets import (
    HELD_OUT_INDEX_OFFSET,
    ImageFolderImages,
    TensorImages,
    image_folder_probe_data,
    probe_data,
    procedural_probe_data,
)
from online_stablerep.eval.features import extract_features, extract_features_multi, preprocess
from online_stablerep.eval.knn import knn_predict, knn_top1
from online_stablerep.eval.linear_probe import LinearProbeResult, linear_probe
from online_stablerep.eval.probe import pixel_features, probe_encoders, write_probe_json

__all__ = [
    "HELD_OUT_INDEX_OFFSET",
    "ImageFolderImages",
    "LinearProbeResult",
    "TensorImages",
    "extract_features",
    "extract_features_multi",
    "image_folder_probe_data",
    "knn_predict",
    "knn_top1",
    "linear_probe",
    "pixel_features",
    "preprocess",
    "probe_data",
    "probe_encoders",
    "procedural_probe_data",
    "write_probe_json",
]
