FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY calhook ./calhook
COPY ingest ./ingest
COPY workers ./workers
COPY schemas ./schemas
RUN pip install --no-cache-dir '.[fast]' flower \
    && mkdir -p /var/lib/calhook/spool && chown -R nobody /var/lib/calhook
# The ingress's spool must outlive the container: mount a volume here.
ENV CALHOOK_SPOOL_DIR=/var/lib/calhook/spool
USER nobody
EXPOSE 8080
CMD ["calhook", "serve"]
