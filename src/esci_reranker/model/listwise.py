"""The listwise reranker: every candidate encoded as a pair, then a transformer over the whole list.

Design (after ListConRanker): the shared encoder reads each "query [SEP] product" pair and pools
it, exactly as the multi-task model does (``_RerankerBase``: the same encoder, priors, padding-free
path and tower cache). A small transformer, the *list transformer*, then reads all candidates of
one query together, plus one extra token holding the query encoded alone, which every candidate
attends to; no positions are given, so the list is a set: permuting the candidates permutes the
outputs and changes nothing else. Each candidate's list-contextualised vector is added to its
pooled pair vector (a residual whose output layer starts at zero, so the untrained model is the
pointwise one), and the three heads (Task 1 score, Task 2 E/S/C/I, Task 3 substitute) read it.

Lists: a forward pass holds whole candidate lists (``groups`` says which list each pair is in);
lists of any length are padded to the longest in the pass and masked. A list longer than
``listwise.max_list`` is dealt round-robin into ``ceil(n / max_list)`` near-equal chunks
(candidate i goes to chunk ``i mod k``, so each chunk sees a spread of the input order), each
scored as its own list in its own pass; ``ListPairEncoder.list_batches`` does this.

Training adds a listwise loss (ListNet over the gains, ``loss.rank_weight``) and a Circle loss
(``loss.circle_weight``: exact candidates above ``1 - m``, the rest below ``m``) to the usual
per-pair losses; ``train.loop`` runs the two-stage schedule through ``on_train_step`` (stage 1:
encoder frozen, list transformer and heads trained; stage 2: everything).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from esci_reranker.model.config import LISTWISE, ModelConfig
from esci_reranker.model.export import DISTILL_HINT
from esci_reranker.model.features import EncodedPairs, PairEncoder, unique_rows
from esci_reranker.model.modeling import (
    MODEL_CLASSES,
    RerankerOutput,
    _pair_cosine,
    _RerankerBase,
)
from esci_reranker.model.registry import Family, WeightsKind, register
from esci_reranker.model.unpadded import Sequences

#: Index of "E" in the E/S/C/I order: the Circle loss's positive class.
EXACT_INDEX = 0


def list_groups(queries: Sequence[str]) -> list[int]:
    """Candidate-list ids 0..L-1 of pairs, one list per distinct query (first-seen order)."""
    ids: dict[str, int] = {}
    return [ids.setdefault(q, len(ids)) for q in queries]


def list_chunks(members: np.ndarray, max_list: int) -> list[np.ndarray]:
    """One list's pair indices as the passes read it: whole, or dealt round-robin into
    ``ceil(n / max_list)`` near-equal chunks when longer than ``max_list``."""
    k = -(-len(members) // max_list)
    return [members[j::k] for j in range(k)] if k > 1 else [members]


class ListPairEncoder(PairEncoder):
    """``PairEncoder`` for the listwise model: pairs as usual, plus the query alone (the list's
    query token) and each pair's list id; ``list_batches`` cuts forward passes at list bounds."""

    list_level = True

    def encode(self, queries: Sequence[str], texts: Sequence[str]) -> EncodedPairs:
        """Tokenise as ``PairEncoder`` does; lists are the distinct queries."""
        encoded = super().encode(queries, texts)
        query_ids = encoded.query_ids
        if query_ids is None:  # no cosine prior: the query tower is still needed for the query token
            query_ids = self.tokenizer(
                list(queries), truncation=True, max_length=self.config.query_max_length
            )["input_ids"]
        return dataclasses.replace(encoded, query_ids=query_ids, groups=list_groups(queries))

    def collate(self, encoded: EncodedPairs, index: Sequence[int]) -> dict[str, Any]:
        """``PairEncoder.collate`` plus the query tower (always) and ``groups`` (B,)."""
        if encoded.groups is None or encoded.query_ids is None:
            raise ValueError("ListPairEncoder.collate: pairs were not encoded by ListPairEncoder.encode.")
        batch = super().collate(encoded, index)
        if "query_input_ids" not in batch:
            unique, rows = unique_rows([encoded.query_ids[i] for i in index])
            batch["query_input_ids"], batch["query_attention_mask"] = self._pad(unique, self.pad_id)
            batch["query_index"] = torch.tensor(rows, dtype=torch.long)  # (B,)
        batch["groups"] = torch.tensor([encoded.groups[i] for i in index], dtype=torch.long)  # (B,)
        return batch

    def list_batches(self, encoded: EncodedPairs, batch_size: int) -> Iterator[np.ndarray]:
        """Index arrays of the forward passes: whole lists (or chunks of lists longer than
        ``listwise.max_list``), packed largest first into passes of at most ``batch_size`` pairs
        (a list larger than that gets a pass of its own); two chunks of one list never share one."""
        if encoded.groups is None:
            raise ValueError("list_batches: pairs were not encoded by ListPairEncoder.encode.")
        assert self.config.listwise is not None
        groups = np.asarray(encoded.groups)
        order = np.argsort(groups, kind="stable")
        bounds = np.flatnonzero(np.diff(groups[order])) + 1
        pieces: list[tuple[int, np.ndarray]] = []
        for members in np.split(order, bounds):
            pieces += [
                (int(groups[members[0]]), c) for c in list_chunks(members, self.config.listwise.max_list)
            ]
        pieces.sort(key=lambda piece: -len(piece[1]))  # stable: ties keep list order
        current: list[np.ndarray] = []
        lists: set[int] = set()
        size = 0
        for group, chunk in pieces:
            if current and (size + len(chunk) > batch_size or group in lists):
                yield np.concatenate(current)
                current, lists, size = [], set(), 0
            current.append(chunk)
            lists.add(group)
            size += len(chunk)
        if current:
            yield np.concatenate(current)


