FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY calhook ./calhook
COPY ingest ./ingest
COPY workers ./workers
COPY schemas ./schemas
RUN pip install --no-cache-dir '.[fast]' flower
USER nobody
EXPOSE 8080
CMD ["calhook", "serve"]
