"""Request bodies of the OpenAI-compatible routes, validated by pydantic.

Strict types: "0.5" is not a temperature and `true` is not a token count, as with OpenAI. Limits
that depend on the model (the context window, the number of heads, the vocabulary) are checked by
the app once the prompt is tokenized. Fields OpenAI has and mtplab does not use (penalties,
logprobs, user, ...) are accepted and ignored, so existing clients work unchanged.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

MAX_STOP = 4  # OpenAI's limit on stop strings
SPECULATION = ("tree", "chain", "off")  # the words `speculative` takes besides true and false


class _Sampling(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None  # None: the one model served
    max_tokens: int | None = Field(None, ge=1)  # None: the rest of the context window
    temperature: float | None = Field(None, ge=0, le=2)  # None: 0, greedy, as `mtplab generate`
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: dict | None = None
    n: int | None = Field(None, ge=1, le=1)  # one answer per request
    # mtplab extensions: speculation, "tree", "chain" or "off" (true: the server's default, on when
    # the model has heads; false: "off"), and its width
    speculative: bool | str | None = None
    n_draft: int | None = Field(None, ge=0)
    # looped trunks: this request's think loops (default: the server's); each count in use keeps a
    # KV cache of its own, hence the bound
    think_loops: int | None = Field(None, ge=1, le=32)

    @field_validator("speculative", mode="before")
    @classmethod
    def _speculation(cls, value):
        # before the union's own checks, which would name a member ("speculative.bool") for a 3
        if value is None or isinstance(value, bool) or (isinstance(value, str) and value in SPECULATION):
            return value
        raise PydanticCustomError("speculation", "must be true, false, 'tree', 'chain' or 'off', got {got}",
                                  {"got": repr(value)[:40]})

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return stops

    def check_stop(self) -> str | None:
        """An error message for a bad `stop`, or None."""
        stops = self.stop_strings()
        if len(stops) > MAX_STOP:
            return f"at most {MAX_STOP} stop strings, got {len(stops)}"
        if any(not s for s in stops):
            return "stop strings must not be empty"
        return None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
