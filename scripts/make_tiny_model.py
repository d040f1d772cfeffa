"""Write tiny causal-LM model folders (random weights, locally trained tokenizer) for tests and the demo.

The folders are ordinary model folders: `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load them with no network, through the same path real users take.
Each tokenizer carries the special tokens, BOS behaviour and chat template of its real family, so
tests meet the real pitfalls: Llama 3 has no pad token and ends a turn with <|eot_id|>, not its EOS;
Qwen's EOS is <|im_end|> and it adds no BOS; Llama 3, Gemma and Mistral add a BOS themselves.

    python scripts/make_tiny_model.py                           # the demo model: demo/tiny-llama
    python scripts/make_tiny_model.py --arch qwen2 --out /tmp/tiny-qwen2 --seed 1
    python scripts/make_tiny_model.py --arch all --out /tmp/tiny   # /tmp/tiny/tiny-<arch> for each

Importable (tests put scripts/ on sys.path): `make_tiny_model(arch, out, ...)`, `make_tokenizer(arch)`.
torch and transformers are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "demo" / "tiny-llama"
DEMO_DATA = REPO_ROOT / "recipes" / "data" / "demo.jsonl"

# At the usual 0.02 a tiny random model's frozen layers pass almost no signal and an adapter barely learns.
# Measured with LoRA r8 on q,v (lr 1e-2, 8 rows a step, 64 short sentences, 100 steps on CPU): std 0.02
# takes the loss from 6.94 to 6.51; 0.1 from 7.26 to 5.12; 0.2 from 8.20 to 4.67 (the data's unigram
# entropy: 4.65) and to 3.70 after 300 steps; 0.3 from 9.74 to 5.48. The other families rank alike.
DEFAULT_INIT_STD = 0.2

DEFAULT_SIZES: dict[str, int] = {
    "hidden": 64,
    "layers": 2,
    "heads": 4,
    "kv_heads": 2,  # ignored where the architecture has no grouped-query attention (gpt2)
    "intermediate": 128,
    "vocab": 1024,  # BPE vocabulary with the special tokens that open it; those at the end come on top
    "max_positions": 512,
}

_CORPUS_SEED = 1234  # the tokenizer depends on the architecture and corpus, never on the model seed

# Llama 3 (tiktoken) groups digits by up to three; Qwen2 splits every digit.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class Family:
    """What a real model family's tokenizer looks like, in the parts that matter to fine-tuning."""

    specials: tuple[str, ...]  # in id order
    specials_first: bool  # ids 0.. (SentencePiece families) or after the BPE vocabulary (tiktoken-like ones)
    bos: str | None
    eos: str
    pad: str | None = None
    unk: str | None = None
    template: str | None = None  # a name in peftctl.data.templates.BUILTIN_TEMPLATES
    adds_bos: bool = False  # the tokenizer puts BOS in front when add_special_tokens=True
    bos_flag: bool = False  # tokenizer_config.json says "add_bos_token": true (Gemma, Mistral; not Llama 3)
    generation_eos: tuple[str, ...] = ()  # generation stops at any of these
    split_regex: str | None = None  # pre-tokenizer split before the byte mapping; None: GPT-2's own
    nfc: bool = False  # NFC-normalise first (Qwen)
    config_extra: dict = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    # Llama 3 instruct: no pad token at all, and a turn ends with <|eot_id|>, which is not the EOS.
    "llama": Family(
        specials=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        specials_first=False, bos="<|begin_of_text|>", eos="<|end_of_text|>", template="llama3", adds_bos=True,
        generation_eos=("<|end_of_text|>", "<|eot_id|>"), split_regex=_LLAMA3_SPLIT,
        config_extra={"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
                      "tie_word_embeddings": False},
    ),
    # Qwen2.5-Instruct: no BOS, <|endoftext|> pads, <|im_end|> is the EOS; small sizes tie embeddings.
    "qwen2": Family(
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        specials_first=False, bos=None, eos="<|im_end|>", pad="<|endoftext|>", template="chatml",
        generation_eos=("<|im_end|>", "<|endoftext|>"), split_regex=_QWEN2_SPLIT, nfc=True,
        config_extra={"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                      "tie_word_embeddings": True},
    ),
    # Mistral-7B-Instruct-v0.3: control tokens [INST] [/INST] right after <unk> <s> </s>; no pad.
    "mistral": Family(
        specials=("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
        specials_first=True, bos="<s>", eos="</s>", unk="<unk>", template="mistral", adds_bos=True, bos_flag=True,
        generation_eos=("</s>",),
        config_extra={"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "sliding_window": None,
                      "tie_word_embeddings": False},
    ),
    # Gemma / Gemma 2: <pad>=0 <eos>=1 <bos>=2 <unk>=3, turns end with <end_of_turn>; embeddings tied.
    "gemma": Family(
        specials=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        specials_first=True, bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", template="gemma", adds_bos=True,
        bos_flag=True, generation_eos=("<eos>", "<end_of_turn>"), config_extra={"tie_word_embeddings": True},
    ),
    # GPT-2: a base model; <|endoftext|> is BOS, EOS and UNK at once, no pad, no chat template. Its 0.1
    # dropouts are zeroed, as every other family has none: train-mode forwards stay deterministic.
    "gpt2": Family(
        specials=("<|endoftext|>",), specials_first=False, bos="<|endoftext|>", eos="<|endoftext|>",
        unk="<|endoftext|>", generation_eos=("<|endoftext|>",),
        config_extra={"tie_word_embeddings": True, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    ),
}
# Phi-3's own chat format is not a built-in template: the phi3 model (fused qkv_proj / gate_up_proj,
# the point of having it) gets the ChatML tokenizer, untied as Phi-3 is.
FAMILIES["phi3"] = replace(FAMILIES["qwen2"], config_extra={"tie_word_embeddings": False})
FAMILIES["gemma2"] = FAMILIES["gemma"]

ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma", "gemma2", "gpt2", "phi3")


# --- corpus ----------------------------------------------------------------------------------------------

_NAMES = "Anna Ben Carla David Emma Felix Grace Hugo Iris Jack Kate Leo Maria Nora Oscar Paula Rosa Sam Tom".split()
_NOUNS = (
    "cat dog bird horse fish tree river house garden city road car train book letter table chair window door "
    "apple bread cheese water coffee tea music song story game ball box bag key phone computer model answer "
    "question problem idea plan teacher student doctor farmer friend child market school office bridge mountain"
).split()
_ADJECTIVES = "small big old new red green blue quiet loud happy sad quick slow bright dark warm cold long".split()
_VERBS = (
    "sees finds opens closes reads writes likes wants needs takes gives makes builds paints carries cleans "
    "moves shows helps calls"
).split()
_PLACES = "park kitchen station library forest beach village office garden market".split()
_TIMES = "today|yesterday|tomorrow|in the morning|at night|on Monday|on Friday|every day|last week|soon".split("|")
_TOPICS = "colours|animals|numbers|the weather|cooking|travel|music|history|science|sport".split("|")


_ONSETS = "b c d f g h k l m n p r s t v w z br ch cl dr fl gr pl sh st th tr".split()
_VOWELS = "a e i o u ai ea ee oo ou".split()


def _made_up_word(rng: random.Random) -> str:
    # Invented place names and terms give BPE enough distinct words to fill a vocabulary of a few thousand.
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3))) + rng.choice("nlrst ")


