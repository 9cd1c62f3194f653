"""How the entity probe is trained and measured: the data builders, features, trainers and
evaluation. The runtime (``plugin``, ``monitor``, ``probe``, ``span_probe``, ``spans``,
``paper_probe``, ``logit_stats``) never imports this package."""

__all__: list[str] = []
