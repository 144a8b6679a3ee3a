"""Students: stock sequence classifiers trained on the teacher's outputs.

Both kinds are the exportable layout of our encoder families (CLS pooling, one tanh layer as
wide as the encoder, no prior: ``model.export``'s rule), i.e. exactly a transformers
``BertForSequenceClassification``; they are saved as one (``model.stock.save_stock``).

- **score** (``student-score``, 1 label; ``CrossEncoderReranker``): loss =
  ``score_weight · MSE(s, z) + rank_weight · ListNet_T(s, z | query)`` with ``z`` the teacher's
  score standardised over the training pairs, ``z = (t - μ) / σ``. Standardised, because a
  stacked teacher's lambdarank score has an arbitrary offset and scale (only differences within
  a list mean anything to it) while a cross-encoder teacher's is in gain units: in z units the
  two loss terms weigh the same and ``rank_temperature`` means the same (in teacher standard
  deviations) whatever the teacher. After training, μ and σ are folded into the classifier's
  last layer (``w ← σ·w``, ``b ← σ·b + μ``: a linear map of a linear layer, exact), so the saved
  student scores on the teacher's own scale. ListNet compares the pairs of a query within a
  batch, so batches are query slices (``optim.batching: query``).
- **esci** (``student-esci``, 4 labels E/S/C/I; ``ClassifierReranker``): loss =
  ``T² · KL(p_teacher,T ‖ softmax(logits / T))`` to the teacher's class probabilities after its
  decision rules; ranking by the expected gain ``Σ p_c · gain_c`` (``labels.ESCI_GAINS``).
  After training, optionally (``rules.class_offsets``; off in the shipped config) its own
  decision rules: class offsets on its log-probabilities fitted on the validation queries'
  labels (``stack.rules.fit_class_offsets``, as the teacher's) and folded into the classifier
  bias; Task 3 = ``p_S`` with a threshold fitted
  (``stack.rules.fit_threshold``) to the teacher's substitute decisions on those queries.
- ``loss.label_weight`` mixes a labelled pair's human label into either target.

Both start from the packaged all-MiniLM-L6-v2 as transformers would start a
``BertForSequenceClassification`` from it: the encoder and its pretrained pooler (our head's
tanh layer), a new classifier layer drawn from N(0, initializer_range²).

Training: Hugging Face accelerate (CPU or GPU, bf16 autocast where native), AdamW with the
training loop's parameter groups and linear warmup/decay, gradient clipping, seeded batches
(``train.batching``). Every ``eval.every_steps`` steps the held-out distillation queries are
scored: their distillation loss chooses the kept model (early stopping with ``eval.patience``),
and the labelled pairs among them give nDCG and Task 2 F1 from the labels (logged only).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from esci_reranker.distill.config import DistillConfig, DistillRules
from esci_reranker.distill.data import LABELLED
from esci_reranker.distill.teacher import PROB_COLUMNS
from esci_reranker.labels import ESCI_GAINS, ESCI_LABELS
from esci_reranker.model.config import CLASSIFIER, SINGLE_TASK, ModelConfig
from esci_reranker.model.modeling import MODEL_CLASSES, RerankerModel, rank_loss
from esci_reranker.progress import progress_bar

#: Student kind -> model family.
STUDENT_FAMILIES: dict[str, str] = {"score": SINGLE_TASK, "esci": CLASSIFIER}


@dataclass
class StudentResult:
    """A trained student (best validation point, on the CPU) and how training went.

    Attributes:
        model, tokenizer: the student, ready for ``model.stock.save_stock``.
        best_step, steps, stopped_early: where the kept model is and when training ended.
        best_val_loss: the kept model's distillation loss on the validation queries.
        history: every validation record (step, losses, label metrics).
        standardisation: the score student's ``mean``/``std`` of the teacher score (folded in).
        decision_rules: the esci student's class offsets (folded into its bias) and objective.
        seconds: wall time of training.
    """

    model: RerankerModel
    tokenizer: Any
    best_step: int
    steps: int
    stopped_early: bool
    best_val_loss: float
    history: list[dict[str, Any]] = field(default_factory=list)
    standardisation: dict[str, float] = field(default_factory=dict)
    decision_rules: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def load_teacher_encoder(model: RerankerModel, teacher: str | Path, backbone: str) -> None:
    """Copy the encoder weights of the checkpoint in ``teacher`` into ``model``'s encoder.

    Raises:
        CheckpointError: ``teacher`` is not a checkpoint folder.
        ValueError: it has no encoder weights of the student's architecture (another backbone,
            an ONNX, LLM or stock-student folder).
    """
    from safetensors.torch import load_file

    from esci_reranker.model.io import WEIGHTS_NAME, existing_checkpoint_dir
    from esci_reranker.model.stock import is_stock_folder

    folder = existing_checkpoint_dir(teacher)
    path = folder / WEIGHTS_NAME
    if is_stock_folder(folder) or not path.is_file():
        raise ValueError(
            f"model.init=teacher: {folder} has no encoder weights of ours ({WEIGHTS_NAME} of an encoder "
            "family); use model.init=backbone."
        )
    prefix = "encoder."
    state = {k[len(prefix) :]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    own = model.encoder.state_dict()
    bad = sorted(k for k, v in own.items() if k not in state or tuple(state[k].shape) != tuple(v.shape))
    if bad:
        raise ValueError(
            f"model.init=teacher: the encoder in {path} is not the student's backbone {backbone} "
            f"({len(bad)} weight(s) missing or of another shape, e.g. {bad[:3]}); distil from a teacher "
            "on the same backbone or use model.init=backbone."
        )
    model.encoder.load_state_dict({k: state[k] for k in own})


def build_student(
    cfg: DistillConfig,
    text_fields: tuple[str, ...],
    long_field_chars: int,
    teacher_encoder: str | Path | None = None,
) -> tuple[RerankerModel, Any]:
    """A new student on ``cfg.model.backbone`` and its tokenizer (see the module docstring).

    ``text_fields``/``long_field_chars`` apply unless the config sets its own. With
    ``teacher_encoder`` (a checkpoint folder on the same backbone), the encoder starts from that
    checkpoint's fine-tuned encoder instead of the backbone's weights (``model.init: teacher``).
    """
    from transformers import AutoConfig, AutoTokenizer

    from esci_reranker.train.loop import resolve_backbone

    backbone = resolve_backbone(cfg.model.backbone)
    family = STUDENT_FAMILIES[cfg.student]
    hidden = int(AutoConfig.from_pretrained(backbone).hidden_size)
    config = ModelConfig(
        model_type=family,
        pooling="cls",
        head_hidden=hidden,
        prior="none",
        lexical=False,
        max_length=cfg.model.max_length,
        text_fields=cfg.model.text_fields or text_fields,
        long_field_chars=cfg.model.long_field_chars or long_field_chars,
        rank_score="expected_gain" if family == CLASSIFIER else "regression",
        dropout=cfg.model.dropout,
    )
    model = MODEL_CLASSES[family].from_backbone(backbone, config)
    model.config.backbone_name = cfg.model.backbone
    if teacher_encoder is not None:
        load_teacher_encoder(model, teacher_encoder, cfg.model.backbone)
    head = model.heads["score" if family == SINGLE_TASK else "esci"]
    init_range = float(getattr(model.encoder.config, "initializer_range", 0.02))
    with torch.no_grad():
        pooler = getattr(model.encoder, "pooler", None)
        dense = getattr(pooler, "dense", None)
        if isinstance(
            dense, torch.nn.Linear
        ):  # the pretrained pooler, as BertForSequenceClassification keeps it
            head.body[0].load_state_dict(dense.state_dict())  # type: ignore[index]
        head.proj.weight.normal_(0.0, init_range)
        head.proj.bias.zero_()
    if cfg.model.freeze_embeddings:
        model.encoder.get_input_embeddings().weight.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(backbone)


@dataclass(frozen=True)
class _Targets:
    """Per-pair training targets as tensors (N, ...) and the query group of each pair."""

    score: torch.Tensor | None  # (N,) standardised teacher score
    log_probs: torch.Tensor | None  # (N, 4) log of the teacher's rule probabilities
    groups: torch.Tensor  # (N,) query codes 0..Q-1


def _labelled_gains(frame: pd.DataFrame) -> np.ndarray:
    """Each pair's label gain (``labels.ESCI_GAINS``); NaN for unlabelled pairs."""
    if "esci_label" not in frame.columns:
        return np.full(len(frame), np.nan)
    labels = (
        frame["esci_label"].where(frame["source"] == LABELLED) if "source" in frame else frame["esci_label"]
    )
    return labels.map(ESCI_GAINS).to_numpy(np.float64, na_value=np.nan)


