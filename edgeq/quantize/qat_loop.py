"""The QAT training loop for causal LMs: seeded data order, checkpoints, resume, conversion.

`run_qat(config, out)` loads the model, prepares it (qat.prepare_qat), trains the trainable
tensors of the chosen method over windows of the calibration half of the corpus, converts to
integers + learned scales and saves the ordinary quantized-model directory. The loss is the
next-token cross-entropy on the text (`loss="ce"`) or the KL divergence from the FP32 model's
next-token distribution (`loss="kd"`, distillation as in LLM-QAT and BitDistiller): the second
trains the quantized model to agree with the float one, which is what top-1 agreement measures.
With `output_grids` the training forward also rounds each static layer's output to the per-tensor
grid a full-integer TFLite file writes it on (qat._simulate_output_grids), so a recipe meant for
`--variant int8` learns through the file's rounding, not only the QDIR's.

Determinism and resume: the windows of step t are a pure function of (seed, t); the learning rate
is a pure function of t (cosine); so a checkpoint needs only the trainable tensors, the AdamW
state (as tensors), the RNG state and t. Checkpoints are `state.safetensors` + `state.json` in one
directory replaced atomically; nothing is pickled. Resuming refuses a checkpoint written with a
different configuration. On CPU with the same thread count, resuming reproduces an uninterrupted
run bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import EdgeqError
from ..fileio import atomic_dir, damaged_fields, read_json, save_tensors, write_json_atomic

CKPT_VERSION = 1


@dataclass(frozen=True)
class QATConfig:
    model: str
    recipe: str
    data: str = "enwiki"
    steps: int = 100
    method: str = "lsq"
    lr: float = 1e-4  # latent weights / low-rank factors
    scale_lr: float = 1e-2  # scales (LSQ) and static activation scales, relative to each tensor's mean scale
    batch: int = 4
    seq_len: int = 128
    seed: int = 0
    loss: str = "ce"  # ce: next-token cross-entropy; kd: KL divergence from the FP32 model (a frozen teacher)
    output_grids: bool = False  # train through full-integer TFLite's requantization of each static layer's output
    rank: int = 16  # lr-qat
    alpha: float | None = None  # lr-qat; None = rank
    base_dtype: str = "fp32"  # lr-qat: fp32 | bf16 | q4.4 | int
    grad_checkpoint: bool = True  # lr-qat
    calib_samples: int = 16  # static activations / Hessian criterion
    eval_windows: int = 8
    threads: int = 1  # part of the configuration: float reduction order (and so resume exactness) depends on it

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def options(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha if self.alpha is not None else float(self.rank),
                "base_dtype": self.base_dtype, "checkpoint": self.grad_checkpoint, "output_grids": self.output_grids}

    def validate(self) -> None:
        if self.steps < 1 or self.batch < 1 or self.seq_len < 2:
            raise EdgeqError(f"qat: steps ({self.steps}), batch ({self.batch}) must be >= 1 and seq_len ({self.seq_len}) >= 2")
        if not (0 < self.lr < math.inf and 0 <= self.scale_lr < math.inf):
            raise EdgeqError(f"qat: lr ({self.lr}) must be finite and > 0, scale_lr ({self.scale_lr}) finite and >= 0")
        if self.alpha is not None and not 0 < self.alpha < math.inf:
            raise EdgeqError(f"qat: alpha ({self.alpha}) must be finite and > 0 (LR-QAT scales its adapters by "
                             "alpha / rank)")
        if self.loss not in LOSSES:
            from ..errors import choice_error

            raise choice_error("loss", self.loss, list(LOSSES))


LOSSES = ("ce", "kd")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, averaged over every position (temperature 1)."""
    s = torch.log_softmax(student.reshape(-1, student.shape[-1]).float(), dim=-1)
    t = torch.log_softmax(teacher.reshape(-1, teacher.shape[-1]).float(), dim=-1)
    return torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")


def lr_at(step: int, steps: int, base: float) -> float:
    """Cosine decay from `base` to 0 over `steps` (a pure function of the step, so resume needs no scheduler state)."""
    return base * 0.5 * (1.0 + math.cos(math.pi * step / steps))


def is_scale(name: str) -> bool:
    return name.endswith(".scale") or name.endswith(".act_scale")


