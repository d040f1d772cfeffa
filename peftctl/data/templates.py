"""Built-in chat templates: the wire formats of the common instruct families, as Jinja text.

Each template renders, through `tokenizer.apply_chat_template`, exactly the string the family's own
tokenizer renders for a conversation of system/user/assistant messages with string contents. Where an
original template drops or refuses something, ours keeps the conversation instead, and says so:

- `chatml`: Qwen2.5-Instruct's format without its default system prompt ("You are Qwen, created by
  Alibaba Cloud...") that Qwen inserts when a conversation has none.
- `llama3`: Meta-Llama-3-8B-Instruct's format. Llama 3.1+ templates differ only in always opening with
  a system turn that carries "Cutting Knowledge Date: ... Today Date: ..." lines.
- `gemma`: Gemma / Gemma 2's format. Their templates raise on a system message; ours folds it into the
  first user turn followed by a blank line, as Gemma 3's template does.
- `mistral`: Mistral-7B-Instruct-v0.3's format (`[INST] ...[/INST] reply</s>`). v0.3's template puts
  the system message before the *last* user message and drops it when the conversation ends with an
  assistant reply (every training example); ours puts it before the first user message, so a
  conversation's rendering is a prefix of its continuation's and the system message always reaches
  the model.

The templates write their special tokens literally instead of using `bos_token` / `eos_token`: a built-in
names one format whatever tokenizer renders it; with the family's own tokenizer the text is the same.
None of them carries `{% generation %}` markers (real templates seldom do, and several non-HF renderers
reject the tag), so assistant spans are found by rendering turn by turn.

Render with `tokenize=False` and then tokenize with `add_special_tokens=False`: the rendered text already
starts with its BOS, and a tokenizer that adds one (Llama 3, Gemma, Mistral) would otherwise double it.
"""

from __future__ import annotations

from pathlib import Path

# Kept free of torch and transformers: `peftctl validate` resolves templates without loading either.

_CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

_LLAMA3 = (
    "{%- for message in messages %}"
    "{%- if loop.first %}{{- '<|begin_of_text|>' }}{%- endif %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

_GEMMA = (
    "{{- '<bos>' }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set first_user_prefix = '' %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{%- set role = 'model' %}{%- else %}{%- set role = message['role'] %}"
    "{%- endif %}"
    "{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '')"
    " + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<start_of_turn>model\\n' }}"
    "{%- endif %}"
)

_MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- '<s>' }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate"
    " user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}"
    "{{- '[INST] ' + message['content'] + '[/INST]' }}"
    "{%- endif %}"
    "{%- else %}"
    "{{- ' ' + message['content'] | trim + '</s>' }}"
    "{%- endif %}"
    "{%- endfor %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": _CHATML,
    "llama3": _LLAMA3,
    "gemma": _GEMMA,
    "mistral": _MISTRAL,
}

# The token that closes an assistant turn: it belongs to the trained span (the model must learn to stop),
# and it is not always the tokenizer's EOS (Llama 3's EOS is <|end_of_text|>).
END_OF_TURN: dict[str, str] = {
    "chatml": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "gemma": "<end_of_turn>",
    "mistral": "</s>",
}

# The tokens each template writes, which a tokenizer must hold as single special tokens.
SPECIAL_TOKENS: dict[str, list[str]] = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "gemma": ["<bos>", "<start_of_turn>", "<end_of_turn>"],
    "mistral": ["<s>", "</s>", "[INST]", "[/INST]"],
}


def resolve_template(value: str, base_dir: str | Path | None = None) -> str:
    """Return the Jinja text that `value` names: a built-in name, inline Jinja, or a file path.

    A relative path resolves from `base_dir` (the recipe's folder; the current directory when None).
    Raises FileNotFoundError, naming the built-ins, when `value` is none of these.
    """
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    # No file name holds these, and recipes may carry a short template inline.
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = Path(base_dir if base_dir is not None else Path.cwd()) / path
    if path.is_file():
        return path.read_text(encoding="utf-8")
    names = ", ".join(sorted(BUILTIN_TEMPLATES))
    raise FileNotFoundError(
        f"chat template {value!r} is neither a built-in template ({names}) nor an existing file ({path})"
    )
