"""`peftctl generate ADAPTER_OR_MODEL [PROMPT]`: a quick look at what an adapter does.

ADAPTER_OR_MODEL is a run folder (its adapter/ is used), an adapter folder of any method (loaded on the base it
records, quantised as it was trained: a 4-bit-trained adapter gets its base in 4-bit), or a model folder such as
`peftctl merge`'s output. Without PROMPT, prompts are read from stdin, one per line.

stdout carries only the generated text, one line per prompt, so that outputs line up with inputs in a pipeline:
the continuation is decoded without special tokens, and a backslash, newline or carriage return in it is written
as \\\\, \\n or \\r (undo it with Python's `codecs.decode(line, "unicode_escape")` for ASCII text, or by replacing
those three). A blank input line gives a blank output line without generating. Decoding is greedy unless
--temperature is above 0; the base's own sampling defaults are not used.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from peftctl.adapter_folder import ADAPTER_INFO, adapter_in, trained_on
from peftctl.errors import InvalidInput, ModelNotFound
from peftctl.generation_config import for_decoding as generation_config
from peftctl.remote_code import RemoteCodeRefused, check_pinned, refusal

PROMPT_FORMATS = ("alpaca", "chat", "raw")


def run(source: str, prompt: str | None, *, chat: bool, max_new_tokens: int, temperature: float,
        prompt_format: str | None = None, jsonl: bool = False, trust_remote_code: bool = False) -> int:
    if prompt_format is not None and prompt_format not in PROMPT_FORMATS:
        raise InvalidInput(f"--format {prompt_format}: expected one of {', '.join(PROMPT_FORMATS)}")
    fmt = "chat" if chat else prompt_format or recorded_format(source)
    model, tokenizer = load_for_generation(source, trust_remote_code=trust_remote_code)
    if fmt == "chat" and not tokenizer.chat_template:
        raise InvalidInput(f"{source}: the tokenizer has no chat template, so --chat cannot be applied",
                           hint="drop --chat, or train with model.chat_template set (it is saved with the adapter)")
    config = generation_config(model, tokenizer, max_new_tokens, temperature)
    prompts = [prompt] if prompt is not None else _stdin_prompts(jsonl)
    for text in prompts:
        answer = generate_one(model, tokenizer, wrap_prompt(text, fmt), chat=fmt == "chat", config=config) \
            if text else ""
        sys.stdout.write((json.dumps(answer, ensure_ascii=False) if jsonl else escape_line(answer)) + "\n")
        sys.stdout.flush()
    return 0


def recorded_format(source: str) -> str:
    """The prompt format an adapter was trained with (run.json's dataset format, saved beside the adapter): alpaca
    prompts get Alpaca's preamble, chat ones the chat template; anything else, and a merged model, is raw."""
    path = Path(source)
    for folder in (path, path / "adapter"):
        try:
            recorded = json.loads((folder / ADAPTER_INFO).read_text()).get("prompt_format")
        except (OSError, ValueError):
            continue
        return recorded if recorded in ("alpaca", "chat") else "raw"
    return "raw"


def wrap_prompt(text: str, fmt: str) -> str:
    """The prompt as training rendered it up to where the answer starts (chat is wrapped by the template later)."""
    if fmt != "alpaca":
        return text
    from peftctl.data.formats import ALPACA_PREAMBLE

    return f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{text}\n\n### Response:\n"


def _stdin_prompts(jsonl: bool):
    """One prompt per line; with --jsonl each line is a JSON string or {"prompt": ...}, so a prompt may hold
    newlines."""
    for number, line in enumerate(sys.stdin, start=1):
        line = line.rstrip("\r\n")
        if not jsonl or not line.strip():
            yield line if not jsonl else ""
            continue
        try:
            value = json.loads(line)
        except ValueError as e:
            raise InvalidInput(f"stdin line {number}: not JSON ({e})",
                               hint='with --jsonl each line is a JSON string or {"prompt": "..."}') from None
        value = value.get("prompt") if isinstance(value, dict) else value
        if not isinstance(value, str):
            raise InvalidInput(f"stdin line {number}: expected a JSON string or an object with a \"prompt\" string")
        yield value


def escape_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def load_for_generation(source: str, *, trust_remote_code: bool = False):
    """(model in eval mode, tokenizer) for a run folder, an adapter folder or a model folder (or hub id). A model's
    own code runs only with `trust_remote_code` from the command line (see peftctl.remote_code)."""
    path = Path(source).absolute()
    if path.is_dir():
        adapter_dir = adapter_in(path)
        if adapter_dir is not None:
            return _adapter_on_base(adapter_dir, trust_remote_code)
        if (path / "config.json").exists():
            return _model(str(path), trust_remote_code)
        raise InvalidInput(f"{source}: neither a run folder, an adapter folder nor a model folder",
                           hint="pass RUN/, RUN/adapter or a merged model folder")
    if path.exists():
        raise InvalidInput(f"{source}: a file; expected a run, adapter or model folder")
    if Path(source).is_absolute() or source.startswith((".", "~")):
        raise ModelNotFound(f"{source}: no such folder", hint="pass RUN/, RUN/adapter or a merged model folder")
    check_pinned(source, None, trust_remote_code)
    return _model(source, trust_remote_code)  # a hub id (or a folder that does not exist: the loader says so)


def _model(name: str, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    from peftctl.model import disable_cpu_repacking, from_pretrained, pick_device

    device = pick_device()
    model = from_pretrained(AutoModelForCausalLM.from_pretrained, name, "model", dtype="auto",
                             device_map={"": str(device)}, trust_remote_code=trust_remote_code)
    if device.type == "cpu":
        disable_cpu_repacking(model)
    return model.eval(), _tokenizer(name, trust_remote_code=trust_remote_code)


def _adapter_on_base(adapter_dir: Path, trust_remote_code: bool = False):
    from types import SimpleNamespace

    from peftctl.generation_config import load_saved
    from peftctl.methods import runtime
    from peftctl.model import load_model, pick_device
    from peftctl.recipe.schema import ModelSection, QuantizationSection

    _, config = runtime.adapter_kind(adapter_dir)
    base = trained_on(adapter_dir, config,
                      hint="load it with peft yourself, or merge it with `peftctl merge --base MODEL`")
    # The adapter's own record of trust_remote_code is a stranger's say-so: it only words the refusal below.
    check_pinned(base.name, base.revision, trust_remote_code)
    recipe = SimpleNamespace(
        model=ModelSection(name=base.name, revision=base.revision, dtype=base.dtype,
                           trust_remote_code=trust_remote_code),
        quantization=QuantizationSection(**base.quantization) if base.quantization else None)
    try:
        model = runtime.load(load_model(recipe, pick_device()), adapter_dir)
    except RemoteCodeRefused:
        raise refusal(base.name, recorded=base.recorded_remote_code) from None
    model.generation_config = load_saved(adapter_dir) or model.generation_config  # the stop tokens it learned
    has_tokenizer = (adapter_dir / "tokenizer_config.json").exists()
    return model.eval(), _tokenizer(str(adapter_dir) if has_tokenizer else base.name, recipe.model.revision,
                                    trust_remote_code=trust_remote_code)


def _tokenizer(name: str, revision: str | None = None, *, trust_remote_code: bool = False):
    from peftctl.model import load_tokenizer
    from peftctl.recipe.schema import ModelSection

    return load_tokenizer(ModelSection(name=name, revision=None if Path(name).is_dir() else revision,
                                       trust_remote_code=trust_remote_code))


def generate_one(model, tokenizer, prompt: str, *, chat: bool, config) -> str:
    import torch

    if chat:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    input_ids = inputs["input_ids"].to(device)
    attention_mask = inputs["attention_mask"].to(device)
    if input_ids.shape[1] == 0:
        return ""
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