def return_freed_memory() -> bool:
    """Make glibc hand large freed blocks back to the OS (a fixed mmap threshold); True where it applies.

    By default glibc raises its mmap threshold to the largest block freed so far (up to 32 MB), so
    the per-layer [out, in] temporaries a training step allocates and frees land on the heap and
    stay in the process's memory. Measured on SmolLM2 w4a16 (3 steps of 1 x 128 tokens): LR-QAT
    with a Q4.4 base peaked at 2,553 MB resident with the default and at 1,408 MB with a 64 KiB
    threshold, full QAT (LSQ) at 5,837 and 4,483 MB (what its autograd graph really holds).
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): their allocators return memory on their own terms
        return False
    return bool(libc.mallopt(-3, 1 << 16))  # M_MMAP_THRESHOLD


def build(config: QATConfig):
    """Model, prepared QAT layers, optimizer and training windows, all seeded by `config.seed`."""
    from ..data import lm_windows
    from ..models import load_model
    from ..models.inputs import calibration_batches
    from ..recipe import load_recipe
    from .qat import QAT_METHODS, prepare_qat

    config.validate()
    return_freed_memory()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    bundle = load_model(config.model)
    if not bundle.is_lm:
        raise EdgeqError(f"qat: {config.model!r} is not a causal LM (it loads as {bundle.kind!r}); edgeq qat trains causal LMs")
    recipe = load_recipe(config.recipe)
    from . import lrqat, pbllm  # noqa: F401

    if config.method not in QAT_METHODS:
        from ..errors import choice_error

        raise choice_error("method", config.method, sorted(QAT_METHODS))
    opts = {**dataclasses.asdict(recipe.pbllm), **config.options()}
    needs = (any(r.activation.mode == "static" for r in recipe.rules if not r.skip) or recipe.smoothing > 0
             or QAT_METHODS[config.method].needs_hessian(opts))
    calib = calibration_batches(bundle, config.data, config.calib_samples, config.seq_len) if needs else None
    torch.manual_seed(config.seed)
    prepared = prepare_qat(bundle, recipe, config.method, calib, config.options())
    params = prepared.trainable()
    if not params:
        raise EdgeqError(f"qat: recipe {recipe.name!r} with method {config.method!r} leaves nothing to train")
    # Adam moves every parameter by about lr per step whatever its gradient, so a scale's learning
    # rate is relative: scale_lr times the tensor's mean scale (1e-2 = about 1% per step).
    groups = [{"params": [p for n, p in params.items() if not is_scale(n)], "lr": config.lr, "base_lr": config.lr}]
    for n, p in params.items():
        if is_scale(n):
            rel = config.scale_lr * float(p.detach().abs().mean())
            groups.append({"params": [p], "lr": rel, "base_lr": rel})
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    windows = lm_windows(bundle.tokenizer, config.data, "calibration", config.seq_len, config.steps * config.batch, seed=config.seed)
    teacher = None
    if config.loss == "kd":  # a second, untouched copy of the float model (prepare_qat changed the first in place)
        teacher = load_model(config.model).module.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    return prepared, opt, windows, teacher


def evaluate(model, tokenizer, data: str, seq_len: int, count: int, teacher=None) -> tuple[float, float | None]:
    """Mean next-token loss on the first `count` evaluation windows (disjoint from training) and, with a
    `teacher`, the next-token top-1 agreement with it over every position (None without), from one pass."""
    from ..data import lm_windows

    ids = torch.from_numpy(lm_windows(tokenizer, data, "evaluation", seq_len, count))
    was = model.training
    model.eval()
    loss, agree = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), 4):
            chunk = ids[i : i + 4]
            out = model(input_ids=chunk, labels=chunk)
            loss += float(out.loss) * len(chunk)
            if teacher is not None:
                agree += int((out.logits.argmax(-1) == teacher(input_ids=chunk).logits.argmax(-1)).sum())
    model.train(was)
    return loss / len(ids), (agree / ids.numel() if teacher is not None else None)


def eval_loss(model, tokenizer, data: str, seq_len: int, count: int) -> float:
    """Mean next-token loss on the first `count` evaluation windows (disjoint from training)."""
    return evaluate(model, tokenizer, data, seq_len, count)[0]


# ---- checkpoints -------------------------------------------------------------------------------

def save_checkpoint(path: Path, config: QATConfig, prepared, opt, step: int, history: list) -> None:
    """Trainable tensors + AdamW state (tensors only) + RNG state + step, replacing `path` atomically."""
    names = {id(p): n for n, p in prepared.trainable().items()}
    tensors = {f"param/{n}": p.detach().contiguous() for n, p in prepared.trainable().items()}
    for p, st in opt.state.items():
        for key, val in st.items():
            tensors[f"opt/{names[id(p)]}/{key}"] = torch.as_tensor(val).contiguous()
    tensors["rng/torch"] = torch.get_rng_state()
    with atomic_dir(path, overwrite=True) as tmp:
        save_tensors(tensors, tmp / "state.safetensors")
        write_json_atomic(tmp / "state.json", {"version": CKPT_VERSION, "step": step, "config": config.to_dict(),
                                               "history": history})


def load_checkpoint(path: Path, config: QATConfig, prepared, opt) -> tuple[int, list]:
    with damaged_fields(f"qat: checkpoint {path}", "remove it to start over"):
        return _restore(path, read_json(path / "state.json"), config, prepared, opt)


def _restore(path: Path, meta: dict, config: QATConfig, prepared, opt) -> tuple[int, list]:
    """The checkpoint's state (`meta`: its state.json) and tensors into `prepared` and `opt`; (step, loss history)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if meta.get("version") != CKPT_VERSION:
        raise EdgeqError(f"qat: checkpoint {path} has version {meta.get('version')}, expected {CKPT_VERSION}")
    # checkpoints from before the loss and output_grids options trained on cross-entropy without output grids
    saved = {"loss": "ce", "output_grids": False, **meta["config"]}
    if saved != config.to_dict():
        diff = sorted(k for k in config.to_dict() if saved.get(k) != config.to_dict()[k])
        raise EdgeqError(f"qat: checkpoint {path} was written with different settings ({', '.join(diff)}); "
                         "resume with the same options or remove the checkpoint")
    try:
        tensors = load_file(path / "state.safetensors")
    except (OSError, SafetensorError) as exc:
        raise EdgeqError(f"qat: checkpoint {path}/state.safetensors cannot be read ({exc}); remove it to start "
                         "over") from None
    params = prepared.trainable()
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param/{n}"])
    for n, p in params.items():
        st = {k.split("/")[-1]: v for k, v in tensors.items() if k.startswith(f"opt/{n}/")}
        if st:
            opt.state[p] = st
    torch.set_rng_state(tensors["rng/torch"])
    return int(meta["step"]), list(meta["history"])