def gain_standardisation(frame: pd.DataFrame) -> tuple[float, float]:
    """Mean and standard deviation of the label gains of ``frame``'s labelled pairs ((0, 1) if none)."""
    gains = _labelled_gains(frame)
    gains = gains[np.isfinite(gains)]
    if not len(gains):
        return 0.0, 1.0
    return float(gains.mean()), float(gains.std()) or 1.0


def _targets(
    frame: pd.DataFrame,
    kind: str,
    mean: float,
    std: float,
    label_weight: float = 0.0,
    gain_stats: tuple[float, float] = (0.0, 1.0),
) -> _Targets:
    """Per-pair targets; with ``label_weight`` w > 0 a labelled pair's target is
    ``(1 - w)·teacher + w·label`` (the gain standardised by ``gain_stats`` for the score
    student, the one-hot class for the esci student); unlabelled pairs keep the teacher's."""
    groups = torch.as_tensor(pd.factorize(frame["query_id"])[0], dtype=torch.long)
    gains = _labelled_gains(frame) if label_weight > 0 else np.full(len(frame), np.nan)
    has_label = np.isfinite(gains)
    if kind == "score":
        z = (frame["t_score"].to_numpy(np.float64) - mean) / std
        z_label = (gains - gain_stats[0]) / gain_stats[1]
        z = np.where(has_label, (1 - label_weight) * z + label_weight * z_label, z)
        return _Targets(torch.as_tensor(z, dtype=torch.float32), None, groups)
    probs = frame[list(PROB_COLUMNS)].to_numpy(np.float64)
    if has_label.any():
        labels = frame["esci_label"].to_numpy()
        onehot = np.zeros_like(probs)
        rows = np.flatnonzero(has_label)
        onehot[rows, [ESCI_LABELS.index(str(labels[i])) for i in rows]] = 1.0
        probs = np.where(has_label[:, None], (1 - label_weight) * probs + label_weight * onehot, probs)
    probs = np.clip(probs, 1e-12, 1.0)
    return _Targets(None, torch.as_tensor(np.log(probs), dtype=torch.float32), groups)