def _sentence(rng: random.Random) -> str:
    name, noun, adj = rng.choice(_NAMES), rng.choice(_NOUNS), rng.choice(_ADJECTIVES)
    town, term = _made_up_word(rng).strip().capitalize(), _made_up_word(rng).strip()
    verb, place, when = rng.choice(_VERBS), rng.choice(_PLACES), rng.choice(_TIMES)
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    forms = [
        f"{name} {verb} the {adj} {noun} in the {place}.",
        f"The {noun} is {adj} {when}.",
        f"{name} has {a} {noun}s and {b} books.",
        f"What is {a} plus {b}? It is {a + b}.",
        f"Why does {name} like the {noun}? Because it is {adj}!",
        f"In {1900 + a}, {name} moved to the {place}; {rng.choice(_NAMES)} stayed.",
        f'"{adj.capitalize()} {noun}," said {name}, "is not {rng.choice(_ADJECTIVES)}."',
        f"- {noun}: {a}\n- {rng.choice(_NOUNS)}: {b}",
        f"Step {a % 9 + 1}: {verb[:-1]} the {noun}.",
        f"{name} travels from {town} to the {place} to buy {term}.",
        f"A {term} is a kind of {adj} {noun} from {town}.",
    ]
    return rng.choice(forms)


def _conversation(rng: random.Random) -> list[dict[str, str]]:
    messages = []
    if rng.random() < 0.4:
        messages.append({"role": "system", "content": f"You are a {rng.choice(_ADJECTIVES)} assistant."})
    for _ in range(rng.randint(1, 2)):
        topic = rng.choice(_TOPICS)
        messages.append({"role": "user", "content": f"Tell me about {topic}. {_sentence(rng)}"})
        messages.append({"role": "assistant", "content": " ".join(_sentence(rng) for _ in range(2))})
    return messages


