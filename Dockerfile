# The BookStore service: docker build -t bookstore . && docker run -p 8000:8000 \
#   -v bookstore-data:/data -e BOOKSTORE_ADMIN_TOKEN=<a long random secret> bookstore
FROM python:3.12-slim

# BOOKSTORE_DEMO=0: on a network, no open shop; the service stops without a token
# (-e BOOKSTORE_DEMO=1 asks for demo mode on purpose).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DATABASE_URL=sqlite:////data/bookstore.db \
    BOOKSTORE_DEMO=0

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

# A user without privileges, who owns the volume the SQLite file lives on.
RUN useradd --system --uid 10001 --no-create-home bookstore \
    && mkdir /data \
    && chown bookstore /data
VOLUME /data

COPY main.py .
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# Facing the internet, put a reverse proxy in front: the service bounds a body (32 KiB,
# 30 s to arrive), but only a proxy bounds headers that never finish arriving.
CMD ["uvicorn", "main:app", "--host", "0.0.0.0", "--port", "8000"]