def distill_loss(
    out: Any, targets: _Targets, index: torch.Tensor | np.ndarray, cfg: DistillConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The student's loss on the pairs at ``index`` (see the module docstring); total and parts."""
    idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
    if cfg.student == "score":
        assert targets.score is not None
        z = targets.score[idx].to(out.score.device)
        parts = {"mse": F.mse_loss(out.score.float(), z)}
        total = cfg.loss.score_weight * parts["mse"]
        if cfg.loss.rank_weight > 0:
            groups = targets.groups[idx].to(out.score.device)
            parts["listnet"] = rank_loss(out.score, z, groups, "listnet", cfg.loss.rank_temperature)
            total = total + cfg.loss.rank_weight * parts["listnet"]
        return total, parts
    assert targets.log_probs is not None
    t = cfg.loss.temperature
    teacher = (targets.log_probs[idx].to(out.esci_logits.device) / t).log_softmax(-1)  # (B, 4)
    student = (out.esci_logits.float() / t).log_softmax(-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1).mean()
    return (t * t) * kl, {"kl": kl}


def student_reranker(
    model: RerankerModel, tokenizer: Any, device: torch.device | None = None, batch_size: int = 64
) -> Any:
    """An in-memory ``Reranker`` over a student (scoring, label metrics; CPU by default)."""
    from esci_reranker.model.features import pair_encoder_for
    from esci_reranker.reranker import Reranker, _TorchRunner

    return Reranker(
        model.config,
        pair_encoder_for(tokenizer, model.config),
        _TorchRunner(model, device or torch.device("cpu"), None),
        device or torch.device("cpu"),
        batch_size=batch_size,
        name="student",
        model=model,
    )


def _validate(
    model: RerankerModel,
    tokenizer: Any,
    device: torch.device,
    val: pd.DataFrame,
    targets: _Targets,
    cfg: DistillConfig,
) -> dict[str, Any]:
    """Distillation loss on the validation pairs (whole queries) and label metrics on the labelled ones."""
    from esci_reranker.eval.evaluator import evaluate_run
    from esci_reranker.eval.runner import predictions_frame
    from esci_reranker.model.modeling import RerankerOutput
    from esci_reranker.train.texts import frame_texts

    model.eval()
    reranker = student_reranker(model, tokenizer, device, cfg.eval.batch_size)
    encoded = reranker.pair_encoder.encode(val["query"].astype(str).tolist(), frame_texts(val, model.config))
    raw = reranker.run_encoded(encoded)
    out = RerankerOutput(
        score=torch.as_tensor(raw["score"]),
        esci_logits=torch.as_tensor(raw["esci_logits"]) if "esci_logits" in raw else None,
    )
    with torch.no_grad():
        loss, parts = distill_loss(out, targets, np.arange(len(val)), cfg)
    record: dict[str, Any] = {"val_loss": float(loss), **{f"val_{k}": float(v) for k, v in parts.items()}}
    labelled = val[val["source"] == LABELLED] if "source" in val.columns else val
    if len(labelled) and labelled["esci_label"].notna().all():
        metrics = evaluate_run(predictions_frame(reranker, labelled.reset_index(drop=True), progress=False))
        record["val_ndcg"] = float(metrics["task1"]["ndcg"])
        if "task2" in metrics:
            record["val_task2_micro_f1"] = float(metrics["task2"]["micro_f1"])
            record["val_task2_macro_f1"] = float(metrics["task2"]["macro_f1"])
    return record


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of ``model``'s state dict (the kept student, independent of training)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class WeightAverage:
    """An exponential moving average of a model's trainable weights (``eval.ema_decay``).

    ``update()`` after each optimiser step: ``avg = decay * avg + (1 - decay) * w``, with the
    decay warmed up as ``min(decay, (1 + n) / (10 + n))`` so that the first steps (and the
    initial weights) do not dominate a short run. ``swapped_in()`` puts the average into the
    model for a block (validation, copying the kept state) and restores the live weights after.
    Frozen parameters (e.g. the embeddings) and buffers are the model's own throughout.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"eval.ema_decay={decay}; expected a value in (0, 1), or 0 for off.")
        self.decay = decay
        self.updates = 0
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.average = [p.detach().clone() for p in self.params]

    def update(self) -> None:
        """Fold the model's current weights into the average."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - decay)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The average in the model's parameters inside the block, the live weights after it."""
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, a in zip(self.params, self.average, strict=True):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(self.params, live, strict=True):
                    p.copy_(w)


def _fold_standardisation(model: RerankerModel, mean: float, std: float) -> None:
    """Make the score head output ``std · s + mean`` (the teacher's scale) instead of ``s``."""
    head = model.score_head
    assert head is not None
    with torch.no_grad():
        head.proj.weight.mul_(std)
        head.proj.bias.mul_(std).add_(mean)


def fit_student_offsets(
    model: RerankerModel, tokenizer: Any, val: pd.DataFrame, rules: DistillRules, batch_size: int
) -> list[float] | None:
    """Class offsets (E fixed at 0) on the student's log-probabilities maximising
    ``rules.objective`` (with ``rules.macro_weight`` for ``micro_macro``, and the floor
    ``rules.min_irrelevant_recall`` on the I label's recall) of its argmax
    (``stack.rules.fit_class_offsets``) against the labels of ``val``'s labelled pairs
    (``rules.fit_to="labels"``), or against the teacher's class (``t_class``) of every ``val``
    pair that has one (``"teacher"``). None when there is no such pair."""
    from esci_reranker.stack.rules import fit_class_offsets
    from esci_reranker.train.texts import frame_texts

    if rules.fit_to == "teacher":
        column = "t_class"
        rows = val[val[column].isin(ESCI_LABELS)] if column in val.columns else val.iloc[:0]
    else:  # "labels" (the config admits no other value)
        column = "esci_label"
        rows = val[np.isfinite(_labelled_gains(val))]  # _labelled_gains: NaN where unlabelled
    if rows.empty:
        return None
    target = rows[column]
    reranker = student_reranker(model.eval(), tokenizer, batch_size=batch_size)
    preds = reranker.predict_texts(rows["query"].astype(str).tolist(), frame_texts(rows, model.config))
    truth = np.array([ESCI_LABELS.index(str(label)) for label in target])
    offsets, _ = fit_class_offsets(
        np.asarray(preds.esci_probs, dtype=np.float64),
        truth,
        rules.objective,
        macro_weight=rules.macro_weight,
        min_irrelevant_recall=rules.min_irrelevant_recall,
    )
    return offsets


def _fold_offsets(model: RerankerModel, offsets: list[float]) -> None:
    """Add ``offsets`` to the class logits' bias: ``softmax(logits + o)`` is then the student's
    probability and its argmax the rules' class, in every library that loads the classifier."""
    head = model.esci_head
    assert head is not None
    with torch.no_grad():
        head.proj.bias.add_(torch.as_tensor(offsets, dtype=head.proj.bias.dtype))


def fit_student_threshold(model: RerankerModel, tokenizer: Any, val: pd.DataFrame, batch_size: int) -> float:
    """The Task 3 threshold on the student's P(S) that best matches the teacher's decisions
    (``t_is_sub``) on ``val`` (micro-F1, ``stack.rules.fit_threshold``)."""
    from esci_reranker.stack.rules import fit_threshold
    from esci_reranker.train.texts import frame_texts

    reranker = student_reranker(model.eval(), tokenizer, batch_size=batch_size)
    preds = reranker.predict_texts(val["query"].astype(str).tolist(), frame_texts(val, model.config))
    threshold, _ = fit_threshold(np.asarray(preds.substitute_probs), val["t_is_sub"].to_numpy(bool))
    return threshold


def train_student(
    cfg: DistillConfig,
    train: pd.DataFrame,
    val: pd.DataFrame,
    text_fields: tuple[str, ...],
    long_field_chars: int,
    progress: bool = True,
    record: Callable[[dict[str, Any]], None] | None = None,
    teacher_encoder: str | Path | None = None,
) -> StudentResult:
    """Train one student on ``train`` (pairs with the teacher columns), early-stopped on ``val``.

    Args:
        cfg: the distillation config (its ``seed`` seeds initialisation and batches).
        train, val: pairs (``query_id``, ``query``, product columns, ``source``, ``esci_label``)
            with ``distill.teacher.TEACHER_COLUMNS``; disjoint by query.
        text_fields, long_field_chars: the teacher's, used unless the config sets its own.
        record: called with every log record (training and validation).
        teacher_encoder: the checkpoint whose encoder the student starts from when
            ``cfg.model.init`` is ``teacher`` (required then; ignored otherwise).

    Returns:
        The kept (best) student on the CPU, with the score student's standardisation folded in
        and the esci student's substitute threshold set.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    from esci_reranker.hardware import keep_freed_memory
    from esci_reranker.model.cpu import use_onednn_linears, use_torch_linears
    from esci_reranker.model.features import pair_encoder_for
    from esci_reranker.train.batching import bucketed_batches, query_batches
    from esci_reranker.train.loop import build_optimizer, release_precision_state, resolve_mixed_precision
    from esci_reranker.train.texts import frame_texts

    if cfg.model.init == "teacher" and teacher_encoder is None:
        raise ValueError("model.init=teacher: no teacher checkpoint was given to start the student from.")
    overlap = set(train["query_id"]) & set(val["query_id"])
    if overlap:
        raise ValueError(f"train_student: train and val share {len(overlap)} query id(s); split by query.")
    if cfg.student == "esci" and not np.isfinite(train[list(PROB_COLUMNS)].to_numpy(np.float64)).all():
        raise ValueError(
            "student esci learns the teacher's E/S/C/I probabilities, but this teacher has no class "
            "outputs (a single-task model); distil a score student (configs/distill_score.yaml)."
        )
    started = time.perf_counter()
    set_seed(cfg.seed)
    mixed_precision = resolve_mixed_precision(cfg.mixed_precision)
    release_precision_state(mixed_precision)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=cfg.optim.grad_accum_steps,
    )
    if accelerator.device.type == "cpu":
        keep_freed_memory()
    train, val = train.reset_index(drop=True), val.reset_index(drop=True)
    model, tokenizer = build_student(
        cfg, text_fields, long_field_chars, teacher_encoder if cfg.model.init == "teacher" else None
    )
    # fp32 training on a CPU runs the linear layers on oneDNN, as train.loop does (model.cpu)
    use_onednn_linears(model)
    mean = float(train["t_score"].mean())
    std = float(train["t_score"].std(ddof=0)) or 1.0
    # the labels' gains are standardised once, on the training pairs, like the teacher's score
    gain_stats = gain_standardisation(train)
    weight = cfg.loss.label_weight
    train_targets, val_targets = (
        _targets(train, cfg.student, mean, std, weight, gain_stats),
        _targets(val, cfg.student, mean, std, weight, gain_stats),
    )
    encoder = pair_encoder_for(tokenizer, model.config)
    encoded = encoder.encode(train["query"].astype(str).tolist(), frame_texts(train, model.config))
    lengths = encoded.lengths()

    def epoch_batches(epoch: int) -> list[np.ndarray]:
        if cfg.optim.batching == "query":
            return query_batches(
                train_targets.groups.numpy(), cfg.optim.batch_size, cfg.optim.group_size, cfg.seed, epoch
            )
        return bucketed_batches(lengths, cfg.optim.batch_size, cfg.seed, epoch, cfg.optim.bucket_size)

    steps_per_epoch = max(1, math.ceil(len(epoch_batches(0)) / cfg.optim.grad_accum_steps))
    total_steps = cfg.optim.max_steps or math.ceil(steps_per_epoch * cfg.optim.epochs)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(cfg.optim.warmup_ratio * total_steps), total_steps
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped: RerankerModel = accelerator.unwrap_model(model)
    device = accelerator.device

    history: list[dict[str, Any]] = []
    best = {"loss": math.inf, "step": -1, "bad": 0}
    best_state: dict[str, torch.Tensor] | None = None
    losses: list[float] = []
    emit = record or (lambda _r: None)

    ema = WeightAverage(unwrapped, cfg.eval.ema_decay) if cfg.eval.ema_decay > 0 else None

    def validate(step: int) -> None:
        nonlocal best_state
        with ema.swapped_in() if ema is not None and step > 0 else contextlib.nullcontext():
            rec = {
                "type": "val",
                "step": step,
                **_validate(unwrapped, tokenizer, device, val, val_targets, cfg),
            }
            # The untrained student (step 0) is a reference only, never kept: its output layer is
            # random. Seen in CV: a seed whose trained validation losses all stayed above step 0's
            # kept the untrained head and ranked near random (nDCG 0.78 against ~0.84).
            improved = step > 0 and rec["val_loss"] < best["loss"]
            if improved:  # the validated weights (the average, with ema) are the kept ones
                best_state = _cpu_state(unwrapped)
        model.train()
        history.append(rec)
        emit(rec)
        if improved:
            best.update(loss=rec["val_loss"], step=step, bad=0)
        elif step > 0:
            best["bad"] += 1
        bar.set_postfix(
            loss=f"{np.mean(losses[-50:]) if losses else 0:.4f}", val_loss=f"{rec['val_loss']:.4f}"
        )

    bar = progress_bar(total=total_steps, desc=f"student-{cfg.student}", unit="step", disable=not progress)
    step, epoch, stopped = 0, 0, False
    if cfg.eval.at_start:
        validate(0)
    model.train()
    while step < total_steps and not stopped:
        for index in epoch_batches(epoch):
            batch = {k: v.to(device) for k, v in encoder.collate(encoded, index).items()}
            with accelerator.accumulate(model):
                out = model(**batch)
                loss, parts = distill_loss(out, train_targets, index, cfg)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            losses.append(float(loss.detach()))
            if not accelerator.sync_gradients:
                continue
            step += 1
            if ema is not None:
                ema.update()
            bar.update(1)
            if step % cfg.eval.every_steps == 0 or step == total_steps:
                emit(
                    {
                        "type": "train",
                        "step": step,
                        "loss": float(np.mean(losses[-50:])),
                        "lr": scheduler.get_last_lr()[0],
                        **{f"loss_{k}": float(v.detach()) for k, v in parts.items()},
                    }
                )
                validate(step)
                stopped = best["bad"] >= cfg.eval.patience
            if stopped or step >= total_steps:
                break
        epoch += 1
    bar.close()
    if best_state is None:  # no trained step was validated: keep the last model (its average)
        with ema.swapped_in() if ema is not None else contextlib.nullcontext():
            best_state = _cpu_state(unwrapped)
        best.update(step=step)
    # Under mixed precision accelerate patches the module's own forward with bf16 autocast; the
    # student leaves here as a plain fp32 module (what save_stock compares with its stock copy,
    # and what every other library will run), not one that silently keeps computing in bf16.
    student = accelerator.unwrap_model(model, keep_fp32_wrapper=False).to("cpu").eval()
    student.load_state_dict(best_state)
    use_torch_linears(student)  # the kept student is the stock model again (same weights)
    standardisation: dict[str, float] = {}
    if cfg.student == "score":
        _fold_standardisation(student, mean, std)
        standardisation = {"mean": mean, "std": std}
        decision: dict[str, Any] = {}
    else:
        offsets = (
            fit_student_offsets(student, tokenizer, val, cfg.rules, cfg.eval.batch_size)
            if cfg.rules.class_offsets
            else None
        )
        if offsets is not None:
            _fold_offsets(student, offsets)
        decision = {
            "class_offsets": dict(zip(ESCI_LABELS, offsets or [0.0] * len(ESCI_LABELS), strict=True)),
            "fitted": offsets is not None,
            # the rules' settings as configured (every one but the on/off switch, said by "fitted")
            **cfg.rules.model_dump(mode="json", exclude={"class_offsets"}),
        }
        # after the offsets: the threshold is on the probabilities the saved student gives
        student.config.substitute_threshold = fit_student_threshold(
            student, tokenizer, val, cfg.eval.batch_size
        )
    return StudentResult(
        model=student,
        tokenizer=tokenizer,
        best_step=int(best["step"]),
        steps=step,
        stopped_early=stopped,
        best_val_loss=float(best["loss"]),
        history=history,
        standardisation=standardisation,
        decision_rules=decision,
        seconds=time.perf_counter() - started,
    )
