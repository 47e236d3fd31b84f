"""An optional judge for free-generation ("in the wild") answers.

An edited model is asked a question and answers freely (greedy). Where the answer begins
with the new target, exact match settles it and no judge is needed. But a free answer can
state the target in other words ("It is Rome, in Italy." for the target "Rome") or bury it in
a sentence; deciding whether it *means* the target takes a reader. The reader here is any
OpenAI-compatible chat endpoint (e.g. a local vLLM server at http://127.0.0.1:8000/v1),
asked for one word, CORRECT or INCORRECT.

A judge can fail: unreachable, slow, or replying something else than one of the two words.
Such an item is graded "failed", never "correct", and is counted apart, so a report can say
how much of its score rests on the judge. Grading one item never raises.

Only the standard library talks to the endpoint: no client package is needed.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import string
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

LABELS = ("correct", "incorrect", "failed")
MAX_REPLY_BYTES = 1 << 20  # a chat reply of five tokens is far smaller; more is a broken server
MAX_BACKOFF = 1.0  # seconds: a judge that is down should cost little waiting

SYSTEM_PROMPT = """\
You check answers in an evaluation of edited language models. The facts may have been \
changed on purpose, so judge the model's answer only against the reference answer, never \
against what you believe to be true.

You get a question, the reference answer and the model's answer. Reply with exactly one word:
CORRECT if the model's answer states the reference answer: the same entity or value, in any \
wording, possibly with further detail that agrees with it.
INCORRECT if the model's answer contradicts the reference answer, names another entity or \
value, hedges between several answers, or gives no answer."""

USER_TEMPLATE = """\
Question: {question}
Reference answer: {target}
Model answer: {answer}

One word, CORRECT or INCORRECT:"""


@dataclass
class JudgeConfig:
    """An OpenAI-compatible chat endpoint that grades free answers against the new target."""

    url: str
    """The endpoint's base URL, e.g. http://127.0.0.1:8000/v1; requests go to <url>/chat/completions."""
    model: str
    """The model name the endpoint serves."""
    timeout: float = 30.0
    """Seconds per request (a slower reply grades the item "failed")."""
    api_key_env: str | None = None
    """Name of an environment variable holding a bearer token (null: no Authorization header)."""
    max_retries: int = 2
    """Retries after a connection error or an HTTP 5xx reply (waits of at most 1 s between)."""
    workers: int = 4
    """Requests in flight at once."""

    def __post_init__(self) -> None:
        if not self.url or not self.url.startswith(("http://", "https://")):
            raise ValueError(f"judge.url must be a non-empty URL starting with http:// or https://, got {self.url!r}")
        if not self.model:
            raise ValueError(f"judge.model must be a non-empty model name, got {self.model!r}")
        if not self.timeout > 0:
            raise ValueError(f"judge.timeout must be > 0, got {self.timeout}")
        if self.max_retries < 0:
            raise ValueError(f"judge.max_retries must be >= 0, got {self.max_retries}")
        if self.workers < 1:
            raise ValueError(f"judge.workers must be >= 1, got {self.workers}")


@dataclass(frozen=True)
class Verdict:
    """The judge's grade of one answer: "correct", "incorrect" or "failed" (no usable grade)."""

    label: str
    detail: str = ""
    """Why it failed (or the judge's raw reply), on one line; empty for a clean grade."""

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise ValueError(f"Verdict.label must be one of {LABELS}, got {self.label!r}")

    @property
    def correct(self) -> bool:
        return self.label == "correct"

    @property
    def failed(self) -> bool:
        return self.label == "failed"


def _failed(reason: str) -> Verdict:
    # one line, bounded: details end up in logs and tables
    return Verdict("failed", " ".join(reason.split())[:300])


