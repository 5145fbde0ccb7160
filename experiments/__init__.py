"""Online experiments, apart from the service that runs them: deterministic assignment (``assignment``), the
versioned experiment store with its audit log (``store``), and the offline analysis: per-user metrics
(``metrics``), the statistical tests (``stats``), the report (``report``) and its readout from the platform's
real sources (``readout``)."""