def circle_loss(
    scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, margin: float, gamma: float
) -> torch.Tensor:
    """Circle loss (Sun et al., 2020) of ``scores`` (B,) within each list of ``groups`` (B,).

    Positives are the exact (E) pairs, negatives the rest; per list with both,
    ``softplus(logsumexp_n(γ·a_n·(s_n − m)) + logsumexp_p(−γ·a_p·(s_p − (1 − m))))`` with
    ``a_p = max(0, 1 + m − s_p)`` and ``a_n = max(0, s_n + m)`` (not differentiated), so scores
    (in gain units) are pushed above ``1 − m`` for exact pairs and below ``m`` for the rest, each
    pair weighted by how far it is from its optimum. Mean over the lists that have both kinds.
    """
    scores = scores.float()
    terms = []
    for value in torch.unique(groups):
        member = groups == value
        s, positive = scores[member], labels[member] == EXACT_INDEX
        if bool(positive.all()) or not bool(positive.any()):
            continue
        sp, sn = s[positive], s[~positive]
        ap = (1.0 + margin - sp.detach()).clamp(min=0.0)
        an = (sn.detach() + margin).clamp(min=0.0)
        logit_p = -gamma * ap * (sp - (1.0 - margin))
        logit_n = gamma * an * (sn - margin)
        terms.append(F.softplus(torch.logsumexp(logit_n, 0) + torch.logsumexp(logit_p, 0)))
    if not terms:
        return scores.sum() * 0.0
    return torch.stack(terms).mean()


@dataclasses.dataclass(frozen=True)
class _Lists:
    """Where each pair sits in the padded list tensor: list (B,), slot (B,), sizes (L,), a row of each list (L,)."""

    list_id: torch.Tensor
    slot: torch.Tensor
    sizes: torch.Tensor
    first_row: torch.Tensor

    @classmethod
    def of(cls, groups: torch.Tensor) -> _Lists:
        _, list_id = torch.unique(groups, return_inverse=True)  # (B,) in 0..L-1
        order = torch.argsort(list_id, stable=True)
        sizes = torch.bincount(list_id)  # (L,)
        starts = torch.cumsum(sizes, 0) - sizes
        slot = torch.empty_like(list_id)
        slot[order] = torch.arange(len(list_id), device=groups.device) - starts[list_id[order]]
        return cls(list_id, slot, sizes, order[starts])