def _load_templates():
    """The peftctl.data.templates module, by path: this script must work before the package is installed."""
    path = REPO_ROOT / "peftctl" / "data" / "templates.py"
    spec = importlib.util.spec_from_file_location("_peftctl_templates", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _texts_from_file(path: Path) -> list[str]:
    """Every string value of a JSON / JSONL file, or the lines of any other text file."""
    raw = path.read_text(encoding="utf-8")
    if path.suffix not in (".json", ".jsonl"):
        return raw.splitlines()
    if path.suffix == ".jsonl":
        stack = [json.loads(line) for line in raw.splitlines() if line.strip()]
    else:
        stack = [json.loads(raw)]
    texts: list[str] = []
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return texts


def build_corpus(arch: str, extra: str | Path | Iterable[str] | None = None, size: int = 3000) -> list[str]:
    """Deterministic English-ish training text for the tokenizer, with the family's chat format around it.

    Special tokens are cut out of the rendered chats: they are added whole, never learnt as merges.
    `extra` (a file, or strings) is appended, e.g. the demo dataset so its words become single tokens.
    """
    rng = random.Random(_CORPUS_SEED)
    texts = [_sentence(rng) for _ in range(size)]
    texts += [
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{_sentence(rng)}\n\n### Response:\n{_sentence(rng)}"
        for _ in range(size // 20)
    ]
    family = FAMILIES[arch]
    if family.template:
        import jinja2

        template = jinja2.Environment().from_string(_load_templates().BUILTIN_TEMPLATES[family.template])
        split = re.compile("|".join(re.escape(s) for s in sorted(family.specials, key=len, reverse=True)))
        for _ in range(size // 10):
            try:
                rendered = template.render(messages=_conversation(rng), add_generation_prompt=False,
                                           raise_exception=_raise)
            except ValueError:  # a format that refuses this shape of conversation
                continue
            texts += [piece for piece in split.split(rendered) if piece]
    if isinstance(extra, (str, Path)):
        texts += _texts_from_file(Path(extra))
    elif extra is not None:
        texts += list(extra)
    return texts


def _raise(message: str):
    raise ValueError(message)


# --- tokenizer -------------------------------------------------------------------------------------------


def make_tokenizer(arch: str, corpus: str | Path | Iterable[str] | None = None, *, vocab: int = 1024,
                   max_positions: int = 512):
    """Train a byte-level BPE on `build_corpus(arch, corpus)` and dress it as `arch`'s real tokenizer.

    Returns a transformers fast tokenizer (not saved). Special tokens are single ids; BOS is added by the
    post-processor where the real family adds one; the family's built-in chat template is set.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    family = FAMILIES[_check_arch(arch)]
    tok = Tokenizer(models.BPE())
    # Byte-level BPE, so any text encodes. Mistral and Gemma really use SentencePiece; the stand-in keeps
    # their special tokens and BOS behaviour.
    if family.split_regex:
        # The exact pipeline of the real tokenizers, which transformers may rebuild on load (5.24 forces
        # Qwen2Tokenizer on a qwen2 folder whatever tokenizer_config.json says): what we train is what loads.
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(family.split_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if family.nfc:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(family.specials) if family.specials_first else [],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(build_corpus(arch, corpus), trainer)
    if not family.specials_first:
        tok.add_special_tokens(list(family.specials))
    byte_level = processors.ByteLevel(trim_offsets=False)
    if family.adds_bos:
        bos = (family.bos, tok.token_to_id(family.bos))
        template = processors.TemplateProcessing(
            single=f"{family.bos}:0 $A:0", pair=f"{family.bos}:0 $A:0 {family.bos}:1 $B:1", special_tokens=[bos]
        )
        tok.post_processor = processors.Sequence([byte_level, template])
    else:
        tok.post_processor = byte_level

    extra = {"add_bos_token": True} if family.bos_flag else {}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        unk_token=family.unk,
        model_max_length=max_positions,
        clean_up_tokenization_spaces=False,
        **extra,
    )
    others = [s for s in family.specials if s not in {family.bos, family.eos, family.pad, family.unk}]
    if others:
        tokenizer.add_special_tokens({"additional_special_tokens": others})
    if family.template:
        tokenizer.chat_template = _load_templates().BUILTIN_TEMPLATES[family.template]
    return tokenizer


def _check_arch(arch: str) -> str:
    if arch not in FAMILIES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return arch


# --- model -----------------------------------------------------------------------------------------------


def _config(arch: str, sizes: dict[str, int], vocab_size: int, init_std: float, token_ids: dict):
    from transformers import AutoConfig

    hidden, heads, kv_heads = sizes["hidden"], sizes["heads"], sizes["kv_heads"]
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads}), and heads of kv_heads ({kv_heads})")
    if arch == "gpt2":
        return AutoConfig.for_model(
            "gpt2", vocab_size=vocab_size, n_embd=hidden, n_layer=sizes["layers"], n_head=heads,
            n_inner=sizes["intermediate"], n_positions=sizes["max_positions"], initializer_range=init_std,
            **token_ids, **FAMILIES[arch].config_extra,
        )
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=sizes["layers"], num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=hidden // heads, intermediate_size=sizes["intermediate"],
        max_position_embeddings=sizes["max_positions"], initializer_range=init_std,
    )
    if arch == "gemma2":
        # Gemma 2's local layers see half its context, as 4096 of 8192 in the real model.
        common.update(sliding_window=sizes["max_positions"] // 2, query_pre_attn_scalar=hidden // heads)
    if arch == "phi3":
        common.pop("head_dim")
    return AutoConfig.for_model(arch, **common, **token_ids, **FAMILIES[arch].config_extra)


def _token_ids(tokenizer, family: Family) -> dict:
    ids = {name: tokenizer.convert_tokens_to_ids(tok) if tok else None
           for name, tok in (("bos_token_id", family.bos), ("eos_token_id", family.eos), ("pad_token_id", family.pad))}
    if ids["bos_token_id"] is None:  # Qwen's config names <|endoftext|> as its BOS though the tokenizer adds none
        ids["bos_token_id"] = tokenizer.convert_tokens_to_ids(family.pad) if family.pad else None
    return ids


def make_tiny_model(
    arch: str,
    out: str | Path,
    *,
    seed: int = 0,
    init_std: float = DEFAULT_INIT_STD,
    dtype: str = "float32",
    max_shard_size: int | str | None = None,
    shards: int | None = None,
    corpus: str | Path | Iterable[str] | None = None,
    **sizes: int,
) -> Path:
    """Write a tiny `arch` model folder at `out` (weights, config, generation config, tokenizer); return it.

    sizes: hidden, layers, heads, kv_heads, intermediate, vocab, max_positions (see DEFAULT_SIZES).
    Every Linear and Embedding weight is drawn from N(0, init_std), and `initializer_range` says so.
    `shards` splits the weights into that many safetensors files (or the nearest count above it that the
    tensor sizes allow; at most one file per tensor); `max_shard_size` sets the size per file directly.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    family = FAMILIES[_check_arch(arch)]
    unknown = set(sizes) - set(DEFAULT_SIZES)
    if unknown:
        raise TypeError(f"unknown size argument(s): {', '.join(sorted(unknown))}; known: {', '.join(DEFAULT_SIZES)}")
    sizes = {**DEFAULT_SIZES, **sizes}
    out = Path(out)

    tokenizer = make_tokenizer(arch, corpus, vocab=sizes["vocab"], max_positions=sizes["max_positions"])
    vocab_size = len(tokenizer)
    if arch in ("qwen2", "phi3"):
        # Qwen pads its embedding matrix past the tokenizer (151936 rows for 151665 tokens): code that
        # takes len(tokenizer) for the vocabulary size, or resizes to it, meets that here.
        vocab_size = math.ceil(vocab_size / 64) * 64
    token_ids = _token_ids(tokenizer, family)
    config = _config(arch, sizes, vocab_size, init_std, token_ids)
    config.dtype = dtype

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=token_ids["bos_token_id"],
        eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in family.generation_eos],
        pad_token_id=token_ids["pad_token_id"],
    )
    if shards and shards > 1 and max_shard_size is None:
        max_shard_size = _shard_size_for(model.state_dict(), shards)
    out.mkdir(parents=True, exist_ok=True)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    progress_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out, **save_kwargs)
    finally:
        if progress_bars:
            hf_logging.enable_progress_bar()
    _save_tokenizer(tokenizer, family, out)
    return out


