# capproxy: slim image, non-root, tokenizer encodings shipped inside the package.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install . \
    && useradd --system --uid 10001 --no-create-home capproxy \
    && mkdir -p /etc/capproxy

COPY config.example.yaml /etc/capproxy/caps.yaml

USER capproxy
EXPOSE 8080

HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"]

# Open files: capproxy raises its soft nofile limit to the hard one at startup and holds
# client connections to server.max_connections (2048 by default). Give the container a
# hard limit well above it: `docker run --ulimit nofile=65536:65536`, or `ulimits` in
# docker-compose.yml.
ENTRYPOINT ["capproxy"]
CMD ["serve", "--config", "/etc/capproxy/caps.yaml", "--host", "0.0.0.0", "--port", "8080"]
