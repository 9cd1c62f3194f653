"""How the router is trained and measured: the facts, the judges, labelling a model pair,
the trainer and the evaluation. The runtime (``plugin``, ``monitor``, ``head``, ``local``,
``remote``) never imports this package."""

__all__: list[str] = []
