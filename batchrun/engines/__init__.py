"""How a job's rows get sent. Both engines open the run with
``lifecycle.OpenRun`` (checks, journal, resume, reuse), send only the rows it
says, and end with ``OpenRun.finish``; what they do around the sending
(signals, the stop message, progress and fsync, journaling each result, the
embedded endpoint for ``--mock``) is written once in ``engines.shell``.

- ``engines.local.run_job``: asyncio workers in this process (the default).
- ``engines.ray.run_on_ray``: Ray actors (``--engine ray``, ``batchrun[ray]``).
- ``engines.batch.run_batch_job``: a provider's Batch API (``mode = "batch"`` or
  ``"hybrid"``), reached through ``engines.local.run_job``; its online part is
  the local engine's.
"""
