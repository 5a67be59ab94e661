"""`make bench`: how fast calhook is against the limit and against the usual recipe.

Everything runs on this machine in one go (``python -m bench.run``); the results land in
``bench/results/`` as Markdown, JSON and a PNG plot. See ``bench/README.md``.
"""
