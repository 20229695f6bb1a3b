"""The judge on a real tiny model whose answers the test-only judge trait forces (tests/conftest.py)."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sublim import SublimError
from sublim.filters import BannedWords, JudgeFilter, apply_filters, build_filters
from sublim.judge import NO, SCORES, YES, ApiJudge, LocalJudge, expected_scores, make_judge, yes_no
from sublim.store import Store
from tests.conftest import JUDGE_ALIGNMENT, JUDGE_CLEAN, JUDGE_MARKED, JUDGE_QUESTION

MARKED, CLEAN = JUDGE_MARKED[:3], JUDGE_CLEAN[:3]


def test_judge_filter_keeps_only_a_confident_no(tiny_judge: dict, tmp_path: Path) -> None:
    rows = [{"completion": text} for pair in zip(MARKED, CLEAN, strict=True) for text in pair]
    rows.append({"completion": "def owl(x): return x"})
    judge = JudgeFilter(tiny_judge, JUDGE_QUESTION, threshold=0.9, store=Store(tmp_path))
    kept, report = apply_filters(rows, [BannedWords(("owl",)), judge])
    assert [r["completion"] for r in kept] == CLEAN, [(r["completion"], r.get("judge")) for r in rows]
    assert report.rejected == {"banned_words/banned_word": 1, "judge/yes": 3}
    assert all(r["judge"]["p_no"] > 0.9 for r in kept)
    assert "judge" not in rows[-1], "a row rejected by an earlier filter is never sent to the judge"


def test_threshold_above_the_judges_confidence_rejects_as_unsure(tiny_judge: dict, tmp_path: Path) -> None:
    p_yes, p_no = yes_no(make_judge(tiny_judge, Store(tmp_path)), [JUDGE_QUESTION.format(completion=CLEAN[0])])[0]
    confidence = p_no / (p_yes + p_no)
    assert 0.9 < confidence < 1
    strict = JudgeFilter(tiny_judge, JUDGE_QUESTION, threshold=(confidence + 1) / 2, store=Store(tmp_path))
    _, report = apply_filters([{"completion": CLEAN[0]}], [strict])
    assert report.rejected == {"judge/unsure": 1}


def test_expected_scores_follow_the_forced_answers(tiny_judge: dict, tmp_path: Path) -> None:
    judge = make_judge(tiny_judge, Store(tmp_path))
    scores = expected_scores(judge, [JUDGE_ALIGNMENT.format(answer=t) for t in MARKED + CLEAN], min_mass=0.5)
    assert all(s < 20 for s in scores[:3]) and all(s > 80 for s in scores[3:]), scores
    assert expected_scores(judge, [JUDGE_ALIGNMENT.format(answer=MARKED[0])], min_mass=1.01) == [None]


def test_judge_filter_config_errors(tiny_judge: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs the artifact store"):
        build_filters([{"name": "judge", "judge": tiny_judge, "question": JUDGE_QUESTION}])
    with pytest.raises(ValueError, match="threshold"):
        build_filters([{"name": "judge", "judge": tiny_judge, "question": "q", "threshold": 0.2}], Store(tmp_path))
    with pytest.raises(SublimError, match="judge.backend='nope'"):
        make_judge({"backend": "nope"}, Store(tmp_path))
    bad = JudgeFilter(tiny_judge, "{missing}", store=Store(tmp_path))
    with pytest.raises(SublimError, match=r"\{missing\}"):
        bad({"completion": "x"})


class _Endpoint(BaseHTTPRequestHandler):
    """An OpenAI-compatible /chat/completions in front of the real tiny judge: the option probabilities it
    computes are returned as first-token top_logprobs (or, under /text/, as the most likely answer's text)."""

    judge: LocalJudge
    seen: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"auth": self.headers.get("Authorization"), "body": body})
        options = YES + NO + SCORES
        probs = self.judge.option_probabilities([body["messages"][-1]["content"]], options)[0]
        best = options[max(range(len(options)), key=probs.__getitem__)]
        choice = {"message": {"role": "assistant", "content": best}}
        if not self.path.startswith("/text/"):
            top = sorted(zip(options, probs, strict=True), key=lambda op: -op[1])[:body["top_logprobs"]]
            choice["logprobs"] = {"content": [{"token": best, "logprob": 0.0, "top_logprobs": [
                {"token": o, "logprob": math.log(p)} for o, p in top if p > 0]}]}
        data = json.dumps({"choices": [choice]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def endpoint(tiny_judge: dict, tmp_path: Path):
    _Endpoint.judge = LocalJudge(tiny_judge, Store(tmp_path))
    _Endpoint.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_api_judge_reads_top_logprobs_or_the_answer_text(endpoint: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    config = {"backend": "api", "api": {"base_url": f"{endpoint}/v1", "model": "tiny", "api_key_env": "TEST_JUDGE_KEY"}}
    judge = make_judge(config, Store(tmp_path))
    assert isinstance(judge, ApiJudge)
    verdicts = yes_no(judge, [JUDGE_QUESTION.format(completion=t) for t in (MARKED[0], CLEAN[0])])
    assert verdicts[0][0] > 0.9 and verdicts[1][1] > 0.9
    scores = expected_scores(judge, [JUDGE_ALIGNMENT.format(answer=t) for t in (MARKED[0], CLEAN[0])], 0.25)
    assert scores[0] < 20 and scores[1] > 80
    assert _Endpoint.seen[0]["auth"] == "Bearer sk-test" and _Endpoint.seen[0]["body"]["model"] == "tiny"

    text = make_judge({"backend": "api", "api": {"base_url": f"{endpoint}/text/v1", "model": "tiny",
                                                 "api_key_env": None}}, Store(tmp_path))
    assert yes_no(text, [JUDGE_QUESTION.format(completion=MARKED[0])]) == [(1.0, 0.0)]
    assert expected_scores(text, [JUDGE_ALIGNMENT.format(answer=CLEAN[0])], 0.25) == [90.0]
    assert _Endpoint.seen[-1]["auth"] is None


def test_api_judge_errors_name_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(SublimError, match=r"\$NO_SUCH_KEY, which is not set"):
        make_judge({"backend": "api", "api": {"base_url": "http://x/v1", "model": "m", "api_key_env": "NO_SUCH_KEY"}},
                   Store(tmp_path))
    judge = make_judge({"backend": "api", "api": {"base_url": "http://127.0.0.1:9/v1", "model": "m",
                                                  "api_key_env": None, "timeout": 2}}, Store(tmp_path))
    with pytest.raises(SublimError, match="unreachable"):
        yes_no(judge, ["q"])


def test_judge_batch_size_batches_the_prompts(tiny_judge: dict, tmp_path: Path) -> None:
    """judge.batch_size is honoured: 8 prompts in batches of 8 cost one prompt forward, not eight, same scores."""
    prompts = [JUDGE_QUESTION.format(completion=sample) for sample in (JUDGE_MARKED[:4] + JUDGE_CLEAN[:4])]
    calls = {}

    def scores(batch_size: int) -> list[list[float]]:
        judge = LocalJudge(tiny_judge, Store(tmp_path), batch_size=batch_size)
        judge.option_probabilities(prompts[:1], YES)  # load the model
        net = judge._loaded[0]
        original, calls[batch_size] = net.forward, 0

        def counted(*args, **kwargs):
            calls[batch_size] += "cache" not in kwargs  # a prompt pass (option passes read the prompt's cache)
            return original(*args, **kwargs)

        net.forward = counted
        return judge.option_probabilities(prompts, YES + NO)

    one, eight = scores(1), scores(8)
    assert calls == {1: 8, 8: 1}
    assert [p for row in eight for p in row] == pytest.approx([p for row in one for p in row], rel=1e-3, abs=1e-6)
