"""A provider's Batch API over HTTP, in OpenAI's shape: upload a file of
requests (``POST /files``), create a batch from it (``POST /batches``), look at
it (``GET /batches/{id}``), cancel it, find it again by its metadata
(``GET /batches``, newest first) and download its output and error files
(``GET /files/{id}/content``).

``BatchClient`` is an ``ApiClient``: one aiohttp session with the key and the
job's headers, the same redaction of every text a server sends back, the same
error classes. Each call goes through the job's retry policy (a 429 or a 503
from the status endpoint is waited out); a call that still fails stops the job
(``ApiDown`` when it kept failing, ``JobStopped`` when the API refused it),
naming the call: the batches submitted so far are recorded, so the same command
re-attaches to them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from batchrun.client import ApiClient
from batchrun.config import Job
from batchrun.errors import (
    ApiDown,
    BadResponse,
    CannotConnect,
    ConnectionDropped,
    JobStopped,
    RequestError,
    RequestTimeout,
)
from batchrun.files import atomic_write
from batchrun.retry import RetryPolicy, send_with_retries

BATCH_ENDPOINT = "/v1/chat/completions"
"""The ``url`` of every request line and the ``endpoint`` of every batch."""
LIST_PAGE = 100


class BatchClient(ApiClient):
    """The Batch API of ``job.base_url``; use as ``async with BatchClient(...)``."""

    def __init__(
        self,
        job: Job,
        api_key: str | None,
        headers: Mapping[str, str] | None,
        secrets: Sequence[str],
        policy: RetryPolicy,
    ) -> None:
        super().__init__(job, api_key, headers, secrets)
        self.policy = policy
        self.base = job.base_url.rstrip("/")

    async def __aenter__(self) -> BatchClient:
        await super().__aenter__()
        return self

    # ---- the calls ----------------------------------------------------------------

    async def upload(self, path: Path) -> str:
        """Upload the request file ``path`` (``purpose=batch``); its file id."""
        info = await self._call("POST", "/files", f"upload {path.name}", upload=path)
        return str(self._field(info, "id", "POST /files"))

    async def create(self, file_id: str, metadata: Mapping[str, str]) -> dict[str, Any]:
        """A batch of the requests in ``file_id``, to be answered within 24 h."""
        body = {
            "input_file_id": file_id,
            "endpoint": BATCH_ENDPOINT,
            "completion_window": "24h",
            "metadata": dict(metadata),
        }
        info = await self._call("POST", "/batches", f"create a batch of {file_id}", body=body)
        self._field(info, "id", "POST /batches")
        return info

    async def get(self, batch_id: str) -> dict[str, Any] | None:
        """The batch as the API sees it now; None when the API does not know it (404)."""
        return await self._call("GET", f"/batches/{batch_id}", f"look at {batch_id}", missing=True)

    async def cancel(self, batch_id: str) -> dict[str, Any] | None:
        """Ask the API to cancel the batch (it turns ``cancelling``, then ``cancelled``).
        A batch that ended meanwhile is returned as it is; None when unknown (404)."""
        info = await self._call(
            "POST", f"/batches/{batch_id}/cancel", f"cancel {batch_id}", missing=True, ended=True
        )
        if info is not None and "status" not in info:
            return await self.get(batch_id)  # refused: it ended meanwhile
        return info

    async def find(self, metadata: Mapping[str, str], since: float) -> dict[str, Any] | None:
        """The newest batch whose metadata holds ``metadata``, among those created
        after ``since`` (epoch seconds): the list is newest first, so the search
        stops at the first older one."""
        after: str | None = None
        while True:
            query = f"?limit={LIST_PAGE}" + (f"&after={after}" if after else "")
            page = await self._call("GET", "/batches" + query, "list the batches")
            data = page.get("data") if isinstance(page, dict) else None
            if not isinstance(data, list):
                raise JobStopped(f"GET {self.base}/batches answered without a `data` list.")
            for batch in data:
                if not isinstance(batch, dict):
                    continue
                found = batch.get("metadata") or {}
                if all(found.get(k) == v for k, v in metadata.items()):
                    return batch
                created = batch.get("created_at")
                if isinstance(created, (int, float)) and created < since:
                    return None
            if not page.get("has_more") or not data:
                return None
            after = data[-1].get("id") if isinstance(data[-1], dict) else None
            if not after:
                return None

    async def download(self, file_id: str, target: Path) -> Path:
        """Write the content of ``file_id`` to ``target`` (atomically)."""

        async def once() -> Path:
            response = await self._send("GET", f"/files/{file_id}/content", None, None, True)
            async with response as resp:
                if resp.status != 200:
                    raise self._status_error(
                        resp.status, await self._read_body(resp), resp.headers.get("Retry-After")
                    )
                with atomic_write(target) as tmp, tmp.open("wb") as out:
                    async for chunk in resp.content.iter_chunked(1 << 20):
                        out.write(chunk)
            return target

        return await self._retried(once, f"download {file_id}")

    # ---- one call -------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        what: str,
        *,
        body: Any = None,
        upload: Path | None = None,
        missing: bool = False,
        ended: bool = False,
    ) -> Any:
        """``method path`` with the retry policy: the JSON answer. With
        ``missing``, a 404 is None; with ``ended``, a 400 or 409 is ``{}`` (a
        batch that ended cannot be cancelled)."""

        async def once() -> Any:
            response = await self._send(method, path, body, upload, upload is not None)
            async with response as resp:
                raw = await self._read_body(resp)
                status = resp.status
                if missing and status == 404:
                    return None
                if ended and status in (400, 409):
                    return {}
                if not 200 <= status < 300:
                    raise self._status_error(status, raw, resp.headers.get("Retry-After"))
            try:
                return orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise BadResponse(f"HTTP {status}: the answer is not JSON", status) from exc

        return await self._retried(once, what)

    async def _send(
        self, method: str, path: str, body: Any, upload: Path | None, long: bool
    ) -> Any:
        """The request, not yet awaited; a ``long`` one (a file) has no total
        timeout, only ``request_timeout_s`` between two reads."""
        assert self._session is not None, "use BatchClient in `async with`"
        timeout = (
            aiohttp.ClientTimeout(total=None, sock_read=self.job.request_timeout_s)
            if long
            else self._session.timeout
        )
        headers: dict[str, str] = {}
        data: Any = None
        if body is not None:
            data = orjson.dumps(body)
        if upload is not None:
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            # aiohttp streams an open file; it is closed when the payload is sent.
            form.add_field(
                "file", upload.open("rb"), filename=upload.name, content_type="application/jsonl"
            )
            data = form()
            headers["Content-Type"] = data.content_type
        return self._session.request(
            method,
            self.base + path,
            data=data,
            headers=headers,
            allow_redirects=False,
            timeout=timeout,
        )

    async def _retried(self, once: Any, what: str) -> Any:
        """``once()`` through the retry policy, aiohttp's errors made ours; a
        failure that stays stops the job."""

        async def attempt() -> Any:
            try:
                return await once()
            except TimeoutError as exc:
                raise RequestTimeout(
                    f"no answer within request_timeout_s={self.job.request_timeout_s:g}s"
                ) from exc
            except aiohttp.ClientConnectorError as exc:
                raise CannotConnect(self._redact(f"cannot connect: {exc}")) from exc
            except aiohttp.ClientError as exc:
                raise ConnectionDropped(self._redact(f"{type(exc).__name__}: {exc}")) from exc

        try:
            result, _ = await send_with_retries(attempt, self.policy)
        except RequestError as exc:
            where = f"{self.base} (trying to {what})"
            if exc.retryable:
                raise ApiDown(
                    f"The Batch API at {where} kept failing: {exc}. Every batch submitted so far "
                    "is recorded: run the same command again to re-attach to it."
                ) from None
            raise JobStopped(
                f"The Batch API at {where} refused: {exc}. Check that base_url serves OpenAI's "
                '/files and /batches (else use mode = "online"), and the key; every batch '
                "submitted so far is recorded, and the same command re-attaches to it."
            ) from None
        return result

    def _field(self, info: Any, name: str, call: str) -> Any:
        value = info.get(name) if isinstance(info, dict) else None
        if not isinstance(value, str) or not value:
            raise JobStopped(f"{call} at {self.base} answered without `{name}`: {str(info)[:200]}")
        return value


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
