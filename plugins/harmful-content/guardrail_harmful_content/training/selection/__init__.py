"""The leave-one-source-out selection as stages: ``features`` (the pool's cached states),
``data`` (the build's labels and splits), ``search`` (out-of-source scores per candidate),
``rule`` (the streaming rule on them) and ``record`` (figures, report and weights). The CLI is
``training/select.py``."""
