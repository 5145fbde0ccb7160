"""``encore``, the platform's command-line tool: one click group (``cli.main``) with a module per command group
(``models``, ``ab``, ``bench``), the end-to-end road (``run``) and the one in-process Dagster job runner
(``jobs``). The top floor of the house: it may import every package below it, and nothing imports it."""
