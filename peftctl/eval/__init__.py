"""`peftctl eval`: base and adapters side by side on held-out data.

targets.py resolves what to evaluate, data.py reads the data file with the training code, run.py loads each base
once and computes loss and predictions, metrics.py scores predictions, stats.py compares targets with a paired
bootstrap, report.py prints and writes the results.
"""
