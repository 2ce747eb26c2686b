"""`edgeq qat MODEL --recipe R --data CORPUS --steps N [--method lsq|lr-qat|pb-llm] -o QDIR`."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..console import progress_shown
from ..errors import EdgeqError
from .common import check_new_dir, emit_json, json_option


@click.command()
@click.argument("model")
@click.option("--recipe", "-r", required=True, help="Preset (w4a4, w4a16, w16a4, w4a4-fc2a8, w8a8, pb-llm, ...) or a recipe file.")
@click.option("--data", default="enwiki", show_default=True, help="Training text: enwiki, pydoc or a UTF-8 text file (its first half).")
@click.option("--steps", type=click.IntRange(1, 10_000_000), default=100, show_default=True)
@click.option("--method", type=click.Choice(["lsq", "lr-qat", "pb-llm", "scales"]), default="lsq", show_default=True,
              help="lsq: full QAT with learnable scales; lr-qat: low-rank adapters on a frozen base; pb-llm: partial binarization; scales: LSQ scales only.")
@click.option("--loss", type=click.Choice(["ce", "kd"]), default="ce", show_default=True,
              help="ce: next-token cross-entropy on the text; kd: distill the FP32 model (KL from its next-token distribution).")
@click.option("--output-grids", is_flag=True,
              help="Train through full-integer TFLite's int8/int16 requantization of each static layer's output (min/max grids "
                   "from calibration, fixed), for files exported with --variant int8.")
@click.option("--lr", type=float, default=None, help="Learning rate of weights / adapters (default 1e-4 lsq, 1e-3 lr-qat, 1e-4 pb-llm).")
@click.option("--scale-lr", type=float, default=1e-2, show_default=True, help="Learning rate of the scales, relative to each layer's mean scale (1e-2: ~1%/step); 0 freezes them.")
@click.option("--batch", type=click.IntRange(1, 4096), default=4, show_default=True)
@click.option("--seq-len", type=click.IntRange(2, 32768), default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--rank", type=click.IntRange(1, 4096), default=16, show_default=True, help="LR-QAT rank r.")
@click.option("--alpha", type=float, default=None, help="LR-QAT scaling alpha (default: the rank, i.e. alpha/r = 1).")
@click.option("--base-dtype", type=click.Choice(["fp32", "bf16", "q4.4", "int"]), default="fp32", show_default=True,
              help="LR-QAT storage of the frozen Phi0 = W0/s0.")
@click.option("--no-grad-checkpoint", is_flag=True, help="LR-QAT: keep W_hat for the backward instead of recomputing it.")
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True, help="Torch threads (part of the run's identity for resume).")
@click.option("--checkpoint-every", type=click.IntRange(0, 10_000_000), default=0, help="Save a checkpoint every K steps (0: never).")
@click.option("--checkpoint-dir", type=click.Path(path_type=Path), default=None, help="Checkpoint directory (default: OUTPUT.ckpt).")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint (same options required).")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Quantized-model directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@json_option
def qat(model, recipe, data, steps, method, loss, output_grids, lr, scale_lr, batch, seq_len, seed, rank, alpha, base_dtype,
        no_grad_checkpoint, threads, checkpoint_every, checkpoint_dir, resume, output, overwrite, as_json):
    """Quantization-aware training of MODEL (a causal LM) starting from the recipe's RTN grid.

    Writes the same quantized-model directory as `edgeq quantize` (integers from the learned
    scales), with the training record and the bit-exact merge check in quant.json under "qat".
    """
    from ..quantize.qat_loop import QATConfig, run_qat

    given = [f"--{name.replace('_', '-')}" for name in ("rank", "alpha", "base_dtype", "no_grad_checkpoint")
             if click.get_current_context().get_parameter_source(name) != click.core.ParameterSource.DEFAULT]
    if given and method != "lr-qat":
        raise EdgeqError(f"qat: {', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to --method lr-qat, "
                         f"not {method!r}")
    check_new_dir(output, overwrite)
    ckpt = checkpoint_dir or output.with_name(output.name + ".ckpt")
    if checkpoint_every and not resume:  # a resumed run's checkpoint is checked where it is read (qat_loop.train)
        _check_checkpoint_dir(ckpt, overwrite)
    if lr is None:
        lr = 1e-3 if method == "lr-qat" else 1e-4
    config = QATConfig(model=model, recipe=recipe, data=data, steps=steps, method=method, loss=loss, output_grids=output_grids, lr=lr,
                       scale_lr=scale_lr, batch=batch, seq_len=seq_len, seed=seed, rank=rank, alpha=alpha, base_dtype=base_dtype,
                       grad_checkpoint=not no_grad_checkpoint, threads=threads)
    start = time.perf_counter()
    qm = run_qat(config, output, ckpt, checkpoint_every, resume, progress=progress_shown(), overwrite=overwrite)
    rec = qm.extra["qat"]
    result = {"output": str(output), "method": method, "recipe": qm.recipe.name, "steps": rec["steps_done"],
              "eval_loss_start": rec["eval_loss_start"], "eval_loss_end": rec["eval_loss_end"],
              "top1_agree_fp32_start": rec["eval_top1_agree_fp32_start"], "top1_agree_fp32_end": rec["eval_top1_agree_fp32_end"],
              "trainable_params": rec["trainable_params"], "bit_exact_merge": rec["merge_check"]["bit_exact"],
              "seconds": round(time.perf_counter() - start, 2)}
    if as_json:
        emit_json(result)
    else:
        agree = ""
        if result["top1_agree_fp32_end"] is not None:
            agree = f", top-1 agreement with FP32 {result['top1_agree_fp32_start']:.4f} -> {result['top1_agree_fp32_end']:.4f}"
        click.echo(f"{output}: {method} QAT ({loss}) with {result['recipe']}, {result['steps']} steps, eval loss "
                   f"{result['eval_loss_start']:.4f} -> {result['eval_loss_end']:.4f}{agree}, {result['trainable_params']} trainable params, "
                   f"merge bit-exact: {result['bit_exact_merge']} ({result['seconds']} s)")


def _check_checkpoint_dir(ckpt: Path, overwrite: bool) -> None:
    """The checkpoint directory a new run will write: only ever one of edgeq's, and one it can write."""
    if (ckpt / "state.json").is_file() and not overwrite:
        raise EdgeqError(f"qat: {ckpt} holds a checkpoint of an earlier run: pass --resume to continue it or "
                         "--overwrite to start over")
    check_new_dir(ckpt, True, marker="state.json", what="a QAT checkpoint directory", option="--checkpoint-dir")
