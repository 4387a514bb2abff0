"""Export a student for apps and phones: two static-shape encoder files (ONNX, TorchScript, ExecuTorch, CoreML) or an
open_clip checkpoint folder, plus preprocessing, tokenizer and a manifest; and run such a folder (docs/export.md).

Submodules: ``formats`` (the format table, error classes; no torch), ``preprocess`` (numpy image preprocessing),
``runtime`` (``ExportedEncoder``: runs an export without torch for ONNX), ``writers`` (torch -> files), ``bundle``
(the whole folder and the parity check). Importing this package imports nothing heavy.
"""
