"""Row formats: check one row and render it as text plus the character spans that are trained.

Rendering to text and spans first (and tokenising later, once) keeps the loss mask exact whatever the tokenizer
does at the boundary between prompt and response. Chat rows go through the tokenizer's chat template, and the
assistant spans are found by rendering the conversation turn by turn and diffing the prefixes: most real
templates have no `{% generation %}` markers, so asking the tokenizer for an assistant mask returns zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")

ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes " \
                  "the request."
ALPACA_PREAMBLE_INPUT = "Below is an instruction that describes a task, paired with an input that provides further " \
                        "context. Write a response that appropriately completes the request."


class RowError(ValueError):
    """A row that cannot be used; the message says which field and why (the caller adds file and row)."""


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) character ranges that are trained
    templated: bool = False  # produced by a chat template: it carries its own BOS and end-of-turn tokens


@dataclass(frozen=True)
class FormatOptions:
    format: str
    fields: dict[str, str]
    train_on_prompt: bool = False
    system_prompt: str | None = None


def render(row: dict, options: FormatOptions, tokenizer=None) -> Rendered:
    """The text of one row and its trained spans; raises RowError for a row that does not fit the format."""
    if options.format == "alpaca":
        instruction = _text(row, options, "instruction")
        extra = _text(row, options, "input", required=False)
        output = _text(row, options, "output")
        preamble = options.system_prompt or (ALPACA_PREAMBLE_INPUT if extra else ALPACA_PREAMBLE)
        prompt = f"{preamble}\n\n### Instruction:\n{instruction}\n\n"
        prompt += f"### Input:\n{extra}\n\n### Response:\n" if extra else "### Response:\n"
        return _prompt_response(prompt, output, options)
    if options.format == "prompt_completion":
        prompt = _text(row, options, "prompt", required=False, allow_empty=True)
        return _prompt_response(prompt, _text(row, options, "completion"), options)
    if options.format == "completion":
        text = _text(row, options, "text")
        return Rendered(text, [(0, len(text))])
    if options.format == "chat":
        return render_chat(messages_of(row, options), tokenizer, options.train_on_prompt)
    raise ValueError(f"unknown format {options.format}")


def _prompt_response(prompt: str, response: str, options: FormatOptions) -> Rendered:
    text = prompt + response
    start = 0 if options.train_on_prompt else len(prompt)
    return Rendered(text, [(start, len(text))])


def _text(row: dict, options: FormatOptions, name: str, *, required: bool = True, allow_empty: bool = False) -> str:
    column = options.fields.get(name, name)
    value = row.get(column)
    if value is None:
        if required:
            raise RowError(f"missing field {column!r}" + (f" (the format's {name!r})" if column != name else ""))
        return ""
    if not isinstance(value, str):
        raise RowError(f"field {column!r} must be text, got {type(value).__name__}")
    if required and not allow_empty and not value.strip():
        raise RowError(f"field {column!r} is empty")
    return value


def messages_of(row: dict, options: FormatOptions) -> list[dict]:
    column = options.fields.get("messages", "messages")
    role_key = options.fields.get("role", "role")
    content_key = options.fields.get("content", "content")
    messages = row.get(column)
    if messages is None:
        raise RowError(f"missing field {column!r}")
    if not isinstance(messages, list) or not messages:
        raise RowError(f"field {column!r} must be a non-empty list of {{role, content}} messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RowError(f"message {i + 1} must be a mapping with {role_key!r} and {content_key!r}")
        role, content = message.get(role_key), message.get(content_key)
        if role not in ROLES:
            raise RowError(f"message {i + 1} has unknown role {role!r} (expected one of: {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise RowError(f"message {i + 1} ({role}) must have text {content_key!r}, got "
                           f"{type(content).__name__ if content is not None else 'nothing'}")
        if role == "assistant" and not content.strip():
            raise RowError(f"message {i + 1} (assistant) is empty")
        if role == "system" and i != 0:
            raise RowError(f"message {i + 1}: a system message may only come first")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise RowError("the conversation has no assistant message to learn from")
    if options.system_prompt and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": options.system_prompt})
    return out


# Stands in for a reply while locating where the template puts it; no real text holds it.
_REPLY_MARK = "\x00peftctl-reply\x00"


def render_chat(messages: list[dict], tokenizer, train_on_prompt: bool = False) -> Rendered:
    """Render through the chat template; an assistant span runs from where the template puts the reply (after the
    turn's header) to the end of the turn's rendering, so it includes the template's end-of-turn token."""
    def apply(msgs) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False)

    text = apply(messages)
    if train_on_prompt:
        return Rendered(text, [(0, len(text))], templated=True)
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        through = apply(messages[: i + 1])
        before = _reply_start(apply, messages[:i])
        if before is not None and text.startswith(through) and through.startswith(before) \
                and len(through) > len(before):
            spans.append((len(before), len(through)))
            cursor = len(through)
            continue
        # A template that rewrites earlier turns (not prefix-stable): find the reply itself and its end token.
        start = text.find(message["content"], cursor)
        if start < 0:
            raise RowError(f"message {i + 1}: the chat template does not reproduce the assistant's reply")
        end = start + len(message["content"])
        for token in _end_tokens(tokenizer):
            if text.startswith(token, end):
                end += len(token)
                break
        spans.append((start, end))
        cursor = end
    return Rendered(text, spans, templated=True)


def _reply_start(apply, history: list[dict]) -> str | None:
    """The rendering up to where the template writes the next assistant reply: the same for every turn, the first
    included (the render of no messages is empty, so a generation prompt cannot place a conversation's opening
    reply -- its header, and Llama 3's BOS, would be trained). A space just before the reply stays with it: BPE
    and sentencepiece vocabularies ("Ġword", "▁word") carry it in the reply's first token. None when the template
    drops the reply."""
    rendered = apply([*history, {"role": "assistant", "content": _REPLY_MARK}])
    at = rendered.find(_REPLY_MARK)
    return None if at < 0 else rendered[:at].rstrip(" ")


def _end_tokens(tokenizer) -> list[str]:
    tokens = [t for t in ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>") if t in tokenizer.get_vocab()]
    if tokenizer.eos_token:
        tokens.append(tokenizer.eos_token)
    return tokens
