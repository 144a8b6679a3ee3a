"""ONNX export of a checkpoint and the ONNX Runtime backend of ``Reranker``.

``export_onnx(model_dir, out_dir, quantize=None)`` writes a folder that
``Reranker.from_pretrained(out_dir, backend="onnx")`` loads (and that the default backend loads
too: a folder with only ONNX weights is picked up as ONNX, see ``resolve_backend``)::

    out_dir/
      model.onnx        the whole model: encoder, every head, the prior towers (``model_int8.onnx``
                        instead when quantised)
      config.json       the checkpoint's ``ModelConfig``, unchanged (``ModelConfig.load`` reads it)
      onnx.json         what this folder is: file, quantisation, opset, inputs/outputs, the checked
                        difference to the PyTorch model, library versions
      tokenizer files

**Graph.** Inputs are the tensors ``PairEncoder.collate`` produces (``input_ids``,
``attention_mask``, ``token_type_ids`` when the tokenizer makes them, and with ``prior="cosine"``
the ``query_*`` / ``product_*`` tower inputs), all int64 with dynamic batch and sequence axes (one
sequence axis per text: ``pair_seq``, ``query_seq``, ``product_seq``). The towers hold each
distinct text of the batch once, so their rows are axes of their own (``query_batch``,
``product_batch``) and ``query_index`` / ``product_index`` (B,) map pairs to rows. With
``lexical``, the float ``lexical`` (B,) is an input too. Graphs exported before the index inputs
existed still load: the runner then repeats tower rows per pair. Outputs are ``score`` (B,)
and, for the multi-task model, ``esci_logits`` (B, 4) and ``substitute_logit`` (B,). The encoder
is traced with eager attention: its ``matmul -> add mask -> softmax -> matmul`` is the pattern
ONNX Runtime's optimiser fuses; the ``sdpa`` trace leaves extra NaN-guard and shape nodes.
The TorchScript exporter (``dynamo=False``) is used, so ``onnxscript`` is not needed.

**Checks.** Before anything is written, the fp32 graph is run with ONNX Runtime on probe pairs at
a batch size different from the traced one and compared with the PyTorch model (tolerance
``EXPORT_TOLERANCE`` on every output); the int8 graph must give finite outputs.

**int8.** Dynamic quantisation (``onnxruntime.quantization.quantize_dynamic``): int8 weights
per output channel (per-tensor scales cost ~3x more score error at the same speed on a
MiniLM-sized model), activations quantised per batch at run time. It needs no calibration data.

**Session.** ``ORT_ENABLE_ALL`` graph optimisation at load time (it takes well under a second for
MiniLM-sized models, so no pre-optimised graph is stored: an ``ENABLE_ALL`` graph is specific to
the CPU it was made on). ``intra_op_num_threads`` defaults to ``torch.get_num_threads()``, so both
backends follow ``OMP_NUM_THREADS`` / ``torch.set_num_threads`` alike.

``onnx`` and ``onnxruntime`` are the ``[onnx]`` extra; they are imported only when used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from esci_reranker.fsutil import staged_dir
from esci_reranker.model.config import WEIGHTS_NAME, CheckpointError, ModelConfig
from esci_reranker.model.export import (
    CROSS_ENCODER_ONLY_FLAG,
    ONNX,
    ExportError,
    _check_target,
    check_export_source,
)
from esci_reranker.model.features import PROBE_PAIRS, PairEncoder
from esci_reranker.model.io import existing_checkpoint_dir, load_checkpoint, load_tokenizer
from esci_reranker.model.modeling import RerankerModel
from esci_reranker.version import __version__

ONNX_NAME: Final[str] = "model.onnx"
ONNX_INT8_NAME: Final[str] = "model_int8.onnx"
#: The sidecar describing an ONNX folder (``config.json`` stays a plain ``ModelConfig``).
ONNX_META_NAME: Final[str] = "onnx.json"
ONNX_FORMAT: Final[str] = "esci-reranker-onnx"
#: ``quantize=`` values of ``export_onnx`` -> the model file they write.
QUANTIZATIONS: Final[Mapping[str | None, str]] = {None: ONNX_NAME, "int8": ONNX_INT8_NAME}
OUTPUT_NAMES: Final[tuple[str, ...]] = ("score", "esci_logits", "substitute_logit")
#: Largest |ONNX fp32 - PyTorch| allowed on any output of the probe pairs at export time.
EXPORT_TOLERANCE: Final[float] = 1e-4
DEFAULT_OPSET: Final[int] = 17
#: Lowest opset the exported graph is checked with (LayerNormalization is native from 17 on;
#: 14..16 decompose it and still work).
MIN_OPSET: Final[int] = 14
_INSTALL_HINT: Final[str] = "pip install 'esci-reranker[onnx]'"
README_NAME: Final[str] = "README.md"
#: ``stage`` in ``onnx.json``: the graph is the checkpoint's whole model ...
WHOLE_MODEL: Final[str] = "whole-model"
#: ... or only the cross-encoder of a stacked checkpoint (``--cross-encoder-only``): its trees,
#: stack features and decision rules were left out, so it scores as ``stacked=False`` does.
CROSS_ENCODER_STAGE: Final[str] = "cross-encoder-only"
_STAGE_NOTES: Final[Mapping[str, str]] = {
    WHOLE_MODEL: "the checkpoint's whole model",
    CROSS_ENCODER_STAGE: (
        "the cross-encoder, the first stage of a stacked checkpoint only: its stacker (trees over "
        "the cross-encoder's outputs and hand-made features, and decision rules) was not exported"
    ),
}


def _dynamic_axes(name: str, ndim: int) -> dict[int, str]:
    """Axis names of one input: the towers hold distinct texts, so their rows are their own axis."""
    for side in ("query", "product"):
        if name.startswith(f"{side}_") and name != f"{side}_index":
            return {0: f"{side}_batch", 1: f"{side}_seq"}
    return {0: "batch", 1: "pair_seq"} if ndim == 2 else {0: "batch"}


class _ExportGraph(nn.Module):
    """The reranker with positional inputs and a tuple of outputs, as the ONNX tracer needs."""

    def __init__(self, model: RerankerModel, input_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = tuple(input_names)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(**dict(zip(self.input_names, inputs, strict=True)))
        if out.esci_logits is None or out.substitute_logit is None:
            return (out.score,)
        return out.score, out.esci_logits, out.substitute_logit


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(f"the ONNX backend needs onnxruntime: {_INSTALL_HINT}") from None
    return onnxruntime


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    # The tracer warns about Python-level shape checks in transformers' mask code (constant for
    # any input here: they compare a mask with itself) and about the legacy exporter.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*aten::index.*")
        yield


class _DropPreprocessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def _probe_batch(encoder: PairEncoder, index: Sequence[int]) -> dict[str, torch.Tensor]:
    # The first two PROBE_PAIRS are traced (padding in every input); all of them (another batch
    # size) and the third alone (batch size 1) are checked.
    encoded = encoder.encode([q for q, _ in PROBE_PAIRS], [t for _, t in PROBE_PAIRS])
    return encoder.collate(encoded, index)


def _session(path: Path, num_threads: int, providers: Sequence[str] = ("CPUExecutionProvider",)) -> Any:
    ort = _import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=list(providers))


def _feed(session: Any, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Numpy inputs for ``session``: token inputs int64, feature inputs (``lexical``) float32."""
    feed = {}
    names = {meta.name for meta in session.get_inputs()}
    batch = _expand_towers(batch, names)
    for meta in session.get_inputs():
        value = batch[meta.name]
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        dtype = np.float32 if meta.type == "tensor(float)" else np.int64
        feed[meta.name] = np.ascontiguousarray(value, dtype=dtype)
    return feed


