"""Shared constants: normalisation statistics and defaults, each with its source."""

from __future__ import annotations

# open_clip/constants.py (OpenAI CLIP preprocessing).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# ALBEF (salesforce/ALBEF dataset/__init__.py) and BLIP (salesforce/BLIP transform) use the CLIP statistics.
ALBEF_MEAN = OPENAI_CLIP_MEAN
ALBEF_STD = OPENAI_CLIP_STD
# timm's MobileViTv2 pretrained_cfg: mean (0, 0, 0), std (1, 1, 1), i.e. [0, 1] input.
MOBILEVIT_MEAN = (0.0, 0.0, 0.0)
MOBILEVIT_STD = (1.0, 1.0, 1.0)

# MCAD (arXiv 2310.19654): k = 11 top-k candidates per query for the single-stream teacher.
DEFAULT_K = 11

# Cache schema version: bump on any change a reader must know about.
SCHEMA_VERSION = 1
