"""The fake teacher's Batch API: files and batches as OpenAI serves them, lines run by the fake's own chat completions.

Routes (under /v1): POST /files (multipart, purpose=batch), GET /files/{id}, GET /files/{id}/content,
POST /batches, GET /batches, GET /batches/{id}, POST /batches/{id}/cancel. A batch goes validating →
in_progress → finalizing → completed (or failed at validation, expired, cancelling → cancelled), with
request_counts as lines run. Output lines are {"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error": null}; a line whose completion was not a 200 goes to the error file
in the same shape, and a line never run to the error file with response null and error
{"code": "batch_expired" | "batch_cancelled", "message"}. Every line runs through the fake's chat
path, so its knobs (p_500, reply, latency...) apply per line and its token stats count what the
output files bill. Knobs (in openai_server.KNOBS): batch_delay, batch_run_seconds, batch_expire_after,
batch_fail (lines start spread over batch_run_seconds, so a cancel or an expiry can leave some unrun). Stats: files_uploaded, batches_created, batch_lines (every custom_id of every batch created,
in order: a line submitted twice shows twice), batch_cancels.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import sys
import time
from typing import Any

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
LIVE = ("validating", "in_progress", "finalizing")
NOT_RUN = {
    "expired": ("batch_expired", "This request could not be executed before the completion window expired."),
    "cancelled": ("batch_cancelled", "This request could not be executed before the batch was cancelled."),
}


def _hex() -> str:
    return secrets.token_hex(12)


def parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """Form fields of a multipart/form-data body: name -> (filename, bytes)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise ValueError("no multipart boundary")
    boundary = b"--" + match.group(1).encode()
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in body.split(boundary)[1:]:
        if part.startswith(b"--"):
            break
        head, _, data = part.lstrip(b"\r\n").partition(b"\r\n\r\n")
        disposition = next((line for line in head.decode("utf-8", "replace").split("\r\n")
                            if line.lower().startswith("content-disposition")), "")
        name = re.search(r'\bname="([^"]*)"', disposition)
        filename = re.search(r'filename="([^"]*)"', disposition)
        if name:
            fields[name.group(1)] = (filename.group(1) if filename else None, data[:-2] if data.endswith(b"\r\n") else data)
    return fields


