"""Service settings, read from environment variables (documented in ``docs/serving.md``).

Every field maps to the upper-case environment variable of the same name (``cache_size`` <-
``CACHE_SIZE``). An invalid value stops start-up with a ``SettingsError`` naming the variable.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    import torch

#: What ``esci-reranker serve`` loads when neither ``--model``, ``MODEL_PATH`` nor
#: ``HF_MODEL_REPO_ID`` is given: the checkpoint written by the README's main job (``make run``).
DEFAULT_MODEL_PATH: Final[str] = "runs/default/model"
#: Default ``MAX_BATCH_TOKENS`` on a CPU and on an accelerator (see ``Settings.batch_token_budget``).
CPU_BATCH_TOKENS: Final[int] = 4096
ACCELERATOR_BATCH_TOKENS: Final[int] = 16384
#: Default ``MAX_BATCH_TOKENS`` on a CPU under the memory policy (on by default): half the
#: activations of one forward, which is what kept the default model under 1 GiB without trimming
#: after most forwards (docs/serving.md, "Memory").
MEMORY_POLICY_BATCH_TOKENS: Final[int] = 2048
#: The memory limit when ``MEMORY_LIMIT_MB`` is unset and the container states none: what a
#: 1 GiB container leaves the process once the allocator's overshoot between two checks (one
#: forward's activations) is allowed for.
DEFAULT_MEMORY_LIMIT_MB: Final[int] = 960
#: Share of the container's own memory limit (cgroup) taken as the default when there is one: the
#: rest is for the kernel's page cache of the library files and the overshoot between checks.
CONTAINER_LIMIT_SHARE: Final[float] = 0.9
#: Smallest ``MEMORY_LIMIT_MB`` accepted (below it the model cannot load); 0 turns the policy off.
MIN_MEMORY_LIMIT_MB: Final[int] = 256

MemoryLimitSource = Literal["MEMORY_LIMIT_MB", "container", "default", "off"]
#: Default ``MAX_QUEUED_REQUESTS``: above the 16 clients a 2-core host serves with no 429, and
#: small enough that an admitted request waits at most ~1.25x as long as under those 16
#: (a CPU serves the admitted requests one forward at a time; docs/serving.md, "Load shedding").
DEFAULT_MAX_QUEUED_REQUESTS: Final[int] = 20

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

ModelOrigin = Literal["MODEL_PATH", "HF_MODEL_REPO_ID", "default"]


class SettingsError(ValueError):
    """An environment variable has a value the service cannot use; the message names it."""


class Settings(BaseSettings):
    """How the HTTP service runs. Build with ``load_settings()`` to get errors that name the variable."""

    model_config = SettingsConfigDict(
        case_sensitive=False, extra="ignore", protected_namespaces=(), validate_default=True
    )

    model_path: str | None = Field(None, description="Local checkpoint folder or Hugging Face Hub repo id.")
    hf_model_repo_id: str | None = Field(None, description="Hub repo id used when MODEL_PATH is unset.")
    inference_device: str = Field("auto", description="cpu, cuda, cuda:N, mps or auto (cuda > mps > cpu).")
    precision: Literal["auto", "fp32", "bf16", "int8"] = Field(
        "auto",
        description="Torch backend arithmetic: bf16 autocast, fp32 (oneDNN-packed on CPU), or int8 "
        "(dynamic int8 linear layers, CPU only, fastest on AVX-512 VNNI CPUs; scores shift slightly, "
        "see docs/speed.md); auto = bf16 where the device computes it natively (AVX-512 BF16/AMX "
        "CPUs, Ampere+ GPUs), else fp32. ONNX folders carry their own precision.",
    )
    batch_size: int = Field(
        64, ge=1, le=4096, description="Pairs per model forward pass when dynamic batching is off."
    )
    batch_wait_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        allow_inf_nan=False,
        description="Dynamic batching: how long a request waits for others to share its forward pass; "
        "0 turns batching off (each request runs alone, BATCH_SIZE pairs per forward).",
    )
    max_batch_tokens: int | None = Field(
        None,
        ge=1,
        le=1_048_576,
        description="Dynamic batching: padded tokens (rows x longest row) per forward pass; unset = "
        "2048 on a CPU under the memory policy (the default; 4096 with MEMORY_LIMIT_MB=0: larger "
        "forwards spill the CPU caches and ran slower) and 16384 on a GPU.",
    )
    tower_cache_size: int = Field(
        20_000,
        ge=0,
        le=10_000_000,
        description="Tower embeddings kept for products/queries seen before (LRU, ~2 KB each for "
        "MiniLM): a warm catalogue skips the towers' share of the work; 0 turns it off.",
    )
    memory_limit_mb: int | None = Field(
        None,
        ge=0,
        le=1_048_576,
        description="Bounded memory (MiB of resident memory): caps glibc malloc's arenas and oneDNN's "
        "kernel cache at start-up (unless MALLOC_ARENA_MAX / ONEDNN_PRIMITIVE_CACHE_CAPACITY are set), "
        "bounds a CPU forward at 2048 padded tokens (unless MAX_BATCH_TOKENS is set) and, after a forward "
        "pass that leaves the RSS above the limit, hands malloc's free memory back to the OS. Unset = "
        "90 % of the container's memory limit (cgroup) when it has one, else 960; 0 = no policy. "
        "See docs/serving.md.",
    )
    malloc_arena_max: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="glibc malloc arenas (the variable glibc reads at process start; applied again at "
        "start-up); unset = 2 under the memory policy (the default), glibc's 8 per core with "
        "MEMORY_LIMIT_MB=0.",
    )
    index_path: str | None = Field(
        None,
        description="A catalogue index folder (`esci-reranker index --out DIR`) that POST /search and the "
        "page at / retrieve from; unset = no search (503 from /search).",
    )
    retriever_path: str | None = Field(
        None,
        description="The retriever that embeds /search queries; unset = the one the index's manifest "
        "names. It must embed text as the index's builder did (checked at start-up).",
    )
    search_max_top_k: int = Field(100, ge=1, le=10_000, description="Largest top_k a /search may ask for.")
    api_key: SecretStr | None = Field(None, description="When set, every scoring request must carry it.")
    rate_limit: str = Field("", description="Per-client limit such as '100/minute'; empty = no limit.")
    cache_size: int = Field(256, ge=0, description="Entries of the response cache; 0 turns it off.")
    max_candidates: int = Field(1000, ge=1, description="More candidates in one request -> 413.")
    max_text_chars: int = Field(10_000, ge=1, description="Longer query or product field -> 422.")
    max_body_bytes: int = Field(
        20_000_000, ge=1024, description="Larger Content-Length -> 413 before the body is read."
    )
    max_queued_requests: int = Field(
        DEFAULT_MAX_QUEUED_REQUESTS,
        ge=0,
        le=100_000,
        description="Load shedding: model requests (scoring, /v1 and /v2 rerank, /search) in progress at "
        "once; one more is answered 429 with Retry-After at once instead of queueing; 0 = no bound.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["json", "text"] = "text"

    @field_validator(
        "model_path",
        "hf_model_repo_id",
        "api_key",
        "index_path",
        "retriever_path",
        "memory_limit_mb",
        "malloc_arena_max",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("log_format", "inference_device", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("inference_device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError("expected one of auto, cpu, cuda, cuda:N, mps")
        return value

    @field_validator("rate_limit")
    @classmethod
    def _check_rate_limit(cls, value: str) -> str:
        value = value.strip()
        if value:
            from limits import parse_many

            try:
                parse_many(value)
            except ValueError:
                raise ValueError(
                    "expected a rate such as '100/minute', '10/second' or '1000 per hour' "
                    "(several separated by ';'), or empty for no limit"
                ) from None
        return value

    @field_validator("memory_limit_mb")
    @classmethod
    def _check_memory_limit(cls, value: int | None) -> int | None:
        if value is not None and 0 < value < MIN_MEMORY_LIMIT_MB:
            raise ValueError(
                f"expected 0 (no memory policy) or at least {MIN_MEMORY_LIMIT_MB} MiB (the model needs more)"
            )
        return value

    def memory_limit(self, container_bytes: int | None = None) -> tuple[int | None, MemoryLimitSource]:
        """The memory policy's limit in MiB and where it came from: ``MEMORY_LIMIT_MB``; else
        ``CONTAINER_LIMIT_SHARE`` of ``container_bytes`` (the cgroup's limit, read by
        ``serve.memory.container_memory_limit``) when given; else ``DEFAULT_MEMORY_LIMIT_MB``.
        ``MEMORY_LIMIT_MB=0`` gives ``(None, "off")``: no policy."""
        if self.memory_limit_mb is not None:
            return (self.memory_limit_mb, "MEMORY_LIMIT_MB") if self.memory_limit_mb else (None, "off")
        if container_bytes is not None:
            share = int(container_bytes * CONTAINER_LIMIT_SHARE) // (1024 * 1024)
            return max(MIN_MEMORY_LIMIT_MB, share), "container"
        return DEFAULT_MEMORY_LIMIT_MB, "default"

    def batch_token_budget(self, device: torch.device) -> int:
        """``MAX_BATCH_TOKENS``, or when unset the default for ``device``: CPU 2048 under the memory
        policy (the default: the RSS holds a forward's activations) and 4096 with
        ``MEMORY_LIMIT_MB=0``; GPU 16384."""
        if self.max_batch_tokens is not None:
            return self.max_batch_tokens
        if device.type != "cpu":
            return ACCELERATOR_BATCH_TOKENS
        return CPU_BATCH_TOKENS if self.memory_limit_mb == 0 else MEMORY_POLICY_BATCH_TOKENS

    def model_source(self) -> tuple[str, ModelOrigin]:
        """The checkpoint to serve and where that choice came from (``MODEL_PATH`` > ``HF_MODEL_REPO_ID`` > default)."""
        if self.model_path:
            return self.model_path, "MODEL_PATH"
        if self.hf_model_repo_id:
            return self.hf_model_repo_id, "HF_MODEL_REPO_ID"
        return DEFAULT_MODEL_PATH, "default"


def looks_like_hub_repo_id(source: str) -> bool:
    """True for ``user/name`` (what the Hub accepts); False for paths such as ``runs/x/model`` or ``./m``."""
    return bool(_HUB_REPO_ID.match(source)) and not Path(source).expanduser().exists()


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, ``overrides`` taking precedence.

    Raises:
        SettingsError: one line per invalid variable, with its value and what is expected.
    """
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as err:
        lines = []
        for error in err.errors(include_url=False):
            name = ".".join(str(part) for part in error["loc"]).upper() or "settings"
            value = error.get("input")
            if name == "API_KEY":
                value = "***"
            shown = f"{value!r:.80}" if not isinstance(value, dict) else "(unset)"
            lines.append(f"{name}={shown}: {error['msg'].removeprefix('Value error, ')}")
        raise SettingsError(
            "invalid service settings (environment variables): " + "; ".join(lines) + ". See docs/serving.md."
        ) from None
