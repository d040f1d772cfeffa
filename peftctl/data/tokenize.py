"""Tokenise a rendered row once, with labels that are -100 everywhere but the trained spans.

Labels are built from the character spans and the tokens' offsets, never from "input_ids == pad": pad may equal
EOS (Llama 3 has no pad token), and masking by value would hide every real EOS, so the model would never learn
to stop.
"""

from __future__ import annotations

IGNORE = -100


class Tokenized(dict):
    """input_ids, labels, length, n_trained, truncated; prompt_length (tokens before the first trained one, before
    truncation) and full_length (before truncation) say what a shorter max_length cut."""


def special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(token, "special", False):
            ids.add(token_id)
    return ids


def special_texts(tokenizer) -> list[str]:
    """The text of every special token, longest first: the strings that, met inside a row's own text, the
    tokenizer turns into control tokens."""
    texts = set(tokenizer.all_special_tokens)
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            texts.add(str(token))
    return sorted((t for t in texts if len(t) > 1), key=lambda t: (-len(t), t))


def special_text_in(row, pattern) -> str:
    """The first special token's text found in any string of a row (recursively), or "".

    Such text is encoded as the control token itself -- as the model's chat template does at inference -- so a
    user turn holding "<|eot_id|>" ends that turn early. Reported, not changed: whether it was meant is the
    data's owner's call."""
    if isinstance(row, str):
        found = pattern.search(row)
        return found.group(0) if found else ""
    values = row.values() if isinstance(row, dict) else row if isinstance(row, (list, tuple)) else ()
    for value in values:
        found = special_text_in(value, pattern)
        if found:
            return found
    return ""


def tokenize_rendered(rendered, tokenizer, max_length: int, eos_id: int, specials: set[int]) -> Tokenized:
    enc = tokenizer(rendered.text, add_special_tokens=not rendered.templated, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    labels = [token if trained else IGNORE for token, trained in zip(ids, _trained(offsets, rendered.spans))]

    if not rendered.templated:
        # Our own EOS ends every plain-text example; drop one the tokenizer may have appended (zero-width).
        if ids and ids[-1] == eos_id and offsets[-1][0] == offsets[-1][1]:
            ids.pop(), labels.pop()
        ids.append(eos_id)
        labels.append(eos_id)
    elif labels and _last_trained_is_plain(labels, specials, tokenizer):
        # A template that closes the assistant turn with no special token would never teach the model to stop.
        ids.append(eos_id)
        labels.append(eos_id)

    full_length = len(ids)
    prompt_length = next((i for i, label in enumerate(labels) if label != IGNORE and i > 0), full_length)
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if labels:
        labels[0] = IGNORE  # nothing predicts the first token; also keeps packed documents from predicting across
    n_trained = sum(1 for label in labels if label != IGNORE)
    return Tokenized(input_ids=ids, labels=labels, length=len(ids), n_trained=n_trained, truncated=truncated,
                     prompt_length=prompt_length, full_length=full_length)


def _trained(offsets, spans) -> list[bool]:
    """Whether each token starts inside a trained span. A zero-width token was added by the post-processor (BOS),
    not part of the text. One span (a completion, most instructions) is tested without a loop over the spans: this
    runs once per token of the dataset."""
    if len(spans) == 1:
        (a, b), = spans
        return [start != end and a <= start < b for start, end in offsets]
    return [start != end and any(a <= start < b for a, b in spans) for start, end in offsets]


def _last_trained_is_plain(labels: list[int], specials: set[int], tokenizer) -> bool:
    """Whether the last trained token that is not whitespace (ChatML trains "<|im_end|>\n") is ordinary text."""
    for label in reversed(labels):
        if label == IGNORE:
            continue
        if label in specials:
            return False
        if tokenizer.decode([label]).strip():
            return True
    return False