def _expand_towers(batch: Mapping[str, Any], names: set[str]) -> Mapping[str, Any]:
    """One tower row per pair, for graphs exported before the towers took ``*_index`` inputs."""
    batch = dict(batch)
    for side in ("query", "product"):
        index = batch.get(f"{side}_index")
        if index is not None and f"{side}_index" not in names and f"{side}_input_ids" in names:
            for key in (f"{side}_input_ids", f"{side}_attention_mask"):
                batch[key] = batch[key][index]
    return batch


def _run_session(session: Any, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, _feed(session, batch)), strict=True))


def _max_difference(model: RerankerModel, session: Any, batch: dict[str, torch.Tensor]) -> float:
    with torch.inference_mode():
        out = model(**batch)
    ours = {"score": out.score, "esci_logits": out.esci_logits, "substitute_logit": out.substitute_logit}
    theirs = _run_session(session, {k: v.numpy() for k, v in batch.items()})
    return max(float(np.abs(theirs[name] - ours[name].float().numpy()).max()) for name in theirs)


def export_onnx(
    model_dir: str | Path,
    out_dir: str | Path,
    quantize: str | None = None,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    cross_encoder_only: bool = False,
) -> Path:
    """Export a checkpoint to an ONNX folder that ``Reranker.from_pretrained(out_dir)`` loads.

    A stacked checkpoint (``stacker/``: trees over the cross-encoder's outputs and hand-made
    features) is refused unless ``cross_encoder_only``: the trees are not in the graph, so the
    folder would score with the first stage alone. With it, the folder is that first stage, and
    says so (``stage`` in ``onnx.json``, and its README.md).

    Args:
        model_dir: a checkpoint folder (``config.json`` + ``model.safetensors`` + tokenizer).
        out_dir: the folder to write (see the module docstring for its content).
        quantize: None for an fp32 ``model.onnx``; ``"int8"`` for a dynamically quantised
            ``model_int8.onnx`` (int8 per-channel weights; ~4x smaller, faster on CPUs with VNNI).
        opset: ONNX opset of the graph (>= 14; 17 has a native LayerNormalization).
        overwrite: replace ``out_dir`` if it exists and is not empty.
        cross_encoder_only: export a stacked checkpoint's cross-encoder without its stacker
            (no effect on a checkpoint without one: the cross-encoder is the whole model).

    Returns:
        ``out_dir``.

    Raises:
        CheckpointError: ``model_dir`` is not a checkpoint.
        ExportError: ``out_dir`` is unusable; the checkpoint is stacked (without
            ``cross_encoder_only``), an llm or a listwise model (``export.check_export_source``);
            or the fp32 graph differs from the PyTorch model by more than ``EXPORT_TOLERANCE``
            (nothing is written then).
        ValueError: unknown ``quantize`` or ``opset`` below 14.
        ImportError: ``onnx`` / ``onnxruntime`` are not installed.
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r}; expected one of {list(QUANTIZATIONS)}.")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset={opset!r}; expected an integer >= {MIN_OPSET} (default {DEFAULT_OPSET}).")
    source, out = Path(model_dir), Path(out_dir)
    _check_target(source, out, overwrite)
    stacked = check_export_source(source, ONNX, cross_encoder_only).stacked
    model, tokenizer = load_checkpoint(source, device="cpu")
    ort = _import_onnxruntime()
    with contextlib.suppress(AttributeError, ValueError):  # no such switch: trace what it has
        model.encoder.set_attn_implementation("eager")
    model.float().eval()

    encoder = PairEncoder(tokenizer, model.config)
    traced = _probe_batch(encoder, [0, 1])
    input_names = list(traced)
    output_names = list(OUTPUT_NAMES if model.config.multi_task else OUTPUT_NAMES[:1])
    dynamic_axes = {n: _dynamic_axes(n, traced[n].ndim) for n in input_names}
    dynamic_axes |= {n: {0: "batch"} for n in output_names}

    with staged_dir(out) as tmp:
        fp32_path = tmp / ONNX_NAME
        graph = _ExportGraph(model, input_names).eval()
        with _quiet_export(), torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                graph,
                tuple(traced[n] for n in input_names),
                str(fp32_path),
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        session = _session(fp32_path, num_threads=1)
        checked = [_probe_batch(encoder, range(len(PROBE_PAIRS))), _probe_batch(encoder, [2])]
        diff = max(_max_difference(model, session, batch) for batch in checked)
        if not diff <= EXPORT_TOLERANCE:
            raise ExportError(
                f"export --format onnx: the ONNX graph differs from the checkpoint by {diff:.2e} "
                f"(> {EXPORT_TOLERANCE:g}) on the probe pairs; not writing it. Please report this "
                "with the model's config.json and the torch/onnxruntime versions."
            )
        meta: dict[str, Any] = {
            "format": ONNX_FORMAT,
            "file": QUANTIZATIONS[quantize],
            "quantize": quantize,
            "quantization": None,
            "opset": opset,
            "inputs": input_names,
            "outputs": output_names,
            "dynamic_axes": {n: {str(k): v for k, v in axes.items()} for n, axes in dynamic_axes.items()},
            "max_abs_diff_fp32_vs_torch": diff,
            "source": source.name,
            "stage": CROSS_ENCODER_STAGE if stacked else WHOLE_MODEL,
            "stage_note": _STAGE_NOTES[CROSS_ENCODER_STAGE if stacked else WHOLE_MODEL],
            "esci_reranker_version": __version__,
            "torch_version": torch.__version__,
            "onnxruntime_version": ort.__version__,
        }
        if quantize == "int8":
            meta["quantization"] = _quantize_int8(fp32_path, tmp / ONNX_INT8_NAME, checked)
            fp32_path.unlink()
        model.config.save(tmp)
        # as in the stock exports: onnxruntime users who tokenise with truncation=True cut pairs
        # at the trained length (our runner passes it explicitly either way)
        tokenizer.model_max_length = model.config.max_length
        tokenizer.save_pretrained(tmp)
        (tmp / ONNX_META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / README_NAME).write_text(_readme(meta, model.config))
        if out.exists() and not out.is_dir():
            out.unlink()
    return out


def _quantize_int8(src: Path, dst: Path, probes: Sequence[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Dynamic int8 quantisation of ``src`` into ``dst``; returns what was done (for ``onnx.json``)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    settings = {"method": "dynamic", "weight_type": "QInt8", "per_channel": True, "reduce_range": False}
    root = logging.getLogger()
    hint = _DropPreprocessHint()
    root.addFilter(hint)  # it suggests shape pre-processing, which changes nothing for this graph
    try:
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True, reduce_range=False)
    finally:
        root.removeFilter(hint)
    fp32, int8 = _session(src, num_threads=1), _session(dst, num_threads=1)
    diff = 0.0
    for batch in probes:
        feed = {k: v.numpy() for k, v in batch.items()}
        a, b = _run_session(fp32, feed), _run_session(int8, feed)
        for name, value in b.items():
            if not np.isfinite(value).all():
                raise ExportError(
                    f"export --format onnx --quantize int8: output {name!r} of the int8 graph is not "
                    "finite on the probe pairs; export without --quantize."
                )
            diff = max(diff, float(np.abs(value - a[name]).max()))
    return settings | {"max_abs_diff_int8_vs_fp32_probe": diff}


def _readme(meta: Mapping[str, Any], config: ModelConfig) -> str:
    """The folder's README.md: what the graph is (and, for a first stage, what it lacks), how to run it."""
    outputs = ", ".join(f"`{name}`" for name in meta["outputs"])
    lines = [
        f"# ESCI reranker export (onnx{', int8' if meta['quantize'] else ''})",
        "",
        f"Exported by `esci-reranker export --format onnx` from `{meta['source']}` "
        f"(model_type `{config.model_type}`): `{meta['file']}`, outputs {outputs}. It holds "
        f"{meta['stage_note']}.",
        "",
    ]
    if meta["stage"] == CROSS_ENCODER_STAGE:
        lines += [
            "**This is the first stage of a stacked model only.** The checkpoint ranks with "
            "gradient-boosted trees over this cross-encoder's outputs and hand-made features, "
            "then decision rules (its `stacker/` folder); none of that is in this graph, so its "
            "scores, classes and substitute decisions are the cross-encoder's own, as "
            "`Reranker.from_pretrained(checkpoint, stacked=False)` gives them, not the stacked "
            f"model's. It was written with `{CROSS_ENCODER_ONLY_FLAG}`. For a stock model that "
            "reproduces the stacked one, distil it (`esci-reranker distill`, docs/deploy.md).",
            "",
        ]
    lines += [
        "```python",
        "from esci_reranker import Reranker",
        "",
        'reranker = Reranker.from_pretrained("PATH")  # the ONNX Runtime backend',
        "```",
        "",
        f"Pairs are (query, product text), truncated to {config.max_length} tokens; product text is "
        f"built from the fields {', '.join(config.text_fields)} (`esci_reranker.data.text.product_text`). "
        f"`{ONNX_META_NAME}` describes the graph (inputs, outputs, opset, the checked difference to "
        "the PyTorch model).",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def onnx_model_path(folder: str | Path) -> Path | None:
    """The ONNX model file of ``folder`` (named by ``onnx.json``, else ``model.onnx`` or
    ``model_int8.onnx``), or None when the folder holds none."""
    folder = Path(folder)
    meta = folder / ONNX_META_NAME
    if meta.is_file():
        try:
            name = json.loads(meta.read_text()).get("file")
        except (json.JSONDecodeError, AttributeError):
            raise CheckpointError(f"{meta}: not a valid {ONNX_META_NAME} (expected a JSON object).") from None
        if isinstance(name, str) and (folder / name).is_file():
            return folder / name
    for name in (ONNX_NAME, ONNX_INT8_NAME):
        if (folder / name).is_file():
            return folder / name
    return None


def resolve_backend(folder: str | Path, backend: str) -> str:
    """The backend to load ``folder`` with: ``torch`` on a folder holding only ONNX weights
    (written by ``export --format onnx``) becomes ``onnx``; anything else is returned as is."""
    folder = Path(folder)
    if backend == "torch" and not (folder / WEIGHTS_NAME).is_file() and onnx_model_path(folder) is not None:
        return "onnx"
    return backend


class OnnxRunner:
    """Runs an ONNX Runtime session on one padded batch (the ``BatchRunner`` of ``backend="onnx"``).

    Feeds the graph only the inputs it declares (``token_type_ids`` is absent for RoBERTa-style
    tokenizers) and returns float32 numpy outputs keyed ``score`` and, for multi-task models,
    ``esci_logits`` and ``substitute_logit``. ``session.run`` is thread-safe, so one runner may
    serve concurrent requests.
    """

    def __init__(self, session: Any, path: Path) -> None:
        self.session = session
        self.path = path
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self.providers: list[str] = list(session.get_providers())

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in batch]
        if missing:
            raise ValueError(
                f"ONNX model {self.path.name}: batch lacks input(s) {missing} (got {sorted(batch)}); "
                "batches come from PairEncoder.collate with the folder's own config.json."
            )
        outputs = self.session.run(self.output_names, _feed(self.session, batch))
        return {n: np.asarray(v, dtype=np.float32) for n, v in zip(self.output_names, outputs, strict=True)}