# ---- the loop ----------------------------------------------------------------------------------

def train(config: QATConfig, checkpoint_dir: Path | None = None, checkpoint_every: int = 0, resume: bool = False,
          progress: bool = False, stop_after: int | None = None):
    """Train; returns (prepared, record). `stop_after` ends early after that many steps (tests, interruption)."""
    prepared, opt, windows, teacher = build(config)
    model, tok = prepared.model, prepared.bundle.tokenizer
    start, history = 0, []
    if resume:
        if checkpoint_dir is None or not (checkpoint_dir / "state.json").is_file():
            raise EdgeqError(f"qat: --resume given but there is no checkpoint in {checkpoint_dir}")
        start, history = load_checkpoint(checkpoint_dir, config, prepared, opt)
    def evaluated():  # (loss, top-1 agreement with the teacher or None); (None, None) without evaluation windows
        return evaluate(model, tok, config.data, config.seq_len, config.eval_windows, teacher) if config.eval_windows else (None, None)

    loss_start, agree_start = evaluated()
    model.train()
    steps = range(start, config.steps)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, initial=start, desc=f"qat {config.method}", unit="step")
    t0, timed = time.perf_counter(), 0
    for step in steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, config.steps, g["base_lr"])
        batch = torch.from_numpy(np.ascontiguousarray(windows[step * config.batch : (step + 1) * config.batch]))
        if teacher is None:
            loss = model(input_ids=batch, labels=batch).loss
        else:
            with torch.no_grad():
                target = teacher(input_ids=batch).logits
            loss = kd_loss(model(input_ids=batch).logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        history.append(round(loss.item(), 6))
        timed += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]:.4f}")
        done = step + 1
        if checkpoint_dir is not None and checkpoint_every and done % checkpoint_every == 0 and done < config.steps:
            save_checkpoint(checkpoint_dir, config, prepared, opt, done, history)
        if stop_after is not None and done - start >= stop_after and done < config.steps:
            if checkpoint_dir is not None:
                save_checkpoint(checkpoint_dir, config, prepared, opt, done, history)
            break
    if bar is not None:
        bar.close()
    step_s = (time.perf_counter() - t0) / max(timed, 1)
    model.eval()
    loss_end, agree_end = evaluated()
    record = {
        "method": config.method,
        "config": config.to_dict(),
        "steps_done": len(history),
        "train_loss": history,
        "eval_loss_start": loss_start,  # the RTN grid the run started from (or the resumed state)
        "eval_loss_end": loss_end,
        # with loss="kd": next-token top-1 agreement with the FP32 teacher on the same evaluation windows
        "eval_top1_agree_fp32_start": agree_start,
        "eval_top1_agree_fp32_end": agree_end,
        "trainable_params": sum(p.numel() for p in prepared.trainable().values()),
        "step_seconds": round(step_s, 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": torch.get_num_threads(),
    }
    return prepared, record


def run_qat(config: QATConfig, out: str | Path, checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0,
            resume: bool = False, progress: bool = False, overwrite: bool = False):
    """Train, convert to integers + learned scales, verify the conversion bit-exactly, save the QDIR."""
    from ..data import lm_windows
    from .qat import convert_qat

    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise EdgeqError(f"output: {out} already exists (pass --overwrite to replace it)")
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    prepared, record = train(config, ckpt, checkpoint_every, resume, progress)
    ids = torch.from_numpy(lm_windows(prepared.bundle.tokenizer, config.data, "evaluation", config.seq_len, 2))
    for layer in prepared.layers.values():  # the QDIR holds no output grids (a full-integer export calibrates its own)
        layer.out_grid = None
    with torch.no_grad():
        before = prepared.model(input_ids=ids).logits
        qm = convert_qat(prepared)
        after = qm.model(input_ids=ids).logits
    diff = float((before - after).abs().max())
    record["merge_check"] = {"max_abs_diff": diff, "bit_exact": bool(torch.equal(before, after)),
                             "what": "training-time fake-quant forward vs merged integer QuantLinear model, 2 evaluation windows"}
    if not record["merge_check"]["bit_exact"]:
        raise EdgeqError(f"qat: the merged integer model differs from the training forward (max |diff| {diff:.3g}); not saved")
    qm.extra["qat"] = record
    qm.save(out, overwrite=overwrite)
    return qm
