"""User mistakes become one-line McadErrors where they are detected (preflight, registries, teachers, configs), and
the CLI prints them as one line with exit code 1; anything else keeps its traceback."""

from __future__ import annotations

import os

import pytest
import typer
from typer.testing import CliRunner

from mcad_cache.cli.app import call_pipeline
from mcad_cache.cli.main import app
from mcad_cache.config import ImportConfig, load_config
from mcad_cache.data import importers
from mcad_cache.data.importers import get_importer, list_importers, register_importer
from mcad_cache.errors import (
    ConfigError,
    DataSourceError,
    InputPathError,
    McadError,
    OutputPathError,
    UnknownImporterError,
    UnknownModelError,
)
from mcad_cache.pipelines import data_import
from mcad_cache.preflight import check_input_file, check_writable_dir
from mcad_cache.runtime import DeviceError
from mcad_cache.teachers import create_teacher

runner = CliRunner()


def test_check_writable_dir(tmp_path):
    assert check_writable_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match=r"--out .*file is a file"):
        check_writable_dir(tmp_path / "file" / "sub")
    with pytest.raises(OutputPathError, match="--shards"):
        check_writable_dir(tmp_path / "file", option="--shards")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_writable_dir_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputPathError, match="not writable|cannot create"):
            check_writable_dir(ro)
        with pytest.raises(OutputPathError, match="cannot create"):
            check_writable_dir(ro / "new")
    finally:
        ro.chmod(0o700)


def test_check_input_file(tmp_path):
    f = tmp_path / "w.pth"
    f.write_bytes(b"x")
    assert check_input_file(f, option="--pretrained") == f
    with pytest.raises(InputPathError, match="--pretrained .*no such file"):
        check_input_file(tmp_path / "missing.pth", option="--pretrained")
    with pytest.raises(InputPathError, match="is a folder"):
        check_input_file(tmp_path, option="--pretrained")
    assert check_input_file(tmp_path, option="--pretrained", allow_dir=True) == tmp_path
    assert issubclass(InputPathError, FileNotFoundError)  # callers catching the builtin still do


def test_importer_registry_lists_and_rejects():
    assert {"karpathy", "folder", "openclipart"} <= set(list_importers())  # openclipart: the demo app registers it
    assert get_importer("karpathy").needs == ("annotations", "root")
    with pytest.raises(UnknownImporterError, match="known importers: .*folder.*karpathy"):
        get_importer("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_importer("karpathy")(lambda **_: [])


def test_registered_importer_is_used_by_the_pipeline(tmp_path, monkeypatch):
    monkeypatch.setattr(importers, "_IMPORTERS", dict(importers._IMPORTERS))  # the registration ends with the test
    calls = []

    @register_importer("test-empty", summary="nothing")
    def _empty(*, root, annotations, seed, report):
        calls.append((root, annotations, seed))
        return []

    with pytest.raises(DataSourceError, match="the annotations hold no entries"):  # issue 13: no silent success
        data_import.run(ImportConfig(source="test-empty", out=str(tmp_path / "out"), root="r", seed=3))
    assert calls == [("r", "", 3)] and (tmp_path / "out" / "index.json").is_file()


def test_import_user_mistakes_are_mcad_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError):
        data_import.run(ImportConfig(source="karpathy", annotations=str(tmp_path / "file"), root=".",
                                     out=str(tmp_path / "file" / "out")))  # fmt: skip
    with pytest.raises(InputPathError, match="--annotations"):
        data_import.run(ImportConfig(source="folder", annotations=str(tmp_path / "none.jsonl"), root=".",
                                     out=str(tmp_path / "o")))  # fmt: skip
    with pytest.raises(ConfigError, match="--samples-per-shard"):
        data_import.run(ImportConfig(source="karpathy", annotations="a", root="r", samples_per_shard=0, out="o"))