def load_onnx_runner(
    folder: str | Path, device: str | torch.device = "cpu", num_threads: int | None = None
) -> tuple[ModelConfig, PreTrainedTokenizerBase, OnnxRunner]:
    """Load an ONNX folder written by ``export_onnx``: its config, tokenizer and a batch runner.

    Args:
        folder: the exported folder.
        device: ``cuda`` uses onnxruntime's CUDA provider when installed (``onnxruntime-gpu``);
            otherwise, and for any other device, the CPU provider (with a warning if not ``cpu``).
        num_threads: intra-op threads; default ``torch.get_num_threads()`` (``OMP_NUM_THREADS`` or
            the physical cores), the same count the torch backend uses.

    Raises:
        CheckpointError: no such folder, no ONNX model in it (e.g. a PyTorch checkpoint), broken
            config/tokenizer, or a graph that lacks the outputs its config needs.
        ImportError: onnxruntime is not installed.
    """
    folder = existing_checkpoint_dir(folder)
    path = onnx_model_path(folder)
    if path is None:
        hint = (
            f"it holds PyTorch weights ({WEIGHTS_NAME}): load it with backend='torch', or export it "
            f"with `esci-reranker export {folder} --format onnx`."
            if (folder / WEIGHTS_NAME).is_file()
            else "write one with `esci-reranker export CHECKPOINT --format onnx`."
        )
        raise CheckpointError(
            f"{folder}: no {ONNX_NAME} or {ONNX_INT8_NAME}; backend='onnx' loads a folder written by "
            f"`esci-reranker export --format onnx`, and {hint}"
        )
    config = ModelConfig.load(folder)
    ort = _import_onnxruntime()
    device = torch.device(device)
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    elif device.type != "cpu":
        warnings.warn(
            f"onnxruntime has no execution provider for device {str(device)!r} here "
            f"(available: {ort.get_available_providers()}); running the ONNX model on the CPU. "
            "Install onnxruntime-gpu for CUDA.",
            RuntimeWarning,
            stacklevel=2,
        )
    threads = num_threads if num_threads is not None else torch.get_num_threads()
    if threads < 1:
        raise ValueError(f"num_threads={threads}; expected a positive integer or None.")
    try:
        session = _session(path, threads, providers)
    except Exception as err:  # onnxruntime raises its own exception types for broken files
        raise CheckpointError(f"{path}: onnxruntime cannot load it ({type(err).__name__}: {err}).") from None
    runner = OnnxRunner(session, path)
    needed = OUTPUT_NAMES if config.multi_task else OUTPUT_NAMES[:1]
    lacking = [n for n in needed if n not in runner.output_names]
    if lacking:
        raise CheckpointError(
            f"{path}: the graph has outputs {runner.output_names} but its config.json "
            f"(model_type {config.model_type!r}) needs {list(needed)}; re-export the checkpoint."
        )
    return config, load_tokenizer(folder), runner
