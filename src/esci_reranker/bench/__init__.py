"""Inference benchmarks: backend throughput and accuracy (``backends``) and HTTP latency (``server``).

``esci-reranker bench`` runs both; ``python -m esci_reranker.bench CHECKPOINT`` runs the backends
alone and ``benchmarks/serve_latency.py`` the server part alone. See docs/speed.md.
"""

from esci_reranker.bench.backends import (
    ANCHOR,
    BACKENDS,
    ONNX_FP32,
    ONNX_INT8,
    TEST_SPLIT,
    TORCH_BF16,
    TORCH_FP32,
    TORCH_INT8,
    ServerLatencyBench,
    candidate_lists,
    encoder_flops,
    format_table,
    matmul_gflops,
    ort_matmul_gflops,
    run_backend_bench,
)
from esci_reranker.bench.server import (
    BATCHING,
    P50_GOAL_MS,
    PRECISIONS,
    LatencyResult,
    Server,
    ServerLatency,
    build_requests,
    format_server_table,
    summarize,
)

__all__ = [
    "ANCHOR",
    "BACKENDS",
    "BATCHING",
    "ONNX_FP32",
    "ONNX_INT8",
    "P50_GOAL_MS",
    "PRECISIONS",
    "TEST_SPLIT",
    "TORCH_BF16",
    "TORCH_FP32",
    "TORCH_INT8",
    "LatencyResult",
    "Server",
    "ServerLatency",
    "ServerLatencyBench",
    "build_requests",
    "candidate_lists",
    "encoder_flops",
    "format_server_table",
    "format_table",
    "matmul_gflops",
    "ort_matmul_gflops",
    "run_backend_bench",
    "summarize",
]
