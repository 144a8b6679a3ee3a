# esci-reranker HTTP service (CPU). Build:  docker build -t esci-reranker .
# Run with a local checkpoint:  docker run -p 8000:8000 -v "$PWD/runs/default/model:/models/model:ro" \
#                                 -e MODEL_PATH=/models/model esci-reranker
# with search (/search and the page at /; `make run` builds runs/default/index):
#                               docker run -p 8000:8000 -v "$PWD/runs/default/model:/models/model:ro" \
#                                 -v "$PWD/runs/default/index:/models/index:ro" -e MODEL_PATH=/models/model \
#                                 -e INDEX_PATH=/models/index esci-reranker
# or a Hub checkpoint:          docker run -p 8000:8000 -e MODEL_PATH=user/esci-reranker esci-reranker
# Lint:                         hadolint Dockerfile   (or: docker run --rm -i hadolint/hadolint < Dockerfile)
FROM python:3.11-slim

# DL3064 flags TOKENIZERS_PARALLELISM for the word TOKEN; no secret is set here.
# hadolint ignore=DL3064
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/app/.cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TOKENIZERS_PARALLELISM=false

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin app

WORKDIR /app

# CPU torch first, from the PyTorch index, so `pip install .` finds torch satisfied and never
# pulls a multi-GB CUDA build. Its own layer: it changes far less often than the code.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY src ./src
# serve: the HTTP service; retrieval: what POST /search and the page need to open a catalogue
# index (sentence-transformers for the query encoder, usearch for the HNSW graph). The packaged
# zero-shot retriever is a core dependency, so an index built with it needs nothing else.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[serve,retrieval]"

# Numeric id (the `app` user created above) so hosts and Kubernetes can verify non-root.
USER 10001

EXPOSE 8000

# Liveness: /health is 200 while the process serves (also while the model loads) and 503 once
# loading failed. python, because the slim image has no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# The model: MODEL_PATH (a mounted folder or a Hub repo id) or HF_MODEL_REPO_ID; see docs/serving.md.
CMD ["esci-reranker", "serve", "--host", "0.0.0.0", "--port", "8000"]
