"""Train a workbench checkpoint: ``python -m refimpl.train --preset target|draft``.

AdamW with linear warm-up and cosine decay, next-character cross-entropy on
Tiny Shakespeare. Writes ``refimpl/assets/NAME.pt`` and ``NAME.json`` (config,
seed, steps, seconds, final train/val loss and the loss curve).

``train`` is a loop over named pieces, which chapter 0 (notebooks/00_workbench.ipynb)
teaches one by one with the same code: ``build_model``, ``make_optimizer``, the
schedule ``lr_at`` applied by ``set_lr``, the loss of one batch (``batch_loss``:
``lm_loss`` or ``distill_loss``), ``optimizer_step``, the evaluation
(``validation_loss``, ``evaluate``) and ``training_record``.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from refimpl.data import CharTokenizer, get_batch, splits
from refimpl.editing import edit_batch, edit_loss
from refimpl.lm import CHECKPOINTS, GPTConfig, TinyGPT, check_int, check_real, generate, load, save
from refimpl.recurrent import LSTMConfig, LSTMDraft


@dataclass(frozen=True)
class Preset:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int = 256
    batch_size: int = 32
    steps: int = 3000
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    dropout: float = 0.0
    seed: int = 1337
    teacher: str | None = None  # distil from this checkpoint's distribution instead of the labels
    teacher_samples: int = 0  # windows of the teacher's own text added to the distillation data
    init: str | None = None  # start from this checkpoint's weights (fine-tuning)
    task: str = "lm"  # "lm": next character of the corpus; "edit": refimpl.editing's answers
    train_only: str | None = None  # with init: train only parameters whose name contains this
    arch: str = "gpt"  # "gpt": lm.TinyGPT; "lstm": recurrent.LSTMDraft (n_head unused)


PRESETS = {
    "target": Preset(n_layer=6, n_head=8, n_embd=256, batch_size=16, steps=2500, lr=1.5e-3),
    "draft": Preset(n_layer=1, n_head=4, n_embd=128, batch_size=16, steps=3000, lr=3e-3),
    # A two-layer draft trained to match the target's next-character distribution (knowledge
    # distillation, Hinton et al. 2015; for speculative decoding: DistillSpec, Zhou et al. 2023).
    "draft_distilled": Preset(n_layer=2, n_head=4, n_embd=128, batch_size=16, steps=6000, lr=3e-3,
                              teacher="target", teacher_samples=1024),
    # The target fine-tuned to correct misspelt passages (refimpl.editing), a copy-heavy task like
    # the grammar correction of Aggressive Decoding (Ge et al. 2022), for prompt lookup.
    # Only the attention weights change (copying is attention's job: induction heads, Olsson et al.
    # 2022), so the checkpoint stores 6 MB on top of the target's.
    "editor": Preset(n_layer=6, n_head=8, n_embd=256, batch_size=16, steps=2000, lr=1e-3, warmup=50,
                     init="target", task="edit", train_only=".attn."),
    # The same distillation into one LSTM layer: a third of the torch calls per draft token (ch. 5).
    "draft_lstm": Preset(n_layer=1, n_head=1, n_embd=256, batch_size=16, steps=6000, lr=3e-3,
                         teacher="target", teacher_samples=1024, arch="lstm"),
    "smoke": Preset(n_layer=1, n_head=2, n_embd=32, block_size=64, batch_size=8, steps=30),
}


def check_preset(p: Preset) -> None:
    """ValueError naming the first field of the preset out of range."""
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "steps"):
        check_int(name, getattr(p, name), 1)
    check_int("warmup", p.warmup, 0)
    check_real("lr", p.lr, 0.0)
    check_real("min_lr", p.min_lr, 0.0, p.lr)
    check_real("weight_decay", p.weight_decay, 0.0)
    check_int("teacher_samples", p.teacher_samples, 0)
    if p.task not in ("lm", "edit"):
        raise ValueError(f"task must be 'lm' or 'edit', got {p.task!r}")
    if p.arch not in ("gpt", "lstm"):
        raise ValueError(f"arch must be 'gpt' or 'lstm', got {p.arch!r}")
    if p.arch == "lstm" and (p.init or p.dropout):
        raise ValueError("arch 'lstm' trains from scratch without dropout (no init, dropout 0)")
    if p.train_only and not p.init:
        raise ValueError("train_only needs init: the other parameters would stay random")


def lr_at(step: int, p: Preset) -> float:
    """Linear warm-up, then cosine decay from lr to min_lr."""
    check_int("step", step, 0)
    if step < p.warmup:
        return p.lr * (step + 1) / p.warmup
    progress = (step - p.warmup) / max(1, p.steps - p.warmup)
    half_span = 0.5 * (p.lr - p.min_lr)
    return p.min_lr + half_span * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: TinyGPT, ids: torch.Tensor, block_size: int,
             max_windows: int | None = None, batch_size: int = 64) -> float:
    """Mean cross-entropy (nats/char) over consecutive non-overlapping windows
    of ``ids`` (the first ``max_windows`` of them if given)."""
    longest = min(len(ids) - 1, model.config.block_size)
    check_int("block_size", block_size, 1, longest)
    check_int("batch_size", batch_size, 1)
    n = (len(ids) - 1) // block_size
    if max_windows is not None:
        n = min(n, check_int("max_windows", max_windows, 1))
    was_training = model.training
    model.eval()
    x = ids[: n * block_size].view(n, block_size)
    y = ids[1: n * block_size + 1].view(n, block_size)
    total = 0.0
    for i in range(0, n, batch_size):
        logits = model(x[i:i + batch_size])
        targets = y[i:i + batch_size].flatten()
        total += F.cross_entropy(logits.flatten(0, 1), targets,
                                 reduction="sum").item()
    model.train(was_training)
    return total / (n * block_size)


@torch.no_grad()
def teacher_log_probs(teacher: TinyGPT, x: torch.Tensor, batch_size: int = 32,
                      progress: bool = True) -> torch.Tensor:
    """The teacher's log-probabilities [N, T, V] at every position of the windows x [N, T]
    (float16, computed once: distillation then costs no more per step than training on labels)."""
    check_int("batch_size", batch_size, 1)
    teacher.eval()
    logp = torch.empty(*x.shape, teacher.config.vocab_size, dtype=torch.float16)
    for i in tqdm(range(0, len(x), batch_size), desc="teacher log-probs", disable=not progress):
        logp[i:i + batch_size] = teacher(x[i:i + batch_size]).log_softmax(-1).half()
    return logp


@torch.no_grad()
def teacher_text(teacher: TinyGPT, ids: torch.Tensor, num: int, block_size: int,
                 generator: torch.Generator, prompt_len: int = 32, batch_size: int = 64,
                 progress: bool = True) -> torch.Tensor:
    """``num`` windows [num, block_size] written by the teacher after prompts drawn from ``ids``,
    half greedy and half sampled at temperature 1: the text a draft meets when it drafts for
    this teacher (on-policy data, as DistillSpec recommends)."""
    check_int("num", num, 1)
    check_int("batch_size", batch_size, 1)
    check_int("prompt_len", prompt_len, 1, min(block_size - 1, len(ids) - 1))
    out, bar = [], tqdm(total=num, desc="teacher text", disable=not progress)
    for temperature, count in ((0.0, num // 2), (1.0, num - num // 2)):
        for i in range(0, count, batch_size):
            b = min(batch_size, count - i)
            starts = torch.randint(len(ids) - prompt_len, (b,), generator=generator)
            prompts = ids[starts[:, None] + torch.arange(prompt_len)]
            out.append(generate(teacher, prompts, block_size - prompt_len, temperature, generator=generator))
            bar.update(b)
    return torch.cat(out)


def build_model(preset: Preset, vocab_size: int) -> TinyGPT | LSTMDraft:
    """A fresh TinyGPT (or LSTMDraft) of the preset's size (from the global seed), or a copy of
    ``preset.init``; with ``train_only``, every other parameter is frozen."""
    if preset.arch == "lstm":
        return LSTMDraft(LSTMConfig(vocab_size, preset.block_size, preset.n_layer, preset.n_embd))
    config = GPTConfig(vocab_size=vocab_size, block_size=preset.block_size,
                       n_layer=preset.n_layer, n_head=preset.n_head,
                       n_embd=preset.n_embd, dropout=preset.dropout)
    model = TinyGPT(config)
    if preset.init:
        init = load(preset.init)
        if init.config != config:
            raise ValueError(f"init checkpoint {preset.init!r} has config "
                             f"{init.config}, the preset {config}")
        model.load_state_dict(init.state_dict())
    if preset.train_only:
        for pname, p in model.named_parameters():
            p.requires_grad_(preset.train_only in pname)
    return model


def make_optimizer(model: TinyGPT, preset: Preset) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices only
    (not on biases and LayerNorm gains), as in GPT-2 and nanoGPT."""
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.ndim >= 2]
    no_decay = [p for p in trained if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": preset.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=preset.lr, betas=(0.9, 0.99))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group the learning rate ``lr`` (from ``lr_at``)."""
    check_real("lr", lr, 0.0)
    for group in opt.param_groups:
        group["lr"] = lr


def lm_loss(model: TinyGPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of the model on x [B, T] against y [B, T]
    (labels -100 are ignored: the editing task scores only its answers)."""
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)


def distill_loss(model: TinyGPT, x: torch.Tensor,
                 teacher_logp: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the teacher's distribution, KL(teacher || model) + const
    (Hinton et al. 2015): teacher_logp [B, T, V] from ``teacher_log_probs``."""
    p_teacher = teacher_logp.float().exp()
    return -(p_teacher * model(x).log_softmax(-1)).sum(-1).mean()


def optimizer_step(model: TinyGPT, opt: torch.optim.Optimizer,
                   loss: torch.Tensor, max_norm: float = 1.0) -> None:
    """One update: gradients of ``loss``, their global norm clipped to
    ``max_norm``, then the AdamW step."""
    check_real("max_norm", max_norm, 0.0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(trained, max_norm)
    opt.step()


@dataclass
class TrainData:
    """What the training loop draws batches from, for every task."""
    tokenizer: CharTokenizer
    train_ids: torch.Tensor
    val_ids: torch.Tensor
    train_text: str | None = None  # task "edit": refimpl.editing samples passages
    val_text: str | None = None
    windows: torch.Tensor | None = None  # teacher: windows [N, T] and the
    teacher_logp: torch.Tensor | None = None  # teacher's log-probs [N, T, V]


def training_data(preset: Preset, tokenizer: CharTokenizer, train_ids, val_ids,
                  gen: torch.Generator, progress: bool = True) -> TrainData:
    """The corpus splits, plus the preset's extras: the text of the splits for
    editing; for distillation, corpus windows and text the teacher wrote, with
    the teacher's log-probabilities (computed once, before training)."""
    data = TrainData(tokenizer, train_ids, val_ids)
    if preset.task == "edit":
        data.train_text = tokenizer.decode(train_ids)
        data.val_text = tokenizer.decode(val_ids)
    if preset.teacher:
        teacher = load(preset.teacher)
        n = len(train_ids) // preset.block_size
        windows = train_ids[: n * preset.block_size].view(n, preset.block_size)
        if preset.teacher_samples:
            written = teacher_text(teacher, train_ids, preset.teacher_samples,
                                   preset.block_size, gen, progress=progress)
            windows = torch.cat([windows, written])
        data.windows = windows
        data.teacher_logp = teacher_log_probs(teacher, windows, progress=progress)
    return data


def batch_loss(model: TinyGPT, preset: Preset, data: TrainData,
               gen: torch.Generator) -> torch.Tensor:
    """The loss on one random batch of the preset's task."""
    B, T = preset.batch_size, preset.block_size
    if preset.teacher:
        rows = torch.randint(len(data.windows), (B,), generator=gen)
        return distill_loss(model, data.windows[rows], data.teacher_logp[rows])
    if preset.task == "edit":
        x, y = edit_batch(data.tokenizer, data.train_text, B, T, gen)
    else:
        x, y = get_batch(data.train_ids, B, T, gen)
    return lm_loss(model, x, y)


def validation_loss(model: TinyGPT, preset: Preset, data: TrainData) -> float:
    """The curve's validation loss: the first 128 validation windows (editing:
    the answers' loss on held-out passages)."""
    if preset.task == "edit":
        return edit_loss(model, data.tokenizer, data.val_text, preset.block_size)
    return evaluate(model, data.val_ids, preset.block_size, max_windows=128)


def training_record(name: str, preset: Preset, model: TinyGPT, data: TrainData,
                    curve: list, seconds: float) -> dict:
    """The JSON written beside the checkpoint: the final losses on 512 training
    windows and on the whole validation split, the curve, how it was made."""
    model.eval()
    T = preset.block_size
    result = {
        "name": name,
        "command": f"python -m refimpl.train --preset {name}",
        "preset": preset.__dict__,
        "steps": preset.steps,
        "seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "final_train_loss": round(evaluate(model, data.train_ids, T, max_windows=512), 4),
        "final_val_loss": round(evaluate(model, data.val_ids, T), 4),
        "curve": curve,
    }
    if preset.task == "edit":  # the curve's val_loss is the answers' loss on held-out passages
        result["final_edit_val_loss"] = round(
            edit_loss(model, data.tokenizer, data.val_text, T, 256), 4)
    return result


def train(name: str, preset: Preset, out_dir: Path = CHECKPOINTS, eval_every: int = 250,
          progress: bool = True) -> dict:
    """Train the preset's model from its seed; write ``out_dir/NAME.pt`` and
    ``NAME.json`` (``training_record``) and return the record."""
    check_preset(preset)
    check_int("eval_every", eval_every, 1)
    torch.manual_seed(preset.seed)
    tokenizer = CharTokenizer.from_corpus()
    train_ids, val_ids = splits(tokenizer)
    model = build_model(preset, tokenizer.vocab_size)
    opt = make_optimizer(model, preset)
    gen = torch.Generator().manual_seed(preset.seed)
    start = time.perf_counter()
    data = training_data(preset, tokenizer, train_ids, val_ids, gen, progress)
    curve = []
    bar = tqdm(range(preset.steps), desc=f"train {name}", disable=not progress)
    for step in bar:
        set_lr(opt, lr_at(step, preset))
        loss = batch_loss(model, preset, data, gen)
        optimizer_step(model, opt, loss)
        if (step + 1) % eval_every == 0 or step + 1 == preset.steps:
            val = validation_loss(model, preset, data)
            curve.append({"step": step + 1, "train_loss": round(loss.item(), 4),
                          "val_loss": round(val, 4),
                          "seconds": round(time.perf_counter() - start, 1)})
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val:.3f}")
    result = training_record(name, preset, model, data, curve,
                             time.perf_counter() - start)
    out_dir.mkdir(parents=True, exist_ok=True)
    save(model, out_dir / f"{name}.pt", base=preset.init if preset.train_only else None,
         **result)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, help="override the preset's number of steps")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--out-dir", type=Path, default=CHECKPOINTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        preset = replace(preset, steps=args.steps)
    result = train(args.preset, preset, args.out_dir)
    print(f"{args.preset}: {result['steps']} steps in {result['seconds']} s, "
          f"train {result['final_train_loss']:.4f}, val {result['final_val_loss']:.4f} nats/char")


if __name__ == "__main__":
    main()
