"""The online recommendation service (``app``: FastAPI) and how to start it as a process (``launch``)."""
