# CPU image: the service and the shipped default model only (no torch, no training code).
# int8 model on CPUExecutionProvider. Build: docker build -t uniguard:cpu .
FROM python:3.11-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UNIGUARD_HOST=0.0.0.0 UNIGUARD_PORT=8000 UNIGUARD_MODEL_DIR=/app/models/default UNIGUARD_PROVIDER=cpu
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install . && useradd --system --uid 10001 uniguard
COPY models/default ./models/default
USER 10001
EXPOSE 8000
# Set UNIGUARD_THREADS to the container's CPU limit: os.cpu_count() sees the host's cores.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz').status != 200)"
CMD ["python", "-m", "service"]
