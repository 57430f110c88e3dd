"""The embedded endpoint's Batch API, shaped like OpenAI's: files and batches over
a simulated queue.

Routes (added to the app by :func:`add_batch_api`):

* ``POST /v1/files`` (multipart: ``purpose=batch`` and ``file``), ``GET /v1/files/{id}``,
  ``GET /v1/files/{id}/content``
* ``POST /v1/batches`` (``input_file_id``, ``endpoint``, ``completion_window``,
  ``metadata``), ``GET /v1/batches`` (newest first; ``limit``, ``after``),
  ``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``
* ``GET /_batch_stats`` — what the queue did (a test control, outside ``/v1``)

The queue: a new batch is ``validating`` for ``batch_start_s`` seconds, then its
lines are checked (JSON objects with a unique ``custom_id``, ``method`` POST, the
batch's ``url``, an object ``body``; at most 50,000 lines): a bad file, or one of
the first ``batch_fail_validation`` batches, ends ``failed`` with ``errors``.
Then ``in_progress``: every batch together is answered at ``batch_rows_per_s``
rows per second, each line by the endpoint's own chat handler (a request to
itself over 127.0.0.1, so a batch answer is the online answer to the same body,
and ``/_stats`` counts every body answered, online or in a batch). A share
``batch_fail_rate`` of the lines get an error line (HTTP 500) instead.
``finalizing`` writes the output file (answered lines, in the order answered) and
the error file, then ``completed``. A batch still running after
``batch_expire_s`` is ``expired``; a cancelled one becomes ``cancelling`` (the
lines being answered finish) and, ``batch_cancel_s`` later, ``cancelled``; both
keep the answers made so far, and put every line never run in the error file
with the code ``batch_expired`` or ``batch_cancelled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import orjson
from aiohttp import web

from batchrun.mock.config import MockConfig

MAX_LINES: Final = 50_000
TERMINAL: Final = frozenset({"failed", "completed", "expired", "cancelled"})
_IN_FLIGHT: Final = 32  # lines the queue answers at once
_JSON: Final = {"Content-Type": "application/json"}


def _now() -> int:
    return int(time.time())


def _oops(status: int, message: str, code: str | None = None) -> web.Response:
    """An OpenAI-style error answer."""
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    return web.Response(status=status, body=orjson.dumps({"error": error}), headers=_JSON)


def _missing(kind: str, name: str) -> web.HTTPNotFound:
    error = {"message": f"No such {kind} object: {name}", "type": "invalid_request_error"}
    return web.HTTPNotFound(body=orjson.dumps({"error": error}), content_type="application/json")


def _json(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data), headers=_JSON)


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int = field(default_factory=_now)

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


@dataclass
class _Batch:
    id: str
    input_file_id: str
    endpoint: str
    metadata: dict[str, str] | None
    origin: str
    created_at: int = field(default_factory=_now)
    status: str = "validating"
    times: dict[str, int] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0
    unrun: int = 0
    output: list[bytes] = field(default_factory=list)
    failed: list[bytes] = field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def set_status(self, status: str) -> None:
        self.status = status
        self.times[f"{status}_at"] = _now()

    def info(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": "24h",
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "request_counts": {
                "total": self.total,
                "completed": len(self.output),
                "failed": len(self.failed) - self.unrun,
            },
            "metadata": self.metadata,
        }
        for name in (
            "in_progress_at",
            "expires_at",
            "finalizing_at",
            "completed_at",
            "failed_at",
            "expired_at",
            "cancelling_at",
            "cancelled_at",
        ):
            data[name] = self.times.get(name)
        return data


class BatchApi:
    """The files, the batches and the queue of one embedded endpoint."""

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.files: dict[str, _File] = {}
        self.batches: dict[str, _Batch] = {}
        self.stats: Counter[str] = Counter()
        self._auth = f"Bearer {config.api_key}".encode() if config.api_key is not None else None
        self._next_slot = 0.0
        self._session: aiohttp.ClientSession | None = None
        self._in_flight = asyncio.Semaphore(_IN_FLIGHT)

    # ---- the app's life ---------------------------------------------------------

    async def close(self, app: web.Application) -> None:
        for batch in self.batches.values():
            if batch.task is not None:
                batch.task.cancel()
        for batch in self.batches.values():
            if batch.task is not None:
                with contextlib.suppress(BaseException):
                    await batch.task
        if self._session is not None:
            await self._session.close()

    @web.middleware
    async def check_key(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """The key check of the Batch API's routes (the chat routes make their own)."""
        if self._auth is not None and request.path.startswith(("/v1/files", "/v1/batches")):
            sent = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(sent, self._auth):
                return _oops(401, "Invalid or missing API key", "invalid_api_key")
        response: web.StreamResponse = await handler(request)
        return response

    def _file(self, request: web.Request) -> _File:
        file = self.files.get(request.match_info["file_id"])
        if file is None:
            raise _missing("File", request.match_info["file_id"])
        return file

    def _batch(self, request: web.Request) -> _Batch:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            raise _missing("Batch", request.match_info["batch_id"])
        return batch

    # ---- files --------------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.Response:
        """``POST /v1/files``: multipart ``purpose`` and ``file``."""
        purpose = filename = None
        data = b""
        try:
            reader = await request.multipart()
            async for part in reader:
                if not isinstance(part, aiohttp.BodyPartReader):
                    continue
                if part.name == "purpose":
                    purpose = (await part.read()).decode()
                elif part.name == "file":
                    filename = part.filename or "upload.jsonl"
                    data = bytes(await part.read())
        except (ValueError, AssertionError, aiohttp.ClientError) as exc:
            return _oops(400, f"Could not read the multipart body: {exc}")
        if purpose != "batch":
            return _oops(400, f"purpose must be 'batch', got {purpose!r}", "invalid_purpose")
        if filename is None:
            return _oops(400, "Missing the 'file' part", "missing_file")
        file = _File("file-" + uuid.uuid4().hex[:24], filename, purpose, data)
        self.files[file.id] = file
        self.stats["files"] += 1
        return _json(file.info())

    async def file_info(self, request: web.Request) -> web.Response:
        """``GET /v1/files/{id}``."""
        return _json(self._file(request).info())

    async def file_content(self, request: web.Request) -> web.Response:
        """``GET /v1/files/{id}/content``: the file's bytes."""
        data = self._file(request).data
        return web.Response(body=data, headers={"Content-Type": "application/octet-stream"})

    def _store(self, name: str, lines: list[bytes]) -> str | None:
        if not lines:
            return None
        file = _File("file-" + uuid.uuid4().hex[:24], name, "batch_output", b"".join(lines))
        self.files[file.id] = file
        return file.id

    # ---- batches ------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.Response:
        """``POST /v1/batches``."""
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _oops(400, "The body is not JSON")
        if not isinstance(body, dict):
            return _oops(400, "The body must be a JSON object")
        file_id = body.get("input_file_id")
        if file_id not in self.files:
            return _oops(400, f"No such File object: {file_id}", "invalid_input_file")
        if body.get("endpoint") != "/v1/chat/completions":
            return _oops(400, "endpoint must be /v1/chat/completions", "invalid_endpoint")
        if body.get("completion_window") != "24h":
            return _oops(400, "completion_window must be '24h'", "invalid_completion_window")
        metadata = body.get("metadata")
        if metadata is not None and (
            not isinstance(metadata, dict)
            or len(metadata) > 16
            or not all(isinstance(v, str) and len(v) <= 512 for v in metadata.values())
        ):
            return _oops(400, "metadata must be at most 16 string values", "invalid_metadata")
        batch = _Batch(
            "batch_" + uuid.uuid4().hex[:24],
            file_id,
            body["endpoint"],
            metadata,
            str(request.url.origin()),
        )
        batch.times["expires_at"] = batch.created_at + int(self.config.batch_expire_s)
        self.batches[batch.id] = batch
        self.stats["batches"] += 1
        batch.task = asyncio.create_task(self._run(batch))
        return _json(batch.info())

    async def list_batches(self, request: web.Request) -> web.Response:
        """``GET /v1/batches``: newest first, ``limit`` (1-100, 20) after the id ``after``."""
        try:
            limit = min(100, max(1, int(request.query.get("limit", "20"))))
        except ValueError:
            return _oops(400, "limit must be a whole number")
        newest = list(reversed(self.batches.values()))
        after = request.query.get("after")
        if after is not None:
            ids = [b.id for b in newest]
            newest = newest[ids.index(after) + 1 :] if after in ids else []
        page = newest[:limit]
        return _json(
            {
                "object": "list",
                "data": [b.info() for b in page],
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
                "has_more": len(newest) > limit,
            }
        )

    async def get(self, request: web.Request) -> web.Response:
        """``GET /v1/batches/{id}``."""
        return _json(self._batch(request).info())

    async def cancel(self, request: web.Request) -> web.Response:
        """``POST /v1/batches/{id}/cancel``."""
        batch = self._batch(request)
        if batch.status in ("completed", "failed", "expired"):
            return _oops(400, f"Cannot cancel a batch with status '{batch.status}'.")
        if batch.status not in ("cancelling", "cancelled"):
            batch.set_status("cancelling")
            batch.stop.set()
            self.stats["cancels"] += 1
        return _json(batch.info())

    async def get_stats(self, request: web.Request) -> web.Response:
        """``GET /_batch_stats``: batches, files, lines, answered, error lines, cancels."""
        by_status = Counter(b.status for b in self.batches.values())
        return _json({**self.stats, "by_status": dict(by_status)})

    # ---- the queue ----------------------------------------------------------------

    async def _run(self, batch: _Batch) -> None:
        """One batch from validating to the end."""
        config = self.config
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(batch.stop.wait(), config.batch_start_s)
        lines = self._check(batch)
        if batch.status == "failed":
            return
        batch.total = len(lines)
        done = 0
        if not batch.stop.is_set():
            batch.set_status("in_progress")
            expires = time.monotonic() + config.batch_expire_s
            async with asyncio.TaskGroup() as tg:
                for line in lines:
                    if not await self._turn(batch, expires):
                        break
                    await self._in_flight.acquire()
                    tg.create_task(self._answer(batch, line))
                    done += 1
        if batch.stop.is_set() and batch.status != "cancelling":
            batch.set_status("expired")
        code, why = (
            ("batch_cancelled", "The batch was cancelled before this request ran.")
            if batch.status == "cancelling"
            else ("batch_expired", "This request could not be run before the batch expired.")
        )
        for line in lines[done:]:
            batch.failed.append(self._error_line(line, None, {"code": code, "message": why}))
        batch.unrun = len(lines) - done
        if batch.status == "cancelling":
            await asyncio.sleep(config.batch_cancel_s)
        elif batch.status == "in_progress":
            batch.set_status("finalizing")
        batch.output_file_id = self._store(f"{batch.id}_output.jsonl", batch.output)
        batch.error_file_id = self._store(f"{batch.id}_error.jsonl", batch.failed)
        if batch.status == "cancelling":
            batch.set_status("cancelled")
        elif batch.status == "finalizing":
            batch.set_status("completed")
        self.stats["lines_unanswered"] += batch.total - done

    def _check(self, batch: _Batch) -> list[dict[str, Any]]:
        """The batch's lines, or (status failed, ``errors`` set) why not."""
        problems: list[dict[str, Any]] = []
        lines: list[dict[str, Any]] = []
        seen: set[str] = set()
        raw = self.files[batch.input_file_id].data.splitlines()
        if self.stats["failed_validation"] < self.config.batch_fail_validation:
            problems.append(
                {"code": "invalid_file", "message": "Validation failed (a test).", "line": None}
            )
        elif len(raw) > MAX_LINES:
            problems.append(
                {
                    "code": "too_many_requests",
                    "message": f"More than {MAX_LINES} requests.",
                    "line": None,
                }
            )
        for number, text in enumerate(raw, 1):
            if problems:
                break
            try:
                line = orjson.loads(text)
            except orjson.JSONDecodeError:
                line = None
            why = None
            if not isinstance(line, dict) or not isinstance(line.get("body"), dict):
                why = "not a JSON object with an object body"
            elif not isinstance(line.get("custom_id"), str) or line["custom_id"] in seen:
                why = f"custom_id {line.get('custom_id')!r} is missing or used twice"
            elif line.get("method") != "POST" or line.get("url") != batch.endpoint:
                why = f"method must be POST and url {batch.endpoint}"
            if why is not None:
                problems.append({"code": "invalid_request", "message": why, "line": number})
            else:
                assert isinstance(line, dict)
                seen.add(line["custom_id"])
                lines.append(line)
        if problems:
            self.stats["failed_validation"] += 1
            batch.errors = problems
            batch.set_status("failed")
        else:
            self.stats["lines"] += len(lines)
        return lines

    async def _turn(self, batch: _Batch, expires: float) -> bool:
        """Wait for the queue's next slot (shared by every batch); False when the
        batch was cancelled or expired meanwhile (``stop`` set)."""
        now = time.monotonic()
        slot = max(now, self._next_slot)
        self._next_slot = slot + 1.0 / self.config.batch_rows_per_s
        wait = min(slot, expires) - now
        if wait > 0.001 and not batch.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(batch.stop.wait(), wait)
        if time.monotonic() >= expires and not batch.stop.is_set():
            batch.stop.set()
        return not batch.stop.is_set()

    def _error_line(
        self,
        line: dict[str, Any],
        response: dict[str, Any] | None,
        error: dict[str, Any] | None,
    ) -> bytes:
        out = {
            "id": "batch_req_" + uuid.uuid4().hex[:24],
            "custom_id": line["custom_id"],
            "response": response,
            "error": error,
        }
        return orjson.dumps(out) + b"\n"

    def _fails(self, custom_id: str) -> bool:
        rate = self.config.batch_fail_rate
        if rate <= 0.0:
            return False
        digest = hashlib.sha256(f"{self.config.seed}:batch-fail:{custom_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < rate

    async def _answer(self, batch: _Batch, line: dict[str, Any]) -> None:
        """Answer one line with the endpoint's own chat handler; put the result in
        the batch's output (HTTP 200) or error lines."""
        try:
            request_id = "req_" + uuid.uuid4().hex[:24]
            if self._fails(line["custom_id"]):
                error = {
                    "message": "The server had an error processing this request.",
                    "type": "server_error",
                }
                response = {"status_code": 500, "request_id": request_id, "body": {"error": error}}
                batch.failed.append(self._error_line(line, response, None))
                self.stats["error_lines"] += 1
                return
            headers = dict(_JSON)
            if self.config.api_key is not None:
                headers["Authorization"] = f"Bearer {self.config.api_key}"
            if self._session is None:
                self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
            try:
                async with self._session.post(
                    batch.origin + batch.endpoint, data=orjson.dumps(line["body"]), headers=headers
                ) as resp:
                    status, raw = resp.status, await resp.read()
                body = orjson.loads(raw)
            except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
                error = {"code": "server_error", "message": f"{type(exc).__name__}: {exc}"}
                batch.failed.append(self._error_line(line, None, error))
                self.stats["error_lines"] += 1
                return
            response = {"status_code": status, "request_id": request_id, "body": body}
            if status == 200:
                out = {"id": "batch_req_" + uuid.uuid4().hex[:24], "custom_id": line["custom_id"]}
                batch.output.append(
                    orjson.dumps({**out, "response": response, "error": None}) + b"\n"
                )
                self.stats["answered"] += 1
            else:
                batch.failed.append(self._error_line(line, response, None))
                self.stats["error_lines"] += 1
        finally:
            self._in_flight.release()


def add_batch_api(app: web.Application, config: MockConfig) -> BatchApi:
    """Serve the Batch API routes on ``app`` (stopped with the app)."""
    api = BatchApi(config)
    app.router.add_post("/v1/files", api.upload)
    app.router.add_get("/v1/files/{file_id}", api.file_info)
    app.router.add_get("/v1/files/{file_id}/content", api.file_content)
    app.router.add_post("/v1/batches", api.create)
    app.router.add_get("/v1/batches", api.list_batches)
    app.router.add_get("/v1/batches/{batch_id}", api.get)
    app.router.add_post("/v1/batches/{batch_id}/cancel", api.cancel)
    app.router.add_get("/_batch_stats", api.get_stats)
    app.middlewares.append(api.check_key)
    app.on_cleanup.append(api.close)
    return api
