# The worker image: `convstats run` by default; any other subcommand works too.
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY schema ./schema
COPY ops ./ops
RUN pip install --no-cache-dir -e .

USER nobody
EXPOSE 9108
ENTRYPOINT ["convstats"]
CMD ["run"]