class ListwiseReranker(_RerankerBase):
    """Pair encoder + list transformer + three heads on the list-contextualised vectors."""

    model_type = LISTWISE

    def _init_family(self) -> None:
        config = self.config
        settings = config.listwise
        assert settings is not None  # ModelConfig fills it in for this model type
        hidden = self.encoder.config.hidden_size
        if hidden % settings.heads:
            raise ValueError(
                f"model.listwise.heads={settings.heads} must divide the encoder's hidden size {hidden}."
            )
        n_prior = len(config.prior_features)
        # Candidates enter with their prior features, so the list step can compare cosines too.
        self.candidate_in = nn.Linear(hidden + n_prior, hidden)
        self.query_in = nn.Linear(hidden, hidden)
        layer = nn.TransformerEncoderLayer(
            hidden,
            settings.heads,
            settings.ff_mult * hidden,
            settings.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.list_transformer = nn.TransformerEncoder(layer, settings.layers, enable_nested_tensor=False)
        self.list_norm = nn.LayerNorm(hidden)
        self.list_out = nn.Linear(hidden, hidden)
        # The list branch starts silent: at step 0 the heads see the pooled pair vector alone.
        nn.init.zeros_(self.list_out.weight)
        nn.init.zeros_(self.list_out.bias)
        #: Stage 1 of the two-stage schedule: the encoder runs without gradients (training only).
        self.freeze_encoder = False
        #: Training steps of stage 1 (``on_train_step``); 0 = no frozen stage.
        self.stage1_steps = 0

    def on_train_step(self, step: int) -> None:
        """The two-stage schedule: encoder frozen before ``stage1_steps``, trained from then on."""
        self.freeze_encoder = step < self.stage1_steps

    def _score_batch(self, batch: Mapping[str, torch.Tensor | None]) -> RerankerOutput:
        """Score the candidate lists in a batch of pairs (``forward``'s inputs by name).

        The inputs are those of ``MultiTaskReranker.forward``, plus: ``groups`` (B,) the candidate
        list of each pair (required; pairs of one list may come in any order), and the query tower
        inputs ``query_*`` are required (the list's query token), which ``ListPairEncoder.collate``
        provides. With ``labels``, the losses include ListNet and Circle terms per list.
        """
        groups, query_index = batch["groups"], batch["query_index"]
        query_input_ids, query_attention_mask = batch["query_input_ids"], batch["query_attention_mask"]
        if groups is None or query_input_ids is None or query_attention_mask is None:
            raise ValueError(
                "the listwise model needs groups (B,), the list of each pair, and the query tower "
                "inputs (query_input_ids, query_attention_mask, query_index); ListPairEncoder.collate "
                "builds them."
            )
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        assert input_ids is not None  # required by forward
        assert attention_mask is not None
        product_input_ids, product_attention_mask = (
            batch["product_input_ids"],
            batch["product_attention_mask"],
        )
        towers = self.config.prior == "cosine"
        sides = [(query_input_ids, query_attention_mask)]
        if towers:
            if product_input_ids is None or product_attention_mask is None:
                raise ValueError(
                    "this model uses the bi-encoder prior: pass product_input_ids/product_attention_mask "
                    "(ListPairEncoder.collate does)."
                )
            sides.append((product_input_ids, product_attention_mask))
        frozen = self.freeze_encoder and self.training
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            # One encoder call for the pairs and the towers (one unpadded pass at inference).
            pair = Sequences(input_ids, attention_mask, batch["token_type_ids"])
            tower_batches, plans = self._tower_batches(sides)
            hidden = self._hidden_states([pair, *tower_batches])
            pooled = self._pool(hidden[0], attention_mask).float()  # (B, H)
            embeddings = self._tower_embeddings(hidden[1:], tower_batches, plans)
        queries = embeddings[0].float()  # (Uq, H), normalised
        cosine = None
        if towers:
            cosine = _pair_cosine(queries, embeddings[1], query_index, batch["product_index"])
            if not self.train_prior:
                cosine = cosine.detach()
        prior = self.prior_features({"lexical": batch["lexical"]}, cosine=cosine)
        query_rows = queries[query_index] if query_index is not None else queries  # (B, H)
        lists = _Lists.of(groups)
        active = torch.ones_like(groups, dtype=torch.bool)
        out = self._score_lists(pooled, prior, query_rows, lists, active)
        rounds = self.config.listwise.iterative_rounds if self.config.listwise is not None else 0
        if rounds and not self.training:
            out = self._iterate(out, pooled, prior, query_rows, lists, rounds)
        labels = batch["labels"]
        if labels is not None:
            self._add_losses(out, labels, groups)
        return out

    def _score_lists(
        self,
        pooled: torch.Tensor,
        prior: torch.Tensor | None,
        query_rows: torch.Tensor,
        lists: _Lists,
        active: torch.Tensor,
    ) -> RerankerOutput:
        """Heads on the list-contextualised vectors; candidates not ``active`` are masked out of
        the lists (their outputs are computed but read nothing from the others)."""
        x = pooled if prior is None else torch.cat([pooled, prior.float()], dim=-1)
        candidates = self.candidate_in(x)  # (B, H)
        n_lists, width = len(lists.sizes), int(lists.sizes.max()) + 1
        seq = candidates.new_zeros(n_lists, width, candidates.shape[-1])  # (L, 1 + N, H)
        seq[lists.list_id, lists.slot + 1] = candidates
        seq[:, 0] = self.query_in(query_rows[lists.first_row])  # slot 0: the query token
        pad = torch.ones(n_lists, width, dtype=torch.bool, device=seq.device)  # True = ignored
        pad[:, 0] = False
        pad[lists.list_id, lists.slot + 1] = ~active
        context = self.list_transformer(seq, src_key_padding_mask=pad)  # (L, 1 + N, H)
        mixed = self.list_norm(context[lists.list_id, lists.slot + 1].float())  # (B, H)
        return self._head_outputs(pooled + self.list_out(mixed), prior)

    def _iterate(
        self,
        out: RerankerOutput,
        pooled: torch.Tensor,
        prior: torch.Tensor | None,
        query_rows: torch.Tensor,
        lists: _Lists,
        rounds: int,
    ) -> RerankerOutput:
        """Iterative inference: drop the lowest share of each list, re-score the rest, ``rounds`` times.

        A dropped candidate keeps the outputs of the round it was dropped in; survivors are
        shifted up (order within them unchanged) so they stay above every dropped candidate.
        """
        assert self.config.listwise is not None
        share = self.config.listwise.iterative_drop
        active = torch.ones_like(lists.list_id, dtype=torch.bool)
        rank = self.rank_scores
        for _ in range(rounds):
            ranking = rank(out)
            changed = False
            for index in range(len(lists.sizes)):
                rows = torch.nonzero((lists.list_id == index) & active).squeeze(-1)
                drop = int(len(rows) * share)
                if len(rows) - drop < 2 or drop < 1:
                    continue
                lowest = rows[torch.argsort(ranking[rows], stable=True)[:drop]]
                active[lowest] = False
                changed = True
            if not changed:
                break
            again = self._score_lists(pooled, prior, query_rows, lists, active)
            for name in ("score", "esci_logits", "substitute_logit", "expected_gain"):
                old, new = getattr(out, name), getattr(again, name)
                setattr(out, name, torch.where(_rows_like(active, old), new, old))
            self._lift_survivors(out, lists, active)
        return out

    def _lift_survivors(self, out: RerankerOutput, lists: _Lists, active: torch.Tensor) -> None:
        """Shift the ranking score of each list's active rows above its dropped rows' maximum."""
        name = "expected_gain" if self.config.rank_score == "expected_gain" else "score"
        values = getattr(out, name).clone()
        for index in range(len(lists.sizes)):
            member = lists.list_id == index
            kept, dropped = member & active, member & ~active
            if not bool(dropped.any()) or not bool(kept.any()):
                continue
            gap = values[dropped].max() - values[kept].min()
            if gap >= 0:
                values[kept] = values[kept] + gap + 1e-4
        setattr(out, name, values)

    def _add_losses(self, out: RerankerOutput, labels: torch.Tensor, groups: torch.Tensor | None) -> None:
        super()._add_losses(out, labels, groups)
        cfg = self.loss_config
        if cfg.circle_weight > 0 and groups is not None:
            out.losses["circle"] = circle_loss(out.score, labels, groups, cfg.circle_margin, cfg.circle_gamma)
            out.loss = out.loss + cfg.circle_weight * out.losses["circle"]  # type: ignore[operator]


def _rows_like(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``mask`` (B,) broadcast to ``like`` (B,) or (B, K)."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


def _export_refusal(source: Path, fmt: str, config: ModelConfig, weights: WeightsKind) -> str:
    """Why no stock classifier or pairwise ONNX graph expresses a listwise checkpoint."""
    return (
        f"export --format {fmt}: {source} is a listwise checkpoint (model_type {LISTWISE!r}): each "
        "candidate's score depends on the other candidates of its query through the list "
        "transformer, which neither a stock sequence classifier nor our pairwise ONNX graph (one "
        "pair in, one score out) can see; there is no stock equivalent. " + DISTILL_HINT.format(model=source)
    )


MODEL_CLASSES[LISTWISE] = ListwiseReranker
register(
    Family(
        model_type=LISTWISE,
        model_class=ListwiseReranker,
        pair_encoder=ListPairEncoder,
        export_refusal=_export_refusal,
    )
)
