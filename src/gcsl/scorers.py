"""Text scorers behind one interface: ``name`` and ``score(texts) -> list[float | None]``.

Every scorer returns a value in [0, 1] per text, or ``None`` for a text it could not score, and
never raises because of a text (a model's output can be anything). After each call,
``last_reasons`` holds, per text, why it got ``None`` (``None`` for scored texts), so evaluators
can record the cause.

==========================  ===========================================================  =========
scorer                      measures                                                      needs
==========================  ===========================================================  =========
:class:`ProfanityScorer`    profanity (a linear SVM shipped in ``alt-profanity-check``)   offline
:class:`PerspectiveScorer`  Perspective API TOXICITY (the paper's scorer)                 network
:class:`DetoxifyScorer`     Detoxify toxicity (original / unbiased / multilingual)        extra
:class:`HFClassifierScorer` one class probability of any sequence classifier              model
:class:`VaderScorer`        VADER sentiment, compound mapped to [0, 1]                    offline
:class:`TextBlobScorer`     TextBlob (Pattern lexicon) polarity mapped to [0, 1]          offline
==========================  ===========================================================  =========

Scores from different scorers are not interchangeable: the profanity scorer in particular is
named for what it measures, so a report never passes it off as Perspective toxicity.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from gcsl.errors import ConfigError, MissingDependencyError, StageError

__all__ = [
    "ProfanityScorer",
    "PerspectiveScorer",
    "DetoxifyScorer",
    "HFClassifierScorer",
    "VaderScorer",
    "TextBlobScorer",
    "build_scorer",
    "SCORER_KINDS",
]

log = logging.getLogger(__name__)

PERSPECTIVE_URL = "https://commentanalyzer.googleapis.com/v1alpha1/comments:analyze"
SCORER_KINDS = ("profanity-check", "perspective", "detoxify", "hf", "vader", "textblob")


def _score_safely(texts: Sequence[Any], batch_fn: Callable[[list[str]], Sequence[float]],
                  batch_size: int) -> tuple[list[float | None], list[str | None]]:
    """Runs ``batch_fn`` over the valid texts; a failing batch is retried text by text.

    Non-text inputs and failures become ``None`` with a reason; non-finite or out-of-range
    values are refused too, so a broken model cannot leak NaN into a metric.
    """
    scores: list[float | None] = [None] * len(texts)
    reasons: list[str | None] = [None] * len(texts)
    valid = []
    for i, t in enumerate(texts):
        if isinstance(t, str):
            valid.append(i)
        else:
            reasons[i] = f"not text ({type(t).__name__})"

    def accept(i: int, value: Any) -> None:
        try:
            v = float(value)
        except (TypeError, ValueError):
            reasons[i] = f"scorer returned a non-number ({value!r})"
            return
        if not math.isfinite(v) or not -1e-6 <= v <= 1 + 1e-6:
            reasons[i] = f"scorer returned {v!r}, outside [0, 1]"
            return
        scores[i] = min(1.0, max(0.0, v))

    for start in range(0, len(valid), max(1, batch_size)):
        chunk = valid[start:start + batch_size]
        try:
            values = list(batch_fn([texts[i] for i in chunk]))
            if len(values) != len(chunk):
                raise ValueError(f"scorer returned {len(values)} values for {len(chunk)} texts")
        except Exception:  # noqa: BLE001 - one bad text must not sink its batch; retried alone below
            for i in chunk:
                try:
                    accept(i, list(batch_fn([texts[i]]))[0])
                except Exception as exc:  # noqa: BLE001 - a text the scorer cannot handle scores None
                    reasons[i] = f"scorer failed: {type(exc).__name__}: {str(exc)[:200]}"
            continue
        for i, v in zip(chunk, values):
            accept(i, v)
    return scores, reasons


class ProfanityScorer:
    """Probability that a text is profane, from ``alt-profanity-check`` (offline, milliseconds).

    It measures profanity, not Perspective-style toxicity: insults without swear words score low.

    >>> s = ProfanityScorer()
    >>> [round(x, 2) > 0.5 for x in s.score(["have a nice day", "fuck off"])]
    [False, True]
    """

    name = "profanity-check (profanity, not Perspective toxicity)"

    def __init__(self, batch_size: int = 256):
        try:
            import profanity_check
        except ImportError:
            raise MissingDependencyError.for_package("alt-profanity-check", "the profanity-check scorer",
                                                     "pip install 'gcsl[eval]'") from None
        self._predict = profanity_check.predict_prob
        self.batch_size = batch_size
        self.last_reasons: list[str | None] = []

    def score(self, texts: Sequence[str]) -> list[float | None]:
        scores, self.last_reasons = _score_safely(texts, lambda b: self._predict(b).tolist(), self.batch_size)
        return scores


class VaderScorer:
    """VADER sentiment mapped to [0, 1]: ``(compound + 1) / 2`` (positive), or one minus it (negative).

    >>> s = VaderScorer("positive")
    >>> s.score(["", "a great, wonderful film"])[0], s.score(["a great, wonderful film"])[0] > 0.5
    (0.5, True)
    """

    def __init__(self, direction: str = "positive"):
        if direction not in ("positive", "negative"):
            raise ConfigError(f"direction: {direction!r} is not one of positive, negative")
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise MissingDependencyError.for_package("vaderSentiment", "the VADER sentiment scorer",
                                                     "pip install 'gcsl[eval]'") from None
        self._analyzer = SentimentIntensityAnalyzer()
        self.direction = direction
        self.name = f"vader-{direction}"
        self.last_reasons: list[str | None] = []

    def _one(self, text: str) -> float:
        positive = (self._analyzer.polarity_scores(text)["compound"] + 1.0) / 2.0
        return positive if self.direction == "positive" else 1.0 - positive

    def score(self, texts: Sequence[str]) -> list[float | None]:
        scores, self.last_reasons = _score_safely(texts, lambda b: [self._one(t) for t in b], 64)
        return scores


class TextBlobScorer:
    """TextBlob polarity p in [-1, 1] mapped to [0, 1] as VaderScorer maps its compound.

    ``(p + 1) / 2`` for ``positive`` and ``(1 - p) / 2`` for ``negative``, so 1 is fully the goal's
    direction and a text without opinion words scores 0.5 under both scorers. The scorer is
    TextBlob's default PatternAnalyzer: a hand-built adjective lexicon (shipped inside the wheel,
    no corpus download) that averages word polarities with negation and intensifiers, so it shares
    neither lexicon nor rules with VADER and serves as an independent check of a VADER-trained goal.

    >>> s = TextBlobScorer("negative")
    >>> s.score(["", "The worst movie ever made."])
    [0.5, 1.0]
    """

    def __init__(self, direction: str = "positive"):
        if direction not in ("positive", "negative"):
            raise ConfigError(f"direction: {direction!r} is not one of positive, negative")
        try:
            from textblob.en.sentiments import PatternAnalyzer
        except ImportError:
            raise MissingDependencyError.for_package("textblob", "the TextBlob sentiment scorer",
                                                     "pip install 'gcsl[eval]'") from None
        self._analyzer = PatternAnalyzer()
        self.direction = direction
        self.name = f"textblob-{direction}"
        self.last_reasons: list[str | None] = []

    def _one(self, text: str) -> float:
        polarity = float(self._analyzer.analyze(text).polarity)
        return (1.0 + polarity) / 2.0 if self.direction == "positive" else (1.0 - polarity) / 2.0

    def score(self, texts: Sequence[str]) -> list[float | None]:
        scores, self.last_reasons = _score_safely(texts, lambda b: [self._one(t) for t in b], 64)
        return scores


class PerspectiveScorer:
    """Perspective API TOXICITY summary score (languages ["en"]), one request per text.

    The key is read from the environment variable ``key_env`` and sent in the ``X-Goog-Api-Key``
    header, never in the URL, so it cannot surface in an exception, a log line or a proxy log.
    Requests start at most ``requests_per_second`` apart (the API's default quota is 1 QPS).
    HTTP 429 and 5xx (and connection failures) are retried with exponential backoff
    (``backoff_base * 2**attempt`` seconds, or the server's Retry-After, capped at
    ``backoff_max``); after ``max_retries`` retries the text scores ``None``. A 400 (empty text,
    unsupported language, too long) scores ``None`` at once. A 401/403 stops with a ConfigError:
    every later request would fail the same way.

    >>> s = PerspectiveScorer()  # doctest: +SKIP
    >>> s.score(["you are wonderful"])  # doctest: +SKIP
    [0.02]
    """

    name = "perspective-toxicity"
    _RETRYABLE = {429, 500, 502, 503, 504}

    def __init__(self, *, key_env: str = "PERSPECTIVE_API_KEY", requests_per_second: float = 1.0,
                 max_retries: int = 5, backoff_base: float = 1.0, backoff_max: float = 60.0,
                 timeout: float = 30.0, url: str = PERSPECTIVE_URL, attribute: str = "TOXICITY",
                 languages: Sequence[str] = ("en",)):
        key = os.environ.get(key_env, "").strip()
        if not key:
            raise ConfigError(f"the Perspective scorer needs an API key in the environment variable {key_env}; "
                              f"export {key_env}=... (or choose another scorer)")
        if requests_per_second <= 0:
            raise ConfigError(f"requests_per_second: must be positive, got {requests_per_second!r}")
        self._key = key
        self._key_env = key_env
        self.min_interval = 1.0 / requests_per_second
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.timeout = timeout
        self.url = url
        self.attribute = attribute
        self.languages = list(languages)
        self._lock = threading.Lock()
        self._next_start = 0.0
        self.last_reasons: list[str | None] = []

    def _wait_turn(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_start)
            self._next_start = start + self.min_interval
        if start > now:
            time.sleep(start - now)

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        delay = self.backoff_base * (2 ** attempt)
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass  # an HTTP-date Retry-After: keep our own backoff
        return min(delay, self.backoff_max)

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "[redacted]")

    def _request(self, text: str) -> tuple[float | None, str | None]:
        body = json.dumps({"comment": {"text": text}, "languages": self.languages,
                           "requestedAttributes": {self.attribute: {}}, "doNotStore": True}).encode("utf-8")
        reason = None
        for attempt in range(self.max_retries + 1):
            self._wait_turn()
            req = urllib.request.Request(self.url, data=body, method="POST", headers={
                "Content-Type": "application/json", "X-Goog-Api-Key": self._key})
            retry_after = None
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    payload = json.loads(resp.read().decode("utf-8"))
                value = payload["attributeScores"][self.attribute]["summaryScore"]["value"]
                return float(value), None
            except urllib.error.HTTPError as exc:
                status = exc.code
                try:
                    detail = self._redact(exc.read().decode("utf-8", "replace")[:300])
                except Exception:  # noqa: BLE001 - the body is only for the message
                    detail = ""
                if status in (401, 403):
                    raise ConfigError(f"the Perspective API refused the key in {self._key_env} (HTTP {status}); "
                                      "check the key and that the API is enabled for its project") from None
                if status not in self._RETRYABLE:
                    return None, f"Perspective HTTP {status}: {_error_message(detail)}"
                reason = f"Perspective HTTP {status} after {attempt + 1} attempt(s)"
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                # refused, reset, timed out or cut off mid-response: all worth another try
                why = getattr(exc, "reason", exc)
                reason = f"Perspective unreachable ({self._redact(str(why))[:200]}) after {attempt + 1} attempt(s)"
            except (ValueError, KeyError, TypeError) as exc:
                return None, f"Perspective response without a {self.attribute} score ({type(exc).__name__})"
            if attempt < self.max_retries:
                delay = self._delay(attempt, retry_after)
                log.warning("%s; retrying in %.2f s", reason, delay)
                time.sleep(delay)
        return None, reason

    def score(self, texts: Sequence[str]) -> list[float | None]:
        scores: list[float | None] = []
        reasons: list[str | None] = []
        for t in texts:
            if not isinstance(t, str):
                scores.append(None)
                reasons.append(f"not text ({type(t).__name__})")
                continue
            if not t.strip():
                # Perspective answers 400 COMMENT_EMPTY; no need to spend quota on it
                scores.append(None)
                reasons.append("empty text")
                continue
            s, r = self._request(t)
            scores.append(s)
            reasons.append(r)
        self.last_reasons = reasons
        return scores


def _error_message(detail: str) -> str:
    try:
        return str(json.loads(detail)["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return detail[:200] or "no detail"


class DetoxifyScorer:
    """Detoxify's ``toxicity`` head (``original``, ``unbiased`` or ``multilingual`` checkpoint).

    Needs the ``detoxify`` extra; its checkpoints download from GitHub on first use.

    >>> s = DetoxifyScorer("original")  # doctest: +SKIP
    """

    def __init__(self, model_type: str = "original", *, device: str | None = None, batch_size: int = 32):
        try:
            from detoxify import Detoxify
        except ImportError:
            raise MissingDependencyError.for_package("detoxify", "the Detoxify scorer",
                                                     "pip install gcsl[detoxify]") from None
        try:
            self._model = Detoxify(model_type, device=device or "cpu")
        except Exception as exc:  # noqa: BLE001 - a failed checkpoint download is an environment problem
            raise StageError(f"could not load the Detoxify '{model_type}' checkpoint ({type(exc).__name__}: "
                             f"{str(exc)[:200]}); it downloads from GitHub on first use") from None
        self.name = f"detoxify-{model_type}"
        self.batch_size = batch_size
        self.last_reasons: list[str | None] = []

    def _batch(self, texts: list[str]) -> list[float]:
        out = self._model.predict(texts)["toxicity"]
        return [out] if isinstance(out, float) else list(out)

    def score(self, texts: Sequence[str]) -> list[float | None]:
        scores, self.last_reasons = _score_safely(texts, self._batch, self.batch_size)
        return scores


class HFClassifierScorer:
    """Probability of one class of any Hugging Face sequence classifier (path or hub id).

    ``label`` picks the class: a label name from the model's ``id2label`` (case-insensitive) or
    an index. Probabilities are a softmax over classes, or a sigmoid for multi-label models.
    Texts longer than ``max_length`` tokens are truncated.

    >>> s = HFClassifierScorer("s-nlp/roberta_toxicity_classifier", label="toxic")  # doctest: +SKIP
    """

    def __init__(self, model: str, *, label: str | int = "toxic", device: str | None = None,
                 batch_size: int = 16, max_length: int = 512):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(model)
            self._model = AutoModelForSequenceClassification.from_pretrained(model)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"could not load the sequence classifier {model!r} ({str(exc).splitlines()[0][:200]}); "
                              "give a local folder or a hub id of a sequence-classification model") from None
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._model.to(self._device).eval()
        cfg = self._model.config
        self._index = self._resolve_label(label, cfg.id2label, model)
        self._multi_label = getattr(cfg, "problem_type", None) == "multi_label_classification"
        if self._tokenizer.pad_token is None:
            # decoder classifiers (GPT-2 style) ship without one; batching needs it
            self._tokenizer.pad_token = self._tokenizer.eos_token
            cfg.pad_token_id = self._tokenizer.eos_token_id
        self.name = f"hf:{model}[{cfg.id2label.get(self._index, self._index)}]"
        self.batch_size = batch_size
        self.max_length = max_length
        self.last_reasons: list[str | None] = []

    @staticmethod
    def _resolve_label(label: str | int, id2label: dict[int, str], model: str) -> int:
        names = {str(v).lower(): int(k) for k, v in id2label.items()}
        if isinstance(label, int) or str(label).isdigit():
            idx = int(label)
            if idx in id2label or str(idx) in id2label:
                return idx
        elif str(label).lower() in names:
            return names[str(label).lower()]
        raise ConfigError(f"label: {label!r} is not a class of {model!r}; its classes are "
                          f"{', '.join(f'{k}={v}' for k, v in sorted(id2label.items()))}")

    def _batch(self, texts: list[str]) -> list[float]:
        import torch

        enc = self._tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt").to(self._device)
        with torch.no_grad():
            logits = self._model(**enc).logits.float()
        probs = torch.sigmoid(logits) if self._multi_label else torch.softmax(logits, dim=-1)
        return probs[:, self._index].tolist()

    def score(self, texts: Sequence[str]) -> list[float | None]:
        scores, self.last_reasons = _score_safely(texts, self._batch, self.batch_size)
        return scores


def build_scorer(kind: str, **options: Any):
    """A scorer by kind: ``profanity-check``, ``perspective``, ``detoxify``, ``hf``, ``vader`` or ``textblob``.

    Options go to the scorer's constructor (``model=`` for ``hf``, ``model_type=`` for
    ``detoxify``, ``direction=`` for ``vader`` and ``textblob``; ``None`` values are left at
    their defaults).

    >>> build_scorer("vader", direction="negative").name
    'vader-negative'
    """
    options = {k: v for k, v in options.items() if v is not None}
    if kind == "profanity-check":
        return ProfanityScorer(**options)
    if kind == "perspective":
        return PerspectiveScorer(**options)
    if kind == "detoxify":
        return DetoxifyScorer(**options)
    if kind == "vader":
        return VaderScorer(**options)
    if kind == "textblob":
        return TextBlobScorer(**options)
    if kind == "hf":
        if not options.get("model"):
            raise ConfigError("the hf scorer needs a model: set the classifier's folder or hub id")
        return HFClassifierScorer(options.pop("model"), **options)
    raise ConfigError(f"scorer: {kind!r} is not one of {', '.join(SCORER_KINDS)}")
