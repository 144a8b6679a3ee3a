"""The rerankers: one transformer encoder over "query [SEP] product", pooled, feeding task heads.

``MultiTaskReranker`` has three heads (Task 1 score, Task 2 E/S/C/I, Task 3 substitute);
``CrossEncoderReranker`` is the single-task Task 1 baseline on the same encoder;
``ClassifierReranker`` is the E/S/C/I head alone, every other output derived from it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel

from esci_reranker.labels import gain_vector
from esci_reranker.model.config import CLASSIFIER, MULTI_TASK, SINGLE_TASK, ModelConfig
from esci_reranker.model.registry import Family, register
from esci_reranker.model.tower_cache import TowerCache, TowerPlan
from esci_reranker.model.unpadded import (
    Sequences,
    UnpaddedEncoder,
    encoder_states,
    packed_states,
    unsupported_reason,
)

logger = logging.getLogger(__name__)

#: Index of "S" in the E/S/C/I order: the Task 3 positive class.
SUBSTITUTE_INDEX = 1


@dataclass
class LossConfig:
    """Per-task loss weights and options.

    Total = score·MSE + esci·CE + substitute·BCE, plus rank·(within-query ranking loss) when
    ``rank_weight`` > 0.
    """

    score_weight: float = 1.0
    esci_weight: float = 1.0
    substitute_weight: float = 0.5
    class_weights: tuple[float, float, float, float] | None = None
    label_smoothing: float = 0.0
    substitute_pos_weight: float | None = None
    #: Weight of a within-query ranking loss on the Task 1 score (needs query groups; 0 = off).
    rank_weight: float = 0.0
    #: ``listnet`` (softmax cross-entropy over a query's pairs) or ``within_mse`` (MSE of the
    #: score's deviation from its query mean to the gain's).
    rank_loss: str = "listnet"
    #: ListNet's softmax temperature, in gain units: scores 1 temperature apart differ by a factor e.
    rank_temperature: float = 0.1
    #: Weight of the Circle loss on the Task 1 score within each list (exact vs the rest; 0 = off).
    circle_weight: float = 0.0
    #: Circle loss relaxation margin m: exact scores are pushed above 1 - m, others below m.
    circle_margin: float = 0.25
    #: Circle loss scale gamma.
    circle_gamma: float = 32.0


def rank_loss(
    scores: torch.Tensor, gains: torch.Tensor, groups: torch.Tensor, kind: str, temperature: float
) -> torch.Tensor:
    """A within-query ranking loss of ``scores`` against ``gains``, both (B,), for query ``groups`` (B,).

    Only differences inside a group count, so the loss ignores what MSE spends most of its
    gradient on with few queries: how many exact matches a query has overall. Groups of one
    pair, or whose pairs all have the same gain, carry no ranking information and are skipped;
    with none left the loss is 0 (with a gradient path, so backward still works).

    ``listnet``: mean over groups of the cross-entropy between ``softmax(gains / T)`` and
    ``softmax(scores / T)``. ``within_mse``: mean over the kept groups' pairs of
    ``((s - mean_g s) - (y - mean_g y))^2``.
    """
    if kind not in ("listnet", "within_mse"):
        raise ValueError(f"loss.rank_loss={kind!r}: expected 'listnet' or 'within_mse'.")
    scores = scores.float()
    terms = []
    for value in torch.unique(groups):
        member = groups == value
        s, y = scores[member], gains[member]
        if s.numel() < 2 or bool((y == y[0]).all()):
            continue
        if kind == "listnet":
            target = (y / temperature).softmax(-1)
            terms.append(-(target * (s / temperature).log_softmax(-1)).sum())
        else:
            terms.append(((s - s.mean()) - (y - y.mean())).pow(2).mean())
    if not terms:
        return scores.sum() * 0.0
    return torch.stack(terms).mean()


@dataclass
class RerankerOutput:
    """Named outputs of ``forward``. Tensors are (B,) unless noted; losses only when labels are given.

    Attributes:
        score: Task 1 relevance score (regression head).
        esci_logits: (B, 4) Task 2 logits in E, S, C, I order (multi-task only).
        substitute_logit: Task 3 "is substitute" logit (multi-task only).
        expected_gain: ``softmax(esci_logits) @ [1, .1, .01, 0]`` (multi-task only).
        prior: (B, F) the prior features (``config.prior_features``: cosine, lexical) if any.
        loss: weighted total loss; ``losses`` holds each task's unweighted loss.
    """

    score: torch.Tensor
    esci_logits: torch.Tensor | None = None
    substitute_logit: torch.Tensor | None = None
    expected_gain: torch.Tensor | None = None
    prior: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average the token vectors where ``mask`` is 1. (B, T, H), (B, T) -> (B, H)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-6)


def class_weight(cfg: LossConfig, device: torch.device) -> torch.Tensor | None:
    """``cfg.class_weights`` as the (4,) fp32 weight of the E/S/C/I cross-entropy, or None."""
    if cfg.class_weights is None:
        return None
    return torch.tensor(cfg.class_weights, device=device, dtype=torch.float32)


def add_rank_loss(
    out: RerankerOutput,
    cfg: LossConfig,
    target_gain: torch.Tensor,
    groups: torch.Tensor | None,
    total: torch.Tensor,
) -> torch.Tensor:
    """``total`` plus the weighted within-query ranking loss of ``out.score`` (kept in
    ``out.losses["rank"]``) when ``cfg.rank_weight`` > 0; ``total`` itself otherwise."""
    if cfg.rank_weight <= 0:
        return total
    if groups is None:
        raise ValueError("loss.rank_weight > 0 needs the pairs' query ids: pass groups.")
    out.losses["rank"] = rank_loss(out.score, target_gain, groups, cfg.rank_loss, cfg.rank_temperature)
    return total + cfg.rank_weight * out.losses["rank"]


def substitute_logit(class_logits: torch.Tensor) -> torch.Tensor:
    """Task 3 logit ``log(p_S / (1 - p_S))`` from E/S/C/I logits or log-probabilities. (B, 4) -> (B,).

    ``1 - p_S`` is summed in log space, so the result is exact where ``p_S`` is near 1.
    """
    others = torch.cat([class_logits[:, :SUBSTITUTE_INDEX], class_logits[:, SUBSTITUTE_INDEX + 1 :]], -1)
    return class_logits[:, SUBSTITUTE_INDEX] - torch.logsumexp(others, -1)


class _Head(nn.Module):
    """Pooled vector (+ optional prior features) -> ``out`` values; linear or one tanh hidden layer."""

    def __init__(self, hidden: int, out: int, head_hidden: int, dropout: float, n_prior: int) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.body: nn.Module = (
            nn.Sequential(nn.Linear(hidden, head_hidden), nn.Tanh(), nn.Dropout(dropout))
            if head_hidden
            else nn.Identity()
        )
        self.proj = nn.Linear(head_hidden or hidden, out)
        # The prior features enter linearly, with their own weights per output, so with the
        # projection zeroed at init the head starts as an affine function of the priors.
        self.prior_weight = nn.Parameter(torch.zeros(out, n_prior)) if n_prior else None

    def forward(self, pooled: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        # fp32 even under autocast: the heads are tiny, and bf16 outputs would round every score
        # to ~3 significant digits, tying candidates that the encoder tells apart.
        with torch.autocast(pooled.device.type, enabled=False):
            out = self.proj(self.body(self.dropout(pooled.float())))  # (B, out)
            if self.prior_weight is not None and prior is not None:
                out = out + prior.float() @ self.prior_weight.float().T  # (B, F) @ (F, out)
        return out


class _RerankerBase(nn.Module):
    """Shared encoder, pooling, optional bi-encoder prior and the loss."""

    model_type: str = ""

    def __init__(
        self,
        config: ModelConfig,
        encoder: PreTrainedModel | None = None,
        loss_config: LossConfig | None = None,
    ) -> None:
        super().__init__()
        if config.model_type != self.model_type:
            raise ValueError(
                f"{type(self).__name__} needs model_type={self.model_type!r}, "
                f"config has {config.model_type!r}."
            )
        self.config = config
        self.loss_config = loss_config or LossConfig()
        #: Whether the loss reaches the encoder through the prior's towers (training only).
        self.train_prior = True
        #: Padding-free inference path (``enable_unpadded``); used only in eval mode without grad.
        self.unpadded: UnpaddedEncoder | None = None
        #: Whether forward passes with autograd run padding-free (``enable_packed_training``).
        self.packed_training = False
        #: Tower embeddings of texts seen before (``Reranker.from_pretrained(tower_cache=N)``);
        #: read only in eval mode without grad, cleared by ``train()``.
        self.tower_cache: TowerCache | None = None
        #: Whether the encoder's linear layers run in dynamic int8 (``quantize_int8``).
        self.int8 = False
        if encoder is None:
            if not config.backbone:
                raise ValueError("model config: backbone is empty; build with from_backbone().")
            encoder = AutoModel.from_config(AutoConfig.for_model(**config.backbone))
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        args = (config.head_hidden, config.dropout, len(config.prior_features))
        self.score_head = _Head(hidden, 1, *args)
        if config.multi_task:
            self.esci_head: _Head | None = _Head(hidden, 4, *args)
            self.substitute_head: _Head | None = _Head(hidden, 1, *args)
        else:
            self.esci_head = None
            self.substitute_head = None
        self.register_buffer("gain_vector", torch.tensor(gain_vector(config.gains), dtype=torch.float32))
        if config.prior_features:
            self._init_prior_residual()
        self._init_family()

    def _init_family(self) -> None:
        """Where a family adds (or removes) its own layers, once the shared ones are built."""

    @property
    def heads(self) -> dict[str, _Head]:
        """The task heads by name: ``score`` and, for the multi-task model, ``esci``, ``substitute``."""
        named = {"score": self.score_head, "esci": self.esci_head, "substitute": self.substitute_head}
        return {name: head for name, head in named.items() if head is not None}

    def _init_prior_residual(self) -> None:
        # Start from the priors alone: score = sum of the prior features (the zero-shot ranking),
        # class logits flat. Training (or ``set_prior_heads`` with fitted values) moves from there.
        for head in self.heads.values():
            nn.init.zeros_(head.proj.weight)
            nn.init.zeros_(head.proj.bias)
        assert self.score_head.prior_weight is not None
        with torch.no_grad():
            self.score_head.prior_weight.fill_(1.0)

    def set_prior_heads(self, weights: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Set each named head's prior weights (out, F) and bias (out,), e.g. fitted on training data."""
        for name, (weight, bias) in weights.items():
            head = self.heads[name]
            if head.prior_weight is None:
                raise ValueError(f"head {name!r} has no prior inputs (model config prior_features is empty).")
            with torch.no_grad():
                head.prior_weight.copy_(
                    torch.as_tensor(weight, dtype=head.prior_weight.dtype).reshape_as(head.prior_weight)
                )
                head.proj.bias.copy_(
                    torch.as_tensor(bias, dtype=head.proj.bias.dtype).reshape_as(head.proj.bias)
                )

    @classmethod
    def from_backbone(
        cls,
        backbone: str,
        config: ModelConfig | None = None,
        loss_config: LossConfig | None = None,
    ) -> _RerankerBase:
        """A new reranker on pretrained encoder weights (a local folder or a Hub id)."""
        encoder = AutoModel.from_pretrained(backbone)
        config = config or ModelConfig(model_type=cls.model_type)
        config.backbone = encoder.config.to_dict()
        config.backbone_name = str(backbone)
        return cls(config, encoder=encoder, loss_config=loss_config)

    def enable_unpadded(self, probes: list[Sequences]) -> bool:
        """Run inference padding-free (``model.unpadded``) if the encoder allows; True if on.

        ``probes`` are padded batches to check the fast path against the encoder's own forward.
        """
        self.unpadded = UnpaddedEncoder.attach(self.encoder, probes)
        return self.unpadded is not None

    def enable_packed_training(self, on: bool = True) -> bool:
        """Run forward passes that need gradients (training) padding-free: the pair and both towers
        packed into one pass over their real tokens (``model.unpadded.packed_states``), with the
        same loss and gradients as the padded passes. Returns whether it is on: off when asked,
        or when the encoder is not of the BERT layout (then a message is logged).
        """
        reason = unsupported_reason(self.encoder) if on else None
        if reason is not None:
            logger.info("padding-free training off: %s", reason)
        self.packed_training = on and reason is None
        return self.packed_training

    def quantize_int8(self) -> int:
        """Run the encoder's linear layers in dynamic int8 on the CPU (``model.cpu.int8_linear``),
        in the unpadded path too; the heads and priors stay fp32. Inference only: afterwards the
        model cannot be trained or saved with int8 weights. Returns how many layers were swapped.

        Raises:
            RuntimeError: this torch build has no dynamic int8 linear for the CPU.
        """
        from esci_reranker.model.cpu import quantize_linears

        swapped = quantize_linears(self.encoder)
        if self.unpadded is not None:
            self.unpadded.quantize_int8()
        self.int8 = True
        return swapped

    def _inferring(self) -> bool:
        return not self.training and not torch.is_grad_enabled()

    def train(self, mode: bool = True) -> _RerankerBase:
        """Set training mode. Entering it drops what was derived from the current weights (the
        tower cache's embeddings, the unpadded path's fused weights): they are about to change."""
        if mode and getattr(self, "int8", False):
            raise RuntimeError(
                "this model's encoder runs in int8 (quantize_int8) and cannot be trained; "
                "load the checkpoint again without precision='int8'."
            )
        if mode and getattr(self, "tower_cache", None) is not None:
            self.tower_cache.clear()  # type: ignore[union-attr]
        if mode:
            self.unpadded = None
        return super().train(mode)

    def _hidden_states(self, batches: list[Sequences]) -> list[torch.Tensor]:
        """Last hidden states (B, T, H) of each padded batch, in one unpadded pass when enabled."""
        if not batches:  # every tower text was in the tower cache
            return []
        if self.unpadded is not None and self._inferring():
            return self.unpadded(batches)
        if self.packed_training and not self._inferring():
            return packed_states(self.encoder, batches)
        return [encoder_states(self.encoder, seqs) for seqs in batches]

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return hidden[:, 0] if self.config.pooling == "cls" else mean_pool(hidden, mask)

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the encoder and pool. (B, T) -> (B, H)."""
        hidden = self._hidden_states([Sequences(input_ids, attention_mask, token_type_ids)])[0]
        return self._pool(hidden, attention_mask)

    def prior_cosine(
        self,
        query_input_ids: torch.Tensor,
        query_attention_mask: torch.Tensor,
        product_input_ids: torch.Tensor,
        product_attention_mask: torch.Tensor,
        query_index: torch.Tensor | None = None,
        product_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cosine of the mean-pooled query and product embeddings, each encoded alone. -> (B,).

        With ``query_index`` (B,), the query inputs hold distinct queries (U, T) and pair i reads
        row ``query_index[i]``; likewise ``product_index``. Without, row i belongs to pair i.
        """
        sides = [(query_input_ids, query_attention_mask), (product_input_ids, product_attention_mask)]
        batches, plans = self._tower_batches(sides)
        return self._tower_cosine(self._hidden_states(batches), batches, plans, query_index, product_index)

    def _tower_batches(
        self, sides: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[list[Sequences], list[TowerPlan]]:
        """The tower inputs to encode for the (query, product) ``sides``: all rows, or at inference
        with the tower cache only the rows it has not seen (then with one plan per side)."""
        if self.tower_cache is None or not self._inferring():
            return [Sequences(ids, mask) for ids, mask in sides], []
        plans = [self.tower_cache.plan(ids, mask) for ids, mask in sides]
        batches = [
            Sequences(ids[plan.missing], mask[plan.missing])
            for plan, (ids, mask) in zip(plans, sides, strict=True)
            if len(plan.missing)
        ]
        return batches, plans

    @classmethod
    def _tower_cosine(
        cls,
        hidden: list[torch.Tensor],
        batches: list[Sequences],
        plans: list[TowerPlan],
        query_index: torch.Tensor | None,
        product_index: torch.Tensor | None,
    ) -> torch.Tensor:
        """Per-pair cosine from the towers' hidden states of ``_tower_batches``' batches. -> (B,)."""
        return _pair_cosine(*cls._tower_embeddings(hidden, batches, plans), query_index, product_index)

    @staticmethod
    def _tower_embeddings(
        hidden: list[torch.Tensor], batches: list[Sequences], plans: list[TowerPlan]
    ) -> list[torch.Tensor]:
        """Normalised embeddings (U, H) of each side's distinct texts, from ``_tower_batches``' passes."""
        encoded = iter(zip(hidden, batches, strict=True))
        if not plans:
            return [_embed(states, seqs.attention_mask) for states, seqs in encoded]
        embeddings = []
        for plan in plans:
            computed = None
            if len(plan.missing):
                states, seqs = next(encoded)
                computed = _embed(states, seqs.attention_mask)
            embeddings.append(plan.fill(computed))
        return embeddings

    @staticmethod
    def _check_towers(inputs: Mapping[str, torch.Tensor | None]) -> None:
        if any(inputs.get(name) is None for name in _TOWER_INPUTS):
            raise ValueError(
                "this model uses the bi-encoder prior: pass query_input_ids/query_attention_mask "
                "and product_input_ids/product_attention_mask (the PairEncoder does)."
            )

    def prior_features(
        self, inputs: Mapping[str, torch.Tensor | None], cosine: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """(B, F) prior features in ``config.prior_features`` order, or None when there are none.

        ``inputs`` holds the tower inputs (``query_*``, ``product_*``) and/or ``lexical``, as
        ``PairEncoder.collate`` makes them; other keys are ignored. ``cosine`` (B,), when the
        caller already ran the towers, is used instead of running them again.
        """
        features = []
        if self.config.prior == "cosine":
            if cosine is None:
                self._check_towers(inputs)
                # With train_prior off the towers are a fixed feature of the current encoder: the
                # encoder still learns through the pair, but not to bend the cosine.
                with torch.set_grad_enabled(self.train_prior and torch.is_grad_enabled()):
                    cosine = self.prior_cosine(
                        *(inputs[name] for name in _TOWER_INPUTS),  # type: ignore[arg-type]
                        query_index=inputs.get("query_index"),
                        product_index=inputs.get("product_index"),
                    )
            features.append(cosine)
        if self.config.lexical:
            lexical = inputs.get("lexical")
            if lexical is None:
                raise ValueError("this model reads the lexical prior: pass lexical (the PairEncoder does).")
            features.append(lexical)
        if not features:
            return None
        return torch.stack([f.float() for f in features], dim=-1)  # (B, F)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        query_input_ids: torch.Tensor | None = None,
        query_attention_mask: torch.Tensor | None = None,
        product_input_ids: torch.Tensor | None = None,
        product_attention_mask: torch.Tensor | None = None,
        lexical: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        query_index: torch.Tensor | None = None,
        product_index: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
    ) -> RerankerOutput:
        """Score a batch of encoded pairs.

        Args:
            input_ids, attention_mask, token_type_ids: the pair "query [SEP] product", (B, T).
            query_*, product_*: the two sides encoded alone; required when ``config.prior`` is set.
                ``query_index``/``product_index`` (B,) map each pair to its row there when the
                tower inputs hold each distinct text once (``PairEncoder.collate`` does this).
            lexical: (B,) query-word coverage of each pair; required when ``config.lexical`` is set.
            labels: (B,) class indices in E, S, C, I order; when given, losses are computed.
            groups: (B,) query ids of the pairs, for the ranking loss (``loss_config.rank_weight``).
        """
        return self._score_batch(
            {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "token_type_ids": token_type_ids,
                "query_input_ids": query_input_ids,
                "query_attention_mask": query_attention_mask,
                "product_input_ids": product_input_ids,
                "product_attention_mask": product_attention_mask,
                "lexical": lexical,
                "labels": labels,
                "query_index": query_index,
                "product_index": product_index,
                "groups": groups,
            }
        )

    def _score_batch(self, batch: Mapping[str, torch.Tensor | None]) -> RerankerOutput:
        """``forward`` with its inputs by name: the one method a pair family overrides, so every
        family keeps ``forward``'s named inputs (the ONNX export and the training loop pass them)."""
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        assert input_ids is not None  # required by forward
        assert attention_mask is not None
        query_index, product_index = batch["query_index"], batch["product_index"]
        batches = [Sequences(input_ids, attention_mask, batch["token_type_ids"])]
        cosine = None
        towers = self.config.prior == "cosine" and self.train_prior
        plans: list[TowerPlan] = []
        if towers:
            # One encoder call for the pair and both towers (a single unpadded pass at inference);
            # with the tower cache, only texts it has not seen go through their tower.
            self._check_towers(batch)
            sides = [
                (batch["query_input_ids"], batch["query_attention_mask"]),
                (batch["product_input_ids"], batch["product_attention_mask"]),
            ]
            tower_batches, plans = self._tower_batches(sides)  # type: ignore[arg-type]
            batches += tower_batches
        hidden = self._hidden_states(batches)
        pooled = self._pool(hidden[0], attention_mask)  # (B, H)
        if towers:
            cosine = self._tower_cosine(hidden[1:], batches[1:], plans, query_index, product_index)
        out = self._head_outputs(pooled, self.prior_features(batch, cosine=cosine))
        labels = batch["labels"]
        if labels is not None:
            self._add_losses(out, labels, batch["groups"])
        return out

    def _head_outputs(self, vectors: torch.Tensor, prior: torch.Tensor | None) -> RerankerOutput:
        """The heads on the (B, H) pair ``vectors``: the score and, with the class heads, the class
        logits, the substitute logit and the expected gain."""
        out = RerankerOutput(score=self.score_head(vectors, prior).squeeze(-1), prior=prior)
        if self.esci_head is not None and self.substitute_head is not None:
            out.esci_logits = self.esci_head(vectors, prior)  # (B, 4)
            out.substitute_logit = self.substitute_head(vectors, prior).squeeze(-1)
            # an elementwise sum, not @: autocast would run a matmul in bf16
            out.expected_gain = (out.esci_logits.float().softmax(-1) * self.gain_vector).sum(-1)
        return out

    def _add_losses(self, out: RerankerOutput, labels: torch.Tensor, groups: torch.Tensor | None) -> None:
        cfg = self.loss_config
        target_gain = self.gain_vector[labels]  # (B,)
        out.losses["score"] = F.mse_loss(out.score.float(), target_gain)
        total = add_rank_loss(out, cfg, target_gain, groups, cfg.score_weight * out.losses["score"])
        if out.esci_logits is not None and out.substitute_logit is not None:
            out.losses["esci"] = F.cross_entropy(
                out.esci_logits.float(),
                labels,
                weight=class_weight(cfg, labels.device),
                label_smoothing=cfg.label_smoothing,
            )
            pos_weight = (
                torch.tensor(cfg.substitute_pos_weight, device=labels.device)
                if cfg.substitute_pos_weight is not None
                else None
            )
            out.losses["substitute"] = F.binary_cross_entropy_with_logits(
                out.substitute_logit.float(),
                (labels == SUBSTITUTE_INDEX).float(),
                pos_weight=pos_weight,
            )
            total = (
                total
                + cfg.esci_weight * out.losses["esci"]
                + cfg.substitute_weight * out.losses["substitute"]
            )
        out.loss = total

    def rank_scores(self, out: RerankerOutput) -> torch.Tensor:
        """The score ``rerank`` sorts by, as chosen by ``config.rank_score``."""
        if self.config.rank_score == "expected_gain" and out.expected_gain is not None:
            return out.expected_gain
        return out.score


_TOWER_INPUTS = ("query_input_ids", "query_attention_mask", "product_input_ids", "product_attention_mask")


def _embed(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalised mean-pooled tower embeddings. (U, T, H) -> (U, H)."""
    return F.normalize(mean_pool(hidden, mask), dim=-1)


def _pair_cosine(
    q: torch.Tensor, p: torch.Tensor, query_index: torch.Tensor | None, product_index: torch.Tensor | None
) -> torch.Tensor:
    """Cosine per pair of normalised tower embeddings, rows picked by the indices. -> (B,)."""
    if query_index is not None:
        q = q[query_index]  # (B, H)
    if product_index is not None:
        p = p[product_index]
    return (q.float() * p.float()).sum(-1)


class MultiTaskReranker(_RerankerBase):
    """Shared encoder with three heads: Task 1 score (MSE to the gain), Task 2 E/S/C/I (CE),
    Task 3 is-substitute (BCE). Loss = weighted sum (``LossConfig``)."""

    model_type = MULTI_TASK


class CrossEncoderReranker(_RerankerBase):
    """Single-task Task 1 baseline: the same encoder with only the regression head."""

    model_type = SINGLE_TASK


class ClassifierReranker(_RerankerBase):
    """The E/S/C/I head alone: a stock 4-label sequence classifier is the whole model.

    The distilled ``student-esci`` (``distill/``). Its other outputs are functions of the class
    probabilities ``p = softmax(esci_logits)``, so exporting the head loses nothing:
    ``score = expected_gain = Σ_c p_c · gain_c`` (Task 1 ranks by the expected gain) and
    ``substitute_logit = log p_S - log(1 - p_S)`` (Task 3: ``sigmoid`` of it is ``p_S``).
    Labels, when given, train the head with cross-entropy (``loss_config.esci_weight``).
    """

    model_type = CLASSIFIER

    def _init_family(self) -> None:
        # The base builds every head of a family with classes; this one derives score and
        # substitute from the class probabilities, so those heads must not exist (nor be saved).
        self.score_head = None  # type: ignore[assignment]
        self.substitute_head = None

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
    ) -> RerankerOutput:
        """Score encoded pairs (B, T): class logits and the outputs derived from them.

        ``groups`` is accepted for the training loop's sake and unused (no ranking loss).
        """
        assert self.esci_head is not None  # built by the base for every family with classes
        hidden = self._hidden_states([Sequences(input_ids, attention_mask, token_type_ids)])[0]
        logits = self.esci_head(self._pool(hidden, attention_mask), None)  # (B, 4), fp32
        log_probs = logits.float().log_softmax(-1)
        gain = (log_probs.exp() * self.gain_vector).sum(-1)  # elementwise: autocast-safe
        out = RerankerOutput(
            score=gain, esci_logits=logits, substitute_logit=substitute_logit(log_probs), expected_gain=gain
        )
        if labels is not None:
            cfg = self.loss_config
            out.losses["esci"] = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
            out.loss = cfg.esci_weight * out.losses["esci"]
        return out


#: The encoder-based families by ``model_type`` (``model.listwise`` adds itself on import; the
#: LLM family is built and loaded by ``model.llm``).
MODEL_CLASSES: dict[str, type[_RerankerBase]] = {
    MULTI_TASK: MultiTaskReranker,
    SINGLE_TASK: CrossEncoderReranker,
    CLASSIFIER: ClassifierReranker,
}
RerankerModel = _RerankerBase
for _model_type, _model_class in MODEL_CLASSES.items():
    register(Family(model_type=_model_type, model_class=_model_class))
