"""`peftctl inspect-data RECIPE`: examples exactly as the model will see them, before a GPU hour is spent.

Trained tokens are shown apart from masked ones (green in a terminal, «between guillemets» in a pipe), special
tokens such as EOS are shown as themselves, and a length histogram says how much was truncated and packed.
Wrong templates, a model that never stops and training on the prompt by accident all show up here.
"""

from __future__ import annotations


def run(recipe_path: str, sets: list[str], n: int) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.text import Text

    from peftctl.data.prepare import prepare
    from peftctl.data.tokenize import IGNORE
    from peftctl.model import load_tokenizer
    from peftctl.recipe.loader import load_recipe

    loaded = load_recipe(recipe_path, sets)
    recipe = loaded.recipe
    tokenizer = load_tokenizer(recipe.model, base_dir=loaded.base_dir)
    # Examples left with no trained token are shown too (training skips them): seeing them is how one finds out why.
    data = prepare(recipe.dataset, tokenizer, seed=recipe.training.seed, pad_id=tokenizer.pad_token_id,
                   keep_untrained=True)
    console = Console(highlight=False, soft_wrap=True)
    styled = console.is_terminal
    examples = data.train.examples
    legend = "[green]trained[/] / [dim]masked[/]" if styled else "«trained» / masked"
    console.print(f"{min(n, len(examples))} of {len(examples):,d} training examples ({legend}); "
                  f"EOS is {escape(repr(tokenizer.eos_token))}, pad is {escape(repr(tokenizer.pad_token))}\n")
    for i in range(min(n, len(examples))):
        ids, labels = examples[i]["input_ids"], examples[i]["labels"]
        text = Text()
        for trained, run_ids in _runs(ids, labels, IGNORE):
            piece = tokenizer.decode(run_ids, skip_special_tokens=False)
            if styled:
                text.append(piece, style="green" if trained else "dim")
            else:
                text.append(f"«{piece}»" if trained else piece)
        trained_count = sum(1 for label in labels if label != IGNORE)
        console.print(f"[bold]example {i + 1}[/]: {len(ids)} tokens, {trained_count} trained")
        console.print(text)
        console.print()
    _summary(console, data, recipe.dataset.max_length)
    return 0


def _runs(ids, labels, ignore):
    current, state = [], None
    for token, label in zip(ids, labels):
        trained = label != ignore
        if state is not None and trained != state:
            yield state, current
            current = []
        state = trained
        current.append(token)
    if current:
        yield state, current


def _summary(console, data, max_length: int) -> None:
    from rich.markup import escape

    stats = data.train.stats
    lengths = list(data.train.examples["length"])
    buckets = 8
    width = max(1, -(-max_length // buckets))
    counts = [0] * buckets
    for length in lengths:
        counts[min(buckets - 1, (length - 1) // width)] += 1
    top = max(counts) or 1
    console.print("[bold]length histogram[/] (tokens per example)")
    for b, count in enumerate(counts):
        bar = "#" * max(1 if count else 0, round(30 * count / top))
        console.print(f"  {b * width + 1:>6}-{min(max_length, (b + 1) * width):<6} {count:>7,d} {bar}")
    rows = len(data.train.rows)
    console.print(f"examples {stats.examples:,d} · tokens {stats.tokens:,d} (trained {stats.trained_tokens:,d}) · "
                  f"truncated {stats.truncated:,d} · with no trained token (training skips them) "
                  f"{stats.skipped_no_trained_token:,d} · bad rows {stats.bad_rows:,d}")
    if data.packed:
        fill = stats.tokens / max(1, rows * max_length)
        console.print(f"packed into {rows:,d} rows of {max_length} tokens: {stats.examples / max(1, rows):.1f} "
                      f"examples per row, {100 * fill:.1f}% filled")
    else:
        console.print(f"not packed: {rows:,d} rows, one example each")
    cut = stats.cut_note(max_length)
    if cut:
        console.print(f"[yellow]{escape(cut)}[/] (training skips them)")
    for line in stats.bad_examples[:5]:
        console.print(f"[yellow]bad row[/] {escape(line)}")  # a row may hold text that looks like markup
    if stats.special_text_rows:
        console.print(f"[yellow]{stats.special_text_rows:,d} example(s) hold a special token's text[/] in their own "
                      "text, encoded as that control token (as the chat template does at inference):")
        for line in stats.special_text_examples[:5]:
            console.print(f"  {line}", markup=False, highlight=False)
