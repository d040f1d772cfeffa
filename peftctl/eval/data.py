"""The evaluation data: read, rendered, tokenised and masked by the code that trains (peftctl.data), plus the
prompt and reference answer that generation needs.

Loss counts exactly the tokens training would train on (same format, fields, max_length, masking). For generation
the prompt is what a user would send: alpaca and prompt_completion rows up to the response, tokenised on their own;
chat rows up to their last assistant turn, rendered by the chat template with the generation prompt. The
reference is the response (the last assistant turn's text for chat). Completion rows have no prompt, so only
loss is measured on them. Bad rows stop with their file and line, like training's default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from peftctl.data.formats import FormatOptions, RowError, messages_of, render
from peftctl.data.prepare import parse_raw_row
from peftctl.data.sources import RAW, load_sources
from peftctl.data.tokenize import special_ids, tokenize_rendered
from peftctl.errors import DataError, InvalidInput


@dataclass
class Example:
    where: str  # "data.jsonl line 7": how messages and --out cite it
    input_ids: list[int]
    labels: list[int]
    n_trained: int
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    reference: str | None = None


@dataclass
class EvalData:
    path: str
    format: str
    examples: list[Example] = field(default_factory=list)
    truncated: int = 0
    skipped_no_trained_token: int = 0
    blank_lines: int = 0

    @property
    def generative(self) -> bool:
        return bool(self.examples) and all(e.prompt_ids is not None for e in self.examples)


def read_eval_data(path: str, options: FormatOptions, tokenizer, *, max_length: int, limit: int | None = None,
                   split: str = "train") -> EvalData:
    if options.format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise InvalidInput(f"{path}: chat data, and the tokenizer has no chat template",
                           hint="evaluate an adapter trained with model.chat_template (it is saved with it)")
    local = Path(path).expanduser()
    spec = str(local.absolute()) if local.exists() or path.startswith((".", "/", "~")) else path
    data = EvalData(spec, options.format)
    eos_id, specials = tokenizer.eos_token_id, special_ids(tokenizer)
    for source in load_sources(spec, split):
        raw = RAW in source.rows.column_names
        for i, row in enumerate(source.rows):
            if limit is not None and len(data.examples) >= limit:
                return data
            try:
                row = parse_raw_row(row[RAW]) if raw else row
                if row is None:
                    data.blank_lines += 1
                    continue
                rendered = render(row, options, tokenizer)
                tokens = tokenize_rendered(rendered, tokenizer, max_length, eos_id, specials)
                prompt, reference = _prompt_and_reference(row, options, tokenizer)
            except RowError as e:
                raise DataError(f"{source.where(i)}: {e}", hint="fix the row, or map columns with --field "
                                "NAME=COLUMN (the format's names: see `peftctl eval --help`)") from None
            except Exception as e:  # noqa: BLE001 - a chat template that raises on this conversation
                raise DataError(f"{source.where(i)}: the chat template refused this row: {e}") from None
            data.truncated += int(tokens["truncated"])
            if tokens["n_trained"] == 0:
                data.skipped_no_trained_token += 1
                continue
            example = Example(source.where(i), tokens["input_ids"], tokens["labels"], tokens["n_trained"],
                              prompt=prompt, reference=reference)
            if prompt is not None:
                example.prompt_ids = prompt_ids(prompt, tokenizer, templated=options.format == "chat")
            data.examples.append(example)
    if not data.examples:
        raise DataError(f"{path}: no usable examples ({data.blank_lines} blank, {data.skipped_no_trained_token} with "
                        "no trained token)", hint="check --format and --field against the file's columns")
    return data


def _prompt_and_reference(row: dict, options: FormatOptions, tokenizer) -> tuple[str | None, str | None]:
    if options.format in ("alpaca", "prompt_completion"):
        # The response span of the rendering without train_on_prompt starts where the prompt ends.
        rendered = render(row, dataclasses.replace(options, train_on_prompt=False), tokenizer)
        start = rendered.spans[0][0]
        return rendered.text[:start], rendered.text[start:]
    if options.format == "chat":
        messages = messages_of(row, options)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True) \
            if last else ""
        return prompt, messages[last]["content"]
    return None, None


def prompt_ids(prompt: str, tokenizer, *, templated: bool) -> list[int]:
    """The prompt's tokens as a user's request would have them: a chat rendering carries its own BOS; plain text
    gets the tokenizer's (never its trailing EOS, which would tell the model the text has ended)."""
    enc = tokenizer(prompt, add_special_tokens=not templated, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    if ids and ids[-1] == tokenizer.eos_token_id and offsets[-1][0] == offsets[-1][1]:
        ids.pop()
    return ids
