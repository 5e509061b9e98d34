"""Tensor file I/O with no knowledge of LoRA or models: lazy readers and streaming writers.

Readers return :class:`TensorRef` values that locate a tensor's bytes in a file, so any block of rows can be read
with one positioned read: no whole-file mmap whose pages would pile up in the process's resident memory.
Writers take the full list of tensors up front (names, dtypes, shapes), write headers first, then stream bytes.
"""

from .safetensors import SafetensorsWriter, read_safetensors
from .source import TensorRef, TensorSource, tensor_bytes
from .torchzip import TorchZipWriter, read_torch_zip

__all__ = [
    "TensorRef",
    "TensorSource",
    "tensor_bytes",
    "read_safetensors",
    "SafetensorsWriter",
    "read_torch_zip",
    "TorchZipWriter",
]
