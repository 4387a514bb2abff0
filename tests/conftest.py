"""Shared pytest fixtures. Each owner adds fixtures only; keep them tiny (CPU, seconds).

Parallel runs (``pytest -n N --dist loadgroup``, as scripts/test.sh runs them): every test module is one unit of
work that one xdist worker runs whole (its module-scoped fixtures are built once), modules marked with the same
``xdist_group`` run on one worker one after the other, and the units in ``FIRST_GROUPS`` start first, so that the
longest ones do not end a run alone. Tests must not share fixed paths or ports, nor depend on the order of modules.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest

# Longest units of work, longest first (CPU seconds measured with pytest -n 2 on 2 cores); the rest keep their order.
FIRST_GROUPS = ()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under xdist's ``loadgroup``: give every test without an ``xdist_group`` mark its module as group, and move the
    groups of ``FIRST_GROUPS`` to the front (runs before xdist turns the marks into node-id suffixes)."""
    if config.getoption("dist", "no") != "loadgroup":
        return

    def group(item) -> str:
        mark = item.get_closest_marker("xdist_group")
        if mark is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
            mark = item.get_closest_marker("xdist_group")
        return str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))

    rank = {name: i for i, name in enumerate(FIRST_GROUPS)}
    items[:] = sorted(items, key=lambda item: rank.get(group(item), len(rank)))  # stable: keeps the order within


# ---------------------------------------------------------------------------------------------------------------
# Teachers (owner: teachers engineer). Tiny, offline, deterministic.
# ---------------------------------------------------------------------------------------------------------------

_TINY_WORDS = (
    "a an the of on in at with and is are two dog dogs cat cats man woman person people photo picture image red blue "
    "green black white car bus tree trees street table sitting standing running riding playing grass water beach"
).split()


def _write_tiny_bert_tokenizer(folder: Path) -> Path:
    """A BERT-uncased-style WordPiece tokenizer with a ~150-token vocabulary, saved with save_pretrained."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += list(string.ascii_lowercase) + list(string.digits) + list(".,!?'-")
    vocab += ["##" + c for c in string.ascii_lowercase + string.digits]
    vocab += [w for w in _TINY_WORDS if w not in vocab]
    raw = folder / "_raw"
    raw.mkdir(exist_ok=True)
    (raw / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast.from_pretrained(str(raw), do_lower_case=True)
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_bert_tokenizer_dir(tmp_path_factory) -> Path:
    """Folder with a tiny BERT-uncased WordPiece tokenizer (tokenizer.json + tokenizer_config.json)."""
    return _write_tiny_bert_tokenizer(tmp_path_factory.mktemp("tiny_bert_tokenizer"))


@pytest.fixture(scope="session")
def tiny_hf_bert_dir(tmp_path_factory) -> Path:
    """A local Hugging Face folder: tiny random BertModel (2 layers, hidden 32) + its tokenizer, seeded."""
    import torch
    from transformers import BertConfig, BertModel

    folder = _write_tiny_bert_tokenizer(tmp_path_factory.mktemp("tiny_hf_bert"))
    from transformers import AutoTokenizer

    vocab_size = len(AutoTokenizer.from_pretrained(str(folder)))
    cfg = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(cfg).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_clip_teacher():
    """open_clip tiny ViT (width 64, 32 px, patch 8) + tiny text transformer, random init (seed 0), CPU."""
    from mcad_cache.teachers import create_teacher

    return create_teacher("clip", model="tiny", device="cpu")


@pytest.fixture(scope="session")
def tiny_albef_teacher(tiny_bert_tokenizer_dir):
    """ALBEF tiny (ViT depth 2 / width 64 / patch 8 / 32 px; BERT 2 text + 2 fusion layers, hidden 64), random init
    (seed 0), tiny WordPiece tokenizer, CPU."""
    from mcad_cache.teachers import create_teacher

    return create_teacher("albef", model="tiny", tokenizer=str(tiny_bert_tokenizer_dir), device="cpu")


@pytest.fixture(scope="session")
def ddp_world(tmp_path_factory) -> dict[str, Path]:
    """The distillation-on-several-ranks world (tests/ddp_world.py): ``shards`` (2 x 4 samples), ``cache`` (fake
    teacher, k 3) and ``student`` (a JSON student without batch-coupled layers). Read-only for the tests."""
    from ddp_world import build_world

    return build_world(tmp_path_factory.mktemp("ddp_world"))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test runs with one intra-op thread (restored afterwards): the models are tiny, and on a shared,
    oversubscribed CPU OpenMP spin-waits make them ~100x slower with 2 threads than with 1."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_BLIP_CONFIG = {
    "image_text_hidden_size": 16,
    "text_config": {
        "vocab_size": 30524,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "encoder_hidden_size": 32,
    },
    "vision_config": {
        "hidden_size": 32,
        "image_size": 32,
        "patch_size": 8,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    },
}


@pytest.fixture(scope="session")
def tiny_blip_dir(tmp_path_factory) -> Path:
    """A local BLIP retrieval folder as ``save_pretrained`` writes it: a tiny random ``BlipForImageTextRetrieval``
    (seed 0) and its ``BlipProcessor`` (32 px PIL image processor; tiny WordPiece tokenizer with BLIP's added
    ``[DEC]`` bos token and ``[ENC]`` special token, as salesforce/BLIP ``init_tokenizer`` adds them)."""
    import torch
    from transformers import AutoTokenizer, BlipConfig, BlipForImageTextRetrieval, BlipImageProcessorPil, BlipProcessor

    folder = tmp_path_factory.mktemp("tiny_blip")
    tok_dir = _write_tiny_bert_tokenizer(tmp_path_factory.mktemp("tiny_blip_tok"))
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    processor = BlipProcessor(BlipImageProcessorPil(size={"height": 32, "width": 32}), tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BlipForImageTextRetrieval(BlipConfig(**TINY_BLIP_CONFIG))
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder
