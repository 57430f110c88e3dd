"""The job: one definition of every key, shared by the TOML file, the CLI flags and
the Python keyword arguments.

``KEYS`` is the single table of job keys. ``load_job`` reads a TOML file, lays the
overrides (flags or keywords) over it, checks every value against ``KEYS`` and
returns a frozen ``Job``. Unknown keys and wrong types are errors that name the
key and the fix; a typo is never a silent default.

Paths written in a job file are relative to the job file's folder, so a job runs
the same from any working directory; paths given as flags or keywords are
relative to the working directory.
"""

from __future__ import annotations

import difflib
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson

from batchrun.deadline import check_batch_keys
from batchrun.errors import JobError
from batchrun.pii import check_keys as check_pii_keys
from batchrun.wire import check_base_url, check_headers

DEFAULT_BASE_URL = "https://api.llmtune.io/v1"
ENDPOINTS = ("chat", "inference")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
SCHEMA_DIALECTS = ("json_schema", "json_object_schema", "vllm", "prompt")
"""The ways a request can carry a response schema, in the order ``schema_via = "auto"`` tries them."""
INPUT_FORMATS = ("auto", "jsonl", "parquet", "openai-batch")
MODES = ("online", "batch", "hybrid")
OWNED_BODY_KEYS = {
    "model": "model",
    "messages": "prompt_template or messages_column",
    "stream": "stream",
    "stream_options": "stream",
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "response_format": "response_format",
    "metadata": "metadata",
}
"""Request body fields batchrun fills itself, and the job key that sets each."""


@dataclass(frozen=True)
class Key:
    """One job key. ``kind`` is what a value must be: str, int, float, bool,
    path, list (of strings) or table (of JSON values)."""

    name: str
    kind: str
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    alias: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


KEYS: tuple[Key, ...] = (
    Key(
        "input",
        "path",
        None,
        "Input table: a JSONL file, a Parquet file or a folder of Parquet files.",
    ),
    Key(
        "input_format",
        "str",
        "auto",
        "`jsonl`, `parquet`, or `openai-batch` (OpenAI Batch API request lines: custom_id becomes the id, each body is sent as it is); `auto` tells them apart by the file.",
        choices=INPUT_FORMATS,
    ),
    Key("output", "path", None, "Output Parquet file (written atomically when the job finishes)."),
    Key("model", "str", None, "Model id sent as `model` (and in the path for endpoint=inference)."),
    Key("base_url", "str", DEFAULT_BASE_URL, "API base URL; any OpenAI-compatible server works."),
    Key(
        "endpoint",
        "str",
        "chat",
        "`chat`: POST {base_url}/chat/completions; `inference`: POST {base_url}/models/{model}/inference (the model id percent-encoded, `/` kept).",
        choices=ENDPOINTS,
    ),
    Key(
        "api_key_env",
        "str",
        "LLMTUNE_API_KEY",
        "Environment variable holding the API key (sent as a Bearer token). Empty: send no key.",
    ),
    Key("system_prompt", "str", None, "System message put before every prompt."),
    Key(
        "prompt_template",
        "str",
        None,
        "User message with {column} placeholders filled from each row.",
    ),
    Key(
        "messages_column",
        "str",
        None,
        "Column holding a whole chat message list (instead of prompt_template).",
    ),
    Key(
        "id_column",
        "str",
        "id",
        "Column with each row's stable id; without it, the row number is the id.",
    ),
    Key("keep_columns", "list", (), "Input columns copied through to the output."),
    Key("temperature", "float", 0.7, "Sampling temperature.", minimum=0.0, maximum=2.0),
    Key("max_tokens", "int", 512, "Maximum completion tokens per row.", minimum=1),
    Key(
        "metadata",
        "table",
        {},
        "Table sent as `metadata` with every request (the row id is added as `row_id`).",
    ),
    Key(
        "pii",
        "list",
        (),
        "Personal data replaced by placeholders before sending and put back in the answers: any of email, phone, card (Luhn-checked), iban (checksum-checked), ip (flag: a,b).",
    ),
    Key(
        "pii_patterns",
        "table",
        {},
        "Your own identifiers to pseudonymize too: name = regular expression (a customer number, an order id); <NAME_1> stands for each.",
        alias="--pii-pattern",
    ),
    Key("pii_region", "str", "US", "Region of phone numbers written without a country code."),
    Key(
        "concurrency",
        "int_or_auto",
        16,
        'Requests in flight at once, or "auto": adapt between 1 and max_concurrency (lower on 429s and timeouts, higher while healthy).',
        minimum=1,
        maximum=4096,
    ),
    Key(
        "max_concurrency",
        "int",
        256,
        'The most requests in flight when concurrency = "auto".',
        minimum=1,
        maximum=4096,
    ),
    Key(
        "rpm",
        "float",
        None,
        "Requests per minute, spread evenly (at most about a second's worth at once). Retries count.",
        minimum=0.001,
    ),
    Key(
        "tpm",
        "float",
        None,
        "Tokens per minute, spread evenly; estimated before sending (prompt characters / 4 + max_tokens), corrected by the usage returned.",
        minimum=1.0,
    ),
    Key(
        "stream",
        "bool",
        False,
        "Stream each answer (SSE) and record the time to first token as `ttft_ms`.",
    ),
    Key(
        "max_attempts",
        "int",
        5,
        "Attempts per row, the first included, before the row is recorded as failed.",
        minimum=1,
    ),
    Key(
        "request_timeout_s",
        "float",
        60.0,
        "Seconds one attempt may take, answer included.",
        minimum=0.001,
    ),
    Key(
        "max_response_bytes",
        "int",
        32 * 1024 * 1024,
        "The most bytes read of one answer, decompressed (streamed answers too); a larger answer makes the row `error`, not retried.",
        minimum=1024,
    ),
    Key(
        "retry_deadline_s",
        "float",
        600.0,
        "Seconds a row may spend in retries before it is recorded as failed.",
        minimum=0.0,
    ),
    Key(
        "response_format",
        "str",
        "text",
        "`text`; `json_object` (every answer must be a JSON object); `json_schema` (every answer must fit response_schema, and its top-level properties become typed output columns).",
        choices=RESPONSE_FORMATS,
    ),
    Key(
        "response_schema",
        "path",
        None,
        "JSON Schema file for response_format = json_schema (giving it implies json_schema).",
    ),
    Key(
        "max_parse_attempts",
        "int",
        2,
        "Requests per row, in all, to get an answer that parses and fits the schema; then the row is `invalid`.",
        minimum=1,
    ),
    Key(
        "schema_via",
        "str",
        "auto",
        "How the schema travels in each request: `json_schema` (OpenAI response_format), `json_object_schema` (response_format json_object with the schema: llama.cpp), `vllm` (structured_outputs), `prompt` (in the system prompt, no server-side constraint); `auto` tries them in that order and keeps the first the server takes.",
        choices=("auto", *SCHEMA_DIALECTS),
    ),
    Key(
        "params",
        "table",
        {},
        "Any other request body fields (top_p, stop, seed, a server's own extensions), merged into every request.",
        alias="--param",
    ),
    Key(
        "headers",
        "table",
        {},
        "Extra HTTP headers; ${VAR} in a value is replaced by that environment variable (and kept out of every output and log).",
        alias="--header",
    ),
    Key(
        "prices",
        "path",
        None,
        "Prices file (TOML, see jobs/prices.toml): the progress line and summary show the spend, and max_cost can stop the job.",
    ),
    Key(
        "max_cost",
        "float",
        None,
        "Budget in the prices' currency: no request starts that could push the spend (paid + worst case in flight) over it; the job then stops (exit 4, resumable).",
        minimum=0.0,
    ),
    Key(
        "api_down_after_s",
        "float",
        300.0,
        "Stop the job (exit 3, resumable) when no request has succeeded for this many seconds while requests keep failing.",
        minimum=1.0,
    ),
    Key(
        "max_failures",
        "float",
        None,
        "Stop the job (exit 3, resumable) once more rows failed than this: a count (1 or more) or a fraction of the rows (below 1).",
        minimum=0.0,
    ),
    Key(
        "allow_insecure_http",
        "bool",
        False,
        "Allow plain http:// to a host that is not loopback (the key would travel in clear).",
    ),
    Key(
        "mode",
        "str",
        "online",
        "`online`: one request per row now; `batch`: the provider's Batch API (OpenAI's /files and /batches, about half the price, answered within 24 h); `hybrid`: a batch first, and before `deadline` the rows it has not answered online.",
        choices=MODES,
    ),
    Key(
        "deadline",
        "str",
        None,
        'When a batch or hybrid job must be done: "HH:MM" (the next such local time), an ISO 8601 date-time, or a duration from the first start ("45m"); kept for reruns.',
    ),
    Key(
        "batch_poll_s",
        "float",
        60.0,
        "Seconds between two looks at a batch's status.",
        minimum=1.0,
    ),
)
KEYS_BY_NAME: dict[str, Key] = {key.name: key for key in KEYS}


@dataclass(frozen=True)
class Job:
    """A checked job. Build it with ``load_job``; every field is a key of ``KEYS``."""

    input: Path
    input_format: str
    output: Path | None
    model: str
    base_url: str
    endpoint: str
    api_key_env: str
    system_prompt: str | None
    prompt_template: str | None
    messages_column: str | None
    id_column: str
    keep_columns: tuple[str, ...]
    temperature: float
    max_tokens: int
    metadata: Mapping[str, Any]
    pii: tuple[str, ...]
    pii_patterns: Mapping[str, Any]
    pii_region: str
    concurrency: int | str
    max_concurrency: int
    rpm: float | None
    tpm: float | None
    stream: bool
    max_attempts: int
    request_timeout_s: float
    max_response_bytes: int
    retry_deadline_s: float
    response_format: str
    response_schema: Path | None
    max_parse_attempts: int
    schema_via: str
    params: Mapping[str, Any]
    headers: Mapping[str, Any]
    prices: Path | None
    max_cost: float | None
    api_down_after_s: float
    max_failures: float | None
    allow_insecure_http: bool
    mode: str
    deadline: str | None
    batch_poll_s: float
    job_file: Path | None = None

    @property
    def workers(self) -> int:
        """The most requests that can ever be in flight (the pool and the workers are this size)."""
        return self.concurrency if isinstance(self.concurrency, int) else self.max_concurrency

    @property
    def url(self) -> str:
        """The URL every request is posted to; the inference path's model id
        percent-encoded, `/` kept (`x?y` would post to /models/x with a query)."""
        base = self.base_url.rstrip("/")
        if self.endpoint == "inference":
            return f"{base}/models/{quote(self.model, safe='/')}/inference"
        return f"{base}/chat/completions"

    def settings(self) -> dict[str, Any]:
        """The job's keys as plain values, for the output's metadata and the logs.
        Holds no secret: the key itself is never a job value, only its variable name."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = value
        return out


def _where(key: str, source: str) -> str:
    return f"`{key}` in {source}" if source.endswith(".toml") else f"`{key}` ({source})"


def _check_value(key: Key, value: Any, source: str, base_dir: Path | None) -> Any:
    """Return ``value`` converted to the key's kind, or raise JobError naming the key."""
    where = _where(key.name, source)
    kind = key.kind
    if value is None:
        return None
    if kind == "path" and isinstance(value, os.PathLike):
        value = os.fspath(value)
    if kind in ("str", "path"):
        if not isinstance(value, str):
            raise JobError(
                f'{where} must be a string, not {type(value).__name__} ({value!r}). Quote it, e.g. {key.name} = "...".'
            )
        if kind == "path":
            if not value:
                raise JobError(f"{where} is empty: give a file path.")
            path = Path(value).expanduser()
            if base_dir is not None and not path.is_absolute():
                path = Path(os.path.normpath(base_dir / path))
            return path
        if key.choices and value not in key.choices:
            raise JobError(f"{where} is {value!r}; it must be one of: {', '.join(key.choices)}.")
        return value
    if kind == "int_or_auto":
        if value == "auto":
            return value
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, str):
            raise JobError(f'{where} must be a whole number or "auto", not {value!r}.')
        kind = "int"
    if kind == "bool":
        if not isinstance(value, bool):
            raise JobError(f"{where} must be true or false, not {value!r}.")
        return value
    if kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise JobError(f"{where} must be a number, not {type(value).__name__} ({value!r}).")
        if not math.isfinite(value):
            raise JobError(f"{where} is {value}; give a finite number.")
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise JobError(f"{where} must be a whole number, not {value!r}.")
            value = int(value)
        else:
            value = float(value)
        if key.minimum is not None and value < key.minimum:
            raise JobError(f"{where} is {value}; it must be at least {key.minimum:g}.")
        if key.maximum is not None and value > key.maximum:
            raise JobError(f"{where} is {value}; it must be at most {key.maximum:g}.")
        return value
    if kind == "list":
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise JobError(
                f'{where} must be a list of column names, e.g. {key.name} = ["customer", "priority"].'
            )
        return tuple(value)
    if kind == "table":
        if not isinstance(value, Mapping):
            raise JobError(f"{where} must be a table, e.g. [{key.name}] with key = value lines.")
        return dict(value)
    raise AssertionError(f"unknown key kind {kind}")


def _unknown_key_error(name: str, source: str) -> JobError:
    close = difflib.get_close_matches(name, KEYS_BY_NAME, n=1)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    known = ", ".join(KEYS_BY_NAME)
    return JobError(f"Unknown key `{name}` in {source}.{hint} Known keys: {known}.")


def read_job_file(path: Path) -> dict[str, Any]:
    """Parse a TOML job file into a plain mapping (not yet checked)."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise JobError(
            f"Job file {path} does not exist. Check the path, or run from flags alone (batchrun run --input ... --model ...)."
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise JobError(
            f"Job file {path} is not valid TOML: {exc}. Fix that line and run again."
        ) from None
    except OSError as exc:
        raise JobError(f"Job file {path} cannot be read: {exc.strerror}.") from None


def load_job(
    job_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    overrides_source: str = "flag",
) -> Job:
    """Build a checked Job from an optional TOML file and overrides.

    ``overrides`` are flags or keywords; a value of None means "not given" and
    leaves the file's value (or the default) in place.
    """
    values: dict[str, Any] = {key.name: key.default for key in KEYS}
    job_path: Path | None = None
    if job_file is not None:
        job_path = Path(job_file)
        source = str(job_path)
        base_dir = job_path.parent
        for name, raw in read_job_file(job_path).items():
            if name not in KEYS_BY_NAME:
                raise _unknown_key_error(name, source)
            values[name] = _check_value(KEYS_BY_NAME[name], raw, source, base_dir)
    for name, raw in (overrides or {}).items():
        if raw is None:
            continue
        if name not in KEYS_BY_NAME:
            raise _unknown_key_error(name, overrides_source)
        values[name] = _check_value(KEYS_BY_NAME[name], raw, overrides_source, None)

    source = str(job_path) if job_path else f"the {overrides_source}s"
    if values["input"] is None:
        raise JobError("No `input` given: set input = ... in the job file or pass --input.")
    if values["input_format"] == "auto":
        values["input_format"] = detect_format(values["input"])
    batch_requests = values["input_format"] == "openai-batch"
    if values["model"] is None and not batch_requests:
        raise JobError("No `model` given: set model = ... in the job file or pass --model.")
    if batch_requests:
        if values["prompt_template"] or values["messages_column"]:
            raise JobError(
                f"Input {values['input']} holds OpenAI batch requests, whose bodies are sent as they are: "
                "leave out `prompt_template` and `messages_column`."
            )
        if values["endpoint"] != "chat":
            raise JobError(
                f"Input {values['input']} holds OpenAI batch requests, which go to {{base_url}}/chat/completions: "
                'set endpoint = "chat".'
            )
        values["model"] = values["model"] or ""  # each body names its own model
    elif bool(values["prompt_template"]) == bool(values["messages_column"]):
        raise JobError(
            f"Set exactly one of `prompt_template` (e.g. 'Summarize: {{ticket}}') or `messages_column` "
            f"(a column holding a chat message list) in {source}."
        )
    check_base_url(values["base_url"], values["allow_insecure_http"])
    if values["response_schema"] is not None and values["response_format"] == "text":
        values["response_format"] = "json_schema"
    if values["response_format"] == "json_schema" and values["response_schema"] is None:
        raise JobError(
            f'`response_format` is "json_schema" in {source} but no `response_schema` is given: '
            'set response_schema = "schema.json" (or pass --response-schema FILE).'
        )
    if values["max_cost"] is not None and values["prices"] is None:
        raise JobError(
            f'`max_cost` is set in {source} but no `prices` file: set prices = "prices.toml" '
            "(or pass --prices FILE) so batchrun can tell what the job spends."
        )
    _check_params(values["params"], source)
    check_headers(values["headers"], source)
    check_pii_keys(values, source)
    check_batch_keys(values, source)
    return Job(**values, job_file=job_path)


def detect_format(path: Path) -> str:
    """parquet by the name (or a folder), openai-batch when the first line is an
    OpenAI Batch API request ({"custom_id", "body", ...}), else jsonl."""
    if path.is_dir() or path.suffix.lower() in (".parquet", ".pq"):
        return "parquet"
    try:
        with path.open("rb") as fh:
            for line in fh:
                if line.strip():
                    first = orjson.loads(line)
                    if isinstance(first, dict) and "custom_id" in first and "body" in first:
                        return "openai-batch"
                    break
    except (OSError, orjson.JSONDecodeError):
        pass  # the input checks say what is wrong, with the line number
    return "jsonl"


def _check_params(params: Mapping[str, Any], source: str) -> None:
    for name in params:
        if name in OWNED_BODY_KEYS:
            raise JobError(
                f"`params` in {source} sets `{name}`, which batchrun sends itself: "
                f"use the `{OWNED_BODY_KEYS[name]}` key instead."
            )
    if "n" in params and params["n"] != 1:
        raise JobError(
            f"`params` in {source} sets n = {params['n']!r}: batchrun keeps one completion per row. "
            "Remove n, or duplicate the rows to get several answers."
        )
