"""`stade calibrate`: run calibration text through a model and save its activation statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stade_cli.cli.options import (
    BatchOpt,
    CacheDirOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    ModelArg,
    SeedOpt,
    cli_errors,
    plan_line,
    print_json,
)


@cli_errors
def calibrate(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the statistics artifact.")],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="c4 or wikitext2 (from the hub, as published), a local .txt/.jsonl/.parquet file, a .safetensors "
            "file of token ids \\[n, seqlen], or the offline samples sample-wiki and sample-news (pip install "
            "'stade\\[demo]').",
        ),
    ] = "c4",
    nsamples: Annotated[
        int | None,
        typer.Option(
            help="Number of calibration windows. \\[default: 128; a token-id file: all its windows]",
            show_default=False,
        ),
    ] = None,
    seqlen: Annotated[
        int | None, typer.Option(help="Tokens per window. \\[default: min(context, 2048)]", show_default=False)
    ] = None,
    seed: SeedOpt = 0,
    hessian: Annotated[
        bool, typer.Option("--hessian", help="Also keep the second-moment matrices H (sparsegpt, admm).")
    ] = False,
    hessian_dtype: Annotated[
        str,
        typer.Option(
            "--hessian-dtype", help="float32 or bfloat16 (half the disk); SparseGPT solves in float32 either way."
        ),
    ] = "float32",
    batch_size: BatchOpt = 8,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            help="I/N: only part I (0-based) of N of the drawn windows, for a job array; join the parts with "
            "`stade stats merge`.",
            rich_help_panel="Several machines",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue a killed run from its last committed block.", rich_help_panel="Several machines"
        ),
    ] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    cache_dir: CacheDirOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run calibration text through MODEL and save per-layer activation statistics.

    Example: stade calibrate meta-llama/Llama-3.2-1B --data c4 --hessian --out stats/

    Offline: stade calibrate smollm2-135m --data notes.txt --nsamples 32 --seqlen 512 --out stats/

    On K GPUs: torchrun --nproc-per-node K -m stade_cli calibrate MODEL --hessian --out stats/
    """
    from stade_cli.base.files import check_apart, check_writable
    from stade_cli.cli.tables import render_stats
    from stade_cli.driver.calibrate import CalibrationConfig, load_data
    from stade_cli.driver.calibrate import calibrate as run
    from stade_cli.models.loading import load_model, resolve_device
    from stade_cli.stats.distributed import cuda_device_for, group_for

    is_ids = data.endswith(".safetensors")
    config = CalibrationConfig(
        data=data,
        nsamples=nsamples if nsamples is not None or is_ids else 128,
        seqlen=seqlen,
        seed=seed,
        hessian=hessian,
        batch_size=batch_size,
        hessian_dtype=hessian_dtype,
        shard=shard,
    )
    check_writable(out, force)
    check_apart(out, [("the model", model), ("the --data file", data)])
    dev = cuda_device_for(resolve_device(device))
    plan_line(
        "calibrate",
        model,
        dev,
        out,
        cache_dir,
        data=data,
        nsamples=config.nsamples,
        seqlen=seqlen,
        hessian=hessian,
        hessian_dtype=hessian_dtype,
        batch_size=batch_size,
        dtype=dtype,
    )
    cache = str(cache_dir) if cache_dir else None
    docs = load_data(config, cache)  # before the model: a source that cannot be had fails in seconds
    loaded = load_model(model, dtype.value if dtype else None, dev, cache, lazy=True, head=False)
    with group_for(dev) as group:
        stats = run(loaded, config, out, dev, force=force, cache_dir=cache, docs=docs, resume=resume, group=group)
    if stats is None:  # another rank than 0: rank 0 reports
        return
    if as_json:
        print_json(stats.summary())
    else:
        render_stats(stats)
