# Image for docker-compose.yml (not tested on the build machine: no Docker there).
FROM python:3.11-slim
WORKDIR /app
COPY . .
RUN pip install --no-cache-dir -e .
