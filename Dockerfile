FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY ingest ingest
COPY hl7 hl7
COPY dicom dicom
COPY storage storage
COPY monitoring monitoring
COPY simulators simulators
RUN pip install --no-cache-dir . && useradd --system --uid 10001 qantara \
    && mkdir -p /app/var/dicom && chown -R qantara /app/var
USER qantara
EXPOSE 8080 2575 11112
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)" || exit 1
CMD ["qantara", "serve"]
