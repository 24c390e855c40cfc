"""Training a row on the transfer questions: transformers' ``Trainer`` with the letter's loss.

Every trained row of the table runs through :func:`train_on_letters`: the same questions, order (the seed),
epochs, batch and schedule; only the model, its parameter groups' learning rates and the loss differ.

The loss is the cross-entropy of the right letter's token at the answer point, over the whole vocabulary
(what SFT on a one-token reply computes). With a teacher (``kd``) it is Hinton's distillation on the
letters (Hinton et al. 2015): ``alpha * CE + (1 - alpha) * T^2 * KL(p_source^T || p_row^T)``, both
distributions over the question's letters only, so that a source with another tokenizer can teach.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from ...training.nonfinite import NonFiniteLossGuard
from .questions import Question


@dataclass(frozen=True)
class LetterBudget:
    """What every trained row gets: the same epochs, batch and schedule (learning rates are per row)."""

    epochs: float = 1.0
    batch_size: int = 8
    warmup: float = 0.1
    scheduler: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class Distillation:
    """KD on the letters: the source's letter logits per question id, temperature and the CE weight."""

    teacher: dict[str, list[float]]
    temperature: float = 2.0
    alpha: float = 0.5


class _QuestionDataset(torch.utils.data.Dataset):
    def __init__(self, questions: list[Question], scorer, teacher: dict | None) -> None:
        self.questions, self.scorer, self.teacher = questions, scorer, teacher

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> dict:
        question = self.questions[index]
        feature = self.scorer.features(question)
        feature["gold"] = self.scorer.letter_ids[question.answer]
        feature["count"] = len(question.choices)
        if self.teacher is not None:
            feature["teacher"] = self.teacher[question.id]
        feature["row"] = f"{question.task}:{question.id}"
        return feature


class _Collator:
    def __init__(self, scorer) -> None:
        self.scorer = scorer

    def __call__(self, features: list[dict]) -> dict:
        batch = self.scorer.collate(features)
        batch["gold"] = torch.tensor([f["gold"] for f in features])
        batch["count"] = torch.tensor([f["count"] for f in features])
        if "teacher" in features[0]:
            width = max(len(f["teacher"]) for f in features)
            batch["teacher"] = torch.tensor([f["teacher"] + [-math.inf] * (width - len(f["teacher"])) for f in features])
        batch["rows"] = [f["row"] for f in features]
        return batch


def letter_loss(logits: torch.Tensor, gold: torch.Tensor, count: torch.Tensor, letter_ids: list[int],
                teacher: torch.Tensor | None = None, kd: Distillation | None = None) -> torch.Tensor:
    """logits [B, V] at the answer point, gold [B] token ids, count [B] letters per question, teacher [B, n]."""
    loss = F.cross_entropy(logits.float(), gold)
    if kd is None or teacher is None:
        return loss
    n = teacher.shape[1]
    student = logits.float()[:, letter_ids[:n]]
    valid = torch.arange(n, device=logits.device)[None] < count[:, None]
    student = student.masked_fill(~valid, -math.inf)
    t = kd.temperature
    target = F.softmax(teacher.float() / t, -1)
    log_student = F.log_softmax(student / t, -1)
    kl = (target * (torch.log(target.clamp(min=1e-12)) - log_student)).masked_fill(~valid, 0.0).sum(-1).mean()
    return kd.alpha * loss + (1 - kd.alpha) * t * t * kl


class _LetterLoss(Trainer):
    def __init__(self, *args, scorer, groups: list[dict], kd: Distillation | None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scorer, self.groups, self.kd = scorer, groups, kd

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        gold, count, teacher = inputs.pop("gold"), inputs.pop("count"), inputs.pop("teacher", None)
        logits = self.scorer.logits(model, inputs)
        loss = letter_loss(logits, gold, count, self.scorer.letter_ids, teacher, self.kd)
        return (loss, {"logits": logits}) if return_outputs else loss

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model or self.model)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = optimizer_cls(self.groups, **optimizer_kwargs)
        return self.optimizer


class LetterTrainer(NonFiniteLossGuard, _LetterLoss):
    """``Trainer`` on letters, with named learning rates per group and the NaN/inf guard of every run."""


@dataclass
class LetterTrainResult:
    seconds: float
    steps: int
    train_loss: float | None
    trainable_params: int


def train_on_letters(model, scorer, questions: list[Question], groups: dict[str, tuple[list, float]],
                     budget: LetterBudget, output: str | Path, seed: int, kd: Distillation | None = None,
                     progress: bool = True) -> LetterTrainResult:
    """Train ``model`` in place. groups: name -> (parameters, learning rate). Nothing is saved (the row's numbers are)."""
    param_groups = [{"params": params, "lr": lr, "weight_decay": budget.weight_decay, "group": name}
                    for name, (params, lr) in groups.items() if params]
    args = TrainingArguments(
        output_dir=str(output), num_train_epochs=budget.epochs, per_device_train_batch_size=budget.batch_size,
        learning_rate=max(group["lr"] for group in param_groups),
        warmup_steps=budget.warmup if budget.warmup < 1 else int(budget.warmup),
        lr_scheduler_type=budget.scheduler, weight_decay=budget.weight_decay, max_grad_norm=budget.max_grad_norm,
        seed=seed, data_seed=seed, save_strategy="no", eval_strategy="no", report_to=[], logging_steps=10,
        disable_tqdm=not progress, remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    trainer = LetterTrainer(model=model, args=args, train_dataset=_QuestionDataset(questions, scorer, kd.teacher if kd else None),
                            data_collator=_Collator(scorer), scorer=scorer, groups=param_groups, kd=kd)
    started = time.perf_counter()
    output_state = trainer.train()
    trainable = sum(p.numel() for group in param_groups for p in group["params"])
    return LetterTrainResult(time.perf_counter() - started, output_state.global_step,
                             output_state.metrics.get("train_loss"), trainable)