def _shard_size_for(state_dict: dict, shards: int) -> int:
    """The largest max_shard_size that splits `state_dict` into at least `shards` files (exactly, where the
    tensor sizes allow), found by bisection with the splitter save_pretrained itself uses."""
    from huggingface_hub import split_torch_state_dict_into_shards

    def count(size: int) -> int:
        return len(split_torch_state_dict_into_shards(state_dict, max_shard_size=size).filename_to_tensors)

    low, high = 1, sum(t.numel() * t.element_size() for t in state_dict.values())
    while low < high:  # the count only falls as the size grows
        mid = (low + high + 1) // 2
        low, high = (mid, high) if count(mid) >= shards else (low, mid - 1)
    return low


def _save_tokenizer(tokenizer, family: Family, out: Path) -> None:
    tokenizer.save_pretrained(out)
    if family.bos_flag:
        # transformers does not write the flag back, but Gemma's and Mistral's files carry it, and on load
        # it rebuilds the BOS post-processor from it; Llama 3's files lack it though its tokenizer adds BOS.
        path = out / "tokenizer_config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        config.update(add_bos_token=True, add_eos_token=False)
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --- command line ----------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="llama", choices=[*ARCHITECTURES, "all"],
                        help="model family (default llama); 'all' writes OUT/tiny-<arch> for each")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"model folder (default {DEFAULT_OUT.relative_to(REPO_ROOT)} in the repository)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-std", type=float, default=DEFAULT_INIT_STD,
                        help=f"std of the random weights (default {DEFAULT_INIT_STD}; 0.02 barely trains an adapter)")
    for name, value in DEFAULT_SIZES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=value, dest=name)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shards", type=int, default=None,
                        help="split the weights into this many files (or the nearest count above)")
    parser.add_argument("--max-shard-size", default=None, type=lambda v: int(v) if v.isdigit() else v,
                        help="largest weights file, in bytes or like 200KB")
    parser.add_argument("--corpus", default=None,
                        help="extra tokenizer training text: a .jsonl/.json dataset (all its string values) or a "
                        "text file; default: the demo data when present (as the tests' tiny models); 'none': no extra")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    sizes = {name: getattr(args, name) for name in DEFAULT_SIZES}
    if args.corpus is None:
        corpus = DEMO_DATA if DEMO_DATA.is_file() else None
    elif args.corpus.lower() == "none":
        corpus = None
    else:
        corpus = Path(args.corpus)
        if not corpus.is_file():
            raise SystemExit(f"--corpus {args.corpus}: no such file")
    archs = ARCHITECTURES if args.arch == "all" else (args.arch,)
    for arch in archs:
        if args.arch == "all":
            out = (args.out or DEFAULT_OUT.parent) / f"tiny-{arch}"
        else:
            out = args.out or DEFAULT_OUT.parent / f"tiny-{arch}"
        start = time.perf_counter()
        make_tiny_model(arch, out, seed=args.seed, init_std=args.init_std, dtype=args.dtype, shards=args.shards,
                        max_shard_size=args.max_shard_size, corpus=corpus, **sizes)
        print(f"wrote {out} ({arch}, {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
