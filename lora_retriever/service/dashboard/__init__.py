"""The dashboard: a browser client of the service's HTTP API, served by the service itself at ``/ui/``.

Plain HTML + ES modules + hand-written SVG charts under ``static/`` (no build step, nothing fetched from the
network at run time). Pages: Pool (adapters with their metadata, a 2-D PCA map of the retrieval keys, register /
delete), Try (retrieval with every adapter's similarity, the streamed answer, methods side by side), Train,
Jobs (live progress, loss curve, log tail, cancel), Merge, Evaluate (the paper's protocol as a job) and Sign-in
(an API key kept in the browser tab's ``sessionStorage``, sent as ``Authorization: Bearer``).

``mount_dashboard(app, engine, jobs, keys)`` serves the files and the few JSON routes the pages need that the
API itself lacks (``routes``); everything else the pages do goes through the public API.
"""

from lora_retriever.service.dashboard.routes import DASHBOARD_PATH, mount_dashboard

__all__ = ["DASHBOARD_PATH", "mount_dashboard"]
