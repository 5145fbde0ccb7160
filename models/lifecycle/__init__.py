"""The lifecycle room: everything that touches MLflow, and the path of a model from training to champion.

It owns

- ``tracking``: the rule that finds the MLflow server (:func:`~models.lifecycle.tracking.tracking_uri`), one
  experiment per pipeline (``experiment_name``), the training run and its epochs, the scaling study's runs,
  the A/B report's run;
- ``registry``: the registered model and its aliases, named once by the settings' ``registry`` group
  (``ENCORE_REGISTRY__MODEL_NAME``, ``__CHALLENGER_ALIAS``, ``__CHAMPION_ALIAS``) for writers and readers
  alike; versions, tags (the gate's tag names included), the audited alias moves, loading a version;
- ``gate``: evaluating a trained recommender and the gate's decision from ``PromotionSettings``;
- ``promotion``: the gate's verdict recorded on a version, promotion (auto) or approval (manual), rollback;
- ``pyfunc``: the MLflow model file itself (Models From Code), which MLflow stores and loads on its own.

No module outside this package imports ``mlflow`` (``tests/test_architecture.py`` checks it). The package
imports nothing on its own: import the module you need.
"""