def test_teacher_user_mistakes_are_mcad_errors(tmp_path):
    with pytest.raises(UnknownModelError, match="known teachers: .*albef.*blip.*clip"):
        create_teacher("nope")
    with pytest.raises(InputPathError, match="--pretrained"):
        create_teacher("albef", model="tiny", pretrained=str(tmp_path / "missing.pth"), device="cpu")
    with pytest.raises(InputPathError, match="--pretrained"):
        create_teacher("blip", pretrained=str(tmp_path / "no_folder"), device="cpu", local_files_only=True)
    with pytest.raises(InputPathError):
        create_teacher("clip", model=str(tmp_path / "missing.json"), device="cpu")


def test_config_file_missing_is_an_input_path_error(tmp_path):
    with pytest.raises(InputPathError, match="--config"):
        load_config(ImportConfig, tmp_path / "run.json")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_device_not_available_is_a_device_error():
    with pytest.raises(DeviceError, match="CUDA is not available"):
        create_teacher("clip", model="tiny", device="cuda")


def test_call_pipeline_maps_only_mcad_errors():
    def user_mistake():
        raise OutputPathError("--out x: a file")

    def bug():
        raise ValueError("a real bug")

    with pytest.raises(typer.Exit) as exit_info:
        call_pipeline(user_mistake)
    assert exit_info.value.exit_code == 1
    with pytest.raises(ValueError, match="a real bug"):  # keeps its traceback
        call_pipeline(bug)
    assert issubclass(OutputPathError, McadError)


def test_user_error_prints_brackets_verbatim(capsys):
    # A gloo error holds "[/__w/pytorch/.../pair.cc:561]": rich parsed it as a closing markup tag and raised
    # MarkupError, so the user saw a traceback instead of the one line (found under torchrun).
    message = "rank 0: Connection closed by peer [/__w/pytorch/third_party/gloo/pair.cc:561] [x]"

    def gloo_failure():
        raise ConfigError(message)

    with pytest.raises(typer.Exit):
        call_pipeline(gloo_failure)
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and err.startswith("error:")


def test_cli_import_to_a_file_parent_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    ann = tmp_path / "c.jsonl"
    ann.write_text("")
    result = runner.invoke(
        app, ["data", "import", "--source", "folder", "--annotations", str(ann), "--root", str(tmp_path),
              "--out", str(tmp_path / "file" / "out")],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "is a file, not a folder" in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) <= 3  # one message (maybe wrapped)


def test_cli_unknown_source_lists_the_registry(tmp_path):
    result = runner.invoke(app, ["data", "import", "--source", "nope", "--out", str(tmp_path)])
    # refused at parse time (click's usage-error exit 2), naming every registered importer
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and "'folder', 'karpathy', 'openclipart'" in out and "--source" in out
    help_text = " ".join(runner.invoke(app, ["data", "import", "--help"]).output.split())
    assert "openclipart" in help_text and "karpathy" in help_text and "folder" in help_text


def test_cli_demo_has_run_and_teachers_subcommands():
    result = runner.invoke(app, ["demo", "--help"])
    assert result.exit_code == 0 and "run" in result.output and "teachers" in result.output
    assert runner.invoke(app, ["teachers", "--help"]).exit_code != 0  # the old top-level command is gone
    bad = runner.invoke(app, ["demo", "run", "--seeds", "1,x"])
    assert bad.exit_code == 2 and "--seeds" in bad.output


def _transformers_state_in_spawned_worker(levels: dict[str, int]) -> tuple[int, bool]:
    from transformers.utils import logging as hf_logging

    from mcad_cache.runtime import init_spawned_logging

    init_spawned_logging(levels, "test")
    return hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()


def test_spawned_worker_takes_the_parents_quiet_transformers_logging():
    """A spawned worker starts with transformers at its own default (WARNING: a load report per student created);
    the parent's ERROR level reaches it, and the weight-loading bars go with it (the old code set the level before
    transformers' import reset it)."""
    import logging
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    levels = {"": logging.WARNING, "mcad_cache": logging.INFO, "transformers": logging.ERROR}
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert pool.submit(_transformers_state_in_spawned_worker, levels).result() == (logging.ERROR, False)
