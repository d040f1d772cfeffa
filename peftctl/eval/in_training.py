"""The recipe's `evaluation:` section: `train` checks its data before training and evaluates the finished adapter
(against its base unless compare_base is false) exactly as `peftctl eval base RUN --data ...` would."""

from __future__ import annotations

from peftctl.errors import PeftctlError
from peftctl.eval.evaluate import EvalOptions


def options_for(recipe) -> EvalOptions:
    """The evaluation's data is read like the training data: the dataset's format, fields, length and masking
    unless the section names a format of its own."""
    section, dataset = recipe.evaluation, recipe.dataset
    source = dataset.sources()[0]
    fmt = section.format or source.format
    fields = section.fields if section.fields is not None else (dict(source.fields) if fmt == source.format else {})
    return EvalOptions(data=section.data, format=fmt, fields=fields, metrics=section.metrics,
                       max_new_tokens=section.max_new_tokens, batch_size=section.batch_size,
                       max_length=dataset.max_length, limit=section.limit, system_prompt=dataset.system_prompt,
                       train_on_prompt=dataset.train_on_prompt,
                       trust_remote_code=recipe.model.trust_remote_code)  # the user's own recipe asked for it


def check_before_training(recipe, tokenizer) -> None:
    """Read the evaluation data and import any user metric now, so that a bad row or a misspelt metric stops the
    run before training rather than after it."""
    from peftctl.data.formats import FormatOptions
    from peftctl.eval import metrics as M
    from peftctl.eval.data import read_eval_data

    options = options_for(recipe)
    names = M.parse_metrics(options.metrics)
    for name in names:
        if name not in M.LOSS_METRICS:
            M.score_function(name)
    fmt = FormatOptions(options.format, dict(options.fields), options.train_on_prompt, options.system_prompt)
    read_eval_data(options.data, fmt, tokenizer, max_length=options.max_length, limit=options.limit)


def evaluate_run(recipe, run, say) -> dict:
    """The evaluation summary for run.json; a failure is recorded there too, then raised."""
    from peftctl.eval.evaluate import evaluate

    targets = (["base"] if recipe.evaluation.compare_base else []) + [str(run.adapter)]
    say(f"evaluating {' and '.join(targets)} on {recipe.evaluation.data}")
    try:
        return evaluate(targets, options_for(recipe), report=say).summary
    except PeftctlError as e:
        run.write_manifest({**run.read_manifest(), "evaluation": {"error": e.message}})
        e.hint = (e.hint + "; " if e.hint else "") + f"the adapter is saved in {run.adapter}: rerun the evaluation " \
            "with `peftctl eval`"
        raise
