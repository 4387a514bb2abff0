"""``mcad-cache export RUN --format onnx|torchscript|executorch|coreml|open_clip [--quantize int8] --out DIR``."""

from __future__ import annotations

from typing import Annotated

import typer

from mcad_cache.cli.app import app, call_pipeline, console, setup_logging
from mcad_cache.pipelines import export as pipeline


@app.command("export")
def export(
    run: Annotated[str, typer.Argument(help="distill run directory or student checkpoint folder")],
    fmt: Annotated[str, typer.Option("--format", help="onnx | torchscript | executorch | coreml | open_clip")] = "onnx",
    quantize: Annotated[str, typer.Option(help="none | int8 (dynamic int8; onnx, torchscript)")] = "none",
    out: Annotated[str, typer.Option(help="export folder (default RUN/export-FORMAT[-int8])")] = "",
    data: Annotated[list[str], typer.Option("--data", help="shards for the parity check (default: generated)")] = None,
    parity_samples: Annotated[int, typer.Option(help="images used for the parity check")] = 16,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty --out folder")] = False,
    threads: Annotated[int, typer.Option(help="CPU threads")] = 1,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Write the student as two static-shape encoders + preprocess.json + tokenizer + manifest (docs/export.md)."""
    setup_logging(verbose)
    cfg = pipeline.ExportConfig(
        run=run, format=fmt, quantize=quantize, out=out, data=tuple(data or ()), parity_samples=parity_samples,
        overwrite=overwrite, threads=threads,
    )  # fmt: skip
    result = call_pipeline(pipeline.run, cfg)
    console.print(f"export -> {result['out']} ({result['format']}, quantize {result['quantize']}, "
                  f"{result['seconds']} s): {', '.join(result['files'])}", highlight=False, soft_wrap=True)  # fmt: skip
    parity = result["parity"]
    if parity is not None:
        verdict = "[green]OK[/green]" if parity["ok"] else "[red]BELOW TARGET[/red]"
        console.print(
            f"parity vs PyTorch ({parity['inputs']}): min cosine image {parity['image_min_cosine']:.6f}, text "
            f"{parity['text_min_cosine']:.6f} (target >= {parity['threshold']}) {verdict}", highlight=False,
        )  # fmt: skip
