"""The answer judge against a stub OpenAI-compatible server on 127.0.0.1 (no other network)."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import pytest

from lightning_alphaedit.judge import Judge, JudgeConfig, Verdict, parse_verdict, summarize

MODEL = "stub-judge"


def _reply(content) -> tuple[int, bytes]:
    return 200, json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()


def grade_by_containment(request: dict) -> tuple[int, bytes]:
    """CORRECT when the model answer contains the reference answer (case-insensitive)."""
    user = request["messages"][-1]["content"]
    match = re.search(r"Reference answer: (.*)\nModel answer: (.*?)\n\n", user, re.DOTALL)
    assert match, user
    target, answer = match.groups()
    return _reply("CORRECT" if target.lower() in answer.lower() else "INCORRECT")


@dataclass
class Stub:
    url: str
    respond: Callable[[dict], tuple[int, bytes]] = grade_by_containment
    delay: Callable[[dict], float] = lambda request: 0.0
    requests: list[dict] = field(default_factory=list)  # path, headers, json of each request
    in_flight: int = 0
    most_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def attempts(self) -> int:
        return len(self.requests)


@pytest.fixture
def stub():
    state: Stub

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output clean
            pass

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            request = json.loads(raw)
            with state.lock:
                state.requests.append({"path": self.path, "headers": dict(self.headers), "json": request})
                state.in_flight += 1
                state.most_in_flight = max(state.most_in_flight, state.in_flight)
            try:
                time.sleep(state.delay(request))
                status, body = state.respond(request)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout test)
            finally:
                with state.lock:
                    state.in_flight -= 1

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state = Stub(url=f"http://127.0.0.1:{server.server_address[1]}/v1")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join(timeout=2)


def make_judge(stub: Stub, **overrides) -> Judge:
    return Judge(JudgeConfig(url=stub.url, model=MODEL, **{"timeout": 2.0, **overrides}))


def test_correct_answer_and_the_request_sent(stub, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_TOKEN", "s3cret")
    judge = make_judge(stub, api_key_env="JUDGE_TEST_TOKEN")
    verdict = judge.grade("What is the capital of Norway?", "Bergen", "It is bergen, on the west coast.")
    assert verdict == Verdict("correct") and verdict.correct
    (request,) = stub.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer s3cret"
    body = request["json"]
    assert body["model"] == MODEL and body["temperature"] == 0 and body["max_tokens"] == 5
    system, user = body["messages"]
    assert system["role"] == "system" and "CORRECT" in system["content"] and "INCORRECT" in system["content"]
    assert user["role"] == "user"
    for text in ("What is the capital of Norway?", "Bergen", "It is bergen, on the west coast."):
        assert text in user["content"]


def test_incorrect_answer_without_api_key(stub):
    verdict = make_judge(stub).grade("What is the capital of Norway?", "Bergen", "Oslo.")
    assert verdict == Verdict("incorrect") and not verdict.correct
    (request,) = stub.requests
    assert "Authorization" not in request["headers"]


def test_unset_api_key_env_is_a_setup_error(stub, monkeypatch):
    monkeypatch.delenv("JUDGE_TEST_TOKEN", raising=False)
    with pytest.raises(ValueError, match="judge.api_key_env"):
        make_judge(stub, api_key_env="JUDGE_TEST_TOKEN")


def test_unexpected_reply_fails(stub):
    stub.respond = lambda request: _reply("Maybe.")
    verdict = make_judge(stub).grade("q", "Bergen", "Bergen")
    assert verdict.label == "failed" and not verdict.correct
    assert "Maybe." in verdict.detail


@pytest.mark.parametrize(
    "reply, label",
    [
        ("CORRECT", "correct"),
        ("  correct.\n", "correct"),
        ("**Correct**", "correct"),
        ("Incorrect", "incorrect"),
        ("INCORRECT: it names Oslo", "incorrect"),
        ("", "failed"),
        ("MAYBE", "failed"),
        ("Not correct", "failed"),
        ("The answer is correct", "failed"),
    ],
)
def test_parse_verdict(reply, label):
    verdict = parse_verdict(reply)
    assert verdict.label == label
    if label == "failed":
        assert repr(reply) in verdict.detail and "\n" not in verdict.detail


def test_server_error_is_retried_then_fails(stub):
    stub.respond = lambda request: (500, b'{"error": "overloaded"}')
    started = time.monotonic()
    verdict = make_judge(stub, max_retries=2).grade("q", "Bergen", "Bergen")
    assert verdict.label == "failed" and "500" in verdict.detail and "3 attempts" in verdict.detail
    assert stub.attempts == 3
    assert time.monotonic() - started < 2.0


def test_server_error_then_recovery(stub):
    stub.respond = lambda request: (500, b"") if stub.attempts == 1 else grade_by_containment(request)
    assert make_judge(stub, max_retries=2).grade("q", "Bergen", "Bergen").correct
    assert stub.attempts == 2


def test_client_error_is_not_retried(stub):
    stub.respond = lambda request: (404, b'{"error": "model not found"}')
    verdict = make_judge(stub, max_retries=2).grade("q", "Bergen", "Bergen")
    assert verdict.label == "failed" and "404" in verdict.detail and "model not found" in verdict.detail
    assert stub.attempts == 1


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"choices": []}',
        b'{"choices": [{"message": {"role": "assistant"}}]}',
        b'{"choices": [{"message": {"content": null}}]}',
        b"[1, 2]",
    ],
)
def test_malformed_reply_fails(stub, body):
    stub.respond = lambda request: (200, body)
    verdict = make_judge(stub).grade("q", "Bergen", "Bergen")
    assert verdict.label == "failed" and verdict.detail
    assert stub.attempts == 1


def test_slow_server_times_out(stub):
    stub.delay = lambda request: 1.5
    started = time.monotonic()
    verdict = make_judge(stub, timeout=0.5, max_retries=2).grade("q", "Bergen", "Bergen")
    elapsed = time.monotonic() - started
    assert verdict.label == "failed" and "0.5 s" in verdict.detail
    assert stub.attempts == 1 and elapsed < 1.4


def test_unreachable_endpoint_fails():
    with socket.socket() as probe:  # a loopback port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    judge = Judge(JudgeConfig(url=f"http://127.0.0.1:{port}/v1", model=MODEL, timeout=0.5, max_retries=1))
    verdict = judge.grade("q", "Bergen", "Bergen")
    assert verdict.label == "failed" and "2 attempts" in verdict.detail


def test_grade_many_keeps_order(stub):
    # earlier items answer later, so completion order is the reverse of item order
    stub.delay = lambda request: 0.05 * (6 - int(re.search(r"Question: q(\d)", request["messages"][-1]["content"])[1]))
    items = [(f"q{i}", "Bergen", "Bergen" if i % 2 == 0 else "Oslo") for i in range(6)]
    verdicts = make_judge(stub, workers=3).grade_many(items)
    assert [v.label for v in verdicts] == ["correct", "incorrect"] * 3
    assert stub.attempts == 6 and 2 <= stub.most_in_flight <= 3
    assert make_judge(stub).grade_many([]) == []


def test_summarize_counts_failures_apart():
    verdicts = [Verdict("correct"), Verdict("failed", "timeout"), Verdict("incorrect"), Verdict("correct")]
    assert summarize(verdicts) == {"correct": 2, "incorrect": 1, "failed": 1}
    assert summarize([]) == {"correct": 0, "incorrect": 0, "failed": 0}
    with pytest.raises(ValueError, match="label"):
        Verdict("maybe")


@pytest.mark.parametrize(
    "overrides, name",
    [
        ({"url": ""}, "judge.url"),
        ({"url": "127.0.0.1:8000/v1"}, "judge.url"),
        ({"model": ""}, "judge.model"),
        ({"timeout": 0}, "judge.timeout"),
        ({"max_retries": -1}, "judge.max_retries"),
        ({"workers": 0}, "judge.workers"),
    ],
)
def test_config_validation_names_the_field(overrides, name):
    with pytest.raises(ValueError, match=re.escape(name)):
        JudgeConfig(**{"url": "http://127.0.0.1:8000/v1", "model": MODEL, **overrides})


def test_wild_evaluation_counts_the_judges_verdicts_and_its_failures(stub):
    """The judge inside the WILD figures on a tiny model: the stub grades by containment, so a
    target the model itself says is correct and another is not; a judge that answers nonsense
    is counted as not correct and reported in judge_failed."""
    from lightning_alphaedit.evaluation import EvaluationConfig, evaluate
    from lightning_alphaedit.requests import EditRequest
    from lightning_alphaedit.targets import ModelTargets
    from lightning_alphaedit.tiny import TinyModelConfig, tiny_model_and_tokenizer
    from lightning_alphaedit.wild import WildConfig, answers

    model, tokenizer = tiny_model_and_tokenizer(TinyModelConfig(initializer_range=0.5))
    said = answers(model, tokenizer, ["The capital of Norway is"], "question", 12, 4)[0]
    assert said  # the test needs a non-empty answer to be contained
    requests = [EditRequest("0", "Norway", "The capital of {} is", said, None),
                EditRequest("1", "Norway", "The river of {} is", "zzzz", None)]
    config = EvaluationConfig(generation=False, wild=WildConfig(
        max_new_tokens=12, judge=JudgeConfig(url=stub.url, model=MODEL, timeout=2.0)))
    scores = evaluate(model, tokenizer, ModelTargets(model), requests, config, wild=True)
    assert scores["wild/question/efficacy_judge"] == 0.5 and scores["wild/question/judge_failed"] == 0.0
    assert [r["json"]["messages"][-1]["content"].count(said) >= 1 for r in stub.requests].count(True) >= 1

    stub.respond = lambda request: _reply("Perhaps.")
    scores = evaluate(model, tokenizer, ModelTargets(model), requests, config, wild=True)
    assert scores["wild/question/efficacy_judge"] == 0.0 and scores["wild/question/judge_failed"] == 1.0
