# CPU image: the service and the shipped default model only (no torch, no training code).
FROM python:3.11-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    UNIGUARD_HOST=0.0.0.0 UNIGUARD_PORT=8000 UNIGUARD_MODEL_DIR=/app/models/default
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install . && useradd --system --uid 10001 uniguard
COPY models/default ./models/default
USER uniguard
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz').status != 200)"
CMD ["python", "-m", "service"]
