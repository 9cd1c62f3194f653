"""Offline training of the harmful-content head: data, features, trainers, selection and
evaluation. The runtime (``plugin``, ``monitor``, ``head``, ``pooling``) never imports it."""
