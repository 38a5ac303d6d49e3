# Qantara gateway image: slim Python, installed as a package, run as a non-root user.
# docker-compose.yml builds it for both gateway replicas.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    QANTARA_BIND=0.0.0.0 \
    QANTARA_DICOM_STORAGE=/app/var/dicom

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY ingest ingest
COPY hl7 hl7
COPY dicom dicom
COPY storage storage
COPY monitoring monitoring
COPY simulators simulators
RUN pip install . \
    && groupadd --system --gid 10001 qantara \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin qantara \
    && mkdir -p /app/var/dicom \
    && chown -R 10001:10001 /app/var

# Numeric, so that a runtime refusing root (runAsNonRoot) can check it.
USER 10001:10001
EXPOSE 8080 2575 11112
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
CMD ["qantara", "serve"]