def parse_verdict(reply: str) -> Verdict:
    """The verdict in the judge's reply: its first word, CORRECT or INCORRECT; else failed."""
    words = reply.strip().upper().strip(string.punctuation + string.whitespace).split()
    word = words[0].strip(string.punctuation) if words else ""
    if word == "CORRECT":
        return Verdict("correct")
    if word == "INCORRECT":
        return Verdict("incorrect")
    # a hedge or prose is no grade: counting it either way would bias the score
    return _failed(f"unexpected reply: {reply!r}")


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Judge:
    """Grades (question, target, answer) triples through an OpenAI-compatible chat endpoint."""

    def __init__(self, config: JudgeConfig):
        self.config = config
        self.endpoint = config.url.rstrip("/") + "/chat/completions"
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if config.api_key_env is not None:
            token = os.environ.get(config.api_key_env)
            if not token:
                # fail at setup, not with one 401 per item at the end of a long run
                raise ValueError(f"judge.api_key_env names {config.api_key_env}, which is not set")
            self._headers["Authorization"] = f"Bearer {token}"
        # a local server is reached directly, even where http_proxy is set for the outside world
        proxies = {} if _is_loopback(config.url) else None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))

    def messages(self, question: str, target: str, answer: str) -> list[dict[str, str]]:
        """The chat messages that ask the judge about one answer."""
        user = USER_TEMPLATE.format(question=question.strip(), target=target.strip(), answer=answer.strip())
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]

    def grade(self, question: str, target: str, answer: str) -> Verdict:
        """The verdict on one answer; any failure is a "failed" verdict, never an exception."""
        try:
            return self._grade(question, target, answer)
        except Exception as error:  # one bad item must not end a long evaluation
            return _failed(f"{type(error).__name__}: {error}")

    def grade_many(self, items: Sequence[tuple[str, str, str]]) -> list[Verdict]:
        """The verdicts on (question, target, answer) triples, in their order, `workers` at a time."""
        if not items:
            return []
        with ThreadPoolExecutor(max_workers=min(self.config.workers, len(items))) as pool:
            return list(pool.map(lambda item: self.grade(*item), items))

    def _grade(self, question: str, target: str, answer: str) -> Verdict:
        payload = {
            "model": self.config.model,
            "messages": self.messages(question, target, answer),
            "temperature": 0,
            "max_tokens": 5,
        }
        body = json.dumps(payload).encode()
        attempts = self.config.max_retries + 1
        reason = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(MAX_BACKOFF, 0.1 * 2 ** (attempt - 1)))
            try:
                raw = self._post(body)
            except urllib.error.HTTPError as error:
                reason = f"HTTP {error.code} from {self.endpoint}: {_error_body(error)}"
                if error.code < 500:
                    return _failed(reason)  # the request itself is wrong: asking again won't help
                continue
            except TimeoutError:
                # not retried: a server slower than the timeout once is slow the next time too
                return _failed(f"no reply from {self.endpoint} within {self.config.timeout:g} s")
            except urllib.error.URLError as error:
                if isinstance(error.reason, TimeoutError):
                    return _failed(f"no reply from {self.endpoint} within {self.config.timeout:g} s")
                reason = f"cannot reach {self.endpoint}: {error.reason}"
                continue
            except (http.client.HTTPException, OSError) as error:  # dropped or reset connections
                reason = f"connection to {self.endpoint} failed: {type(error).__name__}: {error}"
                continue
            return _verdict_from_body(raw)
        return _failed(f"{reason} ({attempts} attempts)")

    def _post(self, body: bytes) -> bytes:
        request = urllib.request.Request(self.endpoint, data=body, headers=self._headers, method="POST")
        # urllib's timeout bounds each socket operation; the deadline bounds the whole reply
        deadline = time.monotonic() + self.config.timeout
        with self._opener.open(request, timeout=self.config.timeout) as response:
            chunks, size = [], 0
            while chunk := response.read(64 * 1024):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_REPLY_BYTES:
                    raise ValueError(f"reply from {self.endpoint} is larger than {MAX_REPLY_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise TimeoutError
        return b"".join(chunks)


def _error_body(error: urllib.error.HTTPError) -> str:
    try:
        return error.read(300).decode(errors="replace") or str(error.reason)
    except Exception:
        return str(error.reason)
    finally:
        error.close()


def _verdict_from_body(raw: bytes) -> Verdict:
    try:
        data = json.loads(raw)
    except ValueError:
        return _failed(f"reply is not JSON: {raw[:200]!r}")
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return _failed(f"reply has no choices[0].message.content: {raw[:200]!r}")
    if not isinstance(content, str):
        return _failed(f"reply content is not text: {content!r}")
    return parse_verdict(content)


def summarize(verdicts: Iterable[Verdict]) -> dict[str, int]:
    """How many verdicts are correct, incorrect and failed (failures are reported apart)."""
    counts = dict.fromkeys(LABELS, 0)
    for verdict in verdicts:
        counts[verdict.label] += 1
    return counts
