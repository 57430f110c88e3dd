"""Other ways to run a job than the local one in ``batchrun.api.run_job``.

``batchrun.engines.ray.run_on_ray``: the rows are sent by actors of a Ray
cluster (``batchrun run --engine ray``, extra ``batchrun[ray]``). Each engine
checks the job, keeps the journal and writes the output exactly as ``run_job``
does; only the sending moves.
"""