class FakeBatchAPI:
    """Files and batches of one FakeTeacher; runs in the teacher's event loop."""

    def __init__(self, teacher) -> None:
        self.teacher = teacher
        self.files: dict[str, dict[str, Any]] = {}
        self.contents: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self._tasks: set[asyncio.Task] = set()

    @staticmethod
    def handles(path: str) -> bool:
        return bool(re.search(r"/(files|batches)(/|$)", path))

    def _stat(self, key: str, value: Any = 1) -> None:
        with self.teacher._lock:
            s = self.teacher._stats
            if isinstance(value, list):
                s[key].extend(value)
            else:
                s[key] += value
            self.teacher._version += 1

    async def handle(self, method: str, path: str, headers: dict, body: bytes):
        server = sys.modules[type(self.teacher).__module__]  # fakes.openai_server, or __main__ as a process
        _error_body, _Response = server._error_body, server._Response

        def error(status: int, message: str, code: str | None = None, param: str | None = None):
            return _Response(status, _error_body(message, "invalid_request_error", param, code))

        def ok(obj: dict) -> Any:
            return _Response(200, json.dumps(obj).encode())

        tail = path.split("/v1", 1)[-1] if "/v1" in path else path
        parts = [p for p in tail.split("/") if p]
        if parts == ["files"] and method == "POST":
            try:
                fields = parse_multipart(body, headers.get("content-type", ""))
            except ValueError as exc:
                return error(400, f"could not parse the upload: {exc}")
            purpose = fields.get("purpose", (None, b""))[1].decode()
            if "file" not in fields:
                return error(400, "'file' is a required property", param="file")
            if purpose != "batch":
                return error(400, f"this fake accepts purpose batch only, got {purpose!r}", param="purpose")
            name, data = fields["file"]
            fid = f"file-{_hex()}"
            self.files[fid] = {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                               "filename": name or "upload.jsonl", "purpose": purpose, "status": "processed",
                               "expires_at": None, "status_details": None}
            self.contents[fid] = data
            self._stat("files_uploaded")
            return ok(self.files[fid])
        if len(parts) in (2, 3) and parts[0] == "files" and method == "GET":
            fid = parts[1]
            if fid not in self.files:
                return error(404, f"No such File object: {fid}", param="id")
            if len(parts) == 3 and parts[2] == "content":
                return _Response(200, self.contents[fid], content_type="application/octet-stream")
            return ok(self.files[fid])
        if parts == ["batches"] and method == "POST":
            try:
                req = json.loads(body or b"{}")
            except ValueError:
                return error(400, "We could not parse the JSON body of your request.")
            fid = req.get("input_file_id")
            if fid not in self.files:
                return error(404, f"No such File object: {fid}", param="input_file_id")
            if req.get("endpoint") not in ENDPOINTS:
                return error(400, f"Invalid endpoint: {req.get('endpoint')!r}", param="endpoint")
            if req.get("completion_window") != "24h":
                return error(400, "completion_window must be 24h", param="completion_window")
            now = int(time.time())
            bid = f"batch_{_hex()}"
            batch = {"id": bid, "object": "batch", "endpoint": req["endpoint"], "errors": None, "input_file_id": fid,
                     "completion_window": "24h", "status": "validating", "output_file_id": None, "error_file_id": None,
                     "created_at": now, "in_progress_at": None, "expires_at": now + 86400, "finalizing_at": None,
                     "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                     "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": req.get("metadata")}
            self.batches[bid] = batch
            ids = []
            for raw in self.contents[fid].splitlines():
                try:
                    ids.append(json.loads(raw).get("custom_id"))
                except ValueError:
                    ids.append(None)
            self._stat("batches_created")
            self._stat("batch_lines", ids)
            task = asyncio.ensure_future(self._process(bid))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return ok(batch)
        if parts == ["batches"] and method == "GET":
            data = sorted(self.batches.values(), key=lambda b: b["created_at"], reverse=True)
            return ok({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                       "last_id": data[-1]["id"] if data else None, "has_more": False})
        if len(parts) >= 2 and parts[0] == "batches":
            bid = parts[1]
            batch = self.batches.get(bid)
            if batch is None:
                return error(404, f"No batch found with id '{bid}'.", param="batch_id")
            if len(parts) == 2 and method == "GET":
                return ok(batch)
            if len(parts) == 3 and parts[2] == "cancel" and method == "POST":
                if batch["status"] not in LIVE:
                    return error(409, f"Cannot cancel a batch with status '{batch['status']}'.")
                batch["status"], batch["cancelling_at"] = "cancelling", int(time.time())
                self._stat("batch_cancels")
                return ok(batch)
        return error(404, f"Invalid URL ({method} {path})")

    # ---- running a batch ----------------------------------------------------------------

    async def _process(self, bid: str) -> None:
        """validating → in_progress → finalizing → completed, or failed / expired / cancelled."""
        k = self.teacher.knobs
        batch = self.batches[bid]
        delay = float(k["batch_delay"])
        await asyncio.sleep(delay)
        lines, problems = self._validate(batch)
        if batch["status"] == "cancelling":
            return await self._end(batch, "cancelled", lines, {})
        if problems or k["batch_fail"] == "validation":
            problems = problems or [{"code": "invalid_request", "message": "The fake was told to fail this batch.", "param": None, "line": 1}]
            batch.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": problems})
            return
        batch.update(status="in_progress", in_progress_at=int(time.time()))
        batch["request_counts"] = {"total": len(lines), "completed": 0, "failed": 0}
        started = time.monotonic()
        expire_after = k["batch_expire_after"]
        results: dict[str, tuple[Any, int]] = {}
        slots = asyncio.Semaphore(64)
        begun = 0
        reader = asyncio.StreamReader()  # never at EOF: the chat path's long sleeps run to the end

        spread = float(k["batch_run_seconds"]) / max(len(lines), 1)

        async def run(no: int, line: dict) -> None:
            nonlocal begun
            start_at = started + no * spread  # lines start spread over batch_run_seconds, as a batch progresses
            while time.monotonic() < start_at and batch["status"] != "cancelling":
                await asyncio.sleep(min(0.05, start_at - time.monotonic()))
            async with slots:
                if batch["status"] == "cancelling" or (expire_after is not None and begun >= int(expire_after)):
                    return
                begun += 1
                with self.teacher._lock:
                    self.teacher._stats["requests_received"] += 1
                    n_req = self.teacher._stats["requests_received"]
                response = await self.teacher._chat(line["body"], n_req, reader)
                results[line["custom_id"]] = (response, n_req)
                counts = batch["request_counts"]
                counts["completed" if response is not None and response.status == 200 else "failed"] += 1

        await asyncio.gather(*(run(no, line) for no, line in enumerate(lines)))
        left = float(k["batch_run_seconds"]) - (time.monotonic() - started)
        while left > 0 and batch["status"] != "cancelling":
            await asyncio.sleep(min(left, 0.05))
            left = float(k["batch_run_seconds"]) - (time.monotonic() - started)
        if batch["status"] == "cancelling":
            await asyncio.sleep(delay)
            return await self._end(batch, "cancelled", lines, results)
        if expire_after is not None and len(results) < len(lines):
            return await self._end(batch, "expired", lines, results)
        batch.update(status="finalizing", finalizing_at=int(time.time()))
        await asyncio.sleep(delay)
        await self._end(batch, "completed", lines, results)

    def _validate(self, batch: dict) -> tuple[list[dict], list[dict]]:
        lines, problems, seen = [], [], set()
        for no, raw in enumerate(self.contents[batch["input_file_id"]].splitlines(), 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                problems.append({"code": "invalid_json_line", "message": f"Line {no} is not valid JSON.", "param": None, "line": no})
                continue
            cid = line.get("custom_id")
            if cid in seen:
                problems.append({"code": "duplicate_custom_id", "message": f"The custom_id for line {no} is not unique.",
                                 "param": "custom_id", "line": no})
            elif line.get("method") != "POST" or line.get("url") != batch["endpoint"]:
                problems.append({"code": "mismatched_endpoint", "message": f"Line {no} does not POST to {batch['endpoint']}.",
                                 "param": "url", "line": no})
            seen.add(cid)
            lines.append(line)
        if len(lines) > 50_000:
            problems.append({"code": "too_many_requests", "message": "A batch can hold at most 50,000 requests.", "param": None, "line": None})
        return lines, problems

    async def _end(self, batch: dict, status: str, lines: list[dict], results: dict) -> None:
        """Write the output and error files, bill what ran, and set the final status."""
        out, err = [], []
        sent = []
        for line in lines:
            cid = line["custom_id"]
            if cid in results and results[cid][0] is not None:
                response, n_req = results[cid]
                try:
                    body = json.loads(response.body)
                except ValueError:  # a body no batch would hold (an HTML 502): the line failed with a 500
                    response.status, body = 500, {"error": {"message": "The server had an error.", "type": "server_error"}}
                entry = {"id": f"batch_req_{_hex()}", "custom_id": cid,
                         "response": {"status_code": response.status, "request_id": f"req_fake{n_req}", "body": body}, "error": None}
                (out if response.status == 200 and "choices" in body else err).append(entry)
                sent.append(response)
            elif status in NOT_RUN:
                code, message = NOT_RUN[status]
                err.append({"id": f"batch_req_{_hex()}", "custom_id": cid, "response": None, "error": {"code": code, "message": message}})
        with self.teacher._lock:
            for response in sent:
                if response.on_sent is not None:
                    response.on_sent()
            self.teacher._version += 1
        now = int(time.time())
        for key, entries in (("output_file_id", out), ("error_file_id", err)):
            if entries:
                fid = f"file-{_hex()}"
                data = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries).encode()
                self.files[fid] = {"id": fid, "object": "file", "bytes": len(data), "created_at": now, "filename": f"{batch['id']}_{key}.jsonl",
                                   "purpose": "batch_output", "status": "processed", "expires_at": None, "status_details": None}
                self.contents[fid] = data
                batch[key] = fid
        batch["status"] = status
        batch[f"{status}_at"] = now
